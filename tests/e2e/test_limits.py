"""Per-sandbox limits through the SDK: CPU count and memory size from the template's build
(``Template.build(cpu_count=, memory_mb=)``), the disk and the process limit from the server.

A memory hog, a fork bomb and a disk filler each stay inside their own sandbox and get a clear
error; the sandbox itself lives on, and a neighbour never notices. One server with small limits
(256 MiB disk, 128 processes per user) keeps this quick.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import CommandExitException, Sandbox, Template

from sandboxd.orchestrator.disk import IMAGE_NAME
from sandboxd.runtimes.gvisor import HOST_TASKS_BASE, HOST_TASKS_PER_PROCESS, host_memory_limit_mb
from sandboxd.testing.server import Server, running_server, sdk_pointed_at

from .hostcheck import sandbox_cgroup

pytestmark = pytest.mark.slow

DISK_MB, MAX_PROCESSES, MEMORY_MB = 256, 128, 256
TEMPLATE = "limits-1cpu-256mb"


@pytest.fixture(scope="module")
def limits(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("limits") / "server.log"
    with running_server(data_dir, log_path, disk_size_mb=DISK_MB, max_processes=MAX_PROCESSES) as server, \
            sdk_pointed_at(server):
        Template.build(Template().from_base_image(), TEMPLATE, cpu_count=1, memory_mb=MEMORY_MB)
        yield server


@pytest.fixture
def small(limits: Server) -> Iterator[Sandbox]:
    sbx = Sandbox.create(TEMPLATE, timeout=180)
    yield sbx
    sbx.kill()


@pytest.fixture
def neighbour(limits: Server) -> Iterator[Sandbox]:
    """Another sandbox on the same host, busy with something of its own the whole time."""
    sbx = Sandbox.create(TEMPLATE, timeout=180)
    sbx.commands.run("sleep 1000", background=True)
    yield sbx
    sbx.kill()


def _fails(sbx: Sandbox, cmd: str, **kw: object) -> CommandExitException:
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run(cmd, timeout=120, **kw)
    return info.value


def _unharmed(sbx: Sandbox) -> None:
    assert sbx.commands.run("echo alive").stdout == "alive\n"
    assert "sleep 1000" in sbx.commands.run("ps -eo args").stdout


def test_the_template_sets_cpu_and_memory_and_the_server_the_disk(limits: Server, small: Sandbox) -> None:
    info = small.get_info()
    assert (info.cpu_count, info.memory_mb) == (1, MEMORY_MB)
    out = small.commands.run("free -m | awk '/^Mem/ {print $2}'; df -m --output=size / /tmp | tail -2; ulimit -u")
    mem_total, root_mb, tmp_mb, nproc = out.stdout.split()
    assert int(mem_total) == MEMORY_MB
    assert 0.9 * DISK_MB < int(root_mb) <= DISK_MB and tmp_mb == root_mb  # /tmp is on the sandbox's disk
    assert int(nproc) == MAX_PROCESSES
    metrics = small.get_metrics()[-1]
    assert 0.9 * DISK_MB * 2**20 < metrics.disk_total <= DISK_MB * 2**20
    assert metrics.mem_total == MEMORY_MB * 2**20
    memory = sandbox_cgroup(limits.settings, small.sandbox_id, "memory")
    assert int((memory / "memory.limit_in_bytes").read_text()) == host_memory_limit_mb(MEMORY_MB) * 2**20
    cpu = sandbox_cgroup(limits.settings, small.sandbox_id, "cpu")
    assert int((cpu / "cpu.cfs_quota_us").read_text()) == int((cpu / "cpu.cfs_period_us").read_text())


def test_one_cpu_is_one_cpu(limits: Server, small: Sandbox) -> None:
    """Two busy loops in a 1-CPU sandbox on a 2-core host: the quota throttles them to one."""
    cpuacct = sandbox_cgroup(limits.settings, small.sandbox_id, "cpuacct")
    cpu = sandbox_cgroup(limits.settings, small.sandbox_id, "cpu")
    throttled_before = _cpu_stat(cpu)["nr_throttled"]
    used_before, started = int((cpuacct / "cpuacct.usage").read_text()), time.monotonic()
    small.commands.run("for i in 1 2; do timeout 4 sh -c 'while :; do :; done' & done; wait")
    used = (int((cpuacct / "cpuacct.usage").read_text()) - used_before) / 1e9
    assert used / (time.monotonic() - started) < 1.15
    assert _cpu_stat(cpu)["nr_throttled"] > throttled_before


def _cpu_stat(cpu: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in (cpu / "cpu.stat").read_text().splitlines())}


def test_a_memory_hog_is_killed_with_a_clear_error_and_the_sandbox_lives(small: Sandbox, neighbour: Sandbox) -> None:
    hog = "python3 -c 'b = []\nwhile True: b.append(bytearray(8 << 20))'"
    err = _fails(small, hog)
    assert "sandboxd: out of memory: killed process" in err.stderr and "(python3)" in err.stderr
    assert f"this sandbox has {MEMORY_MB} MiB of memory" in err.stderr
    assert err.error == "signal: killed"
    # a hog started by a shell: the shell sees it killed and goes on, and so does the sandbox
    out = small.commands.run(f"{hog}; echo exit=$?", timeout=120)
    assert "exit=137" in out.stdout and "out of memory" in out.stderr
    assert int(small.commands.run("free -m | awk '/^Mem/ {print $7}'").stdout) > MEMORY_MB // 2  # freed again
    _unharmed(neighbour)


def test_a_fork_bomb_meets_the_process_limit_and_the_sandbox_lives(limits: Server, small: Sandbox,
                                                                    neighbour: Sandbox) -> None:
    bomb = ("python3 -c 'import os\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n"
            "    except OSError as e:\n        print(n, e); break\n"
            "    if pid == 0:\n        os.execv(\"/bin/sleep\", [\"sleep\", \"600\"])\n    n += 1'")
    out = small.commands.run(bomb, timeout=120).stdout
    forked, reason = out.split(" ", 1)
    assert MAX_PROCESSES - 10 <= int(forked) <= MAX_PROCESSES
    assert "Resource temporarily unavailable" in reason
    pids = sandbox_cgroup(limits.settings, small.sandbox_id, "pids")
    assert int((pids / "pids.current").read_text()) < int((pids / "pids.max").read_text()) \
        == MAX_PROCESSES * HOST_TASKS_PER_PROCESS + HOST_TASKS_BASE
    with pytest.raises(CommandExitException, match="fork: Resource temporarily unavailable"):
        small.commands.run("/bin/true; echo the user is at the limit")  # the shell forks for /bin/true
    # (the sleeps outlive a slow bomb: exited ones would be reaped when it ends, freeing room)
    small.commands.run("pkill -u user sleep", user="root")  # root is not held by it
    assert small.commands.run("echo alive").stdout == "alive\n"
    _unharmed(neighbour)


def test_a_disk_filler_gets_enospc_and_the_host_never_notices(limits: Server, small: Sandbox,
                                                               neighbour: Sandbox) -> None:
    image = limits.settings.sandboxes_dir / small.sandbox_id / IMAGE_NAME
    for target in ("/home/user/fill", "/tmp/fill"):
        err = _fails(small, f"dd if=/dev/zero of={target} bs=1M count={2 * DISK_MB}")
        assert "No space left on device" in err.stderr
        assert image.stat().st_blocks * 512 <= (DISK_MB + 8) * 2**20  # all it took on the host
        small.commands.run(f"rm {target}")
    assert small.commands.run("echo still writable > /home/user/after && cat /home/user/after").stdout \
        == "still writable\n"
    _unharmed(neighbour)
    assert neighbour.commands.run("dd if=/dev/zero of=/home/user/own bs=1M count=64 2>&1 | tail -1").exit_code == 0
