"""Directory watches for the Filesystem service: streaming (WatchDir) and polled (CreateWatcher).

The async SDK streams (``WatchDir``: a ``start`` event first, then events and keepalives); the sync
SDK polls a server-side watcher by id. Both sit on :class:`inotify.DirWatcher`.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable

from . import filesystem_messages as fpb
from .connect import Code, ConnectError
from .entries import entry_info
from .filesystem_messages import Oneof
from .inotify import CHMOD, CREATE, REMOVE, RENAME, WRITE, DirWatcher
from .streams import ClientGone, next_event

_KINDS = {
    CREATE: fpb.EventType.CREATE,
    WRITE: fpb.EventType.WRITE,
    REMOVE: fpb.EventType.REMOVE,
    RENAME: fpb.EventType.RENAME,
    CHMOD: fpb.EventType.CHMOD,
}
MAX_PENDING_EVENTS = 100_000  # a watcher nobody polls or reads must not grow without bound


def check_watch_root(path: str) -> None:
    """``not_found`` / ``invalid_argument`` before any watch is set up."""
    if not os.path.lexists(path):
        raise ConnectError(Code.NOT_FOUND, f"path '{path}' not found")
    if not os.path.isdir(path):
        raise ConnectError(Code.INVALID_ARGUMENT, f"path '{path}' is not a directory")


def to_event(root: str, name: str, kind: str, include_entry: bool) -> fpb.FilesystemEvent:
    """A FilesystemEvent; the entry is added only if asked for and the path still exists."""
    event = fpb.FilesystemEvent(name=name, type=_KINDS[kind])
    if include_entry and kind not in (REMOVE, RENAME):
        try:
            event.entry = entry_info(os.path.join(root, name) if name else root)
        except OSError:
            pass
    return event


def open_watch(
    path: str, recursive: bool, include_entry: bool
) -> tuple[DirWatcher, asyncio.Queue[fpb.FilesystemEvent]]:
    """Start watching ``path``; events arrive on the returned queue."""
    check_watch_root(path)
    queue: asyncio.Queue[fpb.FilesystemEvent] = asyncio.Queue()

    def on_event(name: str, kind: str) -> None:
        if queue.qsize() < MAX_PENDING_EVENTS:
            queue.put_nowait(to_event(path, name, kind, include_entry))

    try:
        watcher = DirWatcher(path, recursive, on_event)
    except OSError as e:
        raise ConnectError(Code.INTERNAL, f"cannot watch '{path}': {e.strerror or e}") from e
    return watcher, queue


async def stream_watch(
    path: str, recursive: bool, include_entry: bool, keepalive_s: float, remaining_ms: Callable[[], float | None]
) -> AsyncIterator[fpb.WatchDirResponse]:
    """The WatchDir stream; it ends at the Connect deadline, and closing it removes the watch."""
    watcher, queue = open_watch(path, recursive, include_entry)
    try:
        yield fpb.WatchDirResponse(event=Oneof("start", fpb.WatchDirResponse.StartEvent()))
        while True:
            wait_s = keepalive_s
            left = remaining_ms()
            if left is not None:
                if left <= 0:
                    raise ConnectError(Code.DEADLINE_EXCEEDED, "watch deadline exceeded")
                wait_s = min(wait_s, left / 1000)
            try:
                event = await next_event(queue, wait_s)
            except ClientGone:
                return
            if event is None:
                if wait_s == keepalive_s:
                    yield fpb.WatchDirResponse(event=Oneof("keepalive", fpb.WatchDirResponse.KeepAlive()))
                continue
            yield fpb.WatchDirResponse(event=Oneof("filesystem", event))
    finally:
        watcher.close()


class PolledWatchers:
    """Watchers created by CreateWatcher, drained by GetWatcherEvents, by id."""

    def __init__(self) -> None:
        self._watchers: dict[str, tuple[DirWatcher, asyncio.Queue[fpb.FilesystemEvent]]] = {}

    def create(self, path: str, recursive: bool, include_entry: bool) -> str:
        watcher, queue = open_watch(path, recursive, include_entry)
        watcher_id = uuid.uuid4().hex
        self._watchers[watcher_id] = (watcher, queue)
        return watcher_id

    def drain(self, watcher_id: str) -> list[fpb.FilesystemEvent]:
        _, queue = self._get(watcher_id)
        events = []
        while not queue.empty():
            events.append(queue.get_nowait())
        return events

    def remove(self, watcher_id: str) -> None:
        watcher, _ = self._get(watcher_id)
        watcher.close()
        del self._watchers[watcher_id]

    def _get(self, watcher_id: str) -> tuple[DirWatcher, asyncio.Queue[fpb.FilesystemEvent]]:
        found = self._watchers.get(watcher_id)
        if found is None:
            raise ConnectError(Code.NOT_FOUND, f"watcher '{watcher_id}' not found")
        return found
