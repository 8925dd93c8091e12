"""The ``process.Process`` Connect service: messages in, :mod:`process_manager` calls, messages out.

Stream semantics the SDK relies on (e2b-protocol.md 3.5): the first message is a ``start`` event with
the pid, then ``data`` chunks, then one ``end``; ``keepalive`` after each idle
``Keepalive-Ping-Interval``; a client disconnect never kills the process; ``Connect-Timeout-Ms`` on
Start is the process lifetime (killed, stream ends with ``deadline_exceeded``).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

from . import process_messages as pb
from .connect import CLIENT_STREAM, SERVER_STREAM, UNARY, Code, ConnectError, Method, RequestContext
from .contract import DEFAULT_PATH
from .identity import rpc_user
from .process_manager import (
    Event,
    ExitInfo,
    ManagedProcess,
    OutputEvent,
    ProcessManager,
    ProcessSpec,
    SpawnError,
)
from .process_messages import Oneof
from .state import EnvdState
from .streams import ClientGone, next_event
from .users import InvalidPathError, User, resolve_path

DEFAULT_KEEPALIVE_S = 90.0
_SIGNALS = {pb.Signal.SIGKILL: signal.SIGKILL, pb.Signal.SIGTERM: signal.SIGTERM}


def process_env(user: User, init_env: dict[str, str], request_env: dict[str, str]) -> dict[str, str]:
    """A child's environment, from scratch: envd's own (PYTHONHOME...) must never leak in."""
    env = {"PATH": DEFAULT_PATH, "HOME": user.home, "USER": user.name, "LOGNAME": user.name}
    env.update(init_env)
    env.update(request_env)
    return env


def keepalive_interval(ctx: RequestContext) -> float:
    """Seconds of idleness before a keepalive event (header ``Keepalive-Ping-Interval``)."""
    raw = ctx.request_headers.get("keepalive-ping-interval")
    try:
        value = float(raw) if raw else DEFAULT_KEEPALIVE_S
    except ValueError:
        value = DEFAULT_KEEPALIVE_S
    return value if value > 0 else DEFAULT_KEEPALIVE_S


def _event(**kw: object) -> pb.ProcessEvent:
    ((name, value),) = kw.items()
    return pb.ProcessEvent(event=Oneof(name, value))


def _to_pb(event: Event) -> pb.ProcessEvent:
    if isinstance(event, OutputEvent):
        return _event(data=pb.ProcessEvent.DataEvent(output=Oneof(event.stream, event.data)))
    end = pb.ProcessEvent.EndEvent(exit_code=event.exit_code, exited=event.exited, status=event.status)
    if event.error is not None:
        end.error = event.error
    return _event(end=end)


async def _events(
    mp: ManagedProcess, queue: asyncio.Queue[Event], ctx: RequestContext, fail_on_deadline: bool
) -> AsyncIterator[pb.ProcessEvent]:
    """Start event, then the process's events with keepalives, until the end event."""
    interval = keepalive_interval(ctx)
    try:
        yield _event(start=pb.ProcessEvent.StartEvent(pid=mp.pid))
        while True:
            wait_s = interval
            remaining_ms = ctx.timeout_ms
            if not fail_on_deadline and remaining_ms is not None:
                if remaining_ms <= 0:
                    raise ConnectError(Code.DEADLINE_EXCEEDED, "stream deadline exceeded")
                wait_s = min(wait_s, remaining_ms / 1000)
            try:
                event = await next_event(queue, wait_s)
            except ClientGone:
                return  # disconnect: stop streaming, the process keeps running
            if event is None:
                yield _event(keepalive=pb.ProcessEvent.KeepAlive())
                continue
            if isinstance(event, ExitInfo):
                if event.timed_out and fail_on_deadline:
                    raise ConnectError(Code.DEADLINE_EXCEEDED, f"process {mp.pid} killed: timeout exceeded")
                yield _to_pb(event)
                return
            yield _to_pb(event)
    finally:
        mp.unsubscribe(queue)


class ProcessService:
    """Implements process.Process on top of a ProcessManager."""

    def __init__(self, state: EnvdState, manager: ProcessManager) -> None:
        self._state = state
        self._manager = manager

    def methods(self) -> list[Method]:
        """The service's RPCs, as :class:`.connect.ConnectApp` serves them."""
        def m(name: str, kind: str, handler: Any) -> Method:
            return Method("process.Process", name, kind, getattr(pb, f"{name}Request"),
                          getattr(pb, f"{name}Response"), handler)
        return [
            m("List", UNARY, self.list), m("Connect", SERVER_STREAM, self.connect),
            m("Start", SERVER_STREAM, self.start), m("Update", UNARY, self.update),
            m("StreamInput", CLIENT_STREAM, self.stream_input), m("SendInput", UNARY, self.send_input),
            m("SendSignal", UNARY, self.send_signal), m("CloseStdin", UNARY, self.close_stdin),
        ]

    def _select(self, selector: pb.ProcessSelector | None) -> ManagedProcess:
        """The process a ProcessSelector names; ``not_found`` if it is not running."""
        match selector.selector if selector is not None else None:
            case Oneof(field="pid", value=int(pid)):
                mp = self._manager.get(pid)
                what = f"process with pid {pid}"
            case Oneof(field="tag", value=str(tag)):
                mp = self._manager.by_tag(tag)
                what = f"process with tag {tag}"
            case _:
                raise ConnectError(Code.INVALID_ARGUMENT, "process selector is required")
        if mp is None:
            raise ConnectError(Code.NOT_FOUND, f"{what} not found")
        return mp

    def _working_dir(self, request_cwd: str, user: User) -> str:
        if request_cwd:
            try:
                return resolve_path(request_cwd, user)
            except InvalidPathError as e:
                raise ConnectError(Code.INVALID_ARGUMENT, str(e)) from e
        if self._state.default_workdir:
            return resolve_path(self._state.default_workdir, user)
        return user.home

    async def start(self, request: pb.StartRequest, ctx: RequestContext) -> AsyncIterator[pb.StartResponse]:
        user = rpc_user(ctx, self._state)
        cfg = request.process
        if cfg is None or not cfg.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        spec = ProcessSpec(
            cmd=cfg.cmd,
            args=tuple(cfg.args),
            envs=dict(cfg.envs),
            cwd=cfg.cwd,
            tag=request.tag,
        )
        pty_size = None
        if request.pty is not None:
            size = request.pty.size
            pty_size = (size.cols or 80, size.rows or 24) if size is not None else (80, 24)
        # The stdin field is optional: upstream defaults it to true for old SDKs.
        stdin = request.stdin if request.stdin is not None else True
        timeout_ms = ctx.timeout_ms
        try:
            mp, queue = self._manager.start(
                spec,
                user=user,
                env=process_env(user, self._state.env_vars, spec.envs),
                cwd=self._working_dir(spec.cwd or "", user),
                stdin=stdin and pty_size is None,
                pty_size=pty_size,
                timeout_s=timeout_ms / 1000 if timeout_ms is not None else None,
            )
        except SpawnError as e:
            raise ConnectError(Code.INVALID_ARGUMENT, str(e)) from e
        async for event in _events(mp, queue, ctx, fail_on_deadline=True):
            yield pb.StartResponse(event=event)

    async def connect(self, request: pb.ConnectRequest, ctx: RequestContext) -> AsyncIterator[pb.ConnectResponse]:
        rpc_user(ctx, self._state)
        mp = self._select(request.process)
        queue = mp.subscribe()
        async for event in _events(mp, queue, ctx, fail_on_deadline=False):
            yield pb.ConnectResponse(event=event)

    async def list(self, request: pb.ListRequest, ctx: RequestContext) -> pb.ListResponse:
        rpc_user(ctx, self._state)
        infos = []
        for mp in self._manager.all():
            cfg = pb.ProcessConfig(cmd=mp.spec.cmd, args=list(mp.spec.args), envs=dict(mp.spec.envs), cwd=mp.spec.cwd)
            infos.append(pb.ProcessInfo(config=cfg, pid=mp.pid, tag=mp.spec.tag))
        return pb.ListResponse(processes=infos)

    async def _write(self, mp: ManagedProcess, data: pb.ProcessInput | None) -> None:
        match data.input if data is not None else None:
            case Oneof(field="stdin", value=chunk):
                pty = False
            case Oneof(field="pty", value=chunk):
                pty = True
            case _:
                return
        try:
            await mp.write_input(chunk, pty=pty)
        except SpawnError as e:
            raise ConnectError(Code.FAILED_PRECONDITION, str(e)) from e
        except OSError as e:
            raise ConnectError(Code.FAILED_PRECONDITION, f"write to process {mp.pid}: {e.strerror or e}") from e

    async def send_input(self, request: pb.SendInputRequest, ctx: RequestContext) -> pb.SendInputResponse:
        rpc_user(ctx, self._state)
        await self._write(self._select(request.process), request.input)
        return pb.SendInputResponse()

    async def stream_input(
        self, request: AsyncIterator[pb.StreamInputRequest], ctx: RequestContext
    ) -> pb.StreamInputResponse:
        rpc_user(ctx, self._state)
        mp: ManagedProcess | None = None
        async for message in request:
            match message.event:
                case Oneof(field="start", value=pb.StreamInputRequest.StartEvent() as start):
                    mp = self._select(start.process)
                case Oneof(field="data", value=pb.StreamInputRequest.DataEvent() as data):
                    if mp is None:
                        raise ConnectError(Code.INVALID_ARGUMENT, "first message must be a start event")
                    await self._write(mp, data.input)
                case _:
                    pass  # keepalive
        return pb.StreamInputResponse()

    async def close_stdin(self, request: pb.CloseStdinRequest, ctx: RequestContext) -> pb.CloseStdinResponse:
        rpc_user(ctx, self._state)
        mp = self._select(request.process)
        try:
            await mp.close_stdin()
        except SpawnError as e:
            raise ConnectError(Code.FAILED_PRECONDITION, str(e)) from e
        return pb.CloseStdinResponse()

    async def send_signal(self, request: pb.SendSignalRequest, ctx: RequestContext) -> pb.SendSignalResponse:
        rpc_user(ctx, self._state)
        mp = self._select(request.process)
        sig = _SIGNALS.get(request.signal)
        if sig is None:
            raise ConnectError(Code.INVALID_ARGUMENT, f"unsupported signal {request.signal}")
        mp.signal(sig)
        return pb.SendSignalResponse()

    async def update(self, request: pb.UpdateRequest, ctx: RequestContext) -> pb.UpdateResponse:
        rpc_user(ctx, self._state)
        mp = self._select(request.process)
        if request.pty is not None and request.pty.size is not None:
            try:
                mp.resize(request.pty.size.cols, request.pty.size.rows)
            except SpawnError as e:
                raise ConnectError(Code.FAILED_PRECONDITION, str(e)) from e
        return pb.UpdateResponse()
