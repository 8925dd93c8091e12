"""Pause and resume through the real SDK on gVisor, beside create, in one run.

Each cycle: ``Sandbox.create()``, a file written, ``pause()`` (memory: frozen in place) and
``Sandbox.connect()`` (thawed), then ``pause(mode="filesystem")`` (synced, runtime stopped) and
``Sandbox.connect()`` (booted again over its disk), each checked by reading the file back.

Prints one table (p50/p95 per step) and the ratios of each resume to a fresh create.

Usage: benchmarks/run pause [N]   (N cycles, default 10; needs root)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sandboxd.testing.server import running_server, sdk_pointed_at

DATA_DIR = Path(os.environ.get("SANDBOXD_BENCH_DATA_DIR", "/var/lib/sandboxd-test"))
STEPS = ("create → ready", "pause (memory)", "resume (memory)", "pause (filesystem)", "resume (boot over disk)")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def timed(fn):  # tiny helper
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def one_cycle(times: dict[str, list[float]]) -> None:
    from e2b import Sandbox

    sbx, took = timed(lambda: Sandbox.create(timeout=300))
    times[STEPS[0]].append(took)
    try:
        sbx.files.write("/home/user/kept", "x")
        times[STEPS[1]].append(timed(sbx.pause)[1])
        sbx, took = timed(lambda: Sandbox.connect(sbx.sandbox_id))
        times[STEPS[2]].append(took)
        assert sbx.files.read("/home/user/kept") == "x"
        times[STEPS[3]].append(timed(lambda: sbx.pause(mode="filesystem"))[1])
        sbx, took = timed(lambda: Sandbox.connect(sbx.sandbox_id))
        times[STEPS[4]].append(took)
        assert sbx.files.read("/home/user/kept") == "x"
    finally:
        sbx.kill()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    log_path = Path(tempfile.mkdtemp(prefix="sbx-bench-")) / "server.log"
    times: dict[str, list[float]] = {s: [] for s in STEPS}
    with running_server(DATA_DIR, log_path) as server, sdk_pointed_at(server):
        for _ in range(n):
            one_cycle(times)
    print(f"\nsandboxd pause/resume — gVisor (ptrace), base template, {n} cycles\n")
    print("| step                         |   n |   p50 ms |   p95 ms |")
    print("|------------------------------|-----|----------|----------|")
    for step, values in times.items():
        print(f"| {step:<28} | {len(values):>3} | {statistics.median(values) * 1000:>8.1f} | "
              f"{pct(values, 95) * 1000:>8.1f} |")
    create = statistics.median(times[STEPS[0]])
    print(f"\nresume (memory) / create (p50): {statistics.median(times[STEPS[2]]) / create:.2f}x; "
          f"resume (boot over disk) / create (p50): {statistics.median(times[STEPS[4]]) / create:.2f}x")


if __name__ == "__main__":
    main()
