"""``filesystem.EntryInfo`` from a path: type, size, mode, owner, times, symlink, metadata.

Shared by the filesystem service (Stat, ListDir, MakeDir, Move). The SDK drops entries whose type is
unspecified, so every entry gets a type; a symlink carries its target's type and mode plus
``isSymlink`` and ``symlinkTarget`` (upstream behaviour), a dangling one FILE_TYPE_SYMLINK.
"""

from __future__ import annotations

import os
import stat

from . import file_metadata
from . import filesystem_messages as fpb
from .messages import Timestamp
from .users import group_name, user_name


def file_type(mode: int) -> int:
    """Map st_mode to FileType; anything not a directory (sockets, fifos...) counts as a file."""
    if stat.S_ISDIR(mode):
        return fpb.FileType.DIRECTORY
    if stat.S_ISLNK(mode):
        return fpb.FileType.SYMLINK
    return fpb.FileType.FILE


def entry_info(path: str, st: os.stat_result | None = None) -> fpb.EntryInfo:
    """Describe ``path`` (not followed); raises OSError (FileNotFoundError...) like os.lstat."""
    st = st or os.lstat(path)
    kind = file_type(st.st_mode)
    entry = fpb.EntryInfo(
        name=os.path.basename(path) or path,
        type=kind,
        path=path,
        size=st.st_size,
        mode=stat.S_IMODE(st.st_mode),
        permissions=stat.filemode(st.st_mode),
        owner=user_name(st.st_uid),
        group=group_name(st.st_gid),
        modified_time=Timestamp(seconds=st.st_mtime_ns // 1_000_000_000, nanos=st.st_mtime_ns % 1_000_000_000),
        metadata=file_metadata.STORE.read(path, st),
    )
    if kind == fpb.FileType.SYMLINK:
        entry.is_symlink = True
        entry.symlink_target = os.path.realpath(path)
        try:
            target = os.stat(path)
        except OSError:
            pass  # dangling: stays FILE_TYPE_SYMLINK
        else:  # as E2B's envd: the target's type and permission bits, the link's own size
            entry.type = file_type(target.st_mode)
            entry.mode = stat.S_IMODE(target.st_mode)
    return entry
