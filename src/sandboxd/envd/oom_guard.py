"""The sandbox's out-of-memory killer: gVisor has none of its own.

Under gVisor a process may allocate past the sandbox's memory size (``MemTotal``): nothing in the
guest refuses, and the first thing to act is the host's OOM killer, which ends the whole sandbox.
So envd watches ``/proc/meminfo`` and, when the memory still available drops below a small
reserve, kills the process using the most (never PID 1 or envd), as a Linux guest kernel would.
The host's limit sits above the guest's size (``runtimes/gvisor.py``), so the guard acts first.

It polls cheaply (one ``pread`` of an open ``/proc/meminfo``: every syscall is dear under
ptrace) and as often as the memory left calls for: the time a fast allocator (1.2 GB/s was
measured under ptrace) would need to use up what is left, halved, between 10 ms and 500 ms.
An idle sandbox (no process but PID 1 and envd) has nothing that could allocate: the guard then
looks every ``IDLE_INTERVAL_S`` only (each wake-up costs host CPU, which decides how many idle
sandboxes a host holds), and envd wakes it (``wake()``) before it starts any process.
A kill is reported to ``on_kill``, which tells the client whose command it was (process_manager).
In a microVM the guest kernel's own OOM killer usually acts first; the guard is harmless there.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("envd.oom")

RESERVE_FRACTION = 0.04  # kill when less than this much of MemTotal is available...
RESERVE_MIN_BYTES = 12 * 1024 * 1024  # ... or less than this, whichever is more
FASTEST_ALLOCATION_BYTES_PER_S = 2 * 1024**3  # above what was measured, to be safe
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.01, 0.5
IDLE_INTERVAL_S = 2.0
#: while other processes run, /proc is listed (to notice the sandbox went idle) at most this often
IDLE_RECHECK_S = 1.0
#: after a kill, how long to let the victim's memory come back before choosing another
SETTLE_S = 0.2
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Victim:
    pid: int
    session: int  # envd starts every command in its own session: this names the command
    name: str
    rss_bytes: int
    total_bytes: int  # the sandbox's memory size


def meminfo(fd: int | None = None) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes, from ``fd`` (an open /proc/meminfo) if given."""
    if fd is None:
        with open("/proc/meminfo", "rb") as f:
            data = f.read()
    else:
        data = os.pread(fd, 4096, 0)
    total = available = 0
    for line in data.splitlines():
        if line.startswith(b"MemTotal:"):
            total = int(line.split()[1]) * 1024
        elif line.startswith(b"MemAvailable:"):
            available = int(line.split()[1]) * 1024
            break
    return total, available


def poll_interval(available: int) -> float:
    """Seconds until the next look: half the time the fastest allocator needs to use up what is left."""
    return min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, available / FASTEST_ALLOCATION_BYTES_PER_S / 2))


def biggest_process(protected: set[int]) -> tuple[int, int, int, str] | None:
    """(pid, rss bytes, session id, name) of the process with the largest resident set."""
    best: tuple[int, int, int, str] | None = None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in protected:
            continue
        try:
            with open(f"/proc/{entry.name}/statm", "rb") as f:
                rss = int(f.read().split()[1]) * _PAGE
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except (OSError, ValueError, IndexError):
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses
        name = stat[stat.index(b"(") + 1:stat.rindex(b")")].decode(errors="replace")
        session = int(stat[stat.rindex(b")") + 2:].split()[3])
        if best is None or rss > best[1]:
            best = (int(entry.name), rss, session, name)
    return best


def only_these_run(protected: set[int]) -> bool:
    """Whether every process in the sandbox is one of ``protected`` (PID 1 and envd: idle)."""
    return all(int(e.name) in protected for e in os.scandir("/proc") if e.name.isdigit())


class OomGuard:
    """A daemon thread; ``check()`` is one round (tests call it directly)."""

    def __init__(self, on_kill: Callable[[Victim], object], protected: set[int] | None = None) -> None:
        self.on_kill = on_kill
        self.protected = protected if protected is not None else {1, os.getpid()}
        self.kills = 0
        self.rounds = 0  # looks at /proc/meminfo so far (how often it wakes: tests)
        self._stop = threading.Event()
        self._wake = threading.Event()  # stop, or a process is about to start

    def start(self) -> OomGuard:
        threading.Thread(target=self._run, name="oom-guard", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        """A process is about to start: look at once and often again (call before spawning)."""
        self._wake.set()

    def _run(self) -> None:
        fd = os.open("/proc/meminfo", os.O_RDONLY | os.O_CLOEXEC)
        busy_until = 0.0  # monotonic time before which /proc is not listed again
        try:
            while not self._stop.is_set():
                self.rounds += 1
                try:
                    total, available = meminfo(fd)
                    if available < max(RESERVE_MIN_BYTES, total * RESERVE_FRACTION) and self.check(total):
                        self._stop.wait(SETTLE_S)
                        continue
                    interval = poll_interval(available)
                    if time.monotonic() >= busy_until:
                        if only_these_run(self.protected):
                            interval = IDLE_INTERVAL_S
                        else:
                            busy_until = time.monotonic() + IDLE_RECHECK_S
                except Exception:  # the guard must outlive one bad read
                    log.exception("oom guard round failed")
                    interval = MAX_INTERVAL_S
                if self._wake.wait(interval):
                    self._wake.clear()
                    busy_until = time.monotonic() + IDLE_RECHECK_S  # the new process needs a moment to show
        finally:
            os.close(fd)

    def check(self, total: int) -> Victim | None:
        """Kill the biggest process; return it (None if there is nothing to kill)."""
        found = biggest_process(self.protected)
        if found is None:
            return None
        pid, rss, session, name = found
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        self.kills += 1
        victim = Victim(pid, session, name, rss, total)
        log.warning("out of memory: killed pid %d (%s) using %d MiB; the sandbox has %d MiB",
                    pid, name, rss >> 20, total >> 20)
        try:
            self.on_kill(victim)
        except Exception:
            log.exception("oom guard: reporting the kill failed")
        return victim
