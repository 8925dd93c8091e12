"""Load test (bounded, loopback only): create and kill 50 sandboxes with 8 in flight.

Prints errors (must be 0), create p50/p95, and the host memory (PSS) and CPU per idle sandbox,
measured over 10 idle sandboxes by summing the proportional set size and CPU time of every host
process that belongs to them (gVisor's sandbox and gofer processes name the sandbox id on their
command line). The CPU is what an idle sandbox costs: envd, its OOM guard's polling, gVisor.

Usage: benchmarks/run load [TOTAL] [IN_FLIGHT]   (default 50 8; needs root)
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sandboxd.runtimes.gvisor import choose_platform
from sandboxd.testing.server import running_server, sdk_pointed_at

DATA_DIR = Path(os.environ.get("SANDBOXD_BENCH_DATA_DIR", "/var/lib/sandboxd-test"))


def one_cycle() -> float:
    from e2b import Sandbox

    t0 = time.perf_counter()
    sbx = Sandbox.create(timeout=120)
    took = time.perf_counter() - t0
    assert sbx.commands.run("echo ok").stdout == "ok\n"
    sbx.kill()
    return took


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


_SYS_KCMP, _KCMP_VM = 312, 1  # x86_64
_libc = ctypes.CDLL(None, use_errno=True)


def same_address_space(a: int, b: int) -> bool:
    """Whether two processes share one memory map (``kcmp(KCMP_VM)``): systrap's stub processes
    are clones sharing their address space, and each reports the whole of it as its PSS."""
    return _libc.syscall(_SYS_KCMP, a, b, _KCMP_VM, 0, 0) == 0


def pss_total_kib(pids: list[int]) -> int:
    """PSS of these processes, each address space counted once."""
    counted: list[int] = []
    total = 0
    for pid in pids:
        if not any(same_address_space(pid, other) for other in counted):
            counted.append(pid)
            total += pss_kib(pid)
    return total


def sandbox_pids(ids: set[str]) -> list[int]:
    """Host processes of these sandboxes: those whose command line names a sandbox id (gVisor's
    sandbox and gofer) and all their descendants. The descendants are gVisor's stub processes
    (ptrace and systrap), which have no command line but map the guest's memory and run its
    code: leaving them out would hide most of a sandbox's memory and CPU."""
    children: dict[int, list[int]] = {}
    named: list[int] = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(pid)
        if any(i in cmdline for i in ids):
            named.append(pid)
    found: set[int] = set()
    todo = list(named)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return sorted(found)


def cpu_seconds(pids: list[int]) -> float:
    """User+system CPU time of these processes and their threads so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def idle_sandboxes(n: int = 10, window_s: float = 10.0) -> tuple[float, float]:
    """(MiB of host PSS, % of one CPU) per idle sandbox, over ``n`` idle sandboxes."""
    from e2b import Sandbox

    sandboxes = [Sandbox.create(timeout=300) for _ in range(n)]
    try:
        time.sleep(3)  # let start-up garbage settle
        pids = sandbox_pids({s.sandbox_id for s in sandboxes})
        pss = pss_total_kib(pids) / 1024 / n
        cpu0 = cpu_seconds(pids)
        time.sleep(window_s)
        cpu = (cpu_seconds(pids) - cpu0) / window_s / n * 100
        return pss, cpu
    finally:
        for s in sandboxes:
            s.kill()


def main() -> None:
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    in_flight = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    log_path = Path(tempfile.mkdtemp(prefix="sbx-load-")) / "server.log"
    errors: list[str] = []
    times: list[float] = []
    with running_server(DATA_DIR, log_path) as server, sdk_pointed_at(server):
        started = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as pool:
            for fut in [pool.submit(one_cycle) for _ in range(total)]:
                try:
                    times.append(fut.result())
                except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
        wall = time.perf_counter() - started
        mem, cpu = idle_sandboxes()
    platform = choose_platform() if server.settings.gvisor_platform == "auto" else server.settings.gvisor_platform
    print(f"\nsandboxd load test — {total} create+run+kill cycles, {in_flight} in flight, gVisor ({platform}), "
          "no warm pool\n")
    print("| measurement                     | value      |")
    print("|---------------------------------|------------|")
    print(f"| errors                          | {len(errors):>10} |")
    if times:
        ordered = sorted(times)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        print(f"| create p50 (ms)                 | {statistics.median(times) * 1000:>10.0f} |")
        print(f"| create p95 (ms)                 | {p95 * 1000:>10.0f} |")
    print(f"| wall time (s)                   | {wall:>10.1f} |")
    print(f"| cycles per second               | {total / wall:>10.2f} |")
    print(f"| host PSS per idle sandbox (MiB) | {mem:>10.1f} |")
    print(f"| host CPU per idle sandbox (%)   | {cpu:>10.2f} |")
    for e in errors[:10]:
        print("error:", e)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
