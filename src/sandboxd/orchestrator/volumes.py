"""Volumes: directories on the host that outlive sandboxes, mounted into them and read and written
through E2B's volume content API.

A volume is ``<data dir>/volumes/<id>/data`` plus a record (name, content token). Sandboxes
created with ``volumeMounts`` get it bound at their path (gVisor bind mounts: writes go straight to
the host directory, so they survive the sandbox, and two sandboxes mounting it see each other's
files). A volume mounted by a sandbox that still exists (running or paused) cannot be destroyed.

The content API works on paths relative to the volume's root, as E2B's orchestrator does (new
files 0o666 and directories 0o777, owned by 9090:9090 unless asked otherwise). Sandboxes can put
symlinks in a volume, so every path is resolved on the host and refused (400) when it leaves the
volume's root; the last component is opened without following a symlink.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import DateTime, String, select
from sqlalchemy.orm import Mapped, mapped_column

from sandboxd.envd.contract import BUNDLE_PATH_IN_SANDBOX
from sandboxd.store.db import Base, Database, new_id, utcnow

DEFAULT_UID = DEFAULT_GID = 9090  # E2B's volume defaults
DEFAULT_FILE_MODE = 0o666
DEFAULT_DIR_MODE = 0o777
MIN_DEPTH, MAX_DEPTH = 1, 10
#: what E2B accepts as a volume name
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_-]{0,127}")
#: where a volume may not be mounted in a sandbox
_RESERVED = ("/", "/proc", "/dev", "/sys", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/usr", BUNDLE_PATH_IN_SANDBOX)


class VolumeError(Exception):
    """A volume operation refused, with the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class VolumeRow(Base):
    __tablename__ = "volumes"
    volume_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    token: Mapped[str] = mapped_column(String(128))  # the volume content API's bearer token
    #: the node whose data dir holds its files (cluster mode: sandboxes mounting it start there)
    node_id: Mapped[str | None] = mapped_column(String(64), nullable=True, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def data_dir_of(data_dir: Path, volume_id: str) -> Path:
    """Where a volume's files are on the host (what sandboxes mounting it get bound)."""
    return data_dir / "volumes" / volume_id / "data"


def check_mount_path(path: str, where: str) -> str:
    """A sandbox path a volume can be mounted at: absolute, normal, not a system directory."""
    if not path.startswith("/") or os.path.normpath(path) != path or "/../" in f"{path}/":
        raise VolumeError(400, f"{where}: {path!r} must be an absolute, normalised path")
    if any(path == r or (r != "/" and path.startswith(r + "/")) for r in _RESERVED):
        raise VolumeError(400, f"{where}: a volume cannot be mounted at {path!r} (a system directory)")
    return path


class Volumes:
    """Volume records and directories."""

    def __init__(self, db: Database, data_dir: Path) -> None:
        self.db = db
        self.data_dir = data_dir
        Base.metadata.create_all(db.engine)  # our table, if this database predates it
        (data_dir / "volumes").mkdir(parents=True, exist_ok=True)

    def create(self, name: str) -> VolumeRow:
        if not _NAME.fullmatch(name):
            raise VolumeError(400, f"name: invalid volume name {name!r} (letters, digits, '-' and '_', at most 128)")
        if self.find(name) is not None:
            raise VolumeError(400, f"Volume with name '{name}' already exists")
        row = VolumeRow(volume_id=new_id(), name=name, token=secrets.token_urlsafe(32), node_id=self.db.node_id)
        root = data_dir_of(self.data_dir, row.volume_id)
        root.mkdir(parents=True)
        os.chown(root, DEFAULT_UID, DEFAULT_GID)
        os.chmod(root, DEFAULT_DIR_MODE)
        with self.db.session() as s:
            s.add(row)
        return row

    def find(self, ref: str) -> VolumeRow | None:
        """By id or name."""
        return self.find_record(self.db, ref)

    @staticmethod
    def find_record(db: Database, ref: str) -> VolumeRow | None:
        """By id or name, without a data dir (the cluster proxy asks which node holds it)."""
        with db.session() as s:
            row = s.get(VolumeRow, ref)
            return row or s.scalars(select(VolumeRow).where(VolumeRow.name == ref)).first()

    def all(self) -> list[VolumeRow]:
        with self.db.session() as s:
            return list(s.scalars(select(VolumeRow).order_by(VolumeRow.created_at)))

    def destroyable(self, volume_id: str, users: list[str]) -> VolumeRow | None:
        """The volume to destroy (None: there is none by that id); 409 while ``users``
        (sandboxes mounting it) exist."""
        row = self.find(volume_id)
        if row is None or row.volume_id != volume_id:
            return None
        if users:
            raise VolumeError(409, f"volume '{volume_id}' is mounted by sandbox {', '.join(users)}: kill "
                                   "them first (its files are kept)")
        return row

    def destroy(self, volume_id: str, users: list[str]) -> bool:
        """Remove a volume and its files; 409 while ``users`` (sandboxes mounting it) exist."""
        if self.destroyable(volume_id, users) is None:
            return False
        with self.db.session() as s:
            found = s.get(VolumeRow, volume_id)
            if found is not None:
                s.delete(found)
        shutil.rmtree(self.data_dir / "volumes" / volume_id, ignore_errors=True)
        return True

    def root(self, row: VolumeRow) -> Path:
        return data_dir_of(self.data_dir, row.volume_id)


# -- the content API's file operations ---------------------------------------------------------


@dataclass(frozen=True)
class Located:
    root: Path
    path: Path  # on the host, inside root (its last component not followed)
    rel: str  # as the client names it: "/" + relative path


def locate(root: Path, raw: str) -> Located:
    """``raw`` (relative to the volume's root, with or without a leading '/') on the host; 400 if
    it names a place outside the root, through '..' or through a symlink."""
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise VolumeError(400, f"path: {raw!r} escapes the volume's root")
    real_root = root.resolve()
    if not parts:
        return Located(real_root, real_root, "/")
    candidate = real_root.joinpath(*parts)
    parent = candidate.parent.resolve()  # symlinks in the parents are followed, then checked
    if parent != real_root and real_root not in parent.parents:
        raise VolumeError(400, f"path: {raw!r} leads outside the volume's root (through a symlink)")
    return Located(real_root, parent / candidate.name, "/" + "/".join(parts))


def _os_error(exc: OSError, what: str) -> VolumeError:
    if exc.errno == errno.ENOENT:
        return VolumeError(404, f"{what}: not found")
    if exc.errno == errno.EEXIST:
        return VolumeError(409, f"{what}: already exists")
    if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.EINVAL):
        return VolumeError(400, f"{what}: {exc.strerror}")
    return VolumeError(500, f"{what}: {exc.strerror or exc}")


def entry_stat(loc: Located) -> dict[str, object]:
    """E2B's ``VolumeEntryStat`` (lstat: a symlink is reported as one, with its target)."""
    try:
        st = os.lstat(loc.path)
    except OSError as exc:
        raise _os_error(exc, loc.rel) from exc
    kind = ("directory" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
            else "symlink" if stat.S_ISLNK(st.st_mode) else "unknown")
    out: dict[str, object] = {
        "name": loc.path.name if loc.rel != "/" else "", "type": kind, "path": loc.rel, "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
        "atime": _iso(st.st_atime), "mtime": _iso(st.st_mtime), "ctime": _iso(st.st_ctime),
    }
    if kind == "symlink":
        out["target"] = os.readlink(loc.path)
    return out


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def list_dir(loc: Located, depth: int | None) -> list[dict[str, object]]:
    want = MIN_DEPTH if depth is None else depth
    if not MIN_DEPTH <= want <= MAX_DEPTH:
        raise VolumeError(400, f"depth: must be between {MIN_DEPTH} and {MAX_DEPTH}")
    if not loc.path.is_dir() or loc.path.is_symlink():
        if not os.path.lexists(loc.path):
            raise VolumeError(404, f"{loc.rel}: not found")
        raise VolumeError(400, f"{loc.rel}: not a directory")
    out: list[dict[str, object]] = []

    def walk(directory: Path, rel: str, level: int) -> None:
        for child in sorted(directory.iterdir(), key=lambda p: p.name):
            child_rel = f"{rel.rstrip('/')}/{child.name}"
            out.append(entry_stat(Located(loc.root, child, child_rel)))
            if level < want and child.is_dir() and not child.is_symlink():
                walk(child, child_rel, level + 1)

    walk(loc.path, loc.rel, 1)
    return out


def _ensure_parents(loc: Located, uid: int, gid: int) -> None:
    missing = []
    p = loc.path.parent
    while p != loc.root and not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
        os.chown(d, uid, gid)
        os.chmod(d, DEFAULT_DIR_MODE)


def make_dir(loc: Located, uid: int | None, gid: int | None, mode: int | None, force: bool) -> dict[str, object]:
    """``force``: parents too, and an existing directory is fine (E2B's createParents)."""
    uid, gid = DEFAULT_UID if uid is None else uid, DEFAULT_GID if gid is None else gid
    try:
        if force:
            _ensure_parents(loc, uid, gid)
        try:
            loc.path.mkdir()
        except FileExistsError:
            if not force or not loc.path.is_dir() or loc.path.is_symlink():
                raise
            return entry_stat(loc)
        os.chown(loc.path, uid, gid)
        os.chmod(loc.path, DEFAULT_DIR_MODE if mode is None else mode)
    except OSError as exc:
        raise _os_error(exc, loc.rel) from exc
    return entry_stat(loc)


def write_file(loc: Located, chunks: Iterable[bytes], uid: int | None, gid: int | None, mode: int | None,
               force: bool) -> dict[str, object]:
    """Create a file (``force``: parents too, and replace an existing one)."""
    uid, gid = DEFAULT_UID if uid is None else uid, DEFAULT_GID if gid is None else gid
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if force else os.O_EXCL)
    try:
        if force:
            _ensure_parents(loc, uid, gid)
        fd = os.open(loc.path, flags, DEFAULT_FILE_MODE if mode is None else mode)
        try:
            for chunk in chunks:
                os.write(fd, chunk)
            os.fsync(fd)
            os.fchown(fd, uid, gid)
            os.fchmod(fd, DEFAULT_FILE_MODE if mode is None else mode)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _os_error(exc, loc.rel) from exc
    return entry_stat(loc)


def open_file(loc: Located) -> int:
    """A read-only descriptor of a regular file (never through a symlink)."""
    try:
        fd = os.open(loc.path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise VolumeError(400, f"{loc.rel}: a symlink; read its target instead") from exc
        raise _os_error(exc, loc.rel) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise VolumeError(400, f"{loc.rel}: not a file")
    return fd


def update(loc: Located, uid: int | None, gid: int | None, mode: int | None) -> dict[str, object]:
    try:
        if uid is not None or gid is not None:
            os.chown(loc.path, -1 if uid is None else uid, -1 if gid is None else gid, follow_symlinks=False)
        if mode is not None:
            if loc.path.is_symlink():
                raise VolumeError(400, f"{loc.rel}: a symlink has no mode of its own")
            os.chmod(loc.path, mode)
    except OSError as exc:
        raise _os_error(exc, loc.rel) from exc
    return entry_stat(loc)


def remove(loc: Located) -> None:
    if loc.rel == "/":
        raise VolumeError(400, "path: the volume's root cannot be removed (destroy the volume)")
    if not os.path.lexists(loc.path):
        raise VolumeError(404, f"{loc.rel}: not found")
    try:
        if loc.path.is_dir() and not loc.path.is_symlink():
            shutil.rmtree(loc.path)
        else:
            loc.path.unlink()
    except OSError as exc:
        raise _os_error(exc, loc.rel) from exc
