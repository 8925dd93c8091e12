"""``rootfs.ext4`` of a build: the block-device form of a template, for microVMs.

A derived cache, never part of the build: ``<data_dir>/cache/<build_id>/rootfs.ext4`` with
``rootfs.ext4.json`` beside it (sha256, size, build id, recipe). Why this cannot go stale
(seed 000, cause 2):
- the build dir it is made from is immutable and verified first (``TemplateStore.verify``);
- the key is the build id (content hash of the build's inputs) and the JSON records the recipe
  hash (this module's source + the mke2fs version): another recipe is a rebuild, not a hit;
- :func:`ext4_image` checks the image's sha256 against the JSON before every hand-out (memoised
  per inode+size+mtime+ctime, which any write changes), and rebuilds on a mismatch;
- the image is published read-only with an atomic rename, checksum file last.

``mkfs.ext4 -d`` copies the tree without mounting anything and never writes to the source. Its
options are fixed (UUID and hash seed derived from the build id, fixed creation time, inode
tables zeroed at mkfs time) so a guest never starts background ``ext4lazyinit`` writes into its
copy-on-write overlay, and the same build gives the same bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandboxd.templates.store import LogFn, TemplateStore, file_sha256

FORMAT = "sandboxd-ext4-1"
IMAGE_NAME = "rootfs.ext4"
META_NAME = "rootfs.ext4.json"
#: Free space a sandbox gets on top of the template's files (the image is sparse: free costs nothing).
DEFAULT_FREE_MB = 1024
_FAKE_TIME = "1700000000"  # mke2fs's own timestamps (superblock, journal); files keep theirs

_verified: dict[tuple[str, int, int, int, int], str] = {}  # (path, ino, size, mtime, ctime) → sha256


class Ext4Error(RuntimeError):
    pass


@dataclass(frozen=True)
class Ext4Image:
    """A verified image: ``sha256`` is its bytes' checksum (the NBD overlay's base id)."""

    build_id: str
    path: Path
    sha256: str
    size: int


def _mke2fs_version() -> str:
    proc = subprocess.run(["mkfs.ext4", "-V"], capture_output=True, text=True)
    return (proc.stdout + proc.stderr).strip().splitlines()[0] if proc.returncode == 0 else "unknown"


def recipe_hash(free_mb: int) -> str:
    h = hashlib.sha256(FORMAT.encode())
    h.update(Path(__file__).read_bytes())
    h.update(f"\0{_mke2fs_version()}\0{free_mb}".encode())
    return h.hexdigest()


def cache_dir(data_dir: Path, build_id: str) -> Path:
    return Path(data_dir) / "cache" / build_id


def image_size_mb(tree_bytes: int, files: int, free_mb: int) -> int:
    """Room for the files (each rounded to 4 KiB blocks), ext4 metadata and the free space."""
    need = tree_bytes * 1.1 + files * 4096 * 2
    return 16 * math.ceil((need / 2**20 + free_mb + 64) / 16)


def mkfs_argv(source: Path, image: Path, build_id: str, size_mb: int) -> list[str]:
    fs_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sandboxd-ext4:{build_id}"))
    return ["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0", "-L", "rootfs",
            "-U", fs_uuid,
            "-E", f"hash_seed={fs_uuid},lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
            "-d", str(source), str(image), f"{size_mb}M"]


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def read_meta(d: Path) -> dict[str, Any]:
    try:
        return json.loads((d / META_NAME).read_text())
    except (OSError, ValueError):
        return {}


def verified_sha256(path: Path, expected: str) -> bool:
    """True iff the file's bytes hash to ``expected`` (memoised while the inode is unchanged)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _verified:
        _verified[key] = file_sha256(path)
    return _verified[key] == expected


def _cached(d: Path, build_id: str, recipe: str) -> Ext4Image | None:
    meta = read_meta(d)
    if meta.get("format") != FORMAT or meta.get("build_id") != build_id or meta.get("recipe") != recipe:
        return None
    if not verified_sha256(d / IMAGE_NAME, meta.get("sha256", "")):
        return None
    return Ext4Image(build_id=build_id, path=d / IMAGE_NAME, sha256=meta["sha256"], size=meta["size"])


def _build(store: TemplateStore, build_id: str, d: Path, recipe: str, free_mb: int, log: LogFn) -> Ext4Image:
    if not store.verify(build_id):
        raise Ext4Error(f"build {build_id} does not verify; refusing to make an image of it")
    build = store.get(build_id)
    size_mb = image_size_mb(build.meta["rootfs"]["bytes"], build.meta["rootfs"]["files"], free_mb)
    tmp = d / f".{IMAGE_NAME}.{secrets.token_hex(4)}"
    log(f"making {IMAGE_NAME} of {build_id} ({size_mb} MiB)")
    try:
        proc = subprocess.run(mkfs_argv(build.rootfs, tmp, build_id, size_mb), capture_output=True, text=True,
                              env={**os.environ, "E2FSPROGS_FAKE_TIME": _FAKE_TIME})
        if proc.returncode != 0:
            raise Ext4Error(f"mkfs.ext4 failed: {(proc.stderr or proc.stdout).strip()[-1000:]}")
        os.chmod(tmp, 0o444)
        sha = file_sha256(tmp)
        os.sync()
        (d / META_NAME).unlink(missing_ok=True)  # the old image loses its checksum first
        os.rename(tmp, d / IMAGE_NAME)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"format": FORMAT, "build_id": build_id, "recipe": recipe, "sha256": sha,
            "size": os.stat(d / IMAGE_NAME).st_size, "size_mb": size_mb}
    meta_tmp = d / f".{META_NAME}.tmp"
    meta_tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.rename(meta_tmp, d / META_NAME)
    return Ext4Image(build_id=build_id, path=d / IMAGE_NAME, sha256=sha, size=os.stat(d / IMAGE_NAME).st_size)


def ext4_image(data_dir: Path, store: TemplateStore, build_id: str, log: LogFn = lambda _: None,
               free_mb: int = DEFAULT_FREE_MB) -> Ext4Image:
    """The verified ``rootfs.ext4`` of ``build_id``: the cached one if it checks out, else made now."""
    store.path(build_id)  # validates the id before it becomes a path
    d = cache_dir(data_dir, build_id)
    recipe = recipe_hash(free_mb)
    with _locked(d):
        found = _cached(d, build_id, recipe)
        if found is not None:
            return found
        if (d / IMAGE_NAME).exists():
            log(f"{d / IMAGE_NAME} is stale or corrupt; rebuilding")
        return _build(store, build_id, d, recipe, free_mb, log)
