"""The layer cache: ``<data_dir>/cache/layers/<key>/{diff/, meta.json}``.

A layer is what one build step changed, as an overlayfs upper directory (whiteouts are ``0:0``
character devices, replaced directories carry ``trusted.overlay.opaque``), so a stack of layers is
mounted as is. Its key is a hash of everything that determines it (the parent's key, the step, the
bytes it copies, the code that carries steps out): an unchanged step finds its layer, a changed one
cannot. Like template builds, layers are written in a temporary directory and renamed into place
only when complete, carry a checksum of their content, are verified before every use, and a layer
that fails verification is moved aside and rebuilt, never repaired in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandboxd.templates.store import file_lock, remove_tree, tree_checksum

LAYER_FORMAT = "sandboxd-layer-1"
OPAQUE_XATTR = "trusted.overlay.opaque"
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")

#: ``make(diff, work)`` fills the empty ``diff`` (``work`` is an empty dir beside it, for overlayfs).
LayerMaker = Callable[[Path, Path], None]


def layer_key(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (prefixed with the layer format)."""
    canon = json.dumps([LAYER_FORMAT, *parts], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def opaque_dirs(root: Path) -> list[str]:
    """Relative paths of the directories marked opaque in an upper directory."""
    out = []
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                if os.getxattr(p, OPAQUE_XATTR, follow_symlinks=False) == b"y":
                    out.append(os.path.relpath(p, root))
    return sorted(out)


def layer_checksum(diff: Path) -> dict[str, Any]:
    """:func:`tree_checksum` of the diff plus its opaque markers (they change what the stack
    shows, so they are content too)."""
    tree = tree_checksum(diff)
    opaque = opaque_dirs(diff)
    h = hashlib.sha256(tree["sha256"].encode() + b"\0" + "\0".join(opaque).encode())
    return {"sha256": h.hexdigest(), "files": tree["files"], "bytes": tree["bytes"], "opaque": opaque}


def mark_opaque(path: Path) -> None:
    os.setxattr(path, OPAQUE_XATTR, b"y", follow_symlinks=False)


@dataclass(frozen=True)
class Layer:
    key: str
    path: Path
    meta: dict[str, Any]

    @property
    def diff(self) -> Path:
        return self.path / "diff"

    @property
    def checksum(self) -> str:
        return self.meta["checksum"]["sha256"]

    @property
    def empty(self) -> bool:
        """Nothing to stack (ENV-only steps, a WORKDIR that already existed...)."""
        return not any(self.diff.iterdir())


class LayerCache:
    """Layers by key; the only writer of ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in (".tmp", ".locks", ".corrupt"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError(f"not a layer key: {key!r}")
        return self.root / key

    def list(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if _KEY_RE.match(p.name))

    def _read(self, key: str) -> Layer | None:
        p = self.path(key)
        try:
            meta = json.loads((p / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return Layer(key, p, meta)

    def verify(self, key: str) -> bool:
        """True iff the layer is complete and its content is exactly what was recorded."""
        layer = self._read(key)
        if layer is None or layer.meta.get("key") != key or not layer.diff.is_dir():
            return False
        try:
            return layer_checksum(layer.diff)["sha256"] == layer.checksum
        except (OSError, ValueError, KeyError):
            return False

    def get(self, key: str, log: Callable[[str], None] = lambda _: None) -> Layer | None:
        """The verified layer for ``key``, or None (a corrupt one is moved aside first)."""
        if not self.path(key).exists():
            return None
        if self.verify(key):
            with contextlib.suppress(OSError):
                os.utime(self.path(key))  # last use, for gc's minimum age
            return self._read(key)
        self.quarantine(key, log)
        return None

    def quarantine(self, key: str, log: Callable[[str], None]) -> None:
        dest = self.root / ".corrupt" / f"{key}-{int(time.time())}-{secrets.token_hex(3)}"
        log(f"layer {key[:12]} failed verification; moved aside and rebuilding")
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path(key), dest)

    def lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        """One maker per key across processes; the others wait and then use its layer."""
        return file_lock(self.root / ".locks" / f"{key}.lock")

    def create(self, key: str, make: LayerMaker, info: dict[str, Any],
               log: Callable[[str], None] = lambda _: None) -> tuple[Layer, bool]:
        """The layer for ``key`` and whether it came from the cache; ``make`` runs only if
        there is no verified layer. If ``make`` raises, nothing is left behind."""
        with self.lock(key):
            if (layer := self.get(key, log)) is not None:
                return layer, True
            self._remove_stale_tmp(key)
            tmp = self.root / ".tmp" / f"{key}-{secrets.token_hex(4)}"
            (tmp / "diff").mkdir(parents=True)
            (tmp / "diff").chmod(0o755)  # an upper's root is the stack's `/`: never the umask's idea
            (tmp / "work").mkdir()
            try:
                make(tmp / "diff", tmp / "work")
                remove_tree(tmp / "work")
                meta = {"key": key, "format": LAYER_FORMAT, "checksum": layer_checksum(tmp / "diff"), "info": info,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
                os.chmod(tmp / "meta.json", 0o444)
                os.rename(tmp, self.path(key))
            except BaseException:
                with contextlib.suppress(OSError):
                    _make_removable(tmp)
                    remove_tree(tmp)
                raise
            return Layer(key, self.path(key), meta), False

    def _remove_stale_tmp(self, key: str) -> None:
        """A maker killed mid-step (SIGKILL, a crash) leaves ``.tmp/<key>-*``; we hold the key's
        lock, so no live maker owns one of them."""
        for stale in (self.root / ".tmp").glob(f"{key}-*"):
            with contextlib.suppress(OSError):
                _make_removable(stale)
                remove_tree(stale)

    def remove(self, key: str) -> bool:
        """Delete a layer (gc); renamed away first so it is never seen half-deleted."""
        with self.lock(key):
            p = self.path(key)
            if not p.exists():
                return False
            trash = self.root / ".tmp" / f"{key}-removing-{secrets.token_hex(4)}"
            os.rename(p, trash)
            _make_removable(trash)
            remove_tree(trash)
            return True


def _make_removable(path: Path) -> None:
    """overlayfs leaves ``work/work`` mode 000; root can remove it anyway, but be explicit so
    removal never depends on that."""
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                if not stat.S_ISLNK(os.lstat(p).st_mode):
                    os.chmod(p, 0o755)


def read_from_stack(lowers: list[Path], rel: str) -> bytes | None:
    """A regular file's bytes as a stack of layers (top first) shows it, without mounting:
    the topmost layer that has the path decides (a whiteout hides it, an opaque parent directory
    hides everything below). Used for small lookups such as /etc/passwd."""
    parts = rel.strip("/").split("/")
    for top in lowers:
        p = top.joinpath(*parts)
        try:
            st = os.lstat(p)
        except (FileNotFoundError, NotADirectoryError):
            if any(_is_opaque(top.joinpath(*parts[:i])) for i in range(1, len(parts))):
                return None
            continue
        if stat.S_ISREG(st.st_mode):
            return p.read_bytes()
        return None  # whiteout, directory, symlink: not a plain file here
    return None


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False
