"""NBD copy-on-write device vs the raw image file, and microVM cold boot vs snapshot restore.

One run, one table (medians of ``--repeat`` runs each):
- 4 KiB sequential and random reads and writes, 20,000 ops per run:
  * raw file: ``os.pread``/``os.pwrite`` on the image (page cache, no protocol) — the floor;
  * NBD COW, QD1: one request at a time over the export's unix socket (a Python client);
  * NBD COW, QD16: 16 requests in flight (how QEMU drives it);
  the server runs in its own process, so client and server do not share a GIL;
- the same sequential workloads through QEMU's block layer (``qemu-img bench``, QD16): raw file
  beside the NBD export;
- microVM (``tiny`` template, 1 vCPU): spawn → envd ``/health`` for a cold boot and for a
  restore from a snapshot of the same VM, and the snapshot itself.

Usage: .venv/bin/python benchmarks/nbd_microvm.py [--repeat 3] [--no-vm]   (root, for the VM part)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import re
import secrets
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sandboxd.nbd import protocol as p

DATA_DIR = Path(os.environ.get("SANDBOXD_BENCH_DATA_DIR", "/var/lib/sandboxd-test"))
IMAGE_MB = 256
BS = 4096
OPS = 20_000


# -- NBD server in a child process -----------------------------------------------------------


def _serve(base: str, cow: str, run_dir: str, conn: object) -> None:
    from sandboxd.nbd.thread import NbdServerThread

    with NbdServerThread(Path(run_dir)) as nbd:
        conn.send(str(nbd.allocate(Path(base), Path(cow), "bench", "bench").socket_path))  # type: ignore[attr-defined]
        conn.recv()  # type: ignore[attr-defined]


class ServerProcess:
    def __init__(self, base: Path, cow: Path, run_dir: Path) -> None:
        self.conn, child = mp.Pipe()
        self.proc = mp.get_context("fork").Process(target=_serve, args=(str(base), str(cow), str(run_dir), child))
        self.proc.start()
        self.socket = Path(self.conn.recv())

    def close(self) -> None:
        self.conn.send("stop")
        self.proc.join(10)


# -- a minimal pipelined client --------------------------------------------------------------


class Client:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buf = self.sock.makefile("rb")
        self.buf.read(18)
        self.sock.sendall(struct.pack(">I", p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        self.sock.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_GO, 6) + b"\0" * 6)
        while True:
            _, _, rtype, length = p.OPTION_REPLY.unpack(self.buf.read(p.OPTION_REPLY.size))
            self.buf.read(length)
            if rtype == p.REP_ACK:
                break

    def run(self, kind: str, offsets: list[int], depth: int) -> None:
        """Simple replies only (no structured reply negotiated): 16 bytes, then data for reads."""
        payload = os.urandom(BS)
        cmd = p.CMD_READ if kind == "read" else p.CMD_WRITE
        sent = done = 0
        while done < len(offsets):
            batch = []
            while sent < len(offsets) and sent - done < depth:
                batch.append(p.pack_request(cmd, sent, offsets[sent], BS) + (payload if cmd == p.CMD_WRITE else b""))
                sent += 1
            if batch:
                self.sock.sendall(b"".join(batch))
            _, error, _ = p.SIMPLE_REPLY.unpack(self.buf.read(16))
            assert error == 0
            if cmd == p.CMD_READ:
                self.buf.read(BS)
            done += 1

    def close(self) -> None:
        self.sock.sendall(p.pack_request(p.CMD_DISC, 0, 0, 0))
        self.sock.close()


def offsets_for(pattern: str, size: int, seed: int) -> list[int]:
    blocks = size // BS
    if pattern == "seq":
        return [(i % blocks) * BS for i in range(OPS)]
    rng = random.Random(seed)
    return [rng.randrange(blocks) * BS for _ in range(OPS)]


def raw_run(image: Path, kind: str, offsets: list[int]) -> None:
    fd = os.open(image, os.O_RDWR if kind == "write" else os.O_RDONLY)
    payload = os.urandom(BS)
    try:
        for off in offsets:
            os.pwrite(fd, payload, off) if kind == "write" else os.pread(fd, BS, off)
    finally:
        os.close(fd)


def mib_s(seconds: float) -> float:
    return OPS * BS / seconds / 2**20


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_nbd(work: Path, repeat: int) -> list[tuple[str, float, float, float]]:
    base = work / "base.img"
    with open(base, "wb") as f:
        for _ in range(IMAGE_MB):
            f.write(os.urandom(2**20))
    base.chmod(0o444)
    scratch = work / "scratch.img"
    shutil.copyfile(base, scratch)
    rows = []
    for pattern in ("seq", "rand"):
        for kind in ("read", "write"):
            raw, qd1, qd16 = [], [], []
            for r in range(repeat):
                offs = offsets_for(pattern, IMAGE_MB * 2**20, r)
                raw.append(timed(lambda: raw_run(scratch if kind == "write" else base, kind, offs)))  # noqa: B023 - called at once
                for depth, out in ((1, qd1), (16, qd16)):
                    cow = work / f"cow-{secrets.token_hex(4)}"  # a fresh device: every write is a first write
                    server = ServerProcess(base, cow, work / "run")
                    try:
                        client = Client(server.socket)
                        out.append(timed(lambda: client.run(kind, offs, depth)))  # noqa: B023 - called at once
                        client.close()
                    finally:
                        server.close()
                        shutil.rmtree(cow)
            rows.append((f"{pattern} {kind} 4K", *(mib_s(statistics.median(v)) for v in (raw, qd1, qd16))))
    rows += bench_qemu_img(base, scratch, work, repeat)
    return rows


def qemu_img_seconds(target: str, write: bool) -> float:
    argv = ["qemu-img", "bench", "-f", "raw", "-c", str(OPS), "-d", "16", "-s", str(BS), "-t", "writeback"]
    out = subprocess.run([*argv, *(["-w"] if write else []), target], capture_output=True, text=True, check=True)
    return float(re.search(r"Run completed in ([0-9.]+) seconds", out.stdout).group(1))  # type: ignore[union-attr]


def bench_qemu_img(base: Path, scratch: Path, work: Path, repeat: int) -> list[tuple[str, float, float, float]]:
    rows = []
    for kind in ("read", "write"):
        raw, nbd = [], []
        for _ in range(repeat):
            raw.append(qemu_img_seconds(str(scratch), kind == "write"))
            cow = work / f"cow-{secrets.token_hex(4)}"
            server = ServerProcess(base, cow, work / "run")
            try:
                nbd.append(qemu_img_seconds(f"nbd+unix:///?socket={server.socket}", kind == "write"))
            finally:
                server.close()
                shutil.rmtree(cow)
        rows.append((f"qemu-img seq {kind} 4K", mib_s(statistics.median(raw)), float("nan"),
                     mib_s(statistics.median(nbd))))
    return rows


# -- microVM -----------------------------------------------------------------------------------


def bench_vm(work: Path, repeat: int) -> dict[str, float]:
    import httpx

    from sandboxd.envd.contract import ENVD_PORT, envd_argv, envd_env
    from sandboxd.nbd.provider import NbdRootfsProvider
    from sandboxd.orchestrator.network import SlotPool
    from sandboxd.runtimes.base import RuntimeSpec
    from sandboxd.runtimes.guest import prepare_guest
    from sandboxd.runtimes.microvm import MicroVMRuntime
    from sandboxd.templates.base import build_tiny
    from sandboxd.templates.store import TemplateStore

    quiet = lambda _msg: None  # noqa: E731
    store = TemplateStore(DATA_DIR / "templates")
    build = build_tiny(store, quiet)
    guest = prepare_guest(DATA_DIR, quiet)
    pool = SlotPool("sbvb", "10.216.0.0/16")
    pool.cleanup_stale(set())
    results: dict[str, list[float]] = {"cold": [], "snapshot": [], "restore": [], "snapshot_mib": []}
    with NbdRootfsProvider(DATA_DIR, store, run_dir=work / "vm-nbd") as provider:
        rt = MicroVMRuntime(work / "vm-state", guest, forbidden_roots=provider.forbidden_roots)
        results["accel_kvm"] = [1.0 if rt.accel == "kvm" else 0.0]

        def ready(address: str) -> None:
            with httpx.Client(timeout=1) as c:
                for _ in range(3000):
                    try:
                        if c.get(f"http://{address}:{ENVD_PORT}/health").is_success:
                            return
                    except httpx.HTTPError:
                        time.sleep(0.01)
            raise TimeoutError("envd did not answer")

        for _ in range(repeat):
            slot = pool.acquire()
            sdir = work / f"vm-{secrets.token_hex(4)}"
            sid = sdir.name
            try:
                spec = RuntimeSpec(sandbox_id=sid, rootfs=provider.prepare(build.build_id, sdir), sandbox_dir=sdir,
                                   netns_path=slot.guest_netns_path, argv=envd_argv(), env=envd_env(), cpu_count=1,
                                   memory_mb=384)
                t0 = time.perf_counter()
                rt.start(spec)
                ready(slot.host_address)
                results["cold"].append(time.perf_counter() - t0)
                snap = rt.pause(sid, sdir / "snapshot")
                results["snapshot"].append(snap.seconds)
                results["snapshot_mib"].append(snap.bytes / 2**20)
                t0 = time.perf_counter()
                rt.restore(spec, snap.path)
                ready(slot.host_address)
                results["restore"].append(time.perf_counter() - t0)
            finally:
                rt.stop(sid)
                provider.release(sdir)
                pool.release(slot)
    return {k: statistics.median(v) for k, v in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-vm", action="store_true", help="skip the microVM part (needs root and QEMU)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        rows = bench_nbd(work, args.repeat)
        vm = None if args.no_vm else bench_vm(work, args.repeat)
    print(f"\nNBD copy-on-write device vs raw image file ({IMAGE_MB} MiB image, {OPS} ops of 4 KiB, "
          f"median of {args.repeat}; MiB/s)")
    print(f"{'workload':<22}{'raw file':>10}{'NBD QD1':>10}{'NBD QD16':>10}{'QD16/raw':>10}")
    for name, raw, qd1, qd16 in rows:
        qd1_text = "-" if qd1 != qd1 else f"{qd1:.0f}"
        print(f"{name:<22}{raw:>10.0f}{qd1_text:>10}{qd16:>10.0f}{qd16 / raw:>10.2f}")
    if vm:
        accel = "KVM" if vm["accel_kvm"] else "TCG"
        print(f"\nmicroVM (tiny template, 1 vCPU, {accel}; median of {args.repeat}; seconds)")
        print(f"{'cold boot → envd /health':<34}{vm['cold']:>8.2f}")
        print(f"{'snapshot (pause + save)':<34}{vm['snapshot']:>8.2f}   ({vm['snapshot_mib']:.0f} MiB)")
        print(f"{'restore → envd /health':<34}{vm['restore']:>8.2f}   ({vm['cold'] / vm['restore']:.0f}x faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
