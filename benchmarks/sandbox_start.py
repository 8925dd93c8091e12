"""Sandbox start and command latency through the real SDK, beside raw runsc, in one run.

Prints one table:
- create→ready: ``Sandbox.create()`` wall time (API + overlay + netns + runsc + envd /health + /init);
- ``commands.run("true")``: one command round trip through proxy and envd;
- raw runsc create→exec: the floor under all of it, measured here on the same template rootfs:
  overlay mount, ``runsc create`` + ``start`` (no network), first ``runsc exec true``.

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
from pathlib import Path

from sandboxd.runtimes.gvisor import choose_platform
from sandboxd.store.db import Database
from sandboxd.templates.store import TemplateStore
from sandboxd.testing.server import running_server, sdk_pointed_at

DATA_DIR = Path(os.environ.get("SANDBOXD_BENCH_DATA_DIR", "/var/lib/sandboxd-test"))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def bench_sdk(n: int) -> tuple[list[float], list[float], list[float]]:
    from e2b import Sandbox

    creates, runs, kills = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        sbx = Sandbox.create(timeout=120)
        creates.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sbx.kill()
        kills.append(time.perf_counter() - t0)
    with Sandbox.create(timeout=300) as sbx:
        sbx.commands.run("true")  # warm the connection pool
        for _ in range(n):
            t0 = time.perf_counter()
            sbx.commands.run("true")
            runs.append(time.perf_counter() - t0)
    return creates, runs, kills


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


def row(name: str, values: list[float]) -> str:
    return (f"| {name:<34} | {len(values):>3} | {statistics.median(values) * 1000:>9.1f} | "
            f"{pct(values, 95) * 1000:>9.1f} |")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    log_path = Path(tempfile.mkdtemp(prefix="sbx-bench-")) / "server.log"
    with running_server(DATA_DIR, log_path) as server, sdk_pointed_at(server):
        template = Database(server.settings.db_url).find_template("base")
        assert template is not None
        rootfs = TemplateStore(server.settings.templates_dir).get(template.build_id).rootfs
        platform = server.settings.gvisor_platform
        platform = choose_platform() if platform == "auto" else platform  # what the server probed
        raw = bench_raw_runsc(rootfs, n, platform)
        creates, runs, kills = bench_sdk(n)
    version = subprocess.run(["runsc", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(f"\nsandboxd benchmarks — gVisor ({version}, {platform}), base template, {n} runs each\n")
    print("| measurement                        |   n |   p50 ms |   p95 ms |")
    print("|------------------------------------|-----|----------|----------|")
    print(row("raw runsc: overlay+create→exec", raw))
    print(row("SDK Sandbox.create() → ready", creates))
    print(row("SDK sandbox.kill()", kills))
    print(row('SDK commands.run("true")', runs))
    print(f"\ncreate→ready / raw runsc (p50): {statistics.median(creates) / statistics.median(raw):.1f}x")


if __name__ == "__main__":
    main()
