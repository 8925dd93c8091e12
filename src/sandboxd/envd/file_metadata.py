"""User metadata of files (``files.write(..., metadata=...)``): where it is kept, and how it is found.

Upstream envd stores it as ``user.e2b.<key>`` xattrs, and so does this envd wherever the
filesystem has them (a microVM's ext4). gVisor's gofer refuses every xattr on the root, so there
the metadata goes to an index envd keeps on the sandbox's own disk instead
(``/var/lib/sandboxd-envd/file-metadata.json``, root only): path → (inode, metadata).

The index keeps the xattr semantics that matter: metadata belongs to one file, not to a name. An
entry counts only while the file at its path is the one it was written for — same inode number
*and* same change time, since ext4 hands a deleted file's inode number to the next new file at
once. So a file deleted or replaced behind envd's back never passes its metadata on. What envd
does itself (rewriting a file through ``/files``, renaming or removing through the API) carries
or drops its entries. The difference from a real xattr: a change made by another process (a
rename, an append, a chmod: anything that moves the change time) loses the metadata.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("envd.metadata")

XATTR_PREFIX = "user.e2b."
INDEX_PATH = Path(os.environ.get("ENVD_METADATA_INDEX", "/var/lib/sandboxd-envd/file-metadata.json"))
_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP)


class FileMetadata:
    """Reads and writes metadata through xattrs, falling back to the index per file."""

    def __init__(self, index_path: Path = INDEX_PATH) -> None:
        self.index_path = index_path
        self._lock = threading.Lock()
        self._index: dict[str, dict] | None = None  # path → {"ino": int, "metadata": {...}}

    # -- the API's operations ------------------------------------------------------------------

    def read(self, path: str, st: os.stat_result) -> dict[str, str]:
        """The metadata of ``path`` (whose lstat is ``st``); empty if it has none."""
        found = _read_xattrs(path)
        if found:
            return found
        with self._lock:
            entry = self._entries().get(path)
        return dict(entry["metadata"]) if entry and _identity(st) == (entry["ino"], entry["ctime"]) else {}

    def replace(self, path: str, metadata: dict[str, str]) -> dict[str, str]:
        """Give ``path`` exactly ``metadata`` (keys lowercased, as upstream); return what it has."""
        metadata = {k.lower(): v for k, v in metadata.items()}
        try:
            _replace_xattrs(path, metadata)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                log.warning("metadata on %s not stored: %s", path, e)
                return {}
            with self._lock:
                entries = self._entries()
                entries[path] = {**_stamp(path), "metadata": metadata}
                self._save(entries)
        return metadata

    def rewritten(self, path: str) -> None:
        """envd wrote ``path`` in place (same inode): it keeps its metadata, as with an xattr."""
        with self._lock:
            entries = self._entries()
            entry = entries.get(path)
            if entry is not None and entry["ino"] == os.lstat(path).st_ino:
                entry.update(_stamp(path))
                self._save(entries)

    def moved(self, source: str, destination: str) -> None:
        """envd renamed ``source`` (a file or a whole tree) to ``destination``, replacing it."""
        with self._lock:
            entries = self._entries()
            moving = {_rebase(p, source, destination): entries.pop(p) for p in list(entries) if _under(p, source)}
            replaced = [p for p in entries if _under(p, destination)]
            for p in replaced:
                del entries[p]
            for new, entry in moving.items():
                with contextlib.suppress(OSError):  # a rename moves the change time of what it moves
                    if entry["ino"] == os.lstat(new).st_ino:
                        entry.update(_stamp(new))
            if moving or replaced:
                entries.update(moving)
                self._save(entries)

    def removed(self, path: str) -> None:
        """envd removed ``path`` (a file or a whole tree)."""
        with self._lock:
            entries = self._entries()
            gone = [p for p in entries if _under(p, path)]
            for p in gone:
                del entries[p]
            if gone:
                self._save(entries)

    # -- the index -----------------------------------------------------------------------------

    def _entries(self) -> dict[str, dict]:
        """The index, loaded once (entries whose file is gone or replaced are dropped then)."""
        if self._index is None:
            try:
                raw = json.loads(self.index_path.read_text())
            except FileNotFoundError:
                raw = {}
            except (OSError, ValueError) as e:
                log.warning("file metadata index %s unreadable, starting empty: %s", self.index_path, e)
                raw = {}
            self._index = {p: e for p, e in raw.items() if _is_still(p, e)}
        return self._index

    def _save(self, entries: dict[str, dict]) -> None:
        self.index_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.index_path.with_name(self.index_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f)
        os.replace(tmp, self.index_path)


def _read_xattrs(path: str) -> dict[str, str]:
    """``user.e2b.*`` xattrs of ``path`` (gVisor's gofer lists none and refuses to set any)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out: dict[str, str] = {}
    for name in names:
        if name.startswith(XATTR_PREFIX):
            try:
                value = os.getxattr(path, name, follow_symlinks=False)
            except OSError:
                continue
            out[name[len(XATTR_PREFIX):]] = value.decode("utf-8", "replace")
    return out


def _replace_xattrs(path: str, metadata: dict[str, str]) -> None:
    for name in os.listxattr(path):
        if name.startswith(XATTR_PREFIX):
            os.removexattr(path, name)
    for key, value in metadata.items():
        os.setxattr(path, XATTR_PREFIX + key, value.encode())


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_ino, st.st_ctime_ns


def _stamp(path: str) -> dict[str, int]:
    ino, ctime = _identity(os.lstat(path))
    return {"ino": ino, "ctime": ctime}


def _is_still(path: str, entry: dict) -> bool:
    """Is the file at ``path`` the one ``entry`` was written for?"""
    try:
        return _identity(os.lstat(path)) == (entry.get("ino"), entry.get("ctime"))
    except OSError:
        return False


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _rebase(path: str, source: str, destination: str) -> str:
    return destination + path[len(source):]


#: The one store envd uses (the index is a file of the sandbox; one envd runs per sandbox).
STORE = FileMetadata()
