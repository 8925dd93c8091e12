"""Sandbox users, read from the sandbox's own /etc/passwd and /etc/group at call time.

Why not :mod:`pwd`: envd runs from a bundle with its own libc, and templates differ in their NSS
set-up; the files are the source of truth in a sandbox, and reading them on every call picks up
users created after envd started (``useradd`` in a command).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PASSWD_PATH = "/etc/passwd"
GROUP_PATH = "/etc/group"


class UnknownUserError(LookupError):
    """The requested user does not exist in the sandbox."""


@dataclass(frozen=True)
class User:
    """One /etc/passwd entry plus its supplementary groups."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[int, ...]


_cache: dict[str, tuple[tuple[int, int], list[list[str]]]] = {}


def _read_lines(path: str) -> list[list[str]]:
    """Colon-separated records of a passwd-style file; missing file → no records.

    Cached by (mtime, size): a ListDir of thousands of entries must not re-read /etc/passwd per
    entry, yet a user added by a command is seen on the next call.
    """
    try:
        st = os.stat(path)
    except OSError:
        return []
    key = (st.st_mtime_ns, st.st_size)
    hit = _cache.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            records = [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return []
    _cache[path] = (key, records)
    return records


def supplementary_groups(name: str, gid: int) -> tuple[int, ...]:
    """The gids initgroups(3) would give ``name``: its primary group and every group listing it."""
    gids = [gid]
    for rec in _read_lines(GROUP_PATH):
        if len(rec) >= 4 and name in rec[3].split(","):
            try:
                g = int(rec[2])
            except ValueError:
                continue
            if g not in gids:
                gids.append(g)
    return tuple(gids)


def lookup_user(name: str) -> User:
    """Find ``name`` in /etc/passwd; raise :class:`UnknownUserError` if absent."""
    for rec in _read_lines(PASSWD_PATH):
        if len(rec) >= 7 and rec[0] == name:
            try:
                uid, gid = int(rec[2]), int(rec[3])
            except ValueError:
                break
            home = rec[5] or "/"
            return User(name, uid, gid, home, rec[6], supplementary_groups(name, gid))
    if name == "root":  # a rootfs without /etc/passwd still has root
        return User("root", 0, 0, "/root", "/bin/sh", (0,))
    raise UnknownUserError(f"user '{name}' not found")


def user_name(uid: int) -> str:
    """Name of ``uid`` for EntryInfo.owner; the number as text if unknown."""
    for rec in _read_lines(PASSWD_PATH):
        if len(rec) >= 3 and rec[2] == str(uid):
            return rec[0]
    return "root" if uid == 0 else str(uid)


def group_name(gid: int) -> str:
    """Name of ``gid`` for EntryInfo.group; the number as text if unknown."""
    for rec in _read_lines(GROUP_PATH):
        if len(rec) >= 3 and rec[2] == str(gid):
            return rec[0]
    return "root" if gid == 0 else str(gid)


class InvalidPathError(ValueError):
    """A path no file can have (a NUL byte): the caller's 400 / INVALID_ARGUMENT, not a crash."""


def resolve_path(path: str, user: User) -> str:
    """Absolute, normalized path; relative paths and ``~`` resolve against the user's home."""
    if "\x00" in path:
        raise InvalidPathError(f"path {path!r} contains a NUL byte")
    if path == "~" or path.startswith("~/"):
        path = user.home + path[1:]
    if not os.path.isabs(path):
        path = os.path.join(user.home, path)
    return os.path.normpath(path)


def chown_quietly(path: str, user: User) -> None:
    """Give ``path`` to ``user`` (envd runs as root); ignore filesystems that refuse chown."""
    try:
        os.lchown(path, user.uid, user.gid)
    except OSError:
        pass


def makedirs_owned(path: str, user: User) -> None:
    """``mkdir -p`` where every directory it creates is owned by ``user``."""
    missing: list[str] = []
    cur = path
    while not os.path.exists(cur):
        missing.append(cur)
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
        except FileExistsError:
            continue
        chown_quietly(d, user)
