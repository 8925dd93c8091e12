"""The API replica's sandbox proxy: a request for a sandbox goes to the node that holds it.

Which requests are sandbox traffic is decided exactly as ``serve`` decides it (proxy/asgi.py:
``E2b-Sandbox-Id``/``-Port`` headers, ``<port>-<id>.<domain>`` hosts, an envd access token, a
pre-signed ``/files`` URL). The request then goes, streaming both ways (websockets too), to the
owning node's listener with the sandbox named in headers and the cluster secret added; the node's
own proxy checks traffic tokens, refuses ``/init`` and dials the sandbox, as ``serve`` does.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from urllib.parse import urlsplit

import httpx

from sandboxd.cluster.auth import SECRET_HEADER
from sandboxd.cluster.tls import ClusterTls
from sandboxd.envd.auth import file_signature
from sandboxd.orchestrator.volumes import Volumes
from sandboxd.proxy.asgi import (
    HOP_BY_HOP,
    ASGIApp,
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    _error,
    _request_body,
    _stream_response,
    route_of,
    signed_files_route,
    token_route,
)
from sandboxd.proxy.websocket import relay_websocket
from sandboxd.store.db import Database, SandboxRow
from sandboxd.store.nodes_db import GONE, Nodes

#: how long where a sandbox lives is remembered (it never moves; a kill is the node's to enforce)
LOCATION_TTL_S = 2.0
VOLUME_CONTENT = "/volumecontent/"
_NAMING = {b"e2b-sandbox-id", b"e2b-sandbox-port", SECRET_HEADER}


class ClusterProxy:
    """ASGI middleware: sandbox traffic to its node, the rest to ``app`` (the API)."""

    def __init__(self, app: ASGIApp, db: Database, secret: str, tls: ClusterTls | None = None) -> None:
        self.app = app
        self._tls = tls.client_context() if tls is not None else None
        self.db = db
        self.nodes = Nodes(db)
        self._secret = secret.encode()
        self._where: dict[str, tuple[float, str | None]] = {}  # sandbox id → (when, node address)
        self._clients: dict[str, httpx.AsyncClient] = {}

    # -- where a sandbox is --------------------------------------------------------------------

    def _locate(self, sandbox_id: str) -> str | None:
        """The address of the node holding ``sandbox_id`` (running or paused), or None."""
        now = time.monotonic()
        hit = self._where.get(sandbox_id)
        if hit is not None and now - hit[0] < LOCATION_TTL_S:
            return hit[1]
        row = self.db.get_sandbox(sandbox_id)
        address = None
        if row is not None and row.node_id is not None:
            node = self.nodes.get(row.node_id)
            address = node.address if node is not None and node.state != GONE else None
        if len(self._where) > 10_000:
            self._where.clear()
        self._where[sandbox_id] = (now, address)
        return address

    def _running(self) -> list[SandboxRow]:
        return [r for r in self.db.list_sandboxes() if r.state == "running" and r.envd_access_token]

    def find_by_token(self, token: str) -> str | None:
        for row in self._running():
            if hmac.compare_digest(row.envd_access_token.encode(), token.encode()):
                return row.sandbox_id
        return None

    def find_signed(self, path: str, operation: str, username: str, signature: str,
                    expiration: int | None) -> str | None:
        for row in self._running():
            expected = file_signature(path, operation, username, row.envd_access_token, expiration)
            if hmac.compare_digest(expected.encode(), signature.encode()):
                return row.sandbox_id
        return None

    # -- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            if scope["type"] == "lifespan":
                return await self._lifespan(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope["type"] == "http" and scope["path"].startswith(VOLUME_CONTENT):
            return await self._volume_content(scope, receive, send)
        route = route_of(scope)
        if route is None and scope["type"] == "http":
            route = await asyncio.to_thread(token_route, scope, self.find_by_token)
            if route is None:
                route = await asyncio.to_thread(signed_files_route, scope, self.find_signed)
        if route is None:
            return await self.app(scope, receive, send)
        sandbox_id, port = route
        address = await asyncio.to_thread(self._locate, sandbox_id)
        headers = self._headers(scope, sandbox_id, port)
        if scope["type"] == "websocket":
            if address is None:
                await receive()
                return await send({"type": "websocket.close", "code": 1008, "reason": "The sandbox was not found"})
            return await self._websocket(scope, receive, send, address, headers)
        if address is None:
            return await _error(send, 502, "The sandbox was not found", sandbox_id=sandbox_id)
        await self._forward(scope, receive, send, address, headers, sandbox_id, port)

    def _headers(self, scope: Scope, sandbox_id: str, port: int) -> list[tuple[bytes, bytes]]:
        """The client's headers for the node: the sandbox named explicitly (whichever way the
        client named it), the secret added; hop-by-hop ones dropped."""
        out = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in HOP_BY_HOP and k.lower() not in _NAMING]
        out += [(b"e2b-sandbox-id", sandbox_id.encode()), (b"e2b-sandbox-port", str(port).encode()),
                (SECRET_HEADER, self._secret)]
        return out

    def _volume_node(self, volume_id: str) -> str | None:
        """The address of the node holding the volume's files, or None."""
        row = Volumes.find_record(self.db, volume_id)
        node = self.nodes.get(row.node_id) if row is not None and row.node_id else None
        return node.address if node is not None and node.state != GONE else None

    async def _volume_content(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The volume content API, on the node whose data dir holds the volume (the node checks
        the volume's token, as ``serve`` does)."""
        volume_id = scope["path"][len(VOLUME_CONTENT):].partition("/")[0]
        address = await asyncio.to_thread(self._volume_node, volume_id)
        if address is None:
            return await _error(send, 404, f"volume '{volume_id}' not found")
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in HOP_BY_HOP
                   and k.lower() not in _NAMING] + [(SECRET_HEADER, self._secret)]
        await self._forward(scope, receive, send, address, headers, volume_id, 0)

    def _client(self, address: str) -> httpx.AsyncClient:
        client = self._clients.get(address)
        if client is None:
            # no read timeout: process streams stay open as long as the process runs
            client = self._clients[address] = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=5.0), follow_redirects=False, verify=self._tls or True,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=100))
        return client

    async def _forward(self, scope: Scope, receive: Receive, send: Send, address: str,
                       headers: list[tuple[bytes, bytes]], sandbox_id: str, port: int) -> None:
        if not any(k.lower() == b"accept-encoding" for k, _ in headers):
            headers.append((b"accept-encoding", b"identity"))  # as proxy/asgi.py: never gzip unasked
        has_body = any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
        body_done = asyncio.Event()
        content = _request_body(receive, body_done) if has_body else None
        if content is None:
            body_done.set()
        url = address.rstrip("/") + (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        client = self._client(address)
        try:
            response = await client.send(client.build_request(scope["method"], url, headers=headers, content=content),
                                         stream=True)
        except ClientDisconnected:
            return
        except httpx.HTTPError as exc:
            return await _error(send, 502, f"the node holding the sandbox does not answer: {type(exc).__name__}",
                                sandbox_id=sandbox_id, port=port)
        try:
            await _stream_response(response, receive, send, body_done, lambda: True)
        finally:
            await response.aclose()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, address: str,
                         headers: list[tuple[bytes, bytes]]) -> None:
        parts = urlsplit(address)
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        scheme = "wss" if parts.scheme == "https" else "ws"
        # the node's proxy checks the traffic token: it must reach the node (and goes no further)
        await relay_websocket({**scope, "headers": headers}, receive, send,
                              f"{scheme}://{parts.netloc}{path}" + (f"?{query}" if query else ""),
                              keep_traffic_token=True, tls=self._tls)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_wrapper(message: dict[str, object]) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                for client in self._clients.values():
                    await client.aclose()
                self._clients.clear()
            await send(message)

        await self.app(scope, receive, send_wrapper)
