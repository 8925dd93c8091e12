"""The gVisor runtime with real runsc, real template builds, overlays and network slots."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from gvisor_helpers import Sandbox, assert_no_traces, processes_mentioning, wait_health

from sandboxd.orchestrator.network import NetworkError, SlotPool
from sandboxd.orchestrator.rootfs import mount_overlay, unmount_overlay
from sandboxd.runtimes.base import CONSOLE_TAIL_BYTES, RuntimeSpec, RuntimeStartError
from sandboxd.runtimes.gvisor import GVisorRuntime, build_statx_shim, platform_failure, probe_platform
from sandboxd.templates.store import Build, TemplateStore


@pytest.mark.slow
def test_envd_answers_through_the_slot_and_stop_leaves_nothing(
        runtime: GVisorRuntime, sandboxes: Callable[..., Sandbox], slot_pool: SlotPool, tiny_build: Build) -> None:
    sbx = sandboxes(tiny_build)
    sid = sbx.spec.sandbox_id
    assert sid in runtime.running()
    assert processes_mentioning(sid)
    took = wait_health(sbx.slot.host_address)
    print(f"tiny: runsc create+start {sbx.start_seconds:.3f} s, envd /health after {took:.3f} s more")

    # While it runs, gVisor owns the guest address: re-adding it would make the kernel RST.
    with pytest.raises(NetworkError, match="in use"):
        slot_pool.restore_guest_address(sbx.slot)

    console = runtime.console_log(sbx.spec.sandbox_dir)
    assert "envd" in console and "ready" in console

    runtime.stop(sid)
    assert_no_traces(runtime, sid)
    runtime.stop(sid)  # idempotent

    # The slot is reusable once its guest address is back (runsc stripped it at start).
    slot_pool.restore_guest_address(sbx.slot)
    again = sandboxes(tiny_build, slot=sbx.slot)
    wait_health(again.slot.host_address)


@pytest.mark.slow
def test_base_template_coreutils_limits_and_writes(
        runtime: GVisorRuntime, sandboxes: Callable[..., Sandbox], base_build: Build,
        template_store: TemplateStore) -> None:
    sbx = sandboxes(base_build, memory_mb=256, cpu_count=1)
    sid = sbx.spec.sandbox_id
    took = wait_health(sbx.slot.host_address)
    print(f"base: runsc create+start {sbx.start_seconds:.3f} s, envd /health after {took:.3f} s more")

    ls = runtime.exec(sid, "ls", "-l", "/")  # statx(AT_NO_AUTOMOUNT) → EINVAL without the shim
    assert ls.returncode == 0, ls.stderr
    assert " etc" in ls.stdout and "root root" in ls.stdout
    st = runtime.exec(sid, "stat", "/etc/passwd")
    assert st.returncode == 0 and "regular file" in st.stdout, st.stderr
    missing = runtime.exec(sid, "stat", "/nonexistent")  # errors still reach errno through the shim
    assert missing.returncode != 0 and "No such file or directory" in missing.stderr

    meminfo = runtime.exec(sid, "cat", "/proc/meminfo").stdout
    assert re.search(r"^MemTotal:\s+262144 kB$", meminfo, re.M), meminfo[:200]
    quota = Path(f"/sys/fs/cgroup/cpu/{sid}/cpu.cfs_quota_us")  # cgroup v1 (this host's layout)
    if quota.exists():
        assert quota.read_text().strip() == "100000"

    assert runtime.exec(sid, "sh", "-c", "echo hi > /root/written && rm /etc/hostname").returncode == 0
    assert (sbx.rootfs.upper / "root" / "written").read_text() == "hi\n"
    assert (base_build.rootfs / "etc" / "hostname").exists()
    runtime.stop(sid)
    assert template_store.verify(base_build.build_id)  # guarantee 1: the template's checksum holds


@pytest.mark.slow
def test_failed_start_says_why_and_leaves_nothing(
        runtime: GVisorRuntime, slot_pool: SlotPool, tiny_build: Build, tmp_path: Path) -> None:
    ov = mount_overlay(tiny_build.rootfs, tmp_path / "bad")
    slot = slot_pool.acquire()
    spec = RuntimeSpec(sandbox_id=f"tbad{secrets.token_hex(4)}", rootfs=ov.merged, sandbox_dir=tmp_path / "bad",
                       netns_path=slot.guest_netns_path, argv=["/nonexistent"], env={})
    try:
        with pytest.raises(RuntimeStartError) as err:
            runtime.start(spec)
        assert "/nonexistent" in err.value.console
        assert err.value.console.strip() in str(err.value)
        assert_no_traces(runtime, spec.sandbox_id)
    finally:
        runtime.stop(spec.sandbox_id)
        slot_pool.release(slot)
        unmount_overlay(tmp_path / "bad")


def test_guard_refuses_template_storage_and_unmounted_dirs(
        runtime: GVisorRuntime, tiny_build: Build, tmp_path: Path) -> None:
    """Guarantee 2: the runtime only ever runs on the provider's (mounted overlay) path."""
    def spec(rootfs: Path) -> RuntimeSpec:
        return RuntimeSpec(sandbox_id="guard", rootfs=rootfs, sandbox_dir=tmp_path / "guard",
                           netns_path="/nonexistent", argv=["/bin/true"], env={})

    with pytest.raises(ValueError, match="template storage"):
        runtime.start(spec(tiny_build.rootfs))
    (tmp_path / "alias").symlink_to(tiny_build.path)
    with pytest.raises(ValueError, match="template storage"):
        runtime.start(spec(tmp_path / "alias" / "rootfs"))
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ValueError, match="not a mount point"):
        runtime.start(spec(plain))
    assert not (tmp_path / "guard" / "bundle").exists() and runtime.running() == set()
    runtime.stop("guard")  # never started: nothing to do, no error

    ov = mount_overlay(tiny_build.rootfs, tmp_path / "sbx")
    try:
        config = runtime.oci_config(spec(ov.merged))
        assert config["root"]["path"] == str(ov.merged)
        assert {"type": "network", "path": "/nonexistent"} in config["linux"]["namespaces"]
        assert config["linux"]["resources"]["memory"]["limit"] == 512 * 1024 * 1024
        json.dumps(config)
    finally:
        unmount_overlay(tmp_path / "sbx")


def test_console_log_is_the_tail(runtime: GVisorRuntime, tmp_path: Path) -> None:
    (tmp_path / "console.log").write_bytes(b"x" * CONSOLE_TAIL_BYTES + b"the end\n")
    tail = runtime.console_log(tmp_path)
    assert len(tail) == CONSOLE_TAIL_BYTES and tail.endswith("the end\n")
    assert runtime.console_log(tmp_path / "missing") == ""


def test_the_statx_shim_is_preloaded_only_under_a_runsc_that_refuses_the_flag(runtime: GVisorRuntime) -> None:
    """Debian's 2022 runsc refuses statx(AT_NO_AUTOMOUNT) (coreutils' ls -l, stat); the 2024 one
    answers it, and a preload would cost every exec and hide a template's own ld.so.preload.
    Whichever runsc is here, the runtime preloads the shim exactly when `stat` fails without it
    (and test_base_template_coreutils_limits_and_writes checks `ls -l` and `stat` work)."""
    with tempfile.TemporaryDirectory(prefix="statx-test-") as root:  # runsc's own answer, not the probe's
        stat = subprocess.run(["runsc", "--root", root, f"--platform={runtime.platform}", "--network=none",
                               "do", "/usr/bin/stat", "-c", "%n", "/"], capture_output=True, timeout=60)
    needed = stat.returncode != 0
    assert (runtime.shim is not None) == needed
    spec = RuntimeSpec(sandbox_id="shim-test", rootfs=Path("/nonexistent"), sandbox_dir=Path("/nonexistent"),
                       netns_path="/nonexistent", argv=["/bin/true"])
    mounts = {m["destination"] for m in runtime.oci_config(spec)["mounts"]}
    assert ("/etc/ld.so.preload" in mounts) == needed


def test_one_probe_answers_both_the_platform_and_the_statx_question() -> None:
    """The platform probe and the statx probe are one runsc start (each is ~0.6 s, paid by the
    first sandbox a server boots); an unknown platform is a failure naming runsc's complaint."""
    probe = probe_platform("ptrace")
    assert probe.failure is None
    assert probe_platform("ptrace") is probe  # cached: asked again, runsc is not run again
    bogus = platform_failure("no-such-platform")
    assert bogus is not None and "exit code" in bogus


def test_statx_shim_is_built_without_libc(tmp_path: Path) -> None:
    shim = build_statx_shim(tmp_path)
    assert shim is not None
    dynamic = subprocess.run(["readelf", "-d", str(shim)], capture_output=True, text=True).stdout
    assert "NEEDED" not in dynamic  # loads harmlessly in any template, libc or not
    symbols = subprocess.run(["nm", "-D", str(shim)], capture_output=True, text=True).stdout
    assert " T statx" in symbols and "w __errno_location" in symbols
