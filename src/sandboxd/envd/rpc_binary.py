"""Binary protobuf, gRPC and gRPC-Web requests: connectrpc's server over envd's own handlers.

The SDKs never send these (JSON only), so envd does not pay for protobuf-py at start: this module
is imported by :class:`.connect.ConnectApp` when the first such request arrives. It builds
connectrpc's ASGI applications from the generated stubs (``rpc/``), each method converting the
protobuf-py request to envd's message through JSON, calling envd's handler, and converting the
answer back the same way; envd's :class:`.connect.ConnectError` becomes connectrpc's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

from connectrpc.code import Code as PbCode
from connectrpc.codec import proto_binary_codec, proto_json_codec
from connectrpc.errors import ConnectError as PbConnectError

from . import connect
from .http_util import Receive, Scope, Send
from .rpc.filesystem import filesystem_pb
from .rpc.filesystem.filesystem_connect import FilesystemASGIApplication
from .rpc.process import process_pb
from .rpc.process.process_connect import ProcessASGIApplication

App = Callable[[Scope, Receive, Send], Awaitable[None]]
_PB_MODULES = {"process.Process": process_pb, "filesystem.Filesystem": filesystem_pb}
_APPS: dict[str, Any] = {"process.Process": ProcessASGIApplication, "filesystem.Filesystem": FilesystemASGIApplication}


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def _context(ctx: Any) -> connect.RequestContext:
    return connect.RequestContext({k: ctx.request_headers[k] for k in ctx.request_headers}, ctx.timeout_ms)


def _pb_error(e: connect.ConnectError) -> PbConnectError:
    return PbConnectError(PbCode(e.code), e.message)


def _adapt(method: connect.Method) -> Callable[..., Any]:
    pb_out = getattr(_PB_MODULES[method.service], method.output.__name__)

    def to_lean(message: Any) -> Any:
        return method.input.from_json(message.to_json())

    def to_pb(message: Any) -> Any:
        return pb_out.from_json(message.to_json())

    if method.kind == connect.SERVER_STREAM:
        async def server_stream(request: Any, ctx: Any) -> AsyncIterator[Any]:
            try:
                async for message in method.handler(to_lean(request), _context(ctx)):
                    yield to_pb(message)
            except connect.ConnectError as e:
                raise _pb_error(e) from e
        return server_stream

    if method.kind == connect.CLIENT_STREAM:
        async def client_stream(requests: AsyncIterator[Any], ctx: Any) -> Any:
            async def lean_requests() -> AsyncIterator[Any]:
                async for message in requests:
                    yield to_lean(message)
            try:
                return to_pb(await method.handler(lean_requests(), _context(ctx)))
            except connect.ConnectError as e:
                raise _pb_error(e) from e
        return client_stream

    async def unary(request: Any, ctx: Any) -> Any:
        try:
            return to_pb(await method.handler(to_lean(request), _context(ctx)))
        except connect.ConnectError as e:
            raise _pb_error(e) from e
    return unary


def binary_app(methods: list[connect.Method]) -> App:
    """One ASGI app for all of ``methods``' services, dispatching on the path's service."""
    apps: dict[str, App] = {}
    for service, app_class in _APPS.items():
        mine = [m for m in methods if m.service == service]
        if mine:
            impl = SimpleNamespace(**{_snake(m.name): _adapt(m) for m in mine})
            apps[f"/{service}/"] = app_class(impl, codecs=(proto_binary_codec(), proto_json_codec()))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        await apps[path[: path.index("/", 1) + 1]](scope, receive, send)

    return app
