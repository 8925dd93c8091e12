"""The sandbox proxy: forwards a client's HTTP traffic to a port inside a sandbox, streaming.

It shares the API's listener. A request is sandbox traffic when it carries ``E2b-Sandbox-Id``
(the SDK sends it on every envd call and never to the control plane) or when its Host is the
``<port>-<sandboxId>.<domain>`` form; everything else goes to the API app.

Bodies stream both ways chunk by chunk: Connect server-streams (process output) and client
streams (stdin) are long-lived. When the client goes away, the upstream request is closed too,
so a disconnected ``commands.run`` frees its connection (the process itself keeps running,
which is what envd's protocol wants).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl

import httpx

from sandboxd.envd.contract import ENVD_PORT
from sandboxd.proxy.upstream import SandboxConnections, UpstreamConnectError, UpstreamError
from sandboxd.proxy.websocket import relay_websocket

log = logging.getLogger("sandboxd.proxy")
#: how often a stream checks that its sandbox is still there (killed or paused: the stream ends)
ROUTE_CHECK_S = 0.5

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]
ASGIApp = Callable[[Any, Any, Any], Any]  # any ASGI app (FastAPI types its scope as a MutableMapping)


@dataclass(frozen=True)
class Upstream:
    """Where a sandbox is reached, and which boot of it answers there: a resumed or rebooted
    sandbox keeps its address, and a kept-alive connection to its previous boot is dead."""

    address: str
    boot: int = 0
    #: ``allowPublicTraffic: false``: every request must carry it (``e2b-traffic-access-token``)
    traffic_token: str | None = None
    #: ``maskRequestHost``: the Host the sandbox's servers see (``${PORT}`` is the port)
    mask_host: str | None = None
    #: ``httpsPorts``: ports whose server speaks TLS itself (the proxy re-encrypts, unverified)
    https_ports: frozenset[int] = frozenset()


Resolver = Callable[[str], Upstream | None]

HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
              b"trailer", b"transfer-encoding", b"upgrade", b"host"}
_HOST_FORM = re.compile(r"^(?P<port>\d{1,5})-(?P<id>[a-z0-9]{1,64})\.")
#: envd paths only the orchestrator may call (``/init`` would let anyone replace the access token).
_INTERNAL_ENVD_PATHS = {"/init"}
#: What envd serves. A request with sandbox headers for envd's port but another path is for the
#: control plane: SDK 2.1-2.2x send ``E2b-Sandbox-Id``/``-Port`` on ``POST /sandboxes/{id}/connect``.
_ENVD_PATHS = {"/health", "/files", "/init", "/envs", "/metrics"}
_ENVD_PREFIXES = ("/process.Process/", "/filesystem.Filesystem/")
#: E2B's header for a sandbox created with ``allowPublicTraffic: false``
TRAFFIC_TOKEN_HEADER = b"e2b-traffic-access-token"


def traffic_denied(upstream: Upstream, port: int, headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why this request may not reach the sandbox's ``port`` (None: it may). A sandbox without
    public traffic answers only requests carrying its traffic token, on every port but envd's,
    whose own access token guards it."""
    if upstream.traffic_token is None or port == ENVD_PORT:
        return None
    given = next((v for k, v in headers if k.lower() == TRAFFIC_TOKEN_HEADER), None)
    if given is None:
        return f"this sandbox is not public: send its traffic access token in {TRAFFIC_TOKEN_HEADER.decode()}"
    if not hmac.compare_digest(given, upstream.traffic_token.encode()):
        return "invalid traffic access token"
    return None


def upstream_headers(upstream: Upstream, port: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The client's headers as the sandbox gets them: hop-by-hop and the traffic token removed,
    Host as ``maskRequestHost`` says (else the client library sets the upstream's own)."""
    out = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() != TRAFFIC_TOKEN_HEADER]
    if upstream.mask_host:
        out.append((b"host", upstream.mask_host.replace("${PORT}", str(port)).encode("latin-1")))
    return out


class ClientDisconnected(Exception):
    pass


class SignedFinder(Protocol):
    def __call__(self, path: str, operation: str, username: str, signature: str,
                 expiration: int | None) -> str | None: ...


def _files_params(scope: Scope) -> dict[str, str]:
    return dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))


def _is_signed_files(scope: Scope) -> bool:
    return scope.get("path") == "/files" and bool(_files_params(scope).get("signature"))


def signed_files_route(scope: Scope, find_signed: SignedFinder) -> tuple[str, int] | None:
    """A pre-signed ``/files`` URL (no sandbox headers): the signature names the sandbox."""
    if not _is_signed_files(scope) or scope.get("method") not in ("GET", "POST"):
        return None
    params = _files_params(scope)
    signature = params["signature"]
    raw_exp = params.get("signature_expiration")
    expiration = int(raw_exp) if raw_exp and raw_exp.isdigit() else None
    operation = "read" if scope["method"] == "GET" else "write"
    sandbox_id = find_signed(params.get("path", ""), operation, params.get("username", ""), signature, expiration)
    return (sandbox_id, ENVD_PORT) if sandbox_id else None


def _is_envd_path(path: str) -> bool:
    return path in _ENVD_PATHS or path.startswith(_ENVD_PREFIXES)


def token_route(scope: Scope, find_by_token: Callable[[str], str | None]) -> tuple[str, int] | None:
    """An envd call that names no sandbox but carries its access token: the token names it.
    SDKs 2.1-2.2x forget ``E2b-Sandbox-Id`` on the sandbox ``Sandbox.connect`` returns, when
    ``E2B_SANDBOX_URL`` is set; the token is the sandbox's own secret, so it routes no one else."""
    token = dict(scope.get("headers", [])).get(b"x-access-token")
    if not token or not _is_envd_path(scope.get("path", "")):
        return None
    sandbox_id = find_by_token(token.decode("latin-1"))
    return (sandbox_id, ENVD_PORT) if sandbox_id else None


def route_of(scope: Scope) -> tuple[str, int] | None:
    """(sandbox id, port) if this request (HTTP or websocket) is for a sandbox, else None."""
    headers = {k.lower(): v for k, v in scope.get("headers", [])}
    sandbox_id = headers.get(b"e2b-sandbox-id")
    if sandbox_id:
        port = _port(headers.get(b"e2b-sandbox-port", str(ENVD_PORT).encode()).decode("latin-1"))
        path = scope.get("path", "")
        if port == ENVD_PORT and not _is_envd_path(path):
            return None
        return sandbox_id.decode("latin-1"), port
    host = headers.get(b"host", b"").decode("latin-1")
    m = _HOST_FORM.match(host)
    if m:
        return m["id"], _port(m["port"])
    return None


def _port(raw: str) -> int:
    return int(raw) if raw.isdigit() and 0 < int(raw) < 65536 else -1


class SandboxProxy:
    """ASGI middleware: sandbox traffic to the sandbox, the rest to ``app``."""

    def __init__(self, app: ASGIApp, resolve: Resolver, find_signed: SignedFinder | None = None,
                 find_by_token: Callable[[str], str | None] | None = None, wake: Resolver | None = None) -> None:
        self.app = app
        self.resolve = resolve
        self.wake = wake  # blocking: resumes a paused sandbox created with autoResume
        self.find_signed = find_signed
        self.find_by_token = find_by_token
        self._pools: dict[str, tuple[Upstream, SandboxConnections]] = {}
        self._last_sweep = 0.0
        self._closing: set[asyncio.Future[None]] = set()  # pools being closed, kept until they are

    def _pool(self, sandbox_id: str, upstream: Upstream) -> SandboxConnections:
        """One connection pool per boot of a sandbox. Addresses are reused when a slot is, and a
        kept-alive connection to a dead sandbox would be black-holed or reset: a pool dies with
        the boot it was made for. No read timeout: process streams stay open as long as the
        process runs."""
        entry = self._pools.get(sandbox_id)
        if entry is None or entry[0] != upstream:
            if entry is not None:
                self._close_later(entry[1])
            entry = self._pools[sandbox_id] = (upstream, SandboxConnections(upstream.address, ENVD_PORT))
        return entry[1]

    def _close_later(self, client: SandboxConnections) -> None:
        """Close a pool in the background; the task is referenced until done (the loop holds
        tasks only weakly)."""
        task = asyncio.ensure_future(client.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _sweep(self) -> None:
        """Close the pools of sandboxes that are gone (at most once a second)."""
        now = time.monotonic()
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        for sandbox_id, (upstream, client) in list(self._pools.items()):
            if self.resolve(sandbox_id) != upstream:
                del self._pools[sandbox_id]
                self._close_later(client)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and (ws_route := route_of(scope)) is not None:
            return await self._websocket(scope, receive, send, *ws_route)
        route = route_of(scope) if scope["type"] == "http" else None
        if route is None and scope["type"] == "http" and self.find_by_token is not None:
            route = token_route(scope, self.find_by_token)
        if route is None and scope["type"] == "http" and self.find_signed is not None:
            route = signed_files_route(scope, self.find_signed)
            if route is None and _is_signed_files(scope):
                return await _error(send, 401, "invalid signature: it matches no running sandbox")
        if route is None:
            if scope["type"] == "lifespan":
                return await self._lifespan(scope, receive, send)
            return await self.app(scope, receive, send)
        sandbox_id, port = route
        upstream = await self._upstream(sandbox_id)
        if upstream is None:
            return await _error(send, 502, "The sandbox was not found", sandbox_id=sandbox_id)
        if port < 0:
            return await _error(send, 400, "E2b-Sandbox-Port is not a valid port")
        if port == ENVD_PORT and scope["path"] in _INTERNAL_ENVD_PATHS:
            return await _error(send, 403, f"{scope['path']} is internal to the orchestrator")
        if (denied := traffic_denied(upstream, port, scope["headers"])) is not None:
            return await _error(send, 403, denied, sandbox_id=sandbox_id, port=port)
        self._sweep()
        await self._forward(scope, receive, send, self._pool(sandbox_id, upstream), sandbox_id, port,
                            upstream_headers(upstream, port, scope["headers"]), upstream)

    async def _upstream(self, sandbox_id: str) -> Upstream | None:
        upstream = self.resolve(sandbox_id)
        if upstream is None and self.wake is not None:
            upstream = await asyncio.to_thread(self.wake, sandbox_id)
        return upstream

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str, port: int) -> None:
        upstream = await self._upstream(sandbox_id)
        if upstream is None or port < 0:
            await receive()
            return await send({"type": "websocket.close", "code": 1008, "reason": "The sandbox was not found"})
        if (denied := traffic_denied(upstream, port, scope["headers"])) is not None:
            await receive()
            return await send({"type": "websocket.close", "code": 1008, "reason": denied})
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        scheme = "wss" if port in upstream.https_ports else "ws"
        host = upstream.mask_host.replace("${PORT}", str(port)) if upstream.mask_host else f"{upstream.address}:{port}"
        await relay_websocket(scope, receive, send, f"{scheme}://{host}{path}" + (f"?{query}" if query else ""),
                              dial=(upstream.address, port))

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass lifespan to the app, and close our upstream pool when it has shut down."""

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                for _, client in self._pools.values():
                    await client.aclose()
                self._pools.clear()
            await send(message)

        await self.app(scope, receive, send_wrapper)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, conns: SandboxConnections,
                       sandbox_id: str, port: int, headers: list[tuple[bytes, bytes]],
                       upstream: Upstream) -> None:
        if not any(k.lower() == b"accept-encoding" for k, _ in headers):
            # a client that never asked for compression must not get it (SDK 1.x's Connect
            # client does not decode gzip): say so to servers that compress by default
            headers.append((b"accept-encoding", b"identity"))
        has_body = any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
        body_done = asyncio.Event()
        content = _request_body(receive, body_done) if has_body else None
        if content is None:
            body_done.set()
        target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        try:
            response = await conns.send(port, port in upstream.https_ports, scope["method"], target, headers, content)
        except ClientDisconnected:
            return
        except UpstreamConnectError:
            return await _error(send, 502, "The sandbox is running but port is not open",
                                sandbox_id=sandbox_id, port=port)
        except (UpstreamError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            return await _error(send, 502, f"error reaching port {port} of the sandbox: {exc}",
                                sandbox_id=sandbox_id, port=port)
        try:
            await _relay(response.status_code, response.raw_headers, response.aiter_raw(), receive, send,
                         body_done, lambda: self.resolve(sandbox_id) == upstream)
        finally:
            await response.aclose()


async def _request_body(receive: Receive, done: asyncio.Event) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            done.set()
            return


async def _stream_response(response: httpx.Response, receive: Receive, send: Send,
                           body_done: asyncio.Event, still_routed: Callable[[], bool]) -> None:
    """:func:`_relay` of an httpx response (the cluster's proxy to its nodes)."""
    await _relay(response.status_code, response.headers.raw, response.aiter_raw(), receive, send,
                 body_done, still_routed)


async def _relay(status: int, raw_headers: list[tuple[bytes, bytes]], chunks: AsyncIterator[bytes],
                 receive: Receive, send: Send, body_done: asyncio.Event, still_routed: Callable[[], bool]) -> None:
    """Send the upstream response as it arrives; stop as soon as the client disconnects, or the
    sandbox is killed or paused (``still_routed`` turns False): a killed sandbox's network is
    deleted without a reset, so its streams would otherwise hang. The response is then left
    unfinished, which closes the client's connection: the SDK probes the sandbox, finds it gone
    and reports E2B's "killed or reached its end of life" error."""
    headers = [(k, v) for k, v in raw_headers if k.lower() not in HOP_BY_HOP]
    await send({"type": "http.response.start", "status": status, "headers": headers})

    async def pump() -> None:
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def client_gone() -> None:
        await body_done.wait()  # before that, the request body reader owns receive()
        while (await receive())["type"] != "http.disconnect":
            pass

    async def route_gone() -> None:
        while still_routed():
            await asyncio.sleep(ROUTE_CHECK_S)

    pump_task = asyncio.ensure_future(pump())
    watch_task = asyncio.ensure_future(client_gone())
    route_task = asyncio.ensure_future(route_gone())
    try:
        await asyncio.wait({pump_task, watch_task, route_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pump_task, watch_task, route_task):
            task.cancel()
        await asyncio.gather(pump_task, watch_task, route_task, return_exceptions=True)
    if route_task.done() and not route_task.cancelled() and pump_task.cancelled():
        log.info("stream from a sandbox ended: the sandbox is gone (killed or paused)")
    if pump_task.done() and not pump_task.cancelled() and pump_task.exception() is not None:
        log.debug("stream from sandbox ended with %r", pump_task.exception())


async def _error(send: Send, status: int, message: str, **extra: Any) -> None:
    """The SDK keys on "was not found" and "port is not open" in 502 bodies."""
    body = json.dumps({"code": status, "message": message, **extra}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
