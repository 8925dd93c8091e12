"""File transfer through the SDK (proxy → envd in a gVisor sandbox) beside ``cp`` on the host.

A 100 MB file of random bytes: ``files.write`` (upload) and ``files.read(format="bytes")``
(download), medians of N runs, printed next to ``cp`` of the same file on the host's disk in the
same run.

Usage: benchmarks/run files [N]   (default 5; needs root)
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sandboxd.testing.server import running_server, sdk_pointed_at

DATA_DIR = Path(os.environ.get("SANDBOXD_BENCH_DATA_DIR", "/var/lib/sandboxd-test"))
SIZE = 100 * 1000 * 1000


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    work = Path(tempfile.mkdtemp(prefix="sbx-files-"))
    src = work / "payload.bin"
    src.write_bytes(os.urandom(SIZE))
    data = src.read_bytes()
    try:
        cp = [timed(lambda i=i: shutil.copyfile(src, work / f"copy{i}.bin")) for i in range(n)]
        with running_server(DATA_DIR, work / "server.log") as server, sdk_pointed_at(server):
            from e2b import Sandbox

            with Sandbox.create(timeout=600) as sbx:
                up = [timed(lambda: sbx.files.write("/home/user/payload.bin", data, request_timeout=600))
                      for _ in range(n)]
                got: list[bytes] = []
                down = [timed(lambda: got.append(bytes(sbx.files.read("/home/user/payload.bin", format="bytes",
                                                                     request_timeout=600))))
                        for _ in range(n)]
                assert all(g == data for g in got), "downloaded bytes differ from the upload"
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def mbps(times: list[float]) -> float:
        return SIZE / statistics.median(times) / 1e6

    print(f"\nsandboxd file transfer — 100 MB random file, {n} runs each, medians\n")
    print("| transfer                          | MB/s     | vs cp  |")
    print("|-----------------------------------|----------|--------|")
    print(f"| cp on the host                    | {mbps(cp):>8.0f} |  1.00x |")
    print(f"| SDK files.write (upload)          | {mbps(up):>8.0f} | {mbps(up) / mbps(cp):>5.2f}x |")
    print(f"| SDK files.read (download)         | {mbps(down):>8.0f} | {mbps(down) / mbps(cp):>5.2f}x |")


if __name__ == "__main__":
    main()
