"""The code interpreter through the real ``e2b-code-interpreter`` SDK, in one run, side by side:

- ``Sandbox.create()`` of ``code-interpreter-v1`` (API + rootfs + runsc + envd + the server's ready check);
- the first ``run_code("1+1")`` after create (the default Python kernel starting, if it is not warm yet);
- warm ``run_code("1+1")``: one execution through proxy, server and kernel;
- ``commands.run("python3 -c 1")`` in the same sandbox, for comparison (a fresh interpreter per call).

The template is built (or verified) first, as ``serve`` does, and is not part of any number.

Usage: benchmarks/run interpreter [N]   (N creates and N warm runs, default 10; needs root)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from sandboxd.interpreter.template import NAME
from sandboxd.store.db import Database
from sandboxd.store.templates_db import TemplateBuilds
from sandboxd.testing.server import running_server, sdk_pointed_at

sys.path.insert(0, str(Path(__file__).parent))
from sandbox_start import DATA_DIR, pct  # noqa: E402 - the benchmarks' shared helpers


def wait_built(db_url: str, timeout: float = 2400) -> None:
    builds = TemplateBuilds(Database(db_url))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = builds.latest(NAME)
        if row is not None and row.status in ("ready", "error"):
            if row.status == "error":
                raise SystemExit(f"{NAME} failed to build: {row.reason}")
            return
        time.sleep(1)
    raise SystemExit(f"{NAME} not built within {timeout}s")


def timed(fn):  # noqa: ANN001, ANN201 - a tiny helper
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench(n: int) -> dict[str, list[float]]:
    from e2b_code_interpreter import Sandbox

    rows: dict[str, list[float]] = {"create": [], "first": [], "warm": [], "cmd": []}
    for _ in range(n):
        t0 = time.perf_counter()
        fresh = Sandbox.create(timeout=300)
        rows["create"].append(time.perf_counter() - t0)
        try:
            t0 = time.perf_counter()
            ex = fresh.run_code("1+1")
            rows["first"].append(time.perf_counter() - t0)
            assert ex.text == "2", ex
        finally:
            fresh.kill()
    sbx = Sandbox.create(timeout=600)
    try:
        sbx.run_code("1+1")
        sbx.commands.run("true")
        for _ in range(n):
            rows["warm"].append(timed(lambda: sbx.run_code("1+1"))[0])
            rows["cmd"].append(timed(lambda: sbx.commands.run("python3 -c 1"))[0])
    finally:
        sbx.kill()
    return rows


def line(name: str, values: list[float]) -> str:
    return (f"| {name:<40} | {len(values):>3} | {statistics.median(values) * 1000:>9.1f} | "
            f"{pct(values, 95) * 1000:>9.1f} |")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    log_path = Path(tempfile.mkdtemp(prefix="sbx-bench-")) / "server.log"
    with running_server(DATA_DIR, log_path, builtin_templates=NAME) as server, sdk_pointed_at(server):
        wait_built(server.settings.db_url)
        rows = bench(n)
    print(f"\nsandboxd code interpreter — gVisor, {NAME}, {n} runs each\n")
    print("| measurement                              |   n |   p50 ms |   p95 ms |")
    print("|------------------------------------------|-----|----------|----------|")
    print(line("Sandbox.create() → ready", rows["create"]))
    print(line('first run_code("1+1") after create', rows["first"]))
    print(line('warm run_code("1+1")', rows["warm"]))
    print(line('commands.run("python3 -c 1")', rows["cmd"]))
    first = statistics.median(rows["create"]) + statistics.median(rows["first"])
    print(f"\ncreate → first result (p50 sum): {first:.2f} s")


if __name__ == "__main__":
    main()
