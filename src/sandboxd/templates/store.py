"""Content-addressed template build store: ``<data_dir>/templates/<build_id>/{rootfs/, meta.json, build.log}``.

Why content-addressed: seed 000's second failure was a fixed rootfs served from stale caches keyed
by a name. Here a build id is the hash of everything that went into the build (recipe, packages,
mirror, envd bundle hash, format version), so a changed input is a different id by construction,
and an id's directory, once published, is never modified:

- builds run in ``.tmp/<build_id>-<random>/`` on the same filesystem and are ``rename()``d into
  place only after the builder succeeded and the tree was checksummed: a half-built dir is never
  visible under a build id;
- ``meta.json`` records the inputs and a checksum of the whole rootfs tree (paths, types, modes,
  owners, sizes, symlink targets, bytes), so :meth:`TemplateStore.verify` detects any change;
- a published build that fails verification is moved to ``.corrupt/`` (never repaired in place)
  and built again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LogFn = Callable[[str], None]
Builder = Callable[[Path, LogFn], None]

STORE_FORMAT = "sandboxd-template-build-1"
BUILD_ID_LEN = 32
_BUILD_ID_RE = re.compile(rf"^[0-9a-f]{{{BUILD_ID_LEN}}}$")


class BuildError(RuntimeError):
    """A build failed; nothing was published. ``log_path`` keeps the failed build's log."""

    def __init__(self, message: str, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path


@dataclass(frozen=True)
class BuildInputs:
    """Everything that determines a build's bytes. Change any field → different build id."""

    name: str
    recipe: str
    packages: tuple[str, ...] = ()
    mirror: str = ""
    envd_bundle_hash: str = ""
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["packages"] = list(self.packages)
        d["extra"] = [list(kv) for kv in self.extra]
        return {"format": STORE_FORMAT, **d}

    @property
    def build_id(self) -> str:
        return build_id_of(self.to_json())


def build_id_of(inputs_json: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the inputs, shortened (128 bits is plenty for ids)."""
    canon = json.dumps(inputs_json, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:BUILD_ID_LEN]


@dataclass(frozen=True)
class Build:
    """A published, immutable build. ``rootfs`` is meant to be a read-only lower layer."""

    build_id: str
    rootfs: Path
    meta: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.rootfs.parent


# ---------------------------------------------------------------------------------------------
# Tree checksum.


def _file_digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.digest()


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB chunks (images are GBs)."""
    return _file_digest(path).hex()


def _walk(root: Path, rel: str = "") -> Iterator[tuple[str, os.stat_result, Path]]:
    """(relative path, lstat, absolute path) of every entry below ``root``, sorted, no following."""
    with os.scandir(root / rel if rel else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        r = f"{rel}/{e.name}" if rel else e.name
        st = e.stat(follow_symlinks=False)
        yield r, st, Path(e.path)
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(root, r)


def tree_checksum(root: Path) -> dict[str, Any]:
    """Checksum of a directory tree and its size. Covers path, type, mode (incl. setuid/sticky),
    uid, gid, file size and bytes, symlink target and device numbers; not timestamps (reading a
    file must not change a template's identity)."""
    h = hashlib.sha256(b"tree-v1\0")
    files = 0
    size = 0
    st0 = os.lstat(root)
    h.update(f".\0d\0{stat.S_IMODE(st0.st_mode):o}\0{st0.st_uid}\0{st0.st_gid}\n".encode())
    for rel, st, path in _walk(root):
        mode = st.st_mode
        head = f"{rel}\0{stat.S_IMODE(mode):o}\0{st.st_uid}\0{st.st_gid}\0"
        if stat.S_ISREG(mode):
            h.update(f"{head}f\0{st.st_size}\0".encode() + _file_digest(path) + b"\n")
            files += 1
            size += st.st_size
        elif stat.S_ISDIR(mode):
            h.update(f"{head}d\n".encode())
        elif stat.S_ISLNK(mode):
            h.update(f"{head}l\0".encode() + os.fsencode(os.readlink(path)) + b"\n")
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = "c" if stat.S_ISCHR(mode) else "b"
            h.update(f"{head}{kind}\0{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}\n".encode())
        elif stat.S_ISFIFO(mode):
            h.update(f"{head}p\n".encode())
        else:  # sockets have no business in a template
            raise ValueError(f"unsupported file type in tree: {rel}")
    return {"sha256": h.hexdigest(), "files": files, "bytes": size}


# ---------------------------------------------------------------------------------------------
# Safe removal: a failed build may have left mounts (proc, dev binds) inside its rootfs.


def _mounts_under(path: Path) -> list[str]:
    real = os.path.realpath(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].encode().decode("unicode_escape")
            if mnt == real or mnt.startswith(real + "/"):
                out.append(mnt)
    return out


def remove_tree(path: Path) -> None:
    """rm -rf that refuses to descend into mounts (never delete a host /dev through a bind)."""
    if not path.exists() and not path.is_symlink():
        return
    mounts = _mounts_under(path)
    if mounts:
        raise BuildError(f"refusing to remove {path}: mounts still inside: {mounts}")
    shutil.rmtree(path)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` across processes, released on exit."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# The store.


class TemplateStore:
    """Builds keyed by build id; the only writer of ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in (".tmp", ".locks", ".failed", ".corrupt"):  # dot dirs are never build ids
            (self.root / sub).mkdir(exist_ok=True)

    # -- reading ---------------------------------------------------------------------------

    def path(self, build_id: str) -> Path:
        if not _BUILD_ID_RE.match(build_id):
            raise ValueError(f"not a build id: {build_id!r}")
        return self.root / build_id

    def exists(self, build_id: str) -> bool:
        return (self.path(build_id) / "meta.json").is_file()

    def list(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if _BUILD_ID_RE.match(p.name) and self.exists(p.name))

    def get(self, build_id: str) -> Build:
        """The published build (not re-verified: call :meth:`verify` where it matters)."""
        if not self.exists(build_id):
            raise KeyError(build_id)
        p = self.path(build_id)
        meta = json.loads((p / "meta.json").read_text())
        return Build(build_id=build_id, rootfs=p / "rootfs", meta=meta)

    def verify(self, build_id: str) -> bool:
        """True iff meta.json belongs to this id and the rootfs tree is byte-for-byte as built."""
        try:
            b = self.get(build_id)
        except (KeyError, ValueError, json.JSONDecodeError):
            return False
        if b.meta.get("build_id") != build_id or build_id_of(b.meta.get("inputs", {})) != build_id:
            return False
        if not b.rootfs.is_dir():
            return False
        try:
            return tree_checksum(b.rootfs)["sha256"] == b.meta.get("rootfs", {}).get("sha256")
        except (OSError, ValueError):
            return False

    # -- building --------------------------------------------------------------------------

    def _lock(self, build_id: str) -> contextlib.AbstractContextManager[None]:
        """One builder per build id (across processes); others wait and then reuse its result."""
        return file_lock(self.root / ".locks" / f"{build_id}.lock")

    def build(self, inputs: BuildInputs, builder: Builder, log: LogFn,
              extra_meta: dict[str, Any] | None = None) -> Build:
        """The build for ``inputs``: the published one if it exists and verifies, else a fresh one.

        ``builder(rootfs_dir, log)`` fills the empty ``rootfs_dir`` and raises on failure, including
        when its own checks (e.g. "envd starts") fail. Nothing is published unless it returns.
        ``extra_meta`` adds descriptive keys to meta.json (anything that decides the bytes must be
        in ``inputs``, which the build id covers)."""
        build_id = inputs.build_id
        with self._lock(build_id):
            if self.exists(build_id):
                if self.verify(build_id):
                    log(f"template {inputs.name}: cached build {build_id} verified")
                    return self.get(build_id)
                self._quarantine(build_id, log)
            return self._build_locked(build_id, inputs, builder, log, extra_meta or {})

    def publish_fetched(self, build_id: str, tmp: Path, expected_sha256: str, log: LogFn) -> Build:
        """Publish a build another node sent (cluster/builds.py), unpacked into ``tmp`` (a dir in
        this store's ``.tmp``): only if its meta.json is the build ``build_id`` names and its rootfs
        has the checksum the cluster recorded when it was built (``expected_sha256``, not the
        sender's word). Anything else is removed and refused."""
        try:
            meta = json.loads((tmp / "meta.json").read_text())
            why = None
            if meta.get("build_id") != build_id or build_id_of(meta.get("inputs", {})) != build_id:
                why = "its meta.json names another build"
            elif (actual := tree_checksum(tmp / "rootfs")["sha256"]) != expected_sha256:
                why = f"its rootfs checksum {actual[:12]}… is not the recorded {expected_sha256[:12]}…"
            elif meta.get("rootfs", {}).get("sha256") != expected_sha256:
                why = "its meta.json records another checksum"
        except (OSError, ValueError) as exc:
            why = f"unreadable: {exc}"
        if why is not None:
            remove_tree(tmp)
            raise BuildError(f"fetched build {build_id} refused: {why}")
        if not (tmp / "build.log").exists():
            (tmp / "build.log").write_text(f"build {build_id} fetched from another node (its log is there)\n")
        with self._lock(build_id):
            if self.exists(build_id):
                remove_tree(tmp)
                return self.get(build_id)
            return self._publish(build_id, tmp, log)

    def remove(self, build_id: str) -> bool:
        """Delete a build (garbage collection; the caller makes sure no sandbox uses it). It is
        first renamed out of the way, so it is never visible half-deleted."""
        with self._lock(build_id):
            if not self.path(build_id).exists():
                return False
            trash = self.root / ".tmp" / f"{build_id}-removing-{secrets.token_hex(4)}"
            os.rename(self.path(build_id), trash)
            remove_tree(trash)
            return True

    def _quarantine(self, build_id: str, log: LogFn) -> None:
        dest = self.root / ".corrupt" / f"{build_id}-{int(time.time())}-{secrets.token_hex(3)}"
        log(f"build {build_id} failed verification; moved to {dest} and rebuilding")
        os.rename(self.path(build_id), dest)

    def _build_locked(self, build_id: str, inputs: BuildInputs, builder: Builder, log: LogFn,
                      extra_meta: dict[str, Any]) -> Build:
        for stale in (self.root / ".tmp").glob(f"{build_id}-*"):
            remove_tree(stale)  # left by a crashed builder of this id; we hold the id's lock
        tmp = self.root / ".tmp" / f"{build_id}-{secrets.token_hex(4)}"
        rootfs = tmp / "rootfs"
        rootfs.mkdir(parents=True)
        log_path = tmp / "build.log"
        started = time.time()
        with open(log_path, "a", buffering=1) as logf:

            def blog(msg: str) -> None:
                logf.write(f"{time.time() - started:8.2f} {msg}\n")
                log(msg)

            blog(f"building template {inputs.name} as {build_id}")
            try:
                builder(rootfs, blog)
                blog("checksumming rootfs")
                checksum = tree_checksum(rootfs)
            except BaseException as exc:
                blog(f"build failed: {type(exc).__name__}: {exc}")
                logf.flush()
                failed_log = self.root / ".failed" / f"{build_id}.log"
                with contextlib.suppress(OSError):
                    shutil.copyfile(log_path, failed_log)
                remove_tree(tmp)
                if isinstance(exc, Exception):
                    raise BuildError(f"template {inputs.name} ({build_id}) failed: {exc}", failed_log) from exc
                raise
            duration = time.time() - started
            blog(f"built in {duration:.1f}s: {checksum['files']} files, {checksum['bytes'] / 1e6:.1f} MB")
        meta = {
            **extra_meta,
            "build_id": build_id,
            "name": inputs.name,
            "inputs": inputs.to_json(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(duration, 2),
            "rootfs": checksum,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return self._publish(build_id, tmp, log)

    def _publish(self, build_id: str, tmp: Path, log: LogFn) -> Build:
        """Make the finished build read-only, durable, then visible (atomic rename)."""
        for name in ("meta.json", "build.log"):
            os.chmod(tmp / name, 0o444)
        os.chmod(tmp, 0o555)
        os.sync()  # the rename must not become durable before the bytes it names
        try:
            os.rename(tmp, self.path(build_id))
        except OSError:
            if not self.exists(build_id):
                raise
            log(f"build {build_id} was published concurrently; discarding ours")
            remove_tree(tmp)
        return self.get(build_id)
