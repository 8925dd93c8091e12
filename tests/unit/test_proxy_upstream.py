"""The proxy's HTTP/1.1 client to a sandbox (proxy/upstream.py) against raw servers on loopback:
what goes on the wire, response framings, and kept-alive connections reused only when safe."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sandboxd.proxy.upstream import SandboxConnections, UpstreamConnectError, UpstreamError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.Server, int, list[int]]:
    """A server whose every connection runs ``handler``; the list counts connections."""
    accepted: list[int] = []

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(r, w)
        finally:
            w.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


async def _read_request(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one request: fixed length or chunked."""
    head = await r.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await r.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await r.readuntil(b"\r\n")
                return head, body
            body += await r.readexactly(size)
            await r.readexactly(2)
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return head, await r.readexactly(int(line.split(b":")[1]))
    return head, b""


async def _body(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c


async def _all(resp) -> bytes:  # type: ignore[no-untyped-def]
    out = b""
    async for chunk in resp.aiter_raw():
        out += chunk
    await resp.aclose()
    return out


def test_keep_alive_reuses_one_connection_and_sends_host() -> None:
    heads: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            try:
                head, _ = await _read_request(r)
            except asyncio.IncompleteReadError:
                return
            heads.append(head)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Case: Kept\r\n\r\nok")
            await w.drain()

    async def main() -> None:
        server, port, accepted = await _serve(handler)
        conns = SandboxConnections("127.0.0.1", envd_port=port)
        for _ in range(3):
            resp = await conns.send(port, False, "GET", "/health?x=1", [(b"x-a", b"1")], None)
            assert resp.status_code == 200
            assert (b"X-Case", b"Kept") in resp.raw_headers  # header case as the server sent it
            assert await _all(resp) == b"ok"
        assert len(accepted) == 1
        assert heads[0].startswith(b"GET /health?x=1 HTTP/1.1\r\n")
        assert f"host: 127.0.0.1:{port}\r\n".encode() in heads[0] and b"x-a: 1\r\n" in heads[0]
        await conns.aclose()
        server.close()

    asyncio.run(main())


def test_request_bodies_fixed_length_as_given_else_chunked() -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            try:
                seen.append(await _read_request(r))
            except asyncio.IncompleteReadError:
                return
            w.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await w.drain()

    async def main() -> None:
        server, port, _ = await _serve(handler)
        conns = SandboxConnections("127.0.0.1", envd_port=port)
        resp = await conns.send(port, False, "POST", "/a", [(b"content-length", b"6")], _body([b"abc", b"def"]))
        assert await _all(resp) == b""
        resp = await conns.send(port, False, "POST", "/b", [], _body([b"x" * 70_000, b"", b"yz"]))
        assert await _all(resp) == b""
        resp = await conns.send(port, False, "POST", "/c", [], None)
        assert await _all(resp) == b""
        assert seen[0][1] == b"abcdef" and b"transfer-encoding" not in seen[0][0].lower()
        assert seen[1][1] == b"x" * 70_000 + b"yz" and b"transfer-encoding: chunked" in seen[1][0]
        assert b"content-length: 0" in seen[2][0]
        await conns.aclose()
        server.close()

    asyncio.run(main())


def test_response_framings_and_interim_responses() -> None:
    responses = iter([
        # interim 100 then a chunked body with an extension and a trailer
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        # HEAD: a Content-Length but no body
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
        # no framing: the body is what comes until the server closes
        b"HTTP/1.1 200 OK\r\n\r\nuntil close",
    ])

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            try:
                await _read_request(r)
            except asyncio.IncompleteReadError:
                return
            data = next(responses)
            w.write(data)
            await w.drain()
            if b"until close" in data:
                return

    async def main() -> None:
        server, port, accepted = await _serve(handler)
        conns = SandboxConnections("127.0.0.1", envd_port=port)
        assert await _all(await conns.send(port, False, "GET", "/", [], None)) == b"hello world"
        resp = await conns.send(port, False, "HEAD", "/", [], None)
        assert resp.status_code == 200 and await _all(resp) == b""
        assert await _all(await conns.send(port, False, "GET", "/", [], None)) == b"until close"
        assert len(accepted) == 1
        await conns.aclose()
        server.close()

    asyncio.run(main())


def test_connection_closed_by_server_is_not_reused_and_unfinished_body_is_not_reused() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            try:
                head, _ = await _read_request(r)
            except asyncio.IncompleteReadError:
                return
            if b"/close" in head:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\na")
                await w.drain()
                return
            if b"/long" in head:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"z" * 10)
                await w.drain()
                await r.read()  # until the client closes
                return
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
            await w.drain()
            if b"/x" in head:
                await asyncio.sleep(0.05)
                return  # a kept-alive connection the server drops while it is idle

    async def main() -> None:
        server, port, accepted = await _serve(handler)
        conns = SandboxConnections("127.0.0.1", envd_port=port)
        assert await _all(await conns.send(port, False, "GET", "/close", [], None)) == b"a"  # 1
        assert await _all(await conns.send(port, False, "GET", "/x", [], None)) == b"b"  # 2
        await asyncio.sleep(0.2)  # the server has closed that kept-alive connection
        assert await _all(await conns.send(port, False, "GET", "/y", [], None)) == b"b"  # 3
        resp = await conns.send(port, False, "GET", "/long", [], None)  # 3 again
        async for _ in resp.aiter_raw():
            break  # the client went away mid-body
        await resp.aclose()
        assert await _all(await conns.send(port, False, "GET", "/z", [], None)) == b"b"  # 4
        assert len(accepted) == 4
        await conns.aclose()
        server.close()

    asyncio.run(main())


def test_errors() -> None:
    async def bad(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await w.drain()

    async def main() -> None:
        server, port, _ = await _serve(bad)
        conns = SandboxConnections("127.0.0.1", envd_port=port)
        with pytest.raises(UpstreamError):
            await conns.send(port, False, "GET", "/", [], None)
        server.close()
        await server.wait_closed()
        with pytest.raises(UpstreamConnectError):
            await conns.send(port, False, "GET", "/", [], None)
        await conns.aclose()

    asyncio.run(main())
