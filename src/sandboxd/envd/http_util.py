"""Tiny ASGI helpers for envd's plain HTTP endpoints (no framework: startup time and the bundle)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class HTTPError(Exception):
    """An error answered as upstream envd does: JSON ``{"code": <status>, "message": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def header(scope: Scope, name: str) -> str | None:
    """First value of a request header (``name`` lowercase), decoded as latin-1."""
    key = name.encode()
    for k, v in scope.get("headers", ()):
        if k.lower() == key:
            return v.decode("latin-1")
    return None


def headers_with_prefix(scope: Scope, prefix: str) -> dict[str, str]:
    """All request headers starting with ``prefix`` (lowercase), prefix stripped, keys lowercased."""
    out: dict[str, str] = {}
    p = prefix.encode()
    for k, v in scope.get("headers", ()):
        lk = k.lower()
        if lk.startswith(p) and len(lk) > len(p):
            out[lk[len(p) :].decode("latin-1")] = v.decode("latin-1")
    return out


def query(scope: Scope) -> dict[str, str]:
    """Query parameters, first value each (``+`` stays ``+`` only when percent-encoded, as in Go)."""
    raw = scope.get("query_string", b"").decode("latin-1")
    return {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as it arrives (chunked or not), never buffered whole."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(499, "client disconnected")
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def read_body(receive: Receive, limit: int = 1 << 20) -> bytes:
    """A small body (JSON control requests), bounded."""
    parts: list[bytes] = []
    size = 0
    async for chunk in body_chunks(receive):
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, "request body too large")
        parts.append(chunk)
    return b"".join(parts)


async def send_response(
    send: Send, status: int, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A complete, non-streamed response."""
    hdrs = list(headers or [])
    if body or status not in (204, 304):
        hdrs.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(send: Send, status: int, obj: object) -> None:
    await send_response(send, status, json.dumps(obj).encode(), [(b"content-type", b"application/json")])


async def send_error(send: Send, status: int, message: str) -> None:
    await send_json(send, status, {"code": status, "message": message})


async def send_connect_error(send: Send, status: int, code: str, message: str) -> None:
    """A Connect error response (unary and refused streams alike): the SDK maps ``code``."""
    await send_json(send, status, {"code": code, "message": message})
