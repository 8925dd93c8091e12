"""Websockets through the proxy against a real websocket server on loopback."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import InvalidStatus

from sandboxd.proxy.asgi import SandboxProxy, Upstream


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def proxy_and_upstream() -> Iterator[tuple[int, int]]:
    up_port, proxy_port = _free_port(), _free_port()
    stop = threading.Event()

    async def echo(ws) -> None:
        async for message in ws:
            await ws.send(message if isinstance(message, bytes) else f"echo:{message}:{ws.request.path}")

    async def upstream_main() -> None:
        async with serve(echo, "127.0.0.1", up_port, subprotocols=["chat"]):
            while not stop.is_set():
                await asyncio.sleep(0.05)

    threading.Thread(target=lambda: asyncio.run(upstream_main()), daemon=True).start()

    async def control_plane(scope, receive, send) -> None:
        pass

    server = uvicorn.Server(uvicorn.Config(SandboxProxy(control_plane, {"sbx1": Upstream("127.0.0.1")}.get),
                                           host="127.0.0.1", port=proxy_port, log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield proxy_port, up_port
    server.should_exit = True
    stop.set()


def test_websocket_relay_by_host_form_and_headers(proxy_and_upstream: tuple[int, int]) -> None:
    proxy_port, up_port = proxy_and_upstream

    async def scenario() -> None:
        async with connect(f"ws://{up_port}-sbx1.sandbox.test:{proxy_port}/room?x=1", subprotocols=["chat"],
                           host="127.0.0.1", port=proxy_port) as ws:
            assert ws.subprotocol == "chat"
            await ws.send("hi")
            assert await ws.recv() == "echo:hi:/room?x=1"
            await ws.send(b"\x00\x01")
            assert await ws.recv() == b"\x00\x01"
        async with connect(f"ws://127.0.0.1:{proxy_port}/", subprotocols=["chat"],
                           additional_headers={"E2b-Sandbox-Id": "sbx1", "E2b-Sandbox-Port": str(up_port)}) as ws:
            await ws.send("again")
            assert (await ws.recv()).startswith("echo:again")

    asyncio.run(scenario())


def test_websocket_to_unknown_sandbox_or_closed_port_is_refused(proxy_and_upstream: tuple[int, int]) -> None:
    proxy_port, _ = proxy_and_upstream

    async def attempt(host: str) -> None:
        async with connect(f"ws://{host}:{proxy_port}/", host="127.0.0.1", port=proxy_port, open_timeout=10):
            pass

    for host in ("8080-nosuch.sandbox.test", f"{_free_port()}-sbx1.sandbox.test"):
        with pytest.raises(InvalidStatus):
            asyncio.run(attempt(host))
