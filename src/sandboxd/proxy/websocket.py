"""WebSocket traffic to a sandbox port: accept the client, dial the sandbox, relay both ways.

ASGI hands websockets over as messages, not as a byte stream, so the proxy is a message relay:
it connects upstream first (so a closed port becomes a refusal, not a dead socket), accepts the
client with the subprotocol the sandbox chose, and copies text/binary frames until either side
closes, passing the close code on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

log = logging.getLogger("sandboxd.proxy")

#: the handshake's own headers (the client library makes its own) and what the sandbox must not see
_SKIP_HEADERS = {b"host", b"connection", b"upgrade", b"sec-websocket-key", b"sec-websocket-version",
                 b"sec-websocket-extensions", b"sec-websocket-protocol", b"content-length"}
TRAFFIC_TOKEN_HEADER = b"e2b-traffic-access-token"


async def relay_websocket(scope: dict[str, Any], receive: Any, send: Any, url: str,
                          dial: tuple[str, int] | None = None, keep_traffic_token: bool = False,
                          tls: ssl.SSLContext | None = None) -> None:
    """Proxy one websocket connection to ``url`` (``ws://address:port/path?query``). With
    ``dial``, the connection goes there and ``url``'s host is only the handshake's Host (a
    sandbox's ``maskRequestHost``); a ``wss`` URL is TLS to the sandbox, unverified (its
    ``httpsPorts`` serve their own, often self-signed, certificates). The traffic token is
    dropped (a sandbox never sees it) unless ``keep_traffic_token``: the cluster proxy relays to
    the node, whose own proxy checks it (``tls``: its mTLS context, verified both ways)."""
    skip = _SKIP_HEADERS if keep_traffic_token else _SKIP_HEADERS | {TRAFFIC_TOKEN_HEADER}
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k.lower() not in skip]
    subprotocols = scope.get("subprotocols") or None
    where: dict[str, Any] = {"host": dial[0], "port": dial[1]} if dial else {}
    if url.startswith("wss://"):
        where["ssl"] = tls or _unverified()
    try:
        upstream = await connect(url, additional_headers=headers, subprotocols=subprotocols,
                                 open_timeout=10, max_size=None, compression=None, **where)
    except (TimeoutError, OSError, InvalidHandshake) as exc:
        status = exc.response.status_code if isinstance(exc, InvalidStatus) else 502
        log.debug("websocket upstream %s refused: %s", url, exc)
        if (await receive())["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 1011 if status >= 500 else 1008})
        return
    async with upstream:
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        to_client = asyncio.ensure_future(_upstream_to_client(upstream, send))
        to_upstream = asyncio.ensure_future(_client_to_upstream(receive, upstream))
        _done, pending = await asyncio.wait({to_client, to_upstream}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _upstream_to_client(upstream: ClientConnection, send: Any) -> None:
    try:
        async for message in upstream:
            key = "text" if isinstance(message, str) else "bytes"
            await send({"type": "websocket.send", key: message})
    except ConnectionClosed:
        pass
    code = upstream.close_code or 1000
    with contextlib.suppress(Exception):
        await send({"type": "websocket.close", "code": code, "reason": upstream.close_reason or ""})


async def _client_to_upstream(receive: Any, upstream: ClientConnection) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            await upstream.close(code=message.get("code", 1000) or 1000)
            return
        if message.get("text") is not None:
            await upstream.send(message["text"])
        elif message.get("bytes") is not None:
            await upstream.send(message["bytes"])


def _unverified() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
