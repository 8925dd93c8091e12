"""The proxy's HTTP/1.1 client to a sandbox's ports: kept-alive connections over asyncio streams.

Why not httpx: every request through the proxy paid httpx's layers (request model, httpcore's
pool, anyio) on top of the hop itself: measured on loopback to envd's ``/health``, 2.3-2.6 ms per
request through ``httpx.AsyncClient`` vs 0.64-0.66 ms over a plain asyncio stream (2 cores,
load 3). Only what the proxy needs is here: one request at a time per connection, bodies
streamed both ways (fixed length as the client sent it, else chunked), responses framed by
``Transfer-Encoding: chunked``, ``Content-Length`` or the connection's end, interim 1xx skipped,
and a connection reused only after a response read to its end.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator

CONNECT_TIMEOUT_S = 5.0
#: idle connections kept per (scheme, port) of a sandbox
MAX_IDLE = 20
#: how long an idle connection is reused: envd keeps them 330 s (envd/__main__.py), any other
#: server in the sandbox is unknown, so the usual 5 s (httpx's default)
IDLE_S_ENVD = 300.0
IDLE_S_OTHER = 5.0
READ_CHUNK = 64 * 1024
HEAD_LIMIT = 256 * 1024  # request/status line and headers

_NO_BODY_STATUS = frozenset({204, 304})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

Headers = list[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """The sandbox's server could not be reached or broke the protocol."""


class UpstreamConnectError(UpstreamError):
    """Nothing accepted the connection (the port is not open)."""


def _tls_context() -> ssl.SSLContext:
    """``httpsPorts``: the sandbox's own (self-signed) server, unverified as on E2B."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class _Conn:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = 0.0

    def usable(self, max_idle_s: float) -> bool:
        return (not self.writer.is_closing() and not self.reader.at_eof() and self.reader.exception() is None
                and time.monotonic() - self.idle_since < max_idle_s)

    def close(self) -> None:
        self.writer.close()


class UpstreamResponse:
    """A response whose head is read; its body comes from :meth:`aiter_raw` (still encoded as
    the server sent it, chunked framing removed). :meth:`aclose` returns the connection to the
    pool if the body was read to its end, else closes it."""

    def __init__(self, pool: _PortPool, conn: _Conn, status: int, headers: Headers, method: str,
                 reusable: bool = True) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn
        self.status_code = status
        self.raw_headers = headers
        self._reusable = reusable  # False: the request was not sent whole
        self._chunked = False
        self._length: int | None = None
        if method == "HEAD" or status in _NO_BODY_STATUS or status < 200:
            self._length = 0
        else:
            for k, v in headers:
                name = k.lower()
                if name == b"transfer-encoding" and b"chunked" in v.lower():
                    self._chunked = True
                elif name == b"content-length" and not self._chunked:
                    try:
                        self._length = int(v)
                    except ValueError as e:
                        raise UpstreamError(f"invalid Content-Length {v!r}") from e
                elif name == b"connection" and b"close" in v.lower():
                    self._reusable = False
            if self._chunked:
                self._length = None
            elif self._length is None:
                self._reusable = False  # the body ends with the connection
        self._done = self._length == 0 and not self._chunked

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        assert self._conn is not None
        reader = self._conn.reader
        if self._chunked:
            while True:
                line = await reader.readuntil(b"\r\n")
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError as e:
                    raise UpstreamError(f"invalid chunk size line {line[:40]!r}") from e
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailers: dropped (as httpx did)
                    break
                while size:
                    data = await reader.read(min(size, READ_CHUNK))
                    if not data:
                        raise UpstreamError("the sandbox's server closed the connection mid-chunk")
                    size -= len(data)
                    yield data
                if await reader.readexactly(2) != b"\r\n":
                    raise UpstreamError("chunk not followed by CRLF")
        elif self._length is not None:
            remaining = self._length
            while remaining:
                data = await reader.read(min(remaining, READ_CHUNK))
                if not data:
                    raise UpstreamError("the sandbox's server closed the connection before the whole body")
                remaining -= len(data)
                yield data
        else:
            while data := await reader.read(READ_CHUNK):
                yield data
        self._done = True

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._reusable:
            self._pool.release(conn)
        else:
            conn.close()


class _PortPool:
    """Idle connections to one (scheme, address, port)."""

    def __init__(self, address: str, port: int, tls: bool, max_idle_s: float) -> None:
        self.address, self.port, self.tls, self.max_idle_s = address, port, tls, max_idle_s
        self._idle: list[_Conn] = []
        self._host = address if port == (443 if tls else 80) else f"{address}:{port}"
        self._closed = False

    def release(self, conn: _Conn) -> None:
        if self._closed or len(self._idle) >= MAX_IDLE or not conn.usable(float("inf")):
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def _connect(self) -> _Conn:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.address, self.port, limit=HEAD_LIMIT,
                                        ssl=_tls_context() if self.tls else None),
                CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, ssl.SSLError) as e:
            raise UpstreamConnectError(f"cannot connect to {self._host}: {e}") from e
        return _Conn(reader, writer)

    def _checkout(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()  # the most recent: the least likely to have been closed
            if conn.usable(self.max_idle_s):
                return conn
            conn.close()
        return None

    async def send(self, method: str, target: str, headers: Headers,
                   body: AsyncIterator[bytes] | None) -> UpstreamResponse:
        has_length = any(k.lower() == b"content-length" for k, _ in headers)
        head = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1")]
        if not any(k.lower() == b"host" for k, _ in headers):
            head.append(b"host: " + self._host.encode("latin-1") + b"\r\n")
        head.extend(k + b": " + v + b"\r\n" for k, v in headers)
        if body is not None and not has_length:
            head.append(b"transfer-encoding: chunked\r\n")
        elif body is None and not has_length and method in _BODY_METHODS:
            head.append(b"content-length: 0\r\n")
        head.append(b"\r\n")
        request_head = b"".join(head)
        conn = self._checkout()
        if conn is not None and body is None:
            # a kept-alive connection the server closed just now: once more on a new one
            try:
                return await self._exchange(conn, method, request_head, None, chunked=False)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise UpstreamError("the sandbox's server closed the connection mid-response") from e
            except (ConnectionResetError, BrokenPipeError):
                pass
            conn = None
        if conn is None:
            conn = await self._connect()
        try:
            return await self._exchange(conn, method, request_head, body, chunked=body is not None and not has_length)
        except asyncio.IncompleteReadError as e:
            raise UpstreamError("the sandbox's server closed the connection without a response") from e
        except asyncio.LimitOverrunError as e:
            raise UpstreamError("response head too large") from e

    async def _exchange(self, conn: _Conn, method: str, head: bytes, body: AsyncIterator[bytes] | None,
                        chunked: bool) -> UpstreamResponse:
        try:
            writer = conn.writer
            sent = False
            try:
                if body is None:
                    writer.write(head)
                else:
                    # the head goes out with the body's first chunk: one segment for a small
                    # request instead of two, each a wake-up and a read for the sandbox's server
                    pending = head
                    async for chunk in body:
                        if not chunk:
                            continue  # an empty chunk would read as chunked framing's last one
                        writer.write(pending + (b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk))
                        pending = b""
                        await writer.drain()
                    writer.write(pending + b"0\r\n\r\n" if chunked else pending)
                await writer.drain()
                sent = True
            except (ConnectionResetError, BrokenPipeError):
                if body is None:
                    raise
                # a server may answer (an error) before the whole body and close: its answer
                # is still the response (as httpcore does); no answer is a reset
            status, headers = await _read_head(conn.reader)
            return UpstreamResponse(self, conn, status, headers, method, reusable=sent)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, Headers]:
    """The final response's status and headers (interim 1xx but 101 skipped)."""
    while True:
        raw = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw[:-4].split(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise UpstreamError(f"invalid status line {status_line[:80]!r}")
        status = int(parts[1])
        headers: Headers = []
        for line in lines:
            name, sep, value = line.partition(b":")
            if not sep:
                raise UpstreamError(f"invalid header line {line[:80]!r}")
            headers.append((name.strip(), value.strip()))
        if 100 <= status < 200 and status != 101:
            continue
        return status, headers


class SandboxConnections:
    """Kept-alive connections to the ports of one boot of one sandbox."""

    def __init__(self, address: str, envd_port: int) -> None:
        self.address = address
        self._envd_port = envd_port
        self._ports: dict[tuple[int, bool], _PortPool] = {}

    async def send(self, port: int, tls: bool, method: str, target: str, headers: Headers,
                   body: AsyncIterator[bytes] | None) -> UpstreamResponse:
        pool = self._ports.get((port, tls))
        if pool is None:
            idle_s = IDLE_S_ENVD if port == self._envd_port and not tls else IDLE_S_OTHER
            pool = self._ports[(port, tls)] = _PortPool(self.address, port, tls, idle_s)
        return await pool.send(method, target, headers, body)

    async def aclose(self) -> None:
        for pool in self._ports.values():
            pool.close()
        self._ports.clear()
