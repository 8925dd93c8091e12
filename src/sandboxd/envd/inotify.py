"""Directory watching with Linux inotify through ctypes (no third-party package in the bundle).

A :class:`DirWatcher` watches one directory (optionally its whole tree, adding watches for
directories created later) and hands each change to a callback as (relative name, kind). Kinds
follow upstream envd's fsnotify mapping: create (also a move into the tree), write, remove, rename
(a move away), chmod.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ctypes

import asyncio
import errno
import logging
import os
import struct
from collections.abc import Callable

log = logging.getLogger("envd.watch")

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

WATCH_MASK = (
    IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
)
_EVENT_HEADER = struct.Struct("iIII")

CREATE, WRITE, REMOVE, RENAME, CHMOD = "create", "write", "remove", "rename", "chmod"

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    """libc through ctypes, loaded on first watch: envd must start even if ctypes is unavailable."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret: int, what: str) -> int:
    if ret < 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def event_kind(mask: int) -> str | None:
    """Map an inotify mask to an event kind; None for bookkeeping events."""
    if mask & (IN_CREATE | IN_MOVED_TO):
        return CREATE
    if mask & IN_MODIFY:
        return WRITE
    if mask & (IN_DELETE | IN_DELETE_SELF):
        return REMOVE
    if mask & (IN_MOVED_FROM | IN_MOVE_SELF):
        return RENAME
    if mask & IN_ATTRIB:
        return CHMOD
    return None


class DirWatcher:
    """inotify watches on ``root`` (and its subtree when ``recursive``), read on the event loop."""

    def __init__(self, root: str, recursive: bool, on_event: Callable[[str, str], None]) -> None:
        self.root = root
        self._recursive = recursive
        self._on_event = on_event
        self._dirs: dict[int, str] = {}
        self._fd = _check(_lib().inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            self._add(root)
            if recursive:
                self._add_tree(root)
        except BaseException:
            os.close(self._fd)
            raise
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._on_readable)

    def _add(self, path: str) -> None:
        wd = _check(_lib().inotify_add_watch(self._fd, os.fsencode(path), WATCH_MASK | IN_ONLYDIR), "inotify_add_watch")
        self._dirs[wd] = path

    def _add_tree(self, top: str) -> None:
        for dirpath, dirnames, _ in os.walk(top):
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if os.path.islink(full):
                    continue
                try:
                    self._add(full)
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                        raise

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        except OSError as e:
            log.warning("inotify read: %s", e)
            return
        offset = 0
        while offset + _EVENT_HEADER.size <= len(data):
            wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
            raw_name = data[offset + _EVENT_HEADER.size : offset + _EVENT_HEADER.size + length]
            offset += _EVENT_HEADER.size + length
            self._handle(wd, mask, os.fsdecode(raw_name.rstrip(b"\0")))

    def _handle(self, wd: int, mask: int, name: str) -> None:
        if mask & IN_IGNORED:
            self._dirs.pop(wd, None)
            return
        if mask & IN_Q_OVERFLOW:
            log.warning("inotify queue overflow on %s; events were lost", self.root)
            return
        directory = self._dirs.get(wd)
        if directory is None:
            return
        full = os.path.join(directory, name) if name else directory
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF) and directory != self.root:
            return  # reported by the parent's watch already
        kind = event_kind(mask)
        if kind is not None:
            rel = os.path.relpath(full, self.root)
            self._on_event("" if rel == "." else rel, kind)
        if self._recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
            try:
                self._add(full)
                self._add_tree(full)
            except OSError:
                return
            self._report_existing(full)

    def _report_existing(self, top: str) -> None:
        """A directory that appeared under a recursive watch may have been filled before its own
        watch was in place (``mkdir -p a/b && touch a/b/f``): report what is in it as created, so
        no file in a new directory goes unseen (one that raced the watch may be reported twice)."""
        for dirpath, dirnames, filenames in os.walk(top):
            for name in sorted(dirnames) + sorted(filenames):
                self._on_event(os.path.relpath(os.path.join(dirpath, name), self.root), CREATE)
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]

    def close(self) -> None:
        """Stop watching; idempotent."""
        if self._fd < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1


class GoneWatches:
    """inotify watches on single files that report when one is deleted or moved away, read
    without blocking whenever the owner asks (:meth:`gone`): no thread, no event loop, and an
    answer that is up to date with every unlink and rename the kernel has seen so far."""

    MASK = IN_DELETE_SELF | IN_MOVE_SELF

    def __init__(self) -> None:
        self._fd = _check(_lib().inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")
        self._paths: dict[int, str] = {}

    def add(self, path: str) -> None:
        """Watch ``path`` (its inode: the watch follows it through renames)."""
        wd = _check(_lib().inotify_add_watch(self._fd, os.fsencode(path), self.MASK), "inotify_add_watch")
        self._paths[wd] = path

    def moved(self, old: str, new: str) -> None:
        """The owner renamed ``old`` to ``new`` itself: keep watching it under its new name."""
        for wd, path in self._paths.items():
            if path == old:
                self._paths[wd] = new

    def gone(self) -> tuple[set[str], bool]:
        """(paths deleted or moved away since the last call, whether events were lost)."""
        gone: set[str] = set()
        overflow = False
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return gone, overflow
            offset = 0
            while offset + _EVENT_HEADER.size <= len(data):
                wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
                offset += _EVENT_HEADER.size + length
                if mask & IN_Q_OVERFLOW:
                    overflow = True
                elif mask & (IN_DELETE_SELF | IN_MOVE_SELF) and wd in self._paths:
                    gone.add(self._paths[wd])
                if mask & IN_IGNORED:
                    self._paths.pop(wd, None)
