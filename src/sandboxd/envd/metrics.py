"""``GET /metrics`` (upstream shape): CPU, memory and root-disk usage of the sandbox.

Read from /proc and statvfs so it works the same under gVisor and in a VM. CPU usage is measured
between consecutive calls (a short first sample when there is no previous one).
"""

from __future__ import annotations

import asyncio
import os
import time

FIRST_SAMPLE_S = 0.1
_MIB = 1024 * 1024


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies from the aggregate line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


class Metrics:
    """Keeps the previous CPU sample so each call reports usage since the last one."""

    def __init__(self) -> None:
        self._last: tuple[int, int] | None = None

    async def cpu_used_pct(self) -> float:
        if self._last is None:
            self._last = _cpu_times()
            await asyncio.sleep(FIRST_SAMPLE_S)
        busy0, total0 = self._last
        busy1, total1 = self._last = _cpu_times()
        span = total1 - total0
        return round(100.0 * (busy1 - busy0) / span, 2) if span > 0 else 0.0

    async def snapshot(self) -> dict[str, float | int]:
        mem = _meminfo()
        total = mem.get("MemTotal", 0)
        used = total - mem.get("MemAvailable", mem.get("MemFree", 0))
        disk = os.statvfs("/")
        return {
            "ts": int(time.time()),
            "cpu_count": _cpu_count(),
            "cpu_used_pct": await self.cpu_used_pct(),
            "mem_total": total,
            "mem_used": used,
            "mem_cache": mem.get("Cached", 0) + mem.get("Buffers", 0),
            "mem_total_mib": total // _MIB,
            "mem_used_mib": used // _MIB,
            "disk_used": (disk.f_blocks - disk.f_bfree) * disk.f_frsize,
            "disk_total": disk.f_blocks * disk.f_frsize,
        }
