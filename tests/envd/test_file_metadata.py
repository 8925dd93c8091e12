"""File metadata where the filesystem refuses xattrs, as gVisor's gofer root does: on a real
ramfs, which refuses ``user.*`` xattrs the same way (EOPNOTSUPP), envd keeps an index."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.envd.file_metadata import FileMetadata


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "ramfs"
    root.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", str(root)], check=True)


@pytest.fixture
def store(tmp_path: Path) -> FileMetadata:
    return FileMetadata(tmp_path / "index" / "file-metadata.json")


def _read(store: FileMetadata, path: Path) -> dict[str, str]:
    return store.read(str(path), os.lstat(path))


def test_ramfs_refuses_xattrs_like_the_gofer(ramfs: Path) -> None:
    (ramfs / "f").write_text("x")
    with pytest.raises(OSError, match="not supported"):
        os.setxattr(ramfs / "f", "user.e2b.k", b"v")


def test_metadata_is_kept_in_the_index_and_survives_a_restart(ramfs: Path, store: FileMetadata) -> None:
    f = ramfs / "f"
    f.write_text("x")
    assert store.replace(str(f), {"Owner": "a"}) == {"owner": "a"}
    assert _read(store, f) == {"owner": "a"}
    assert stat.S_IMODE(store.index_path.stat().st_mode) == 0o600
    assert _read(FileMetadata(store.index_path), f) == {"owner": "a"}  # a new envd reads the index
    assert store.replace(str(f), {"other": "b"}) == {"other": "b"}  # replaced, not merged
    assert _read(store, f) == {"other": "b"}


def test_envd_rewriting_or_renaming_keeps_it_and_removing_drops_it(ramfs: Path, store: FileMetadata) -> None:
    d = ramfs / "d"
    d.mkdir()
    f = d / "f"
    f.write_text("x")
    store.replace(str(f), {"k": "v"})
    f.write_text("rewritten in place")  # what an upload without metadata does: same inode
    store.rewritten(str(f))
    assert _read(store, f) == {"k": "v"}
    os.rename(f, d / "g")
    store.moved(str(f), str(d / "g"))
    assert _read(store, d / "g") == {"k": "v"}
    os.rename(d, ramfs / "e")  # a whole tree
    store.moved(str(d), str(ramfs / "e"))
    assert _read(store, ramfs / "e" / "g") == {"k": "v"}
    (ramfs / "e" / "g").unlink()
    store.removed(str(ramfs / "e"))
    (ramfs / "e" / "g").write_text("a new file")
    assert _read(store, ramfs / "e" / "g") == {}


def test_a_file_replaced_behind_envds_back_does_not_inherit(ramfs: Path, store: FileMetadata) -> None:
    f = ramfs / "f"
    f.write_text("x")
    store.replace(str(f), {"k": "v"})
    f.unlink()
    f.write_text("someone else's file")  # (ext4 would even reuse the inode number: tests/e2e)
    assert _read(store, f) == {}
    assert _read(FileMetadata(store.index_path), f) == {}
    g = ramfs / "g"
    g.write_text("x")
    store.replace(str(g), {"k": "v"})
    g.chmod(0o600)  # changed by another process: the index cannot tell it from a replacement
    assert _read(store, g) == {}


def test_where_xattrs_work_they_are_used(tmp_path: Path, store: FileMetadata) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    store.replace(str(f), {"K": "v"})
    assert os.getxattr(f, "user.e2b.k") == b"v"
    assert _read(store, f) == {"k": "v"}
    assert not store.index_path.exists()
