"""``sandboxd doctor`` run for real: clean against a healthy server's data dir (exit 0), then
against a data dir broken on purpose the ways the seeds describe, where every one of those checks
must fail with its fix and the exit code must be 1.

The broken setup: ``base`` pointing at another template's build (stale), that build's envd
started by a wrapper passing a flag its launcher does not know (seed 000) — which also breaks its checksum —, a real QEMU
given a template file as its disk (seed 004), a leftover network namespace, a runsc platform
that cannot start and a server that does not answer.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sandboxd.config import Settings
from sandboxd.store.db import Database
from sandboxd.templates.base import build_tiny
from sandboxd.templates.store import TemplateStore, remove_tree
from sandboxd.testing.server import Server, _env, free_port, running_server

pytestmark = pytest.mark.slow


def doctor(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("sandboxd")
    return subprocess.run([str(exe), "doctor", *args], env=_env(settings), capture_output=True, text=True,
                          timeout=600)


def findings(out: str) -> dict[str, list[tuple[str, str, str | None]]]:
    """check name -> [(status, detail, fix)] parsed from doctor's output."""
    result: dict[str, list[tuple[str, str, str | None]]] = {}
    last = None
    for line in out.splitlines():
        if m := re.match(r"^\[(ok  |warn|FAIL)\] ([^:]+): (.*)$", line):
            last = [m.group(1).strip(), m.group(3), None]
            result.setdefault(m.group(2), []).append(last)  # type: ignore[arg-type]
        elif (m := re.match(r"^\s+fix: (.*)$", line)) and last is not None:
            last[2] = m.group(1)
    return {k: [tuple(v) for v in vs] for k, vs in result.items()}  # type: ignore[misc]


@pytest.fixture(scope="module")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """With a warm pool of one: its sandbox has no record, and must not count as a leftover."""
    with running_server(data_dir, tmp_path_factory.mktemp("doctor") / "server.log", warm_pool_size=1) as srv:
        yield srv


def test_healthy_server_passes(server: Server) -> None:
    for _ in range(600):
        if httpx.get(f"{server.url}/health", timeout=5).json().get("warmPoolReady") == 1:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the warm pool did not fill")
    proc = doctor(server.settings, "--url", server.url)
    found = findings(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for check in ("root", "gVisor (runsc)", "QEMU", "namespaces", "nftables", "data dir", "free disk",
                  "base template", "checksums", "envd starts", "VM disks", "leftovers", "server"):
        assert check in found and all(s == "ok" for s, _, _ in found[check]), (check, proc.stdout)
    assert "(current recipe and envd)" in found["base template"][0][1]
    assert "1 without a record are the running server's warm pool" in found["leftovers"][0][1]


@pytest.fixture
def broken(data_dir: Path) -> Iterator[tuple[Settings, dict[str, object]]]:
    """A data dir of its own (own template store: its build gets broken) and the host state to undo."""
    shared = TemplateStore(data_dir / "templates")
    tiny = build_tiny(shared, lambda _: None)  # cached after the first run
    root = Path(tempfile.mkdtemp(prefix="doctor-", dir=data_dir))
    prefix = "dr" + os.urandom(2).hex()
    settings = Settings.from_env({}, data_dir=root, port=free_port(), net_prefix=prefix, gvisor_platform="nonexistent")
    (root / "templates").mkdir()
    subprocess.run(["cp", "-a", str(shared.path(tiny.build_id)), str(root / "templates" / tiny.build_id)], check=True)
    undo: dict[str, object] = {"build_id": tiny.build_id, "netns": f"{prefix}-7"}
    try:
        yield settings, undo
    finally:
        if isinstance(vm := undo.get("vm"), subprocess.Popen):
            vm.kill()
            vm.wait()
        subprocess.run(["ip", "netns", "del", str(undo["netns"])], capture_output=True)
        remove_tree(root)


def test_broken_setup_fails_with_fixes(broken: tuple[Settings, dict[str, object]]) -> None:
    settings, undo = broken
    build_id = str(undo["build_id"])
    store = TemplateStore(settings.templates_dir)
    Database(settings.db_url).set_template("base", build_id)  # base -> tiny's build: stale
    # seed 000: envd's launcher became a wrapper passing a flag the real binary does not know
    # (the build's checksum breaks too)
    launcher = store.path(build_id) / "rootfs" / "opt/sandboxd/bin/tini"
    os.chmod(launcher.parent, 0o755)
    launcher.rename(launcher.with_name("tini.real"))
    launcher.write_text('#!/bin/sh\nexec /opt/sandboxd/bin/tini.real --debug "$@"\n')
    launcher.chmod(0o755)
    # seed 004: a VM whose disk is a file in the template store
    image = settings.templates_dir / build_id / "meta.json"
    undo["vm"] = subprocess.Popen(
        ["qemu-system-x86_64", "-name", "guest=sandboxd-doctortest", "-M", "microvm", "-S", "-nodefaults",
         "-display", "none", "-drive", f"file={image},format=raw,readonly=on,if=none,id=d0",
         "-device", "virtio-blk-device,drive=d0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["ip", "netns", "add", str(undo["netns"])], check=True)
    dead_url = f"http://127.0.0.1:{free_port()}"
    _wait_for_vm()

    proc = doctor(settings, "--url", dead_url)
    found = findings(proc.stdout)
    assert proc.returncode == 1, proc.stdout + proc.stderr

    def failed(check: str) -> tuple[str, str | None]:
        bad = [(d, fix) for s, d, fix in found.get(check, []) if s == "FAIL"]
        assert bad, f"{check} did not fail:\n{proc.stdout}"
        return bad[0]

    detail, fix = failed("gVisor (runsc)")
    assert "platform nonexistent" in detail and "ptrace" in (fix or "")
    detail, fix = failed("base template")
    assert detail.startswith("stale") and fix and "sandboxd template build-base" in fix
    detail, fix = failed("checksums")
    assert build_id in detail and fix and "sandboxd cache verify" in fix
    detail, fix = failed("envd starts")
    assert build_id in detail and "did not answer GET /health" in detail and fix
    detail, fix = failed("VM disks")
    assert "doctortest" in detail and "template storage" in detail and fix and "kill" in fix
    detail, fix = failed("leftovers")
    assert fix and f"ip netns del {undo['netns']}" in fix
    detail, fix = failed("server")
    assert dead_url in detail and fix and "sandboxd serve" in fix
    assert all(s == "ok" for s, _, _ in found["namespaces"] + found["data dir"]), proc.stdout


def _wait_for_vm() -> None:
    """The paused QEMU's process carries its name once it is exec'd."""
    from sandboxd.doctor.sandboxes import qemu_processes

    for _ in range(100):
        if any(sid == "doctortest" for _, sid, _ in qemu_processes()):
            return
        time.sleep(0.1)
    raise AssertionError("the test VM did not start")


def test_a_full_or_read_only_data_dir_fails(tmp_path: Path) -> None:
    """A data dir on an 8 MiB filesystem (real tmpfs) has too little room; remounted read-only,
    it cannot be written at all."""
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(data)], check=True)
    try:
        settings = Settings.from_env({}, data_dir=data, port=free_port(), net_prefix="dr" + os.urandom(2).hex())
        Database(settings.db_url).engine.dispose()  # a server ran here once (and closed its database)
        found = findings((proc := doctor(settings, "--quick")).stdout)
        assert proc.returncode == 1, proc.stdout
        (status, detail, fix), = found["free disk"]
        assert status == "FAIL" and "under 1024 MiB" in detail and fix, proc.stdout
        subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)
        found = findings((proc := doctor(settings, "--quick")).stdout)
        (status, detail, fix), = found["data dir"]
        assert status == "FAIL" and "not writable" in detail and fix and "remount,rw" in fix, proc.stdout
    finally:
        subprocess.run(["umount", "-l", str(data)], check=True)


def test_missing_programs_fail_with_the_package_to_install(tmp_path: Path) -> None:
    """With none of the host's programs on PATH (as on a machine where nothing was installed)."""
    settings = Settings.from_env({}, data_dir=tmp_path, port=free_port())
    exe = Path(sys.executable).with_name("sandboxd")
    proc = subprocess.run([str(exe), "doctor", "--quick"], env={**_env(settings), "PATH": str(tmp_path / "empty")},
                          capture_output=True, text=True, timeout=120)
    found = findings(proc.stdout)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (status, detail, fix), = found["host tools"]
    assert status == "FAIL" and "debootstrap" in detail and fix and fix.startswith("apt-get install -y ")
    assert {"debootstrap", "e2fsprogs", "nftables", "iproute2"} <= set(fix.split()), fix
    assert found["gVisor (runsc)"][0][0] == "FAIL" and found["gVisor (runsc)"][0][2] == "apt-get install -y runsc"
    assert found["QEMU"][0][0] == "FAIL" and "qemu-system-x86" in (found["QEMU"][0][2] or "")
    assert found["nftables"][0][0] == "FAIL" and found["namespaces"][0][0] == "FAIL"
