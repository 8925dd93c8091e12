"""The Connect protocol as envd serves it to the SDKs: JSON, unary and streaming, no protobuf-py.

What connectrpc's server did for envd (its ``_server_async``, ``_protocol_connect``), kept case by
case so nothing changes on the wire:

- unary: ``POST`` only (no method of envd is side-effect free, so no ``GET``: 405 ``Allow: POST``),
  ``application/json``; the body (at most 4 MiB) is decoded per ``Content-Encoding`` (identity,
  gzip; another is ``unimplemented``); the answer is the message with ``Content-Encoding`` as
  negotiated from ``Accept-Encoding`` (gzip if listed) and ``Vary: Accept-Encoding``, or a Connect
  error ``{"code", "message"}`` with the HTTP status of its code;
- streaming: ``application/connect+json``, envelopes (flag byte, 4-byte big-endian length) both
  ways, ``Connect-Content-Encoding`` / ``Connect-Accept-Encoding``; the answer is 200 with the
  messages, then the end-of-stream envelope (flag 0x02) ``{}`` or ``{"error": {...}}``. Server
  streams take exactly one request message; client streams answer exactly one message;
- ``Connect-Protocol-Version`` must be 1 when sent, ``Connect-Timeout-Ms`` at most 10 digits
  (else ``invalid_argument``); an unknown path is a bare 404, another codec a bare 415.

Requests in binary protobuf or gRPC / gRPC-Web go to :mod:`.rpc_binary`, which loads protobuf-py
and connectrpc then, and only then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from .http_util import Receive, Scope, Send
from .messages import Message

log = logging.getLogger("envd.connect")

READ_MAX_BYTES = 4 * 1024 * 1024  # connectrpc's default limit of a request message


class Code:
    """The Connect error codes (their wire names)."""

    CANCELED = "canceled"
    UNKNOWN = "unknown"
    INVALID_ARGUMENT = "invalid_argument"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    OUT_OF_RANGE = "out_of_range"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    DATA_LOSS = "data_loss"
    UNAUTHENTICATED = "unauthenticated"


#: the HTTP status of a unary error, by code (the Connect spec's table, as connectrpc sends it)
HTTP_STATUS = {
    Code.CANCELED: 499, Code.UNKNOWN: 500, Code.INVALID_ARGUMENT: 400, Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404, Code.ALREADY_EXISTS: 409, Code.PERMISSION_DENIED: 403, Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400, Code.ABORTED: 409, Code.OUT_OF_RANGE: 400, Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500, Code.UNAVAILABLE: 503, Code.DATA_LOSS: 500, Code.UNAUTHENTICATED: 401,
}


class ConnectError(Exception):
    """An RPC's error: its Connect code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class RequestContext:
    """What a handler sees of its request: the headers (lowercase names, first value) and the
    time left of ``Connect-Timeout-Ms``."""

    def __init__(self, request_headers: dict[str, str], timeout_ms: float | None = None) -> None:
        self.request_headers = request_headers
        self._end = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000

    @property
    def timeout_ms(self) -> float | None:
        """Milliseconds left until the request's deadline, None without one."""
        return None if self._end is None else (self._end - time.monotonic()) * 1000


UNARY, SERVER_STREAM, CLIENT_STREAM = "unary", "server_stream", "client_stream"


@dataclass(frozen=True)
class Method:
    """One RPC: ``/<service>/<name>``, its kind, message classes and handler."""

    service: str
    name: str
    kind: str
    input: type[Message]
    output: type[Message]
    handler: Callable[..., Any]

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


# -- compression ---------------------------------------------------------------------------------

COMPRESSIONS = ("gzip", "identity")  # what connectrpc's server accepts by default, in its order


def _negotiate(accept: str) -> str:
    for name in accept.split(","):
        if name.strip() in COMPRESSIONS:
            return name.strip()
    return "identity"


def _compress(name: str, data: bytes) -> bytes:
    if name == "identity":
        return data
    import zlib

    c = zlib.compressobj(6, zlib.DEFLATED, 31)  # gzip framing, as gzip.compress(level 6)
    return c.compress(data) + c.flush()


def _decompress(name: str, data: bytes) -> bytes:
    if name == "identity" or not data:
        if len(data) > READ_MAX_BYTES:
            raise _too_large()
        return data
    import zlib

    parts: list[bytes] = []
    total = 0
    remaining = data
    d = zlib.decompressobj(wbits=31)
    try:
        while True:
            out = d.decompress(remaining, READ_MAX_BYTES + 1 - total)
            total += len(out)
            parts.append(out)
            if total > READ_MAX_BYTES:
                raise _too_large()
            if d.eof:
                remaining = d.unused_data
                if not remaining:
                    return b"".join(parts)
                d = zlib.decompressobj(wbits=31)
            elif not d.unconsumed_tail:
                raise EOFError("compressed data ended before the end-of-stream marker was reached")
            else:
                remaining = d.unconsumed_tail
    except (zlib.error, EOFError) as e:
        raise ConnectError(Code.UNKNOWN, str(e)) from e


def _too_large() -> ConnectError:
    return ConnectError(Code.RESOURCE_EXHAUSTED, f"message is larger than configured max {READ_MAX_BYTES}")


# -- codec -------------------------------------------------------------------------------------------


def decode(data: bytes, cls: type[Message]) -> Message:
    """A request message from JSON; malformed JSON or a mistyped field is ``invalid_argument``."""
    try:
        return cls.from_json(data)
    except Exception as e:  # JSON errors, TypeError, ValueError, OverflowError, RecursionError
        raise ConnectError(Code.INVALID_ARGUMENT, f"invalid {cls.__name__} JSON: {e}") from e


def encode(message: Message) -> bytes:
    return message.to_json().encode()


def envelope(flags: int, data: bytes) -> bytes:
    return struct.pack(">BI", flags, len(data)) + data


class HTTPRefusal(Exception):
    """An answer before the protocol starts: a bare status with headers, no body."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.headers = headers or []


def request_headers(scope: Scope) -> dict[str, str]:
    """Request headers, lowercase names, first value each."""
    out: dict[str, str] = {}
    for k, v in scope.get("headers", ()):
        out.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
    return out


def codec_name(content_type: str, *, stream: bool) -> str:
    """connectrpc's reading of the codec from ``Content-Type`` (parameters dropped)."""
    ct = content_type.partition(";")[0].strip().lower()
    prefix = "application/connect+" if stream else "application/"
    return ct[len(prefix):] if ct.startswith(prefix) else ct


def is_binary(headers: dict[str, str], method: Method) -> bool:
    """Whether the request is for protobuf-py's side: gRPC, gRPC-Web, or Connect with a codec
    other than JSON that connectrpc serves (``proto``)."""
    ct = headers.get("content-type", "")
    if ct.startswith("application/grpc"):  # application/grpc, application/grpc+proto, grpc-web...
        return True
    return codec_name(ct, stream=method.kind != UNARY) == "proto"


def context_of(headers: dict[str, str]) -> RequestContext:
    """The request's context; a bad ``Connect-Protocol-Version`` or timeout is ``invalid_argument``."""
    version = headers.get("connect-protocol-version", "1")
    if version != "1":
        raise ConnectError(Code.INVALID_ARGUMENT, f"connect-protocol-version must be '1': got '{version}'")
    raw = headers.get("connect-timeout-ms")
    timeout_ms = None
    if raw:
        if len(raw) > 10:
            raise ConnectError(Code.INVALID_ARGUMENT, f"Invalid timeout header: '{raw} has >10 digits")
        try:
            timeout_ms = int(raw)
        except ValueError as e:
            raise ConnectError(Code.INVALID_ARGUMENT, f"Invalid timeout header: '{raw}'") from e
    return RequestContext(headers, timeout_ms)


# -- the application -----------------------------------------------------------------------------


class ConnectApp:
    """ASGI application serving the given methods by path (JSON; binary goes to ``binary``)."""

    def __init__(self, methods: list[Method], binary: Callable[[], Callable[[Scope, Receive, Send], Awaitable[None]]]) -> None:
        self.methods = {m.path: m for m in methods}
        self._binary_factory = binary
        self._binary: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = self.methods.get(scope["path"])
        if method is None:
            await _send_refusal(send, HTTPRefusal(404))
            return
        headers = request_headers(scope)
        if is_binary(headers, method):
            if self._binary is None:
                self._binary = self._binary_factory()
            await self._binary(scope, receive, send)
            return
        try:
            if scope["method"] != "POST":
                raise HTTPRefusal(405, [(b"allow", b"POST")])
            ctx = context_of(headers)
            if codec_name(headers.get("content-type", ""), stream=method.kind != UNARY) != "json":
                raise HTTPRefusal(415, [(b"Accept-Post", b"application/json, application/proto")])
            if method.kind == UNARY:
                await _unary(method, headers, ctx, receive, send)
                return
        except HTTPRefusal as e:
            await _send_refusal(send, e)
            return
        except Exception as e:  # noqa: BLE001 - answered as a Connect error
            await _send_unary_error(send, _wire_error(e))
            return
        await _stream(method, headers, ctx, receive, send)


def _wire_error(e: Exception) -> ConnectError:
    if isinstance(e, ConnectError):
        return e
    log.error("RPC failed", exc_info=e)
    return ConnectError(Code.UNKNOWN, str(e))


async def _send_refusal(send: Send, e: HTTPRefusal) -> None:
    await send({"type": "http.response.start", "status": e.status, "headers": e.headers})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_unary_error(send: Send, e: ConnectError) -> None:
    body = json.dumps(e.to_dict()).encode()
    await send({"type": "http.response.start", "status": HTTP_STATUS.get(e.code, 500),
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return
        elif kind == "http.disconnect":
            raise ConnectError(Code.CANCELED, "Client disconnected before request completion")
        else:
            raise ConnectError(Code.UNKNOWN, "Unexpected message type")


async def _unary(method: Method, headers: dict[str, str], ctx: RequestContext, receive: Receive, send: Send) -> None:
    response_compression = _negotiate(headers.get("accept-encoding", ""))
    parts: list[bytes] = []
    size = 0
    async for chunk in _body_chunks(receive):
        size += len(chunk)
        if size > READ_MAX_BYTES:
            raise _too_large()
        parts.append(chunk)
    body = b"".join(parts)
    compression = headers.get("content-encoding", "identity").lower()
    if compression not in COMPRESSIONS:
        raise ConnectError(Code.UNIMPLEMENTED, f"unknown compression: '{compression}': "
                                               f"supported encodings are {', '.join(COMPRESSIONS)}")
    request = decode(_decompress(compression, body), method.input)
    response = await method.handler(request, ctx)
    data = _compress(response_compression, encode(response))
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"),
        (b"content-encoding", response_compression.encode()),
        (b"vary", b"Accept-Encoding"),
        (b"content-length", str(len(data)).encode()),
    ]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def _request_messages(receive: Receive, method: Method, compression: str) -> AsyncIterator[Message]:
    """The request's envelopes as messages (a trailing partial envelope is ignored, as connectrpc)."""
    buffer = bytearray()
    async for chunk in _body_chunks(receive):
        buffer += chunk
        while len(buffer) >= 5:
            length = int.from_bytes(buffer[1:5], "big")
            if length > READ_MAX_BYTES:
                raise _too_large()
            if len(buffer) < 5 + length:
                break
            flags = buffer[0]
            data = bytes(buffer[5 : 5 + length])
            del buffer[: 5 + length]
            if flags & 0x01:
                if compression == "identity":
                    raise ConnectError(Code.INTERNAL, "protocol error: sent compressed message without compression support")
                data = _decompress(compression, data)
            elif len(data) > READ_MAX_BYTES:
                raise _too_large()
            yield decode(data, method.input)


async def _single(messages: AsyncIterator[Message]) -> Message:
    request = None
    async for message in messages:
        if request is not None:
            raise ConnectError(Code.UNIMPLEMENTED, "unary request has multiple messages")
        request = message
    if request is None:
        raise ConnectError(Code.UNIMPLEMENTED, "unary request has zero messages")
    return request


async def _one(message: Message) -> AsyncIterator[Message]:
    yield message


async def _stream(method: Method, headers: dict[str, str], ctx: RequestContext, receive: Receive, send: Send) -> None:
    request_compression = headers.get("connect-content-encoding", "identity")
    if request_compression not in COMPRESSIONS:
        request_compression = "identity"  # as connectrpc: an unknown one is taken as identity
    response_compression = _negotiate(headers.get("connect-accept-encoding", ""))
    flag = 0 if response_compression == "identity" else 1
    started = False

    async def start() -> None:
        nonlocal started
        started = True
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/connect+json"),
            (b"connect-content-encoding", response_compression.encode()),
        ]})

    error: ConnectError | None = None
    try:
        messages = _request_messages(receive, method, request_compression)
        gone: asyncio.Event | None = None
        monitor: asyncio.Task[None] | None = None
        if method.kind == SERVER_STREAM:
            responses: AsyncIterator[Message] = method.handler(await _single(messages), ctx)
            # the request is read: watch for the client leaving, to stop streaming promptly
            gone = asyncio.Event()
            monitor = asyncio.create_task(_watch_disconnect(receive, gone))
        else:
            responses = _one(await method.handler(messages, ctx))
        try:
            async for message in responses:
                if gone is not None and gone.is_set():
                    raise ConnectError(Code.CANCELED, "Client disconnected")
                if not started:
                    await start()
                data = envelope(flag, _compress(response_compression, encode(message)))
                await send({"type": "http.response.body", "body": data, "more_body": True})
        finally:
            if monitor is not None:
                monitor.cancel()
            aclose = getattr(responses, "aclose", None)
            if aclose is not None:
                await aclose()
    except Exception as e:  # noqa: BLE001 - ends the stream as a Connect error
        error = _wire_error(e)
    end = json.dumps({"error": error.to_dict()} if error is not None else {}).encode()
    if not started:
        await start()
    await send({"type": "http.response.body", "body": envelope(flag | 0x02, _compress(response_compression, end)),
                "more_body": False})


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while True:
        message: MutableMapping[str, Any] = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return
