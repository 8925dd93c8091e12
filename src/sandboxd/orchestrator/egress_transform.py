"""Request transforms of the egress proxy (E2B's ``network.rules``): one intercepted connection.

The sandbox's TLS is terminated with a certificate from its own CA (:mod:`egress_ca`), its
HTTP/1.1 requests are read one by one and each gets the rule's headers (replacing any of the same
name; ``${e2b.secrets.<name>}`` filled in with the secret's current value, here, per request),
and they go on over TLS to the address the sandbox dialled, whose certificate must be valid for
the host (the system's CAs, plus the operator's ``egress_upstream_ca``). Answers are passed back
unchanged. Bodies are streamed (``Content-Length`` or chunked), never held; after an ``Upgrade``
or ``CONNECT`` the connection is passed through as it is. The rule is looked up again for each
request, so ``update_network`` applies to open connections too.

The ClientHello was read already (to find the name), so the TLS toward the sandbox runs over
memory BIOs fed from the connection's stream rather than ``start_tls``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Awaitable, Callable

from sandboxd.orchestrator.egress import PLACEHOLDER, HostRule

MAX_HEAD = 65536
CHUNK = 65536


class MissingSecret(Exception):
    """A placeholder names a secret that is gone or cannot be unsealed: the request is not sent."""


class TlsServerStream:
    """The server side of TLS over a connection whose first bytes were read already."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: ssl.SSLContext,
                 first: bytes) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=True)
        self._in.write(first)
        self._reader, self._writer = reader, writer

    async def _send(self) -> None:
        if data := self._out.read():
            self._writer.write(data)
            await self._writer.drain()

    async def _receive(self) -> bool:
        chunk = await self._reader.read(CHUNK)
        if chunk:
            self._in.write(chunk)
        else:
            self._in.write_eof()
        return bool(chunk)

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._send()
                if not await self._receive():
                    raise ConnectionError("the sandbox closed the connection during the TLS handshake") from None
        await self._send()

    async def read(self) -> bytes:
        """Some plaintext; b"" at the end."""
        while True:
            try:
                data = self._tls.read(CHUNK)
            except ssl.SSLWantReadError:
                await self._send()
                await self._receive()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            await self._send()
            return data

    async def write(self, data: bytes) -> None:
        self._tls.write(data)
        await self._send()


class Buffered:
    """Reads of a byte source by line, head and size (what an HTTP/1 request needs)."""

    def __init__(self, read: Callable[[], Awaitable[bytes]]) -> None:
        self._read, self._buf = read, b""

    async def _fill(self) -> bool:
        chunk = await self._read()
        self._buf += chunk
        return bool(chunk)

    async def until(self, sep: bytes) -> bytes | None:
        """Up to and with ``sep``; None at the end before a byte came."""
        while (i := self._buf.find(sep)) < 0:
            if len(self._buf) > MAX_HEAD:
                raise ConnectionError("request head too long")
            if not await self._fill():
                if self._buf:
                    raise ConnectionError("the sandbox closed the connection mid-request")
                return None
        out, self._buf = self._buf[:i + len(sep)], self._buf[i + len(sep):]
        return out

    async def some(self, limit: int) -> bytes:
        if not self._buf and not await self._fill():
            raise ConnectionError("the sandbox closed the connection mid-body")
        out, self._buf = self._buf[:limit], self._buf[limit:]
        return out

    def take_all(self) -> bytes:
        out, self._buf = self._buf, b""
        return out


def rewrite_head(head: bytes, headers: dict[str, tuple[str, str]]) -> bytes:
    """The request head with ``headers`` (lower-cased name → (name, value)) set: any line of
    the same name dropped, the new ones added last."""
    lines = head[:-4].split(b"\r\n")
    kept = [lines[0]] + [ln for ln in lines[1:]
                         if ln.partition(b":")[0].strip().decode("latin-1").lower() not in headers]
    kept += [f"{name}: {value}".encode() for name, value in headers.values()]
    return b"\r\n".join(kept) + b"\r\n\r\n"


def framing(head: bytes) -> tuple[str, int]:
    """How the request's body ends: ``("chunked", 0)``, ``("length", n)``, ``("none", 0)``, or
    ``("tunnel", 0)`` (``Upgrade``/``CONNECT``: opaque bytes from here on)."""
    lines = head[:-4].split(b"\r\n")
    if lines[0].upper().startswith(b"CONNECT "):
        return "tunnel", 0
    fields: dict[str, str] = {}
    for ln in lines[1:]:
        name, _, value = ln.partition(b":")
        key = name.strip().decode("latin-1").lower()
        fields[key] = (fields[key] + "," if key in fields else "") + value.strip().decode("latin-1")
    if "upgrade" in fields:
        return "tunnel", 0
    if "chunked" in fields.get("transfer-encoding", "").lower():
        return "chunked", 0
    if "content-length" in fields:
        try:
            n = int(fields["content-length"].split(",")[0])
        except ValueError:
            raise ConnectionError("bad Content-Length") from None
        if n < 0:
            raise ConnectionError("bad Content-Length")
        return "length", n
    return "none", 0


def fill(rule: HostRule, secret_value: Callable[[str], str | None]) -> dict[str, tuple[str, str]]:
    """The rule's headers with every ``${e2b.secrets.<name>}`` replaced by the secret's current
    value (blocking: reads the database; run it off the proxy's loop)."""
    def one(m: re.Match[str]) -> str:
        try:
            value = secret_value(m[2]) if m[1] == "secrets" else None
        except Exception as exc:  # noqa: BLE001 - e.g. sealed under another key: fail closed
            raise MissingSecret(m[2]) from exc
        if value is None:
            raise MissingSecret(m[2])
        return value
    out = {}
    for key, (name, value) in rule.headers().items():
        out[key] = (name, PLACEHOLDER.sub(one, value))
    return out


async def _copy_body(src: Buffered, send: Callable[[bytes], Awaitable[None]], kind: str, length: int) -> None:
    if kind == "length":
        while length:
            data = await src.some(min(length, CHUNK))
            length -= len(data)
            await send(data)
    elif kind == "chunked":
        while True:
            line = await src.until(b"\r\n")
            if line is None:
                raise ConnectionError("the sandbox closed the connection mid-body")
            await send(line)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise ConnectionError("bad chunk size") from None
            if size == 0:
                while (trailer := await src.until(b"\r\n")) not in (None, b"\r\n"):
                    assert trailer is not None
                    await send(trailer)
                await send(b"\r\n")
                return
            await _copy_body(src, send, "length", size + 2)


async def relay(client: TlsServerStream, up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter,
                headers_for: Callable[[], Awaitable[dict[str, tuple[str, str]] | None]]) -> None:
    """Requests from the sandbox, transformed, to the upstream; its answers back as they come.
    ``headers_for`` gives the headers to set on the next request (None: the rule is gone)."""
    async def to_upstream(data: bytes) -> None:
        up_writer.write(data)
        await up_writer.drain()

    async def requests() -> None:
        src = Buffered(client.read)
        while (head := await src.until(b"\r\n\r\n")) is not None:
            kind, length = framing(head)
            headers = await headers_for()
            await to_upstream(rewrite_head(head, headers) if headers else head)
            if kind == "tunnel":
                if rest := src.take_all():
                    await to_upstream(rest)
                while data := await client.read():
                    await to_upstream(data)
                return
            await _copy_body(src, to_upstream, kind, length)

    async def answers() -> None:
        while data := await up_reader.read(CHUNK):
            await client.write(data)

    tasks = [asyncio.ensure_future(requests()), asyncio.ensure_future(answers())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # an error ends the connection
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError, ssl.SSLError):
                await task
