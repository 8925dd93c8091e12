"""microVM create through the real SDK: a cold boot beside a restore of the template's booted image.

Both on the ``base`` template as a microVM template, one server each (booted images off, then
on), ``N`` sequential ``Sandbox.create()`` → first ``commands.run`` each, killed after. The image is
made (and waited for) before the restored creates are timed; its making is reported too.

Usage: benchmarks/run microvm [N]   (default 5; needs root; QEMU under TCG here: seconds per boot)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sandboxd.orchestrator.boot_images import BootImages, ImageKey
from sandboxd.store.db import Database
from sandboxd.testing.server import Server, running_server, sdk_pointed_at

DATA_DIR = Path(os.environ.get("SANDBOXD_BENCH_DATA_DIR", "/var/lib/sandboxd-test"))
TEMPLATE = "base-vm"
SLOW = 900


def vm_template(server: Server) -> str:
    db = Database(server.settings.db_url)
    base = db.find_template("base")
    assert base is not None, "build the base template first (./sandboxd.sh serve or the test suite)"
    db.set_template(TEMPLATE, base.build_id, runtime="microvm")
    return base.build_id


def creates(n: int) -> tuple[list[float], list[float]]:
    """``n`` × create → first command: (create seconds, first command seconds)."""
    from e2b import Sandbox

    made, firsts = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        sbx = Sandbox.create(template=TEMPLATE, timeout=600, request_timeout=SLOW)
        made.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sbx.commands.run("true")
        firsts.append(time.perf_counter() - t0)
        sbx.kill()
    return made, firsts


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    logs = Path(tempfile.mkdtemp(prefix="sbx-microvm-"))
    with running_server(DATA_DIR, logs / "cold.log", microvm_boot_images=0, envd_ready_timeout_s=600.0) as server, \
            sdk_pointed_at(server):
        vm_template(server)
        cold, cold_first = creates(n)
    with running_server(DATA_DIR, logs / "images.log", envd_ready_timeout_s=600.0) as server, sdk_pointed_at(server):
        build_id = vm_template(server)
        t0 = time.perf_counter()
        creates(1)  # boots, and has the image made behind it
        settings = server.settings
        key = ImageKey(build_id, settings.cpu_count, settings.memory_mb)
        if BootImages(settings.data_dir / "boot-images", lambda k, p: None).wait(key, SLOW) is None:
            raise SystemExit(f"the booted image was not made:\n{server.log()[-3000:]}")
        made_in = time.perf_counter() - t0
        restored, restored_first = creates(n)
    p50 = statistics.median
    print(f"\nsandboxd microVM create — base template, {settings.cpu_count} vCPU, {settings.memory_mb} MiB, "
          f"{n} runs each (seconds, medians)\n")
    print("| create                                   | create p50 | first command p50 | vs cold |")
    print("|------------------------------------------|------------|-------------------|---------|")
    print(f"| cold boot (booted images off)            | {p50(cold):>10.2f} | {p50(cold_first):>17.2f} |   1.00x |")
    print(f"| restore of the template's booted image   | {p50(restored):>10.2f} | {p50(restored_first):>17.2f} | "
          f"{p50(restored) / p50(cold):>6.2f}x |")
    print(f"\nfirst create + making the image: {made_in:.1f} s (once per build and VM shape)")


if __name__ == "__main__":
    main()
