"""The proxy against a real upstream HTTP server on loopback: streaming both ways, disconnects."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from sandboxd.proxy.asgi import SandboxProxy
from sandboxd.proxy.asgi import Upstream as Route


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream:
    """/stream sends 3 chunks 0.2 s apart; /echo returns the request body; /forever streams until
    the client goes away and records that it did."""

    def __init__(self) -> None:
        self.disconnected = threading.Event()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/echo":
            body = b""
            while True:
                m = await receive()
                body += m.get("body", b"")
                if not m.get("more_body"):
                    break
            await send({"type": "http.response.start", "status": 200, "headers": [(b"x-seen-query", scope["query_string"])]})
            await send({"type": "http.response.body", "body": body})
            return
        if path == "/forever":
            self._watcher = asyncio.ensure_future(self._watch_disconnect(receive))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3 if path == "/stream" else 10_000):
            if self.disconnected.is_set():
                return
            await send({"type": "http.response.body", "body": f"chunk{i}\n".encode(), "more_body": True})
            await asyncio.sleep(0.2)
        await send({"type": "http.response.body", "body": b""})

    async def _watch_disconnect(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected.set()


def _serve(app, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return server


@pytest.fixture
def proxied() -> Iterator[tuple[str, int, Upstream]]:
    upstream, up_port, proxy_port = Upstream(), _free_port(), _free_port()

    async def control_plane(scope, receive, send) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"control plane"})

    servers = [_serve(upstream, up_port),
               _serve(SandboxProxy(control_plane, {"sbx1": Route("127.0.0.1")}.get), proxy_port)]
    yield f"http://127.0.0.1:{proxy_port}", up_port, upstream
    for s in servers:
        s.should_exit = True


def test_response_streams_chunk_by_chunk(proxied) -> None:
    url, up_port, _ = proxied
    headers = {"E2b-Sandbox-Id": "sbx1", "E2b-Sandbox-Port": str(up_port)}
    arrivals = []
    with httpx.stream("GET", f"{url}/stream", headers=headers) as r:
        for line in r.iter_lines():
            arrivals.append((time.monotonic(), line))
    assert [line for _, line in arrivals] == ["chunk0", "chunk1", "chunk2"]
    assert arrivals[-1][0] - arrivals[0][0] > 0.3  # not buffered until the end


def test_chunked_request_body_and_query_pass_through(proxied) -> None:
    url, up_port, _ = proxied
    headers = {"E2b-Sandbox-Id": "sbx1", "E2b-Sandbox-Port": str(up_port)}

    def body() -> Iterator[bytes]:
        yield b"part1-"
        yield b"part2"

    r = httpx.post(f"{url}/echo?path=%2Fa%20b&x=1", headers=headers, content=body())
    assert r.content == b"part1-part2"
    assert r.headers["x-seen-query"] == "path=%2Fa%20b&x=1"


def test_client_disconnect_closes_upstream(proxied) -> None:
    url, up_port, upstream = proxied
    headers = {"E2b-Sandbox-Id": "sbx1", "E2b-Sandbox-Port": str(up_port)}
    with httpx.stream("GET", f"{url}/forever", headers=headers) as r:
        lines = r.iter_lines()
        assert next(lines) == "chunk0"
    assert upstream.disconnected.wait(5)


def test_unknown_sandbox_closed_port_and_control_plane(proxied) -> None:
    url, _, _ = proxied
    r = httpx.get(f"{url}/health", headers={"E2b-Sandbox-Id": "other"})
    assert r.status_code == 502 and "was not found" in r.json()["message"]
    r = httpx.get(f"{url}/", headers={"E2b-Sandbox-Id": "sbx1", "E2b-Sandbox-Port": str(_free_port())})
    assert r.status_code == 502 and "port is not open" in r.json()["message"]
    assert httpx.get(f"{url}/v2/sandboxes").text == "control plane"
