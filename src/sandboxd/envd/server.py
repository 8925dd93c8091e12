"""envd's HTTP/1.1 server: asyncio protocols and h11, driving the ASGI app (``http`` and ``lifespan``).

Why not uvicorn: envd's start is most of a cold sandbox create and every module it loads stays in
the guest's memory for the sandbox's life; uvicorn's config and server modules (and the logging
configuration they pull in) cost ~95 ms of imports under gVisor and ~3 MiB of envd's heap, for the
little envd uses of them. This module does what envd needs, in uvicorn's manner
(``uvicorn/protocols/http/h11_impl.py``):

- keep-alive, closed after ``keep_alive_s`` idle by a timer per connection: nothing here wakes up
  while envd is idle (each wake-up is host CPU under gVisor); the ``Date`` header is computed when
  a response is sent, at most once a second;
- request bodies streamed to the app with backpressure (reading pauses while a request's unread
  body exceeds :data:`HIGH_WATER`; ``Expect: 100-continue`` is answered when the app first asks
  for the body); responses written as the app sends them (chunked when it gives no length), the
  app waiting while the socket's write buffer is full;
- ``http.disconnect`` once the client has gone (or, as in uvicorn, once the response is complete);
- an app exception is logged and answered 500 if nothing was sent yet, else the connection is
  closed; a malformed request (or headers over :data:`MAX_HEADER_BYTES`) gets a 400 and a close;
- SIGTERM/SIGINT: stop listening, let requests in flight finish for ``graceful_s``, drop the rest,
  run the lifespan shutdown, then die of the same signal (as uvicorn did).

No access log, no ``Server`` header, no websockets, no TLS (it ends at the host's proxy).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote

import h11

log = logging.getLogger("envd.server")

App = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]
Message = MutableMapping[str, Any]

HIGH_WATER = 64 * 1024  # unread request body above which reading pauses (uvicorn's value)
MAX_HEADER_BYTES = 16 * 1024  # request line + headers (h11's and uvicorn's default)
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_REASONS = {100: b"Continue", 200: b"OK", 204: b"No Content", 206: b"Partial Content", 400: b"Bad Request",
            401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
            409: b"Conflict", 413: b"Payload Too Large", 500: b"Internal Server Error", 507: b"Insufficient Storage"}

_date_second = -1
_date_value = b""


def http_date() -> bytes:
    """The ``Date`` header's value, formatted at most once a second (on demand: no timer)."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
    return _date_value


class _Shared:
    """What every connection of one server shares."""

    def __init__(self, app: App, keep_alive_s: float, app_state: dict[str, Any]) -> None:
        self.app = app
        self.keep_alive_s = keep_alive_s
        self.app_state = app_state
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.shutting_down = False


class _Cycle:
    """One request and its response, as the app sees them (``receive`` and ``send``)."""

    def __init__(self, conn: _Connection, scope: Message) -> None:
        self.conn = conn
        self.scope = scope
        self.head = scope["method"] == "HEAD"
        self.body = bytearray()
        self.more_body = True  # more of the body is to come from the client
        self.body_ended = False  # the app was given the body's last message
        self.event = asyncio.Event()  # set on body data, end of body, disconnect, response complete
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.waiting_for_100 = conn.h11.they_are_waiting_for_100_continue

    async def run(self) -> None:
        try:
            await self.conn.shared.app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            self.conn.close()  # the server is shutting down
            raise
        except BaseException as exc:
            log.error("Exception in ASGI application", exc_info=exc)
            await self._fail()
            if not isinstance(exc, Exception):
                raise
        else:
            if not self.response_started and not self.disconnected:
                log.error("ASGI callable returned without starting response")
                await self._fail()
            elif not self.response_complete and not self.disconnected:
                log.error("ASGI callable returned without completing response")
                self.conn.close()

    async def _fail(self) -> None:
        """A 500 if nothing was sent yet (then close: ``connection: close``), else just close."""
        if not self.response_started and not self.disconnected:
            try:
                await self.send({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]})
                await self.send({"type": "http.response.body", "body": b"Internal Server Error"})
                return
            except Exception:  # noqa: BLE001 - h11 refused (its state after an error): close instead
                pass
        self.conn.close()

    async def receive(self) -> Message:
        conn = self.conn
        if self.waiting_for_100 and not conn.closing:
            self.waiting_for_100 = False
            conn.write(conn.h11.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")))
        # Once the whole body was received, the next receive waits for the disconnect (or the
        # response's end): a stream's handler watches for it (connectrpc, envd/streams.py).
        while not (self.disconnected or self.response_complete or self.body
                   or (not self.more_body and not self.body_ended)):
            conn.resume_reading()
            self.event.clear()
            await self.event.wait()
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        body = bytes(self.body)
        self.body.clear()
        self.body_ended = not self.more_body
        conn.resume_reading()
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: Message) -> None:
        conn = self.conn
        if conn.write_paused and not self.disconnected:
            await conn.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected ASGI message 'http.response.start', got {kind!r}")
            self.response_started = True
            self.waiting_for_100 = False
            status = message["status"]
            headers = [(b"date", http_date()), *message.get("headers", ())]
            if conn.shared.shutting_down:
                headers.append((b"connection", b"close"))
            conn.write(conn.h11.send(h11.Response(status_code=status, headers=headers,
                                                  reason=_REASONS.get(status, b""))))
        elif not self.response_complete:
            if kind != "http.response.body":
                raise RuntimeError(f"expected ASGI message 'http.response.body', got {kind!r}")
            body = message.get("body", b"")
            if body and not self.head:
                conn.write(conn.h11.send(h11.Data(data=body)))
            if not message.get("more_body", False):
                self.response_complete = True
                self.event.set()
                conn.write(conn.h11.send(h11.EndOfMessage()))
                conn.response_complete()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} after the response completed")


class _Connection(asyncio.Protocol):
    """One client connection: feeds h11, runs one :class:`_Cycle` at a time (no pipelining in
    parallel: a pipelined request waits, with reading paused, until the response before it is done)."""

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.transport: asyncio.Transport | None = None
        self.cycle: _Cycle | None = None
        self.closing = False
        self.write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._read_paused = False
        self._idle: asyncio.TimerHandle | None = None
        self._server: tuple[str, int] | None = None
        self._client: tuple[str, int] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._server = _addr(transport.get_extra_info("sockname"))
        self._client = _addr(transport.get_extra_info("peername"))
        self.shared.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.shared.connections.discard(self)
        self._disarm_idle()
        cycle = self.cycle
        if cycle is not None:
            if not cycle.response_complete:
                cycle.disconnected = True
            cycle.event.set()
        self._wake_writer()

    def eof_received(self) -> bool | None:
        return None  # the client is done: close (uvicorn does the same)

    def data_received(self, data: bytes) -> None:
        self._disarm_idle()
        self.h11.receive_data(data)
        self._handle_events()
        if self.cycle is None and not self.closing:
            self._arm_idle()  # a partial request line or headers: still idle for the timeout

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_writer()

    # internals

    def _handle_events(self) -> None:
        conn = self.h11
        while not self.closing:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                self._bad_request(str(e))
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:  # a pipelined request: wait for the current response
                self.pause_reading()
                return
            if isinstance(event, h11.Request):
                # h11 bounds a head still arriving; one that came whole in a read is checked here
                if len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers) > MAX_HEADER_BYTES:
                    self._bad_request(f"request line and headers over {MAX_HEADER_BYTES} bytes")
                    return
                self._start_cycle(event)
            elif isinstance(event, h11.Data):
                cycle = self.cycle
                if cycle is None or conn.our_state is h11.DONE:
                    continue  # the response was sent before the body was read: discard the rest
                cycle.body += event.data
                if len(cycle.body) > HIGH_WATER:
                    self.pause_reading()
                cycle.event.set()
            elif isinstance(event, h11.EndOfMessage):
                if conn.our_state is h11.DONE:
                    self._next_cycle()
                    continue
                if self.cycle is not None:
                    self.cycle.more_body = False
                    self.cycle.event.set()
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    def _start_cycle(self, event: h11.Request) -> None:
        raw_path, _, query_string = bytes(event.target).partition(b"?")
        scope: Message = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": event.http_version.decode("ascii"),
            "server": self._server,
            "client": self._client,
            "scheme": "http",
            "method": event.method.decode("ascii"),
            "root_path": "",
            "path": unquote(raw_path.decode("ascii")),
            "raw_path": raw_path,
            "query_string": query_string,
            "headers": list(event.headers),
            "state": self.shared.app_state.copy(),
        }
        self._disarm_idle()
        self.cycle = _Cycle(self, scope)
        task = asyncio.get_running_loop().create_task(self.cycle.run())
        self.shared.tasks.add(task)
        task.add_done_callback(self._cycle_done)

    def _cycle_done(self, task: asyncio.Task[None]) -> None:
        self.shared.tasks.discard(task)
        if not task.cancelled():
            task.exception()  # logged by _Cycle.run already; do not warn again

    def response_complete(self) -> None:
        """The app sent the last byte of its response."""
        conn = self.h11
        if conn.our_state is h11.MUST_CLOSE or self.shared.shutting_down:
            self.close()
            return
        if conn.their_state is h11.DONE:
            self._next_cycle()
            self._handle_events()  # a pipelined request may be waiting
        else:
            self.resume_reading()  # the rest of an unread body is read and discarded

    def _next_cycle(self) -> None:
        self.h11.start_next_cycle()
        self.cycle = None
        self.resume_reading()
        self._arm_idle()

    def _bad_request(self, reason: str) -> None:
        log.warning("invalid HTTP request: %s", reason)
        if self.cycle is None or not self.cycle.response_started:
            body = b"Invalid HTTP request received."
            self.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
                       b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.close()

    def write(self, data: bytes) -> None:
        if data and not self.closing and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if not self.closing and self.transport is not None:
            self.closing = True
            self.transport.close()
        self._disarm_idle()

    def pause_reading(self) -> None:
        if not self._read_paused and not self.closing and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and not self.closing and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    async def drain(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drained)

    def _wake_writer(self) -> None:
        if self._drained is not None:
            if not self._drained.done():
                self._drained.set_result(None)
            self._drained = None

    def _arm_idle(self) -> None:
        self._disarm_idle()
        self._idle = asyncio.get_running_loop().call_later(self.shared.keep_alive_s, self.close)

    def _disarm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def shutdown(self) -> None:
        """Server shutdown: close now if idle, else after the response in flight."""
        if self.cycle is None or self.cycle.response_complete:
            self.close()


def _addr(value: Any) -> tuple[str, int] | None:
    return (str(value[0]), int(value[1])) if isinstance(value, tuple) and len(value) >= 2 else None


class _Lifespan:
    """The app's ``lifespan`` scope: startup before serving, shutdown after."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[bool] = loop.create_future()
        self._stopped: asyncio.Future[bool] = loop.create_future()
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> bool:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._inbox.put({"type": "lifespan.startup"})
        return await self._started

    async def shutdown(self) -> bool:
        if self._task is None or self._task.done():
            return False
        await self._inbox.put({"type": "lifespan.shutdown"})
        return await self._stopped

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": _ASGI, "state": self.state}
        try:
            await self.app(scope, self._inbox.get, self._send)
        except BaseException as exc:
            log.error("Exception in 'lifespan' protocol", exc_info=exc)
        finally:
            for fut in (self._started, self._stopped):
                if not fut.done():
                    fut.set_result(False)

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        fut = self._started if kind.startswith("lifespan.startup.") else self._stopped
        if kind.endswith(".failed"):
            log.error("%s: %s", kind, message.get("message", ""))
        if not fut.done():
            fut.set_result(kind.endswith(".complete"))


async def serve(app: App, host: str, port: int, *, keep_alive_s: float, graceful_s: float = 2.0) -> int:
    """Run ``app`` until SIGTERM/SIGINT; the signal number that ended it (0: the lifespan startup
    failed, -1: envd could not listen; then nothing was served)."""
    loop = asyncio.get_running_loop()
    lifespan = _Lifespan(app)
    if not await lifespan.startup():
        log.error("application startup failed; exiting")
        return 0
    received: list[int] = []
    stop = asyncio.Event()

    def on_signal(sig: int) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    shared = _Shared(app, keep_alive_s, lifespan.state)
    try:
        server = await loop.create_server(lambda: _Connection(shared), host, port, reuse_address=True, backlog=1024)
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", host, port, e)
        await lifespan.shutdown()
        return -1
    log.info("envd serving on http://%s:%d", host, port)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        server.close()
        shared.shutting_down = True
        for c in list(shared.connections):
            c.shutdown()
        deadline = loop.time() + graceful_s
        while shared.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for c in list(shared.connections):
            if c.transport is not None:
                c.transport.abort()  # its app (a stream) gets http.disconnect
        if shared.tasks:
            await asyncio.wait(list(shared.tasks), timeout=0.5)
            for t in list(shared.tasks):
                t.cancel()
        await lifespan.shutdown()
    return received[0] if received else 0


def run(app: App, host: str, port: int, *, keep_alive_s: float, graceful_s: float = 2.0) -> None:
    """:func:`serve` in a fresh event loop; then exit the way the signal that stopped it would
    have ended the process (as uvicorn does: the default action of that signal), or with status 3
    if the app did not start (1 if the port was taken)."""
    sig = asyncio.run(serve(app, host, port, keep_alive_s=keep_alive_s, graceful_s=graceful_s))
    if sig <= 0:
        raise SystemExit(3 if sig == 0 else 1)
    signal.signal(sig, signal.SIG_DFL)
    signal.raise_signal(sig)
