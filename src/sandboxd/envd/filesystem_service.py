"""The ``filesystem.Filesystem`` Connect service (Stat, ListDir, MakeDir, Move, Remove).

Error codes are what the SDK keys on (e2b-protocol.md 3.6): ``not_found`` makes ``exists()`` False,
``already_exists`` makes ``make_dir()`` False. envd runs as root; paths are resolved against the
calling user's home and anything created is owned by that user, as upstream does.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from . import file_metadata
from . import filesystem_messages as fpb
from .connect import SERVER_STREAM, UNARY, Code, ConnectError, Method, RequestContext
from .entries import entry_info
from .identity import rpc_user
from .process_service import keepalive_interval
from .state import EnvdState
from .users import InvalidPathError, User, makedirs_owned, resolve_path
from .watchers import PolledWatchers, stream_watch

_ERRNO_CODES = {
    errno.ENOENT: Code.NOT_FOUND,
    errno.EEXIST: Code.ALREADY_EXISTS,
    errno.ENOTEMPTY: Code.ALREADY_EXISTS,
    errno.EACCES: Code.PERMISSION_DENIED,
    errno.EPERM: Code.PERMISSION_DENIED,
    errno.ENOTDIR: Code.INVALID_ARGUMENT,
    errno.EISDIR: Code.INVALID_ARGUMENT,
    errno.EINVAL: Code.INVALID_ARGUMENT,
    errno.EXDEV: Code.INVALID_ARGUMENT,
    errno.ENOSPC: Code.RESOURCE_EXHAUSTED,
}


@contextmanager
def os_errors(what: str) -> Iterator[None]:
    """Turn OSError into the Connect error the SDK expects (ENOENT → not_found...)."""
    try:
        yield
    except OSError as e:
        code = _ERRNO_CODES.get(e.errno or 0, Code.INTERNAL)
        raise ConnectError(code, f"{what}: {e.strerror or e}") from e


def list_dir(root: str, depth: int) -> list[fpb.EntryInfo]:
    """Entries under ``root`` down to ``depth`` levels (symlinked dirs are listed, not entered)."""
    out: list[fpb.EntryInfo] = []

    def walk(directory: str, level: int) -> None:
        try:
            with os.scandir(directory) as it:
                items = sorted(it, key=lambda d: d.name)
        except OSError:
            if level == 1:
                raise
            return  # unreadable subdirectory: skip it, keep the rest
        for item in items:
            try:
                out.append(entry_info(item.path, item.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue  # vanished meanwhile
            if level < depth and item.is_dir(follow_symlinks=False):
                walk(item.path, level + 1)

    walk(root, 1)
    return out


class FilesystemService:
    """Implements filesystem.Filesystem."""

    def __init__(self, state: EnvdState) -> None:
        self._state = state
        self._watchers = PolledWatchers()

    def methods(self) -> list[Method]:
        """The service's RPCs, as :class:`.connect.ConnectApp` serves them."""
        def m(name: str, handler: Any, kind: str = UNARY) -> Method:
            return Method("filesystem.Filesystem", name, kind, getattr(fpb, f"{name}Request"),
                          getattr(fpb, f"{name}Response"), handler)
        return [
            m("Stat", self.stat), m("MakeDir", self.make_dir), m("Move", self.move), m("ListDir", self.list_dir),
            m("Remove", self.remove), m("WatchDir", self.watch_dir, SERVER_STREAM),
            m("CreateWatcher", self.create_watcher), m("GetWatcherEvents", self.get_watcher_events),
            m("RemoveWatcher", self.remove_watcher),
        ]

    def _path(self, ctx: RequestContext, path: str) -> tuple[User, str]:
        user = rpc_user(ctx, self._state)
        if not path:
            raise ConnectError(Code.INVALID_ARGUMENT, "path is required")
        try:
            return user, resolve_path(path, user)
        except InvalidPathError as e:
            raise ConnectError(Code.INVALID_ARGUMENT, str(e)) from e

    async def stat(self, request: fpb.StatRequest, ctx: RequestContext) -> fpb.StatResponse:
        _, path = self._path(ctx, request.path)
        with os_errors(f"stat '{path}'"):
            return fpb.StatResponse(entry=entry_info(path))

    async def list_dir(self, request: fpb.ListDirRequest, ctx: RequestContext) -> fpb.ListDirResponse:
        _, path = self._path(ctx, request.path)
        depth = max(request.depth, 1)
        with os_errors(f"list '{path}'"):
            if not os.path.isdir(path):
                if not os.path.lexists(path):
                    raise FileNotFoundError(errno.ENOENT, "no such directory")
                raise NotADirectoryError(errno.ENOTDIR, "path is not a directory")
            real = os.path.realpath(path)
            entries = await asyncio.to_thread(list_dir, real, depth)
        if real != path:  # listed through a symlink: report paths as the client named them
            for e in entries:
                e.path = path + e.path[len(real) :]
        return fpb.ListDirResponse(entries=entries)

    async def make_dir(self, request: fpb.MakeDirRequest, ctx: RequestContext) -> fpb.MakeDirResponse:
        user, path = self._path(ctx, request.path)
        with os_errors(f"make directory '{path}'"):
            if os.path.lexists(path):
                if os.path.isdir(path):
                    raise ConnectError(Code.ALREADY_EXISTS, f"directory '{path}' already exists")
                raise ConnectError(Code.INVALID_ARGUMENT, f"path '{path}' already exists and is not a directory")
            makedirs_owned(path, user)
            return fpb.MakeDirResponse(entry=entry_info(path))

    async def move(self, request: fpb.MoveRequest, ctx: RequestContext) -> fpb.MoveResponse:
        user, source = self._path(ctx, request.source)
        _, destination = self._path(ctx, request.destination)
        with os_errors(f"move '{source}' to '{destination}'"):
            if not os.path.lexists(source):
                raise ConnectError(Code.NOT_FOUND, f"source '{source}' not found")
            makedirs_owned(os.path.dirname(destination), user)
            try:
                os.rename(source, destination)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                await asyncio.to_thread(shutil.move, source, destination)
            file_metadata.STORE.moved(source, destination)
            return fpb.MoveResponse(entry=entry_info(destination))

    async def remove(self, request: fpb.RemoveRequest, ctx: RequestContext) -> fpb.RemoveResponse:
        _, path = self._path(ctx, request.path)
        with os_errors(f"remove '{path}'"):
            if os.path.isdir(path) and not os.path.islink(path):
                await asyncio.to_thread(shutil.rmtree, path)
            elif os.path.lexists(path):
                os.unlink(path)
            # else: nothing there, which is what was asked (E2B's envd: os.RemoveAll)
        file_metadata.STORE.removed(path)
        return fpb.RemoveResponse()

    async def watch_dir(self, request: fpb.WatchDirRequest, ctx: RequestContext) -> AsyncIterator[fpb.WatchDirResponse]:
        _, path = self._path(ctx, request.path)
        async for message in stream_watch(
            path, request.recursive, request.include_entry, keepalive_interval(ctx), lambda: ctx.timeout_ms
        ):
            yield message

    async def create_watcher(
        self, request: fpb.CreateWatcherRequest, ctx: RequestContext
    ) -> fpb.CreateWatcherResponse:
        _, path = self._path(ctx, request.path)
        watcher_id = self._watchers.create(path, request.recursive, request.include_entry)
        return fpb.CreateWatcherResponse(watcher_id=watcher_id)

    async def get_watcher_events(
        self, request: fpb.GetWatcherEventsRequest, ctx: RequestContext
    ) -> fpb.GetWatcherEventsResponse:
        rpc_user(ctx, self._state)
        return fpb.GetWatcherEventsResponse(events=self._watchers.drain(request.watcher_id))

    async def remove_watcher(
        self, request: fpb.RemoveWatcherRequest, ctx: RequestContext
    ) -> fpb.RemoveWatcherResponse:
        rpc_user(ctx, self._state)
        self._watchers.remove(request.watcher_id)
        return fpb.RemoveWatcherResponse()
