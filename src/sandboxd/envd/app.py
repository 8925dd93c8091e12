"""The envd ASGI application: plain HTTP routes next to the two Connect services.

Routing is a dict lookup, no framework. The Connect services are served by :mod:`.connect` (JSON,
what the SDKs send; binary protobuf and gRPC load protobuf-py then, :mod:`.rpc_binary`), which
matches on the full request path (``/process.Process/Start``). The access-token check runs here,
before dispatch, for everything but ``GET /health``, ``POST /init`` and ``/files`` (own check).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from . import ENVD_VERSION
from .auth import needs_token, tokens_equal
from .connect import ConnectApp, Method
from .contract import INIT_ENTROPY_FIELD, SUDO
from .entropy import reseed
from .files_http import FilesHandler
from .filesystem_service import FilesystemService
from .http_util import (
    HTTPError,
    Receive,
    Scope,
    Send,
    header,
    read_body,
    send_connect_error,
    send_error,
    send_json,
    send_response,
)
from .metrics import Metrics
from .oom_guard import OomGuard
from .process_manager import ProcessManager
from .process_service import ProcessService
from .state import EnvdState
from .streams import DISCONNECTED
from .sudo_broker import SudoBroker, setuid_blocked

log = logging.getLogger("envd")

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
RPC_PREFIXES = ("/process.Process/", "/filesystem.Filesystem/")


def _watch_disconnect(receive: Receive) -> Receive:
    """Wrap ``receive`` so stream handlers learn about a disconnect at once (see streams.py)."""
    gone = asyncio.Event()
    DISCONNECTED.set(gone)

    async def wrapped() -> MutableMapping[str, Any]:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
        return message

    return wrapped


class EnvdApp:
    """ASGI entry point; owns the state, the process manager and the services."""

    def __init__(self, state: EnvdState | None = None) -> None:
        self.state = state or EnvdState()
        self.processes = ProcessManager()
        self._files = FilesHandler(self.state)
        self._metrics_source = Metrics()
        methods = ProcessService(self.state, self.processes).methods() + FilesystemService(self.state).methods()
        self._rpc = ConnectApp(methods, lambda: _binary_app(methods))
        self._routes: dict[tuple[str, str], Handler] = {
            ("GET", "/health"): self._health,
            ("POST", "/init"): self._init,
            ("GET", "/envs"): self._envs,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/files"): self._files.download,
            ("POST", "/files"): self._files.upload,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        is_rpc = path.startswith(RPC_PREFIXES)
        token = self.state.access_token
        if (token is not None and needs_token(method, path)
                and not tokens_equal(header(scope, "x-access-token"), token)):
            if is_rpc:
                await send_connect_error(send, 401, "unauthenticated", "invalid or missing access token")
            else:
                await send_error(send, 401, "invalid or missing access token")
            return
        if is_rpc:
            await self._rpc(scope, _watch_disconnect(receive), send)
            return
        route = self._routes.get((method, path))
        if route is None:
            status = 405 if any(p == path for _, p in self._routes) else 404
            await send_error(send, status, f"{method} {path} not found" if status == 404 else "method not allowed")
            return
        try:
            await route(scope, receive, send)
        except HTTPError as e:
            await send_error(send, e.status, e.message)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _start_sudo_broker_if_needed()
                if _guards_memory():
                    loop = asyncio.get_running_loop()
                    guard = OomGuard(lambda v: loop.call_soon_threadsafe(self.processes.oom_killed, v))  # noqa: B023 - one loop
                    self.processes.before_spawn = guard.start().wake
                log.info("envd %s ready", ENVD_VERSION)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.processes.kill_all()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_response(send, 204)

    async def _init(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(receive)
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            raise HTTPError(400, f"invalid JSON body: {e}") from e
        if not isinstance(body, dict):
            raise HTTPError(400, "JSON body must be an object")
        current = self.state.access_token
        if current is not None and not (
            tokens_equal(header(scope, "x-access-token"), current) or tokens_equal(body.get("accessToken"), current)
        ):
            # Once locked, only someone who knows the token (the orchestrator) may re-init; a
            # process inside the sandbox must not be able to swap the token or the default user.
            raise HTTPError(401, "envd is already initialized with another access token")
        seed = _entropy_of(body)  # checked before anything is applied
        self.state.apply_init(body)
        if seed:
            reseed(seed)
        log.info("init: default user %s, %d env vars, token %s", self.state.default_user,
                 len(self.state.env_vars), "set" if self.state.access_token else "unset")
        await send_response(send, 204)

    async def _envs(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, self.state.env_vars)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, await self._metrics_source.snapshot())


def _binary_app(methods: list[Method]) -> Handler:
    """Binary protobuf and gRPC: protobuf-py and connectrpc, loaded at the first such request."""
    log.info("loading protobuf-py for a binary or gRPC request")
    from .rpc_binary import binary_app

    return binary_app(methods)


def _entropy_of(body: dict[str, Any]) -> bytes:
    """The new entropy a restored guest's ``/init`` carries (envd/entropy.py), or none."""
    raw = body.get(INIT_ENTROPY_FIELD)
    if raw is None:
        return b""
    try:
        if not isinstance(raw, str):
            raise ValueError("must be a base64 string")
        return base64.b64decode(raw, validate=True)
    except ValueError as e:
        raise HTTPError(400, f"{INIT_ENTROPY_FIELD}: {e}") from e


def _guards_memory() -> bool:
    """Run the OOM guard only as a sandbox's envd: asked for (``envd_env``) and our parent is
    PID 1 (the sandbox's init). The template build check starts envd with the same environment
    in a chroot that still sees the host's processes: the guard must never act there."""
    return os.environ.get("ENVD_OOM_GUARD") == "1" and os.getppid() == 1


def _start_sudo_broker_if_needed() -> None:
    """Passwordless sudo must work even where setuid cannot (gVisor): see sudo_broker."""
    if os.geteuid() == 0 and os.path.exists(SUDO) and setuid_blocked():
        try:
            SudoBroker().start()
        except OSError as exc:
            log.warning("sudo broker not started: %s", exc)
