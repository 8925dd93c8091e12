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
def boot(tmp_path: Path) -> Path:
    """A boot id file of our own: writing a new id is what a new boot of the sandbox looks like."""
    path = tmp_path / "boot_id"
    path.write_text("boot-1\n")
    return path


@pytest.fixture
def store(tmp_path: Path, boot: Path) -> FileMetadata:
    return FileMetadata(tmp_path / "index" / "file-metadata.json", boot)


def _read(store: FileMetadata, path: Path) -> dict[str, str]:
    return store.read(str(path), os.lstat(path))


def test_ramfs_refuses_xattrs_like_the_gofer(ramfs: Path) -> None:
    (ramfs / "f").write_text("x")
    with pytest.raises(OSError, match="not supported"):
        os.setxattr(ramfs / "f", "user.e2b.k", b"v")


def test_metadata_is_kept_in_the_index_and_read_again_by_a_new_envd(ramfs: Path, store: FileMetadata,
                                                                    boot: Path) -> None:
    f = ramfs / "f"
    f.write_text("x")
    assert store.replace(str(f), {"Owner": "a"}) == {"owner": "a"}
    assert _read(store, f) == {"owner": "a"}
    assert stat.S_IMODE(store.index_path.stat().st_mode) == 0o600
    assert _read(FileMetadata(store.index_path, boot), f) == {"owner": "a"}
    assert store.replace(str(f), {"other": "b"}) == {"other": "b"}  # replaced, not merged
    f.write_text("rewritten in place")  # same inode: still the same file
    assert _read(store, f) == {"other": "b"}
    assert store.replace(str(f), {}) == {}  # written again without metadata: none is left (E2B's envd)
    assert _read(store, f) == {}
    assert str(f) not in store.index_path.read_text()


def test_envds_own_renames_carry_it_and_removals_drop_it(ramfs: Path, store: FileMetadata) -> None:
    d = ramfs / "d"
    d.mkdir()
    f = d / "f"
    f.write_text("x")
    store.replace(str(f), {"k": "v"})
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


def test_what_others_delete_or_move_away_loses_it(ramfs: Path, store: FileMetadata) -> None:
    for name in ("deleted", "moved", "replaced"):
        (ramfs / name).write_text("x")
        store.replace(str(ramfs / name), {"k": name})
    (ramfs / "deleted").unlink()
    (ramfs / "deleted").write_text("someone else's file")
    os.rename(ramfs / "moved", ramfs / "elsewhere")
    (ramfs / "moved").write_text("another file")
    (ramfs / "new").write_text("y")
    os.rename(ramfs / "new", ramfs / "replaced")
    for name in ("deleted", "moved", "replaced", "elsewhere"):
        assert _read(store, ramfs / name) == {}, name


def test_an_index_of_an_earlier_boot_is_taken_as_it_is(ramfs: Path, store: FileMetadata, boot: Path) -> None:
    """gVisor numbers inodes anew at every boot; between two boots nothing ran in the sandbox."""
    f = ramfs / "f"
    f.write_text("x")
    store.replace(str(f), {"k": "v"})
    index = store.index_path.read_text()
    store.index_path.write_text(index.replace(f'"ino": {f.stat().st_ino}', '"ino": 1'))
    assert _read(FileMetadata(store.index_path, boot), f) == {}  # same boot, another inode: not this file
    store.index_path.write_text(index.replace(f'"ino": {f.stat().st_ino}', '"ino": 1'))
    boot.write_text("boot-2\n")
    assert _read(FileMetadata(store.index_path, boot), f) == {"k": "v"}


def test_where_xattrs_work_they_are_used(tmp_path: Path, store: FileMetadata) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    store.replace(str(f), {"K": "v"})
    assert os.getxattr(f, "user.e2b.k") == b"v"
    assert _read(store, f) == {"k": "v"}
    assert not store.index_path.exists()
