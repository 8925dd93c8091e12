"""The NBD server with real clients (qemu-io, qemu-img) and, for errors, a hand-rolled one."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
from nbd_helpers import BASE_SIZE, RawClient, error_of, sha256

from sandboxd.nbd import protocol as p
from sandboxd.nbd.thread import NbdServerThread


def uri(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


def qemu_io(sock: Path, *commands: str) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    return subprocess.run([*argv, uri(sock)], capture_output=True, text=True, timeout=60)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0 and "fail" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc.stdout


def test_exports_copy_on_write_and_isolated(nbd: NbdServerThread, base: Path, tmp_path: Path) -> None:
    before = sha256(base)
    a = nbd.allocate(base, tmp_path / "a", "b1", owner="sbx-a")
    b = nbd.allocate(base, tmp_path / "b", "b1", owner="sbx-b")
    assert a.socket_path != b.socket_path and a.state == b.state == "allocated"
    ok(qemu_io(a.socket_path, "write -P 0xaa 0 64k", "write -P 0x11 100 7", "flush"))
    ok(qemu_io(b.socket_path, "write -P 0xbb 0 64k"))
    ok(qemu_io(a.socket_path, "read -P 0xaa 0 100", "read -P 0x11 100 7", "read -P 0xaa 107 65429"))
    ok(qemu_io(b.socket_path, "read -P 0xbb 0 64k"))
    # the untouched rest of each export is the base, byte for byte
    out = tmp_path / "a.raw"
    ok(subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri(a.socket_path), str(out)],
                      capture_output=True, text=True))
    assert out.read_bytes()[65536:] == base.read_bytes()[65536:]
    assert sha256(base) == before

    states = {s.owner: s for s in nbd.state()}
    assert states["sbx-a"].dirty_blocks == 16 and states["sbx-a"].metrics.writes == 2
    assert states["sbx-a"].cow_dir == tmp_path / "a" and states["sbx-a"].base == base
    m = nbd.metrics()
    assert m["exports_in_use"] == 2 and m["exports_free"] >= 1  # the pool was topped up
    # 7 bytes at 100 arrive as one 512-byte write: the server announces 512 as its minimum block
    assert m["dirty_blocks"] == 32 and m["bytes_written"] == 2 * 65536 + 512
    kinds = [(e.kind, e.owner) for e in nbd.events()]
    assert ("allocated", "sbx-a") in kinds and ("connected", "sbx-a") in kinds
    assert ("disconnected", "sbx-a") in kinds


def test_killed_client_leaves_the_export_reusable(nbd: NbdServerThread, base: Path, tmp_path: Path) -> None:
    ex = nbd.allocate(base, tmp_path / "a", "b1", owner="sbx")
    ok(qemu_io(ex.socket_path, "write -P 0x5a 1M 1M"))
    # a client in the middle of a long stream of writes, killed without any goodbye
    proc = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "aio_write -P 0x77 0 1M"] + ["-c", "write -P 0x66 2M 4M"] * 200
                            + [uri(ex.socket_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while nbd.export_of("sbx").state != "connected" and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.01)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # a new client at once (the server may not even have seen the EOF yet: a dead owner is evicted)
    ok(qemu_io(ex.socket_path, "read -P 0x5a 1M 1M", "write -P 0x42 0 4k", "read -P 0x42 0 4k"))
    assert nbd.export_of("sbx").state == "allocated"  # type: ignore[union-attr]
    assert nbd.metrics()["errors"] == 0


def test_second_client_is_refused_while_the_first_lives(nbd: NbdServerThread, base: Path, tmp_path: Path) -> None:
    ex = nbd.allocate(base, tmp_path / "a", "b1", owner="sbx")
    with RawClient(ex.socket_path) as first, RawClient(ex.socket_path) as second:
        first.greeting()
        assert first.go()[-1][0] == p.REP_ACK
        second.greeting()
        rtype, msg = second.go()[-1]
        assert rtype == p.REP_ERR_POLICY and b"in use by pid" in msg and b"two writers" in msg
        assert nbd.export_of("sbx").client_pid == os.getpid()  # type: ignore[union-attr]


def test_release_disconnects_and_frees_the_slot(nbd: NbdServerThread, base: Path, tmp_path: Path) -> None:
    ex = nbd.allocate(base, tmp_path / "a", "b1", owner="sbx")
    with RawClient(ex.socket_path) as c:
        c.greeting()
        c.go()
        c.request(p.CMD_WRITE, 0, 4, b"data")
        assert c.reply()[0] == 0
        assert nbd.release("sbx") is True
        with pytest.raises((ConnectionError, OSError)):
            c.request(p.CMD_READ, 0, 4)
            c.reply()
    assert nbd.release("sbx") is False
    free = {s.name: s for s in nbd.state()}[ex.name]
    assert free.state == "free" and free.owner is None
    with RawClient(ex.socket_path) as c:
        c.greeting()
        rtype, msg = c.go()[-1]
        assert rtype == p.REP_ERR_UNKNOWN and b"not allocated" in msg
    kinds = [e.kind for e in nbd.events()]
    assert kinds.count("released") == 1
    # the same sandbox state comes back on a new allocation (recovery keeps the socket path)
    again = nbd.allocate(base, tmp_path / "a", "b1", owner="sbx", prefer=ex.name)
    assert again.socket_path == ex.socket_path
    ok(qemu_io(again.socket_path, "read -v 0 4"))
    assert ok(qemu_io(again.socket_path, "read -v 0 4")).startswith("00000000:  64 61 74 61  data")


def test_server_restart_keeps_export_state(base: Path, tmp_path: Path) -> None:
    with NbdServerThread(tmp_path / "run") as first:
        ex = first.allocate(base, tmp_path / "a", "b1", owner="sbx")
        ok(qemu_io(ex.socket_path, "write -P 0x99 4k 8k"))
        with pytest.raises(RuntimeError, match="another NBD server"):
            NbdServerThread(tmp_path / "run").start()
    with NbdServerThread(tmp_path / "run") as second:
        again = second.allocate(base, tmp_path / "a", "b1", owner="sbx", prefer=ex.name)
        assert again.socket_path == ex.socket_path and again.dirty_blocks == 2
        ok(qemu_io(again.socket_path, "read -P 0x99 4k 8k"))


def test_bad_requests_get_clear_errors_and_the_connection_goes_on(
        nbd: NbdServerThread, base: Path, tmp_path: Path) -> None:
    ex = nbd.allocate(base, tmp_path / "a", "b1", owner="sbx")
    with RawClient(ex.socket_path) as c:
        c.greeting()
        assert c.option(p.OPT_LIST_META_CONTEXT, b"x")[-1][0] == p.REP_ERR_UNSUP
        rtype, msg = c.option(99)[-1]
        assert rtype == p.REP_ERR_UNSUP and b"unknown option 99" in msg
        rtype, msg = c.option(p.OPT_GO, struct.pack(">I", 100) + b"short")[-1]
        assert rtype == p.REP_ERR_INVALID
        name = b"someone-else"
        rtype, msg = c.option(p.OPT_GO, struct.pack(">I", len(name)) + name + b"\0\0")[-1]
        assert rtype == p.REP_ERR_UNKNOWN and b"someone-else" in msg
        replies = c.option(p.OPT_LIST)
        assert replies[0][0] == p.REP_SERVER and ex.name.encode() in replies[0][1]
        c.go()
        assert c.size == BASE_SIZE
        cases = [
            (dict(type_=p.CMD_READ, offset=BASE_SIZE - 2, length=4), p.EINVAL, "past the end"),
            (dict(type_=p.CMD_WRITE, offset=BASE_SIZE, length=3, data=b"abc"), p.ENOSPC, "past the end"),
            (dict(type_=p.CMD_READ, offset=0, length=p.MAX_REQUEST_LENGTH + 1), p.EOVERFLOW, "exceeds"),
            (dict(type_=p.CMD_BLOCK_STATUS, offset=0, length=4096), p.EINVAL, "unsupported command BLOCK_STATUS"),
            (dict(type_=77, offset=0, length=1), p.EINVAL, "unsupported command command 77"),
            (dict(type_=p.CMD_READ, offset=0, length=1, flags=p.CMD_FLAG_DF), p.EINVAL, "not valid for READ"),
        ]
        for i, (req, errno, text) in enumerate(cases):
            c.request(handle=i, **req)  # type: ignore[arg-type]
            got_errno, handle, payload = c.reply()
            assert (got_errno, handle) == (errno, i)
            assert text in error_of(payload)[1]
        c.request(p.CMD_READ, 0, 16, handle=99)
        assert c.reply() == (0, 99, base.read_bytes()[:16])
        c.request(p.CMD_DISC)
    assert nbd.metrics()["errors"] == len(cases)


def test_simple_replies_without_structured_negotiation(nbd: NbdServerThread, base: Path, tmp_path: Path) -> None:
    ex = nbd.allocate(base, tmp_path / "a", "b1", owner="sbx")
    with RawClient(ex.socket_path) as c:
        c.greeting()
        c.go(structured=False)
        c.request(p.CMD_READ, BASE_SIZE, 1, handle=5)
        assert c.simple_reply() == (p.EINVAL, 5)
        c.request(p.CMD_READ, 0, 8, handle=6)
        assert c.simple_reply() == (0, 6) and c.recv_exact(8) == base.read_bytes()[:8]
        # the old-style EXPORT_NAME path is served too (on another connection: one option ends it)
    with RawClient(ex.socket_path) as c:
        c.greeting()
        c.sock.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, 0))
        size, flags = struct.unpack(">QH", c.recv_exact(10))
        assert size == BASE_SIZE and flags & p.TFLAG_SEND_FLUSH
