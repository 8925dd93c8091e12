"""The COPY files cache: one tar per ``filesHash`` at ``<data_dir>/cache/files/<hash>.tar``.

The SDK computes ``filesHash`` on the client (``COPY <src> <dest>``, then each file's relative
path, ``st_mode``, size and bytes, symlink targets) and uploads a tar of exactly those files only if
the server says it has none. A client's hash is a claim, not a fact: before a tar is used its hash
is computed again from the tar itself (:func:`files_hash_of_tar`), and a tar that does not match is
deleted. So a cached tar can only ever stand for the bytes its name says (seed 000: no stale
caches), and the hash is also the checksum ``sandboxd cache verify`` uses.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
import tarfile
from pathlib import Path
from typing import IO

_HASH = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class FilesError(RuntimeError):
    """Uploaded files are missing, malformed or do not match their hash."""


def _member_mode(m: tarfile.TarInfo, target: tarfile.TarInfo) -> int:
    """The ``st_mode`` the client hashed: type bits from the member kind, permission bits from the
    header (a hard link has the bits of the file it links to)."""
    if m.isdir():
        return stat.S_IFDIR | m.mode
    if m.issym():
        return stat.S_IFLNK | m.mode
    return stat.S_IFREG | target.mode


def files_hash_of_tar(tar_path: Path, src: str, dest: str) -> str:
    """Recompute the SDK's ``filesHash`` (e2b ``calculate_files_hash``) from an uploaded tar.

    The client hashes its files sorted by absolute path; sorting the member names gives the same
    order because all of them share the context directory as prefix (the context itself, ``.``,
    is that prefix and so comes first)."""
    h = hashlib.sha256(f"COPY {src} {dest}".encode())
    with tarfile.open(tar_path, "r:*") as tar:
        members = sorted(tar.getmembers(), key=lambda m: "" if m.name == "." else m.name)
        for m in members:
            if not (m.isdir() or m.isreg() or m.issym() or m.islnk()):
                raise FilesError(f"unsupported entry in upload: {m.name}")
            target = tar._find_link_target(m) if m.islnk() else m  # type: ignore[attr-defined]  # noqa: SLF001 - stdlib helper
            h.update(m.name.encode())
            h.update(str(_member_mode(m, target)).encode())
            if m.issym():
                h.update(str(len(os.fsencode(m.linkname))).encode())
                h.update(m.linkname.encode())
                continue
            if m.isdir():
                continue
            h.update(str(target.size).encode())
            f = tar.extractfile(target)
            assert f is not None
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _check_names(tar_path: Path) -> None:
    """Reject archives whose names could escape the unpack directory."""
    with tarfile.open(tar_path, "r:*") as tar:
        for m in tar.getmembers():
            parts = m.name.split("/")
            if m.name.startswith("/") or ".." in parts:
                raise FilesError(f"unsafe path in upload: {m.name!r}")


class FilesCache:
    """Uploaded COPY contexts by ``filesHash``; written atomically, verified before use."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / ".tmp").mkdir(parents=True, exist_ok=True)

    def path(self, files_hash: str) -> Path:
        if not _HASH.match(files_hash):
            raise FilesError(f"not a files hash: {files_hash!r}")
        return self.root / f"{files_hash}.tar"

    def present(self, files_hash: str) -> bool:
        return self.path(files_hash).is_file()

    def list(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.tar") if _HASH.match(p.stem))

    def put(self, files_hash: str, stream: IO[bytes] | bytes) -> int:
        """Store an upload (tar, gzip or not) under ``files_hash``; replaces an older upload for the
        same hash atomically (``forceUpload``). Returns the stored size."""
        dest = self.path(files_hash)
        tmp = self.root / ".tmp" / f"{files_hash}-{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as f:
                if isinstance(stream, bytes):
                    f.write(stream)
                else:
                    while chunk := stream.read(_CHUNK):
                        f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            try:
                _check_names(tmp)
            except tarfile.TarError as exc:
                raise FilesError(f"upload for {files_hash[:12]} is not a tar archive: {exc}") from exc
            os.replace(tmp, dest)
            return dest.stat().st_size
        finally:
            tmp.unlink(missing_ok=True)

    def verified(self, files_hash: str, src: str, dest: str) -> Path:
        """The tar for a COPY step, after checking it really hashes to ``files_hash``. A tar that
        does not is deleted (so the SDK uploads it again next time) and the step fails."""
        path = self.path(files_hash)
        if not path.is_file():
            raise FilesError(f"files for COPY {src} {dest} ({files_hash[:12]}) were never uploaded")
        try:
            got = files_hash_of_tar(path, src, dest)
        except (tarfile.TarError, OSError, KeyError) as exc:
            got = f"unreadable ({exc})"
        if got != files_hash:
            path.unlink(missing_ok=True)
            raise FilesError(f"uploaded files for COPY {src} {dest} do not match their hash "
                             f"{files_hash[:12]} (got {got[:12]}); upload them again")
        return path

    def remove(self, files_hash: str) -> bool:
        path = self.path(files_hash)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def readable(self, files_hash: str) -> bool:
        """For ``cache verify``: the tar opens and every member is readable (its hash can only be
        checked together with the COPY step that names it, which :meth:`verified` does)."""
        try:
            with tarfile.open(self.path(files_hash), "r:*") as tar:
                for m in tar.getmembers():
                    if m.isreg():
                        f = tar.extractfile(m)
                        while f is not None and f.read(_CHUNK):
                            pass
            return True
        except (tarfile.TarError, OSError, EOFError):
            return False
