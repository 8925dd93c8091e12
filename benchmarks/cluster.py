"""Cluster benchmark (bounded, this host only): create latency on a single server beside a
cluster, and create throughput of a cluster with 1 node beside 3 nodes.

Each setup is started fresh: ``serve`` (SQLite, one process); then PostgreSQL + one API replica +
1 node, and + 3 nodes, each node in its own network namespace (sandboxd/testing/cluster.py). For
each: create p50/p95 of N sequential creates (each sandbox runs ``echo`` once, then is killed), and
creates/s of M creates with K in flight. Every node here shares one host's CPUs: 3 nodes on a
2-core machine measure the cluster's overhead and placement, not a 3x bigger machine.

Usage: benchmarks/run cluster [N M K]   (default 10 16 4; needs root)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sandboxd.testing.cluster import running_cluster
from sandboxd.testing.server import running_server

DATA_DIR = Path(os.environ.get("SANDBOXD_BENCH_DATA_DIR", "/var/lib/sandboxd-test"))


def cycle(opts: dict[str, Any]) -> float:
    from e2b import Sandbox

    t0 = time.perf_counter()
    sbx = Sandbox.create(timeout=120, **opts)
    took = time.perf_counter() - t0
    assert sbx.commands.run("echo ok").stdout == "ok\n"
    sbx.kill()
    return took


def measure(opts: dict[str, Any], n: int, m: int, k: int) -> dict[str, float]:
    cycle(opts)  # warm: connections, caches
    seq = [cycle(opts) for _ in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(k) as pool:
        list(pool.map(lambda _: cycle(opts), range(m)))
    wall = time.perf_counter() - t0
    return {"p50": statistics.median(seq) * 1000, "p95": sorted(seq)[max(0, int(len(seq) * 0.95) - 1)] * 1000,
            "rate": m / wall}


def main() -> None:
    n, m, k = (int(a) for a in (sys.argv[1:] + ["10", "16", "4"][len(sys.argv) - 1:])[:3])
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        with running_server(DATA_DIR, Path(tmp) / "serve.log") as srv:
            rows.append(("serve (1 process, SQLite)", measure(
                {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}, n, m, k)))
        for nodes in (1, 3):
            logs = Path(tmp) / f"cluster{nodes}"
            logs.mkdir()
            with running_cluster(DATA_DIR, logs, apis=1, nodes=nodes) as c:
                api = c.apis[0]
                rows.append((f"cluster: 1 API, {nodes} node{'s' if nodes > 1 else ''}, PostgreSQL", measure(
                    {"api_key": c.api_key, "api_url": api.url, "sandbox_url": api.url}, n, m, k)))
    print(f"\n{n} sequential creates (p50/p95), then {m} creates with {k} in flight "
          f"(each: create, echo, kill); {os.cpu_count()} CPUs\n")
    print(f"| setup | create p50 | create p95 | creates/s ({k} in flight) |")
    print("|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['p50']:.0f} ms | {r['p95']:.0f} ms | {r['rate']:.2f} |")


if __name__ == "__main__":
    main()
