"""Density: keep N idle sandboxes alive at once, with the API still answering, then remove them all.

Creates N sandboxes (IN_FLIGHT at a time) through the real SDK and keeps every one alive; then,
with all N idle, measures host memory (PSS of every host process that belongs to a sandbox, per
sandbox), idle CPU, the host's free memory, and ``get_info`` / ``Sandbox.list`` latency against
random sandboxes; then kills them all and checks that nothing leaked: no sandbox process, network
namespace, mount, loop device or sandbox directory left behind. Exits non-zero on any create
error or leak.

Before that, the idle cost of each gVisor platform side by side (8 idle sandboxes on each): systrap
spins on every wake-up (gVisor issue 13361), which is what decides how many idle sandboxes fit.

Usage: benchmarks/run density [N] [IN_FLIGHT] [PLATFORM]
       (default 500 4 auto; needs root; ~25 min for 500 on 2 cores)
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from load import cpu_seconds, pss_total_kib, sandbox_pids  # benchmarks/load.py: the same accounting

from sandboxd.runtimes.gvisor import choose_platform
from sandboxd.testing.server import Server, running_server, sdk_pointed_at

DATA_DIR = Path(os.environ.get("SANDBOXD_BENCH_DATA_DIR", "/var/lib/sandboxd-test"))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def create_all(n: int, in_flight: int) -> tuple[list[object], list[float], list[str]]:
    from e2b import Sandbox

    def one() -> tuple[object, float]:
        t0 = time.perf_counter()
        sbx = Sandbox.create(timeout=3600)
        return sbx, time.perf_counter() - t0

    sandboxes, times, errors = [], [], []
    with ThreadPoolExecutor(in_flight) as pool:
        for fut in [pool.submit(one) for _ in range(n)]:
            try:
                sbx, took = fut.result()
                sandboxes.append(sbx)
                times.append(took)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
    return sandboxes, times, errors


def api_latency(sandboxes: list[object], calls: int) -> tuple[list[float], list[float]]:
    """ms of ``get_info`` on random sandboxes, and of one full ``Sandbox.list`` page walk."""
    from e2b import Sandbox

    infos = []
    for _ in range(calls):
        sbx = random.choice(sandboxes)
        t0 = time.perf_counter()
        sbx.get_info()  # type: ignore[attr-defined]
        infos.append((time.perf_counter() - t0) * 1000)
    lists = []
    for _ in range(5):
        t0 = time.perf_counter()
        paginator = Sandbox.list(limit=100)
        while paginator.has_next:
            paginator.next_items()
        lists.append((time.perf_counter() - t0) * 1000)
    return infos, lists


def leftovers(server: Server, ids: set[str]) -> list[str]:
    """What the killed sandboxes left on the host (must be nothing)."""
    found = [f"process {pid}" for pid in sandbox_pids(ids)]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines()
              if line.startswith(server.settings.net_prefix)]
    data = str(server.settings.data_dir)
    found += [f"mount {line.split()[4]}" for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split()[4].startswith(data + "/sandboxes")]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    found += [f"loop {line.split(':')[0]}" for line in loops.splitlines() if data in line]
    sandboxes_dir = server.settings.data_dir / "sandboxes"
    if sandboxes_dir.exists():
        found += [f"dir {p}" for p in sandboxes_dir.iterdir()]
    return found


def settled(server: Server, ids: set[str]) -> tuple[list[str], float]:
    """Leftovers once the server's teardowns (which run after kill answers) are done: polled
    until none remain or the limit passed (2 s a sandbox, at least 2 min: measured 0.5 s a
    sandbox with 100 on 2 cores, four teardowns at a time); and how long that took."""
    limit_s = max(120.0, 2.0 * len(ids))
    t0 = time.perf_counter()
    while (found := leftovers(server, ids)) and time.perf_counter() - t0 < limit_s:
        time.sleep(0.5)
    return found, time.perf_counter() - t0


def kill_all(sandboxes: list[object], in_flight: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(lambda s: s.kill(), sandboxes))  # type: ignore[attr-defined]
    return time.perf_counter() - t0


def idle_cost(platform: str, n: int = 8, window_s: float = 10.0) -> tuple[float, float]:
    """(% of one core, MiB of PSS) per idle sandbox on ``platform``."""
    from e2b import Sandbox

    log_path = Path(tempfile.mkdtemp(prefix="sbx-idle-")) / "server.log"
    with running_server(DATA_DIR, log_path, gvisor_platform=platform) as server, sdk_pointed_at(server):
        sandboxes = [Sandbox.create(timeout=300) for _ in range(n)]
        time.sleep(3)
        pids = sandbox_pids({s.sandbox_id for s in sandboxes})
        cpu0 = cpu_seconds(pids)
        time.sleep(window_s)
        cpu = (cpu_seconds(pids) - cpu0) / window_s / n * 100
        pss = pss_total_kib(pids) / 1024 / n
        for s in sandboxes:
            s.kill()
    return cpu, pss


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    in_flight = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    platform = sys.argv[3] if len(sys.argv) > 3 else "auto"
    idle = {p: idle_cost(p) for p in ("systrap", "ptrace")}
    log_path = Path(tempfile.mkdtemp(prefix="sbx-density-")) / "server.log"
    free_before = mem_available_mib()
    with running_server(DATA_DIR, log_path, max_sandboxes=n + 8, gvisor_platform=platform) as server, \
            sdk_pointed_at(server):
        t0 = time.perf_counter()
        sandboxes, creates, errors = create_all(n, in_flight)
        create_wall = time.perf_counter() - t0
        ids = {s.sandbox_id for s in sandboxes}  # type: ignore[attr-defined]
        time.sleep(5)  # start-up garbage settles
        pids = sandbox_pids(ids)
        pss = pss_total_kib(pids) / 1024
        used = free_before - mem_available_mib()
        cpu0 = cpu_seconds(pids)
        time.sleep(10)
        cpu = (cpu_seconds(pids) - cpu0) / 10 * 100
        infos, lists = api_latency(sandboxes, 300) if sandboxes else ([0.0], [0.0])
        kill_wall = kill_all(sandboxes, in_flight)
        leaked, settle = settled(server, ids)
    platform = choose_platform() if server.settings.gvisor_platform == "auto" else server.settings.gvisor_platform
    alive = len(sandboxes)
    per = max(alive, 1)
    print(f"\nsandboxd density — {alive} of {n} sandboxes alive at once ({in_flight} created in flight), "
          f"gVisor ({platform}), {os.cpu_count()} cores\n")
    print("| idle sandbox, by gVisor platform (8 each) | CPU % of one core | PSS MiB |")
    print("|-------------------------------------------|-------------------|---------|")
    for name, (cpu_pct, pss_mib) in idle.items():
        print(f"| {name:<41} | {cpu_pct:>17.2f} | {pss_mib:>7.1f} |")
    print()
    print("| measurement                               | value      |")
    print("|-------------------------------------------|------------|")
    print(f"| create errors                             | {len(errors):>10} |")
    creates = creates or [0.0]
    print(f"| create p50 / p95 (ms)                     | "
          f"{statistics.median(creates) * 1000:>4.0f} / {pct(creates, 95) * 1000:>4.0f} |")
    print(f"| time until all alive (s)                  | {create_wall:>10.1f} |")
    print(f"| host PSS per idle sandbox (MiB)           | {pss / per:>10.1f} |")
    print(f"| host memory used per sandbox (MiB)        | {used / per:>10.1f} |")
    print(f"| host CPU per idle sandbox (% of one core) | {cpu / per:>10.2f} |")
    print(f"| get_info p50 / p99 (ms), all alive        | {statistics.median(infos):>4.1f} / {pct(infos, 99):>4.1f} |")
    print(f"| Sandbox.list, every page (ms p50)         | {statistics.median(lists):>10.1f} |")
    print(f"| kill all (s)                              | {kill_wall:>10.1f} |")
    print(f"| kill → host clean (s)                     | {settle:>10.1f} |")
    print(f"| left behind after kill                    | {len(leaked):>10} |")
    for e in errors[:10]:
        print("error:", e)
    for item in leaked[:20]:
        print("leaked:", item)
    sys.exit(1 if errors or leaked else 0)


if __name__ == "__main__":
    main()
