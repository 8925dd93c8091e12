"""Fuzzing the NBD server with malformed handshakes and requests (seeded, so failures replay).

Each session connects, sends a random mix of valid and broken frames, half-closes and drains the
socket. Between sessions a real client (qemu-io) must still get correct data; at the end the
server is alive, counted the protocol errors, still serves the export and never touched the base.
"""

from __future__ import annotations

import random
import socket
import struct
import subprocess
from pathlib import Path

from nbd_helpers import BASE_SIZE, sha256

from sandboxd.nbd import protocol as p
from sandboxd.nbd.thread import NbdServerThread

SESSIONS = 1000
KNOWN_OPTIONS = [p.OPT_EXPORT_NAME, p.OPT_ABORT, p.OPT_LIST, p.OPT_STARTTLS, p.OPT_INFO, p.OPT_GO,
                 p.OPT_STRUCTURED_REPLY, p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT]


def _length(rng: random.Random) -> int:
    return rng.choice([0, 1, 7, 512, 4096, 65536, p.MAX_REQUEST_LENGTH + 1, 2**32 - 1, rng.randrange(2**32)])


def _option(rng: random.Random) -> bytes:
    option = rng.choice([*KNOWN_OPTIONS, rng.randrange(2 ** 32)])
    if option in (p.OPT_GO, p.OPT_INFO) and rng.random() < 0.6:
        name = rng.choice([b"", b"nbd0", rng.randbytes(rng.randrange(20))])
        n = rng.randrange(4)
        data = struct.pack(">I", rng.choice([len(name), rng.randrange(2**32)])) + name + struct.pack(">H", n)
        data += b"".join(struct.pack(">H", rng.randrange(8)) for _ in range(n))
        data = data[:rng.randrange(len(data) + 1)] if rng.random() < 0.2 else data
    else:
        data = rng.randbytes(rng.choice([0, 0, 3, 100]))
    declared = len(data) if rng.random() < 0.8 else _length(rng)
    magic = p.IHAVEOPT if rng.random() < 0.95 else rng.randrange(2**64)
    return p.OPTION_HEADER.pack(magic, option, declared) + data


def _request(rng: random.Random) -> bytes:
    type_ = rng.choice([p.CMD_READ, p.CMD_WRITE, p.CMD_FLUSH, p.CMD_TRIM, p.CMD_WRITE_ZEROES, p.CMD_CACHE,
                        p.CMD_BLOCK_STATUS, rng.randrange(2**16)])
    offset = rng.choice([0, 4096, BASE_SIZE - 1, BASE_SIZE, rng.randrange(BASE_SIZE), rng.randrange(2**64)])
    length = rng.choice([0, 1, 4096, 65536, rng.randrange(1 << 20), _length(rng)])
    flags = rng.choice([0, 0, p.CMD_FLAG_FUA, rng.randrange(2**16)])
    magic = p.REQUEST_MAGIC if rng.random() < 0.97 else rng.randrange(2**32)
    payload = b""
    if type_ == p.CMD_WRITE:
        payload = rng.randbytes(min(length, 70000)) if rng.random() < 0.9 else rng.randbytes(10)
    return struct.pack(">IHHQQI", magic, flags, type_, rng.randrange(2**64), offset, length) + payload


def _session(rng: random.Random) -> bytes:
    """Bytes of one client: junk, or a (mostly) valid start followed by random frames."""
    if rng.random() < 0.1:
        return rng.randbytes(rng.randrange(200))
    flags = p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES if rng.random() < 0.9 else rng.randrange(2**32)
    out = struct.pack(">I", flags)
    out += b"".join(_option(rng) for _ in range(rng.randrange(4)))
    if rng.random() < 0.7:
        if rng.random() < 0.5:
            out += p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_STRUCTURED_REPLY, 0)
        out += p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_GO, 6) + b"\0\0\0\0\0\0"
        out += b"".join(_request(rng) for _ in range(rng.randrange(1, 8)))
    return out


def _run(sock_path: Path, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(1 << 16):
                pass
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server hung up on a broken frame: that is the point


def _healthy(sock_path: Path) -> None:
    proc = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 7M 4k", "-c", "read -P 0x3c 7M 4k",
                           f"nbd+unix:///?socket={sock_path}"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "fail" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_malformed_sessions_never_break_the_server(nbd: NbdServerThread, base: Path, tmp_path: Path) -> None:
    before = sha256(base)
    ex = nbd.allocate(base, tmp_path / "cow", "b1", owner="sbx")
    rng = random.Random(20240504)
    for i in range(SESSIONS):
        _run(ex.socket_path, _session(rng))
        if i % 100 == 99:
            _healthy(ex.socket_path)
    _healthy(ex.socket_path)
    state = nbd.export_of("sbx")
    assert state is not None and state.state == "allocated"
    m = nbd.metrics()
    assert m["protocol_errors"] > 20 and m["errors"] > 50, m
    assert sha256(base) == before
    assert any(e.kind == "rejected" for e in nbd.events())
    assert not any(e.kind == "error" for e in nbd.events()), [e for e in nbd.events() if e.kind == "error"]
