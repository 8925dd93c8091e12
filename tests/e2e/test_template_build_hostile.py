"""Hostile template builds through the real SDK's ``Template.build``: a RUN step that reads the
host's files, dials the host's ports, tries to leave its root, fills its disk or fork-bombs does
no harm beyond its own build — and the server, and the next build, carry on.

Every address here is loopback, a namespace sandboxd made, or the host's own (the listener binds
0.0.0.0 on the host: whatever address of the host a build dials, it would answer there).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.orchestrator.disk import loop_devices_of
from sandboxd.templates.contained import build_pool
from sandboxd.testing.server import Server, running_server, sdk_pointed_at

pytestmark = pytest.mark.slow

#: A step may write this much: small, so the disk filler is quick.
BUILD_DISK_MB = 256


@pytest.fixture(scope="module")
def server_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's TMPDIR: where its build steps keep their scratch (disk image included)."""
    return tmp_path_factory.mktemp("hostile-server-tmp")


@pytest.fixture(scope="module")
def hostile_env(data_dir: Path, tmp_path_factory: pytest.TempPathFactory, server_tmp: Path) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("hostile") / "server.log"
    try:
        with _server_tmpdir(server_tmp), running_server(data_dir, log_path, build_disk_mb=BUILD_DISK_MB) as srv, \
                sdk_pointed_at(srv):
            yield srv
    finally:
        if log_path.exists():
            print(f"--- server log tail ---\n{log_path.read_text(errors='replace')[-3000:]}")


@contextlib.contextmanager
def _server_tmpdir(path: Path) -> Iterator[None]:
    """TMPDIR for the server spawned meanwhile (its environment is this process's)."""
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(path)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved


class Listener:
    """A TCP listener on every address of the host; remembers who connected."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.peers: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            self.peers.append(peer[0])
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def _build(name: str, *commands: str, user: str = "root") -> list[str]:
    from e2b import Template

    template = Template().from_image("e2bdev/base")
    for cmd in commands:
        template = template.run_cmd(cmd, user=user)
    logs: list[str] = []
    Template.build(template, name, on_build_logs=lambda entry: logs.append(entry.message))
    return logs


def _failed_build(name: str, cmd: str) -> tuple[str, float]:
    from e2b.exceptions import BuildException

    t0 = time.monotonic()
    with pytest.raises(BuildException) as failed:
        _build(name, cmd)
    return str(failed.value), time.monotonic() - t0


def _read_in_sandbox(name: str, path: str) -> str:
    from e2b import Sandbox

    with Sandbox.create(name, timeout=60) as sbx:
        return sbx.files.read(path)


def _server_is_healthy_and_builds(server: Server) -> None:
    with server.api() as api:
        assert api.get("/health").status_code == 200
    marker = uuid.uuid4().hex
    _build("hostile-after", f"echo {marker} > /tmp/after")
    assert _read_in_sandbox("hostile-after", "/tmp/after") == f"{marker}\n"


def test_a_build_reads_its_own_files_never_the_hosts(hostile_env: Server, tmp_path: Path):
    secret = tmp_path / f"host-secret-{uuid.uuid4().hex}"
    secret.write_text("the host's secret\n")
    _build("hostile-read",
           f"(cat {secret} 2>&1 || true) > /tmp/secret.txt; cat /etc/shadow > /tmp/shadow.txt; "
           "(cat /proc/1/cmdline | tr '\\0' ' '; echo) > /tmp/pid1.txt; "
           "(ls /var/lib/sandboxd* 2>&1 || true) > /tmp/datadir.txt")
    from e2b import Sandbox

    with Sandbox.create("hostile-read", timeout=60) as sbx:
        seen = {p: sbx.files.read(f"/tmp/{p}.txt") for p in ("secret", "shadow", "pid1", "datadir")}
        image_shadow = sbx.commands.run("cat /etc/shadow", user="root").stdout
    assert "No such file" in seen["secret"] and "host's secret" not in seen["secret"]
    assert seen["shadow"] == image_shadow  # the image's own /etc/shadow ...
    assert seen["shadow"] != Path("/etc/shadow").read_text()  # ... never the host's
    assert seen["pid1"].startswith("/bin/bash -c (cat ")  # PID 1 is the step's own shell: no host process in view
    assert "No such file" in seen["datadir"]


def test_a_build_reaches_no_port_of_the_host(hostile_env: Server):
    listener = Listener()
    try:
        # every address the host has, and the host's end of every build slot's link
        host_addrs = ["127.0.0.1", *_host_addresses()]
        pool = build_pool(hostile_env.settings)
        veths = [pool.slot(i).host_side_address for i in range(4)]
        probes = " ".join(dict.fromkeys(host_addrs + veths))
        script = (
            "python3 -m http.server 8111 --bind 127.0.0.1 >/dev/null 2>&1 & sleep 1; "  # a control: its own port
            f"for a in 127.0.0.1:8111 {' '.join(f'{a}:{listener.port}' for a in probes.split())}; do "
            "  if timeout 2 bash -c \"echo x > /dev/tcp/${a%:*}/${a#*:}\" 2>/dev/null; "
            "  then echo \"reached $a\"; else echo \"blocked $a\"; fi; "
            "done > /tmp/probes.txt; kill %1")
        _build("hostile-ports", script)
        probes_seen = _read_in_sandbox("hostile-ports", "/tmp/probes.txt").splitlines()
    finally:
        listener.close()
    assert probes_seen[0] == "reached 127.0.0.1:8111"  # the probe works: its own loopback answers
    assert len(probes_seen) == 1 + len(probes.split())
    assert all(line.startswith("blocked ") for line in probes_seen[1:]), probes_seen
    assert listener.peers == []


def test_a_build_cannot_escape_its_root(hostile_env: Server):
    marker = f"/tmp/sandboxd-escaped-{uuid.uuid4().hex}"
    script = (
        # the classic chroot escape, a second proc, the host's disk, PID 1's root, a mount of /
        f"mkdir -p /jail && chroot /jail /bin/true 2>/dev/null; "
        f"python3 -c \"import os; os.makedirs('/j', exist_ok=True); fd = os.open('/', 0); os.chroot('/j'); "
        f"os.fchdir(fd); [os.chdir('..') for _ in range(64)]; os.chroot('.'); open('{marker}', 'w').write('x')\"; "
        f"echo x > /proc/1/root{marker}; "
        f"mkdir -p /mnt/host && (mount /dev/vda /mnt/host || mount -t ext4 /dev/sda /mnt/host) 2>/dev/null; "
        f"echo x > /mnt/host{marker} 2>/dev/null; "
        f"(mknod /tmp/disk b 253 0 && mount /tmp/disk /mnt/host && echo x > /mnt/host{marker}) 2>/dev/null; "
        f"nsenter -t 1 -m -- sh -c 'echo x > {marker}' 2>/dev/null; true")
    _build("hostile-escape", script)
    assert not os.path.exists(marker)  # not on the host: at most in the build's own layer
    assert not Path(f"/mnt/host{marker}").exists()


def test_a_disk_filler_fails_its_own_build(hostile_env: Server, server_tmp: Path):
    message, seconds = _failed_build("hostile-disk", "dd if=/dev/zero of=/filler bs=1M count=100000")
    assert "filled its build disk" in message and f"at most {BUILD_DISK_MB} MiB" in message, message
    print(f"disk filler: build failed after {seconds:.1f}s")
    assert seconds < 180
    # what it wrote was on the step's own disk image, gone with the step: no scratch, no loop device
    assert list(server_tmp.glob("sandboxd-step-*")) == [] and loop_devices_of(server_tmp) == []
    _server_is_healthy_and_builds(hostile_env)


def test_a_fork_bomb_fails_its_own_build_in_bounded_time(hostile_env: Server):
    message, seconds = _failed_build("hostile-fork", "bomb() { bomb | bomb & }; bomb; sleep 600")
    # whichever of its host cgroup's limits it meets first (tasks, or the memory they take) ends it
    assert ("ran more processes than a build step may" in message
            or "used more memory than a build step may" in message), message
    print(f"fork bomb: build failed after {seconds:.1f}s")
    assert seconds < 180  # measured 28-70 s on 2 busy cores; the step timeout is an hour
    _server_is_healthy_and_builds(hostile_env)


def test_a_memory_hog_fails_its_own_build(hostile_env: Server):
    message, seconds = _failed_build("hostile-memory", "python3 -c 'b = bytearray(6 << 30); print(len(b))'")
    assert "used more memory than a build step may (build_memory_mb=2048)" in message, message
    print(f"memory hog: build failed after {seconds:.1f}s")
    assert seconds < 180
    _server_is_healthy_and_builds(hostile_env)


def _host_addresses() -> list[str]:
    """The host's IPv4 addresses (every interface but sandboxes' slots' own links)."""
    import subprocess

    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines() if " lo " not in line]
