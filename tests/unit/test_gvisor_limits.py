"""The host-side limits of a gVisor sandbox: sizes, the pid space, and where a cgroup limit lives."""

from __future__ import annotations

import os
from pathlib import Path

from sandboxd.runtimes.base import RuntimeSpec
from sandboxd.runtimes.gvisor import (
    HOST_TASKS_BASE,
    HOST_TASKS_PER_PROCESS,
    PID_MAX,
    host_memory_limit_mb,
    memory_cgroup_limit_file,
    raise_pid_max,
    resources,
)


def test_the_host_limits_sit_above_the_guests() -> None:
    spec = RuntimeSpec(sandbox_id="s", rootfs=Path("/r"), sandbox_dir=Path("/d"), netns_path="/n", argv=["x"],
                       cpu_count=1, memory_mb=512, max_processes=100)
    r = resources(spec)
    assert r["memory"]["limit"] == 512 * 2**20  # what the guest is told it has
    assert r["cpu"]["quota"] == r["cpu"]["period"]  # one CPU
    assert r["pids"]["limit"] == 100 * HOST_TASKS_PER_PROCESS + HOST_TASKS_BASE
    assert host_memory_limit_mb(512) == 512 + 192 and host_memory_limit_mb(4096) == 4096 + 1024


def test_pid_max_is_raised_never_lowered(tmp_path: Path) -> None:
    f = tmp_path / "pid_max"
    f.write_text("32768\n")
    raise_pid_max(f)
    assert int(f.read_text()) == PID_MAX
    f.write_text(str(PID_MAX * 2))
    raise_pid_max(f)
    assert int(f.read_text()) == PID_MAX * 2


def test_the_memory_limit_file_of_a_process_exists() -> None:
    limit = memory_cgroup_limit_file(os.getpid())
    assert limit.name in ("memory.limit_in_bytes", "memory.max") and limit.is_file()
