"""User metadata of files (``files.write(..., metadata=...)``): where it is kept, and how it is found.

Upstream envd stores it as ``user.e2b.<key>`` xattrs, and so does this envd wherever the
filesystem has them (a microVM's ext4). gVisor's gofer refuses every xattr on the root, so there
the metadata goes to an index envd keeps on the sandbox's own disk instead
(``/var/lib/sandboxd-envd/file-metadata.json``, root only): path → (inode, metadata).

The index keeps the xattr semantics that matter: metadata belongs to one file, not to a name.
- An inotify watch on every indexed file drops its entry the moment anyone deletes it or moves
  it away, so a file put in its place — ext4 hands it the same inode number at once — never
  inherits the metadata. Renames and removals through envd's own API carry or drop entries.
- The inode number is checked too (a file replaced while envd was not watching). gVisor numbers
  inodes anew at every boot, though, so an index written by an earlier boot of the sandbox
  (``boot_id``) is taken as it is and renumbered: between two boots nothing ran in it.
The one difference from an xattr: a rename by another process loses the metadata.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from .inotify import GoneWatches

log = logging.getLogger("envd.metadata")

XATTR_PREFIX = "user.e2b."
INDEX_PATH = Path(os.environ.get("ENVD_METADATA_INDEX", "/var/lib/sandboxd-envd/file-metadata.json"))
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP)


class FileMetadata:
    """Reads and writes metadata through xattrs, falling back to the index per file."""

    def __init__(self, index_path: Path = INDEX_PATH, boot_id_path: Path = BOOT_ID_PATH) -> None:
        self.index_path = index_path
        self.boot_id_path = boot_id_path
        self._lock = threading.Lock()
        self._index: dict[str, dict[str, Any]] | None = None  # path → {"ino": int, "metadata": {...}}
        self._watches: GoneWatches | None = None

    # -- the API's operations ------------------------------------------------------------------

    def read(self, path: str, st: os.stat_result) -> dict[str, str]:
        """The metadata of ``path`` (whose lstat is ``st``); empty if it has none."""
        found = _read_xattrs(path)
        if found:
            return found
        with self._lock:
            entry = self._entries().get(path)
        return dict(entry["metadata"]) if entry and entry["ino"] == st.st_ino else {}

    def replace(self, path: str, metadata: dict[str, str]) -> dict[str, str]:
        """Give ``path`` exactly ``metadata`` (keys lowercased, as upstream); return what it has."""
        metadata = {k.lower(): v for k, v in metadata.items()}
        try:
            _replace_xattrs(path, metadata)
            in_xattrs = True
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                log.warning("metadata on %s not stored: %s", path, e)
                return {}
            in_xattrs = False
        with self._lock:
            entries = self._entries()
            if in_xattrs or not metadata:  # the index keeps nothing for it: a stale entry goes
                if entries.pop(path, None) is not None:
                    self._save(entries)
                return metadata
            if path not in entries:
                self._watch(path)
            entries[path] = {"ino": os.lstat(path).st_ino, "metadata": metadata}
            self._save(entries)
        return metadata

    def moved(self, source: str, destination: str) -> None:
        """envd renamed ``source`` (a file or a whole tree) to ``destination``, replacing it."""
        with self._lock:
            entries = self._entries(expected_gone=source)
            moving = {_rebase(p, source, destination): entries.pop(p) for p in list(entries) if _under(p, source)}
            replaced = [p for p in entries if _under(p, destination)]
            for p in replaced:
                del entries[p]
            if moving or replaced:
                entries.update(moving)
                if self._watches is not None:
                    for new in moving:
                        self._watches.moved(_rebase(new, destination, source), new)
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

    def _entries(self, expected_gone: str | None = None) -> dict[str, dict[str, Any]]:
        """The index, up to date with every deletion and move the watches saw (except of what
        is under ``expected_gone``: envd's own rename)."""
        if self._index is None:
            self._index = self._load()
        elif self._watches is not None:
            gone, overflow = self._watches.gone()
            lost = [p for p in gone if expected_gone is None or not _under(p, expected_gone)]
            if overflow:  # events were lost: keep only what still is the file it was
                lost += [p for p, e in self._index.items() if not _is_still(p, e["ino"])]
            for p in lost:
                self._index.pop(p, None)
            if lost:
                self._save(self._index)
        return self._index

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            raw = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("file metadata index %s unreadable, starting empty: %s", self.index_path, e)
            return {}
        same_boot = raw.get("boot") == self._boot_id()
        entries = {}
        for path, entry in raw.get("files", {}).items():
            try:
                ino = os.lstat(path).st_ino
            except OSError:
                continue
            if not same_boot or ino == entry.get("ino"):
                entries[path] = {"ino": ino, "metadata": entry["metadata"]}
                self._watch(path)
        self._save(entries)
        return entries

    def _watch(self, path: str) -> None:
        if self._watches is None:
            self._watches = GoneWatches()
        self._watches.add(path)

    def _boot_id(self) -> str:
        try:
            return self.boot_id_path.read_text().strip()
        except OSError:
            return ""

    def _save(self, entries: dict[str, dict[str, Any]]) -> None:
        self.index_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.index_path.with_name(self.index_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"boot": self._boot_id(), "files": entries}, f)
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


def _is_still(path: str, ino: int) -> bool:
    try:
        return os.lstat(path).st_ino == ino
    except OSError:
        return False


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _rebase(path: str, source: str, destination: str) -> str:
    return destination + path[len(source):]


#: The one store envd uses (the index is a file of the sandbox; one envd runs per sandbox).
STORE = FileMetadata()
