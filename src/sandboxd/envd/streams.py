"""Server-stream plumbing: notice a client disconnect while a stream is idle.

The Connect layer (connect.py) notices a disconnect only when the handler yields its next
message, so an idle stream (a quiet background command, a watch) would linger until the next
keepalive. The app wraps each RPC's ASGI ``receive`` and flags ``http.disconnect`` in a context
variable that the stream handlers (same task, or tasks copied from it) wait on next to their event
queue.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import TypeVar

T = TypeVar("T")

DISCONNECTED: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar("envd_disconnected", default=None)


class ClientGone(Exception):
    """The client closed the stream; the handler should just stop."""


async def next_event(queue: asyncio.Queue[T], timeout: float) -> T | None:
    """The next queued item; None after ``timeout`` s idle; ClientGone if the client left."""
    if not queue.empty():
        return queue.get_nowait()
    gone = DISCONNECTED.get()
    if gone is None:
        try:
            return await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            return None
    if gone.is_set():
        raise ClientGone
    getter = asyncio.ensure_future(queue.get())
    waiter = asyncio.ensure_future(gone.wait())
    try:
        done, _ = await asyncio.wait({getter, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not getter.done():
            getter.cancel()
    if getter in done:
        return getter.result()
    if waiter in done:
        raise ClientGone
    return None
