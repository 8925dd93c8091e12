"""Sandbox start and command latency through the real SDK, beside raw runsc, in one run.

Prints one table, medians and p95 with each median's ratio to raw runsc's:
- raw runsc create→exec: the floor under a create, on the same template rootfs and platform:
  overlay mount, ``runsc create`` + ``start`` (no network), first ``runsc exec true``;
- create, cold: ``Sandbox.create()`` on a server without a warm pool (API + disk + overlay +
  netns + runsc + envd's start-up + /init);
- create, warm: the same on a server whose pool is full (waited for before each create): the
  claim of a booted sandbox (record, envd /init with token and env vars, route);
- create, warm back to back: creates in a row without waiting, so the pool (size 2) drains and
  later creates may find it empty;
- create, 8 in flight: a first burst of 8 at once (the pool holds 2: the rest boot cold), then,
  once the pool has grown to the burst's size (it keeps what recent bursts asked for), a next one;
- ``commands.run("true")``, small ``files.write``/``files.read``: round trips through proxy and envd.

Usage: benchmarks/run [N]   (N runs each, default 20; needs root, like the server)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from sandboxd.runtimes.gvisor import choose_platform
from sandboxd.store.db import Database
from sandboxd.templates.store import TemplateStore
from sandboxd.testing.server import Server, running_server, sdk_pointed_at

DATA_DIR = Path(os.environ.get("SANDBOXD_BENCH_DATA_DIR", "/var/lib/sandboxd-test"))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def bench_creates(n: int, before_each: Callable[[], None] = lambda: None) -> tuple[list[float], list[float]]:
    """``n`` × (create, kill): their wall times."""
    from e2b import Sandbox

    creates, kills = [], []
    for _ in range(n):
        before_each()
        t0 = time.perf_counter()
        sbx = Sandbox.create(timeout=120)
        creates.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sbx.kill()
        kills.append(time.perf_counter() - t0)
    return creates, kills


def bench_burst(k: int) -> list[float]:
    """``k`` creates at once (threads): each one's wall time; then all killed."""
    from e2b import Sandbox

    def one(_: int) -> tuple[Sandbox, float]:
        t0 = time.perf_counter()
        return Sandbox.create(timeout=120), time.perf_counter() - t0

    with ThreadPoolExecutor(k) as pool:
        done = list(pool.map(one, range(k)))
        list(pool.map(lambda d: d[0].kill(), done))
    return [took for _, took in done]


def bench_round_trips(n: int) -> dict[str, list[float]]:
    """``commands.run("true")`` and small file writes and reads in one sandbox."""
    from e2b import Sandbox

    times: dict[str, list[float]] = {"run": [], "write": [], "read": []}
    with Sandbox.create(timeout=300) as sbx:
        sbx.commands.run("true")  # warm the connection pool
        for i in range(n):
            t0 = time.perf_counter()
            sbx.commands.run("true")
            times["run"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sbx.files.write(f"/tmp/small-{i}", "hello sandbox\n")
            times["write"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sbx.files.read(f"/tmp/small-{i}")
            times["read"].append(time.perf_counter() - t0)
    return times


def pool_refilled(server: Server, size: int, timeout_s: float = 120) -> Callable[[], None]:
    """A wait until the server's warm pool holds ``size`` sandboxes again (its /health says)."""
    def wait() -> None:
        deadline = time.monotonic() + timeout_s
        while httpx.get(f"{server.url}/health").json().get("warmPoolReady", 0) < size:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the warm pool did not refill to {size} within {timeout_s:.0f}s")
            time.sleep(0.1)
    return wait


def _oci_config(rootfs: Path) -> dict:
    return {
        "ociVersion": "1.0.0",
        "process": {"args": ["/bin/sleep", "infinity"], "env": ["PATH=/usr/bin:/bin"], "cwd": "/",
                    "user": {"uid": 0, "gid": 0}},
        "root": {"path": str(rootfs)},
        "hostname": "bench",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")]},
    }


def bench_raw_runsc(template_rootfs: Path, n: int, platform: str) -> list[float]:
    """Overlay + runsc create/start + first exec, with the server's runsc flags but no network."""
    times = []
    with tempfile.TemporaryDirectory(prefix="sbx-bench-") as tmp:
        root = Path(tmp) / "runsc-root"
        flags = ["runsc", "--root", str(root), f"--platform={platform}", "--network=none"]
        for i in range(n):
            d = Path(tmp) / f"c{i}"
            for sub in ("upper", "work", "rootfs", "bundle"):
                (d / sub).mkdir(parents=True)
            (d / "bundle" / "config.json").write_text(json.dumps(_oci_config(d / "rootfs")))
            cid = f"bench-{os.getpid()}-{i}"
            t0 = time.perf_counter()
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={template_rootfs},upperdir={d / 'upper'},workdir={d / 'work'}",
                            str(d / "rootfs")], check=True)
            try:
                subprocess.run([*flags, "create", "--bundle", str(d / "bundle"), cid], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                subprocess.run([*flags, "start", cid], check=True)
                subprocess.run([*flags, "exec", cid, "/bin/true"], check=True)
                times.append(time.perf_counter() - t0)
            finally:
                subprocess.run([*flags, "delete", "--force", cid], capture_output=True)
                subprocess.run(["umount", str(d / "rootfs")], capture_output=True)
    return times


def row(name: str, values: list[float], floor: float | None) -> str:
    p50 = statistics.median(values)
    ratio = f"{p50 / floor:>7.2f}x" if floor else " " * 8
    return f"| {name:<38} | {len(values):>3} | {p50 * 1000:>9.1f} | {pct(values, 95) * 1000:>9.1f} | {ratio} |"


POOL_SIZE = 2
BURST = 8  # creates in flight at once (the "8 in flight"); the pool grows to it (warm_pool_max)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    log_dir = Path(tempfile.mkdtemp(prefix="sbx-bench-"))
    with running_server(DATA_DIR, log_dir / "cold.log", warm_pool_size=0) as server, sdk_pointed_at(server):
        template = Database(server.settings.db_url).find_template("base")
        assert template is not None
        rootfs = TemplateStore(server.settings.templates_dir).get(template.build_id).rootfs
        platform = server.settings.gvisor_platform
        platform = choose_platform() if platform == "auto" else platform  # what the server probed
        raw = bench_raw_runsc(rootfs, n, platform)
        cold, kills = bench_creates(n)
        trips = bench_round_trips(n)
    with (running_server(DATA_DIR, log_dir / "warm.log", warm_pool_size=POOL_SIZE) as server,
          sdk_pointed_at(server)):
        warm, _ = bench_creates(n, pool_refilled(server, POOL_SIZE))
        burst, _ = bench_creates(n)
        first_burst = bench_burst(BURST)  # the pool holds POOL_SIZE: most of these boot cold
        pool_refilled(server, BURST, timeout_s=300)()  # the pool grows to the burst's size
        next_burst = bench_burst(BURST)
    version = subprocess.run(["runsc", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    floor = statistics.median(raw)
    print(f"\nsandboxd benchmarks — gVisor ({version}, {platform}), base template, {n} runs each\n")
    print("| measurement                            |   n |   p50 ms |   p95 ms | p50/raw  |")
    print("|----------------------------------------|-----|----------|----------|----------|")
    print(row("raw runsc: overlay+create→exec", raw, floor))
    print(row("SDK Sandbox.create(), cold (no pool)", cold, floor))
    print(row(f"SDK Sandbox.create(), warm (pool {POOL_SIZE})", warm, floor))
    print(row("SDK Sandbox.create(), warm back to back", burst, floor))
    print(row(f"SDK create, {BURST} in flight, first burst", first_burst, floor))
    print(row(f"SDK create, {BURST} in flight, next burst", next_burst, floor))
    print(row("SDK sandbox.kill()", kills, None))
    print(row('SDK commands.run("true")', trips["run"], None))
    print(row("SDK files.write (14 bytes)", trips["write"], None))
    print(row("SDK files.read (14 bytes)", trips["read"], None))


if __name__ == "__main__":
    main()
