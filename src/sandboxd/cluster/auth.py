"""API↔node authentication: every request to a node carries the cluster secret, compared in
constant time; anything without it is refused before it reaches the node's API or its sandboxes.

The secret is a file (the same on every machine of the cluster, mode 0600, at least 32 bytes:
``head -c 32 /dev/urandom | base64 > cluster.secret``); it never appears on a command line.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path
from typing import Any

from sandboxd.config import Settings
from sandboxd.proxy.asgi import ASGIApp, Receive, Scope, Send

SECRET_HEADER = b"x-sandboxd-cluster-secret"
MIN_SECRET_BYTES = 32


class ClusterConfigError(ValueError):
    pass


def load_secret(settings: Settings) -> str:
    """The cluster secret from ``cluster_secret_file``; an error naming what is wrong otherwise."""
    path = settings.cluster_secret_file
    if path is None:
        raise ClusterConfigError("cluster mode needs SANDBOXD_CLUSTER_SECRET_FILE: a file with the secret every "
                                 "API and node shares (head -c 32 /dev/urandom | base64 > cluster.secret)")
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise ClusterConfigError(f"cluster secret file {path}: {exc.strerror}") from exc
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ClusterConfigError(f"cluster secret file {path}: at least {MIN_SECRET_BYTES} bytes, please")
    return secret


class RequireSecret:
    """ASGI middleware in front of a node: HTTP and websocket requests need the secret (the header
    is removed before the request goes on, so it never reaches a sandbox); lifespan passes."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self._secret = secret.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        given = b""
        headers: list[tuple[bytes, bytes]] = []
        for k, v in scope.get("headers", []):
            if k.lower() == SECRET_HEADER:
                given = v
            else:
                headers.append((k, v))
        if not hmac.compare_digest(given, self._secret):
            return await _refuse(scope, receive, send)
        await self.app({**scope, "headers": headers}, receive, send)


async def _refuse(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.close", "code": 1008, "reason": "cluster secret required"})
        return
    body = json.dumps({"code": 401, "message": "this is a sandboxd node: requests need the cluster secret"}).encode()
    start: dict[str, Any] = {"type": "http.response.start", "status": 401,
                             "headers": [(b"content-type", b"application/json"),
                                         (b"content-length", str(len(body)).encode())]}
    await send(start)
    await send({"type": "http.response.body", "body": body})
