"""Helpers for NBD tests. ``RawClient`` speaks the wire format by hand, for what real clients never
send (malformed requests, a second client at once) and to see exact error replies; real I/O
tests use qemu-io, qemu-img and QEMU itself."""

from __future__ import annotations

import hashlib
import socket
import struct
from pathlib import Path

from sandboxd.nbd import protocol as p


class RawClient:
    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.size = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def greeting(self, flags: int = p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES) -> None:
        magic, opt, hflags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT) and hflags & p.FLAG_FIXED_NEWSTYLE
        self.sock.sendall(struct.pack(">I", flags))

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; return its replies up to the final one (ACK or an error)."""
        self.sock.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, rtype, length = p.OPTION_REPLY.unpack(self.recv_exact(p.OPTION_REPLY.size))
            assert magic == p.OPTION_REPLY_MAGIC and opt == option
            replies.append((rtype, self.recv_exact(length)))
            if rtype == p.REP_ACK or rtype & p.REP_FLAG_ERROR:
                return replies

    def go(self, name: str = "", structured: bool = True) -> list[tuple[int, bytes]]:
        if structured:
            assert self.option(p.OPT_STRUCTURED_REPLY) == [(p.REP_ACK, b"")]
        raw = name.encode()
        replies = self.option(p.OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        for rtype, data in replies:
            if rtype == p.REP_INFO and struct.unpack_from(">H", data)[0] == p.INFO_EXPORT:
                self.size = struct.unpack_from(">Q", data, 2)[0]
        return replies

    def request(self, type_: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0,
                handle: int = 7) -> None:
        self.sock.sendall(p.pack_request(type_, handle, offset, length, flags) + data)

    def reply(self) -> tuple[int, int, bytes]:
        """(errno, handle, data) of the next reply, simple or structured (one final chunk)."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv_exact(12))
            return error, handle, b""
        assert magic == p.STRUCTURED_REPLY_MAGIC, hex(magic)
        flags, ctype, handle, length = struct.unpack(">HHQI", self.recv_exact(16))
        assert flags & p.REPLY_FLAG_DONE
        payload = self.recv_exact(length)
        if ctype == p.REPLY_TYPE_ERROR:
            return struct.unpack_from(">I", payload)[0], handle, payload
        if ctype == p.REPLY_TYPE_OFFSET_DATA:
            return 0, handle, payload[8:]
        return 0, handle, payload

    def structured_reply(self) -> tuple[int, int, bytes]:
        """(chunk type, handle, payload) of one structured chunk."""
        magic, flags, ctype, handle, length = p.CHUNK_HEADER.unpack(self.recv_exact(p.CHUNK_HEADER.size))
        assert magic == p.STRUCTURED_REPLY_MAGIC and flags & p.REPLY_FLAG_DONE
        return ctype, handle, self.recv_exact(length)

    def simple_reply(self) -> tuple[int, int]:
        magic, error, handle = p.SIMPLE_REPLY.unpack(self.recv_exact(p.SIMPLE_REPLY.size))
        assert magic == p.SIMPLE_REPLY_MAGIC
        return error, handle


def error_of(payload: bytes) -> tuple[int, str]:
    """(errno, message) of an NBD_REPLY_TYPE_ERROR payload."""
    errno, length = struct.unpack_from(">IH", payload)
    return errno, payload[6:6 + length].decode()


BASE_SIZE = 8 * 1024 * 1024


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
