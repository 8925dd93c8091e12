"""``sandbox.files`` through the real SDK, server and gVisor sandbox."""

from __future__ import annotations

import pytest
from e2b import FileType, NotFoundException, Sandbox

pytestmark = pytest.mark.slow


def test_write_read_roundtrip_text_and_bytes(sandbox: Sandbox) -> None:
    info = sandbox.files.write("/home/user/hello.txt", "hi")
    assert info.path == "/home/user/hello.txt"
    assert sandbox.files.read("/home/user/hello.txt") == "hi"
    blob = bytes(range(256)) * 4096
    sandbox.files.write("/home/user/blob.bin", blob)
    assert bytes(sandbox.files.read("/home/user/blob.bin", format="bytes")) == blob
    # written as the default user, visible to commands
    assert sandbox.commands.run("stat -c %U /home/user/hello.txt").stdout == "user\n"


def test_list_exists_make_dir(sandbox: Sandbox) -> None:
    assert sandbox.files.make_dir("/home/user/d/e") is True
    assert sandbox.files.make_dir("/home/user/d/e") is False
    sandbox.files.write("/home/user/d/f.txt", "x")
    entries = {e.name: e for e in sandbox.files.list("/home/user/d")}
    assert set(entries) == {"e", "f.txt"}
    assert entries["e"].type == FileType.DIR and entries["f.txt"].type == FileType.FILE
    assert sandbox.files.exists("/home/user/d/f.txt")
    assert not sandbox.files.exists("/home/user/d/nope")


def test_rename_and_remove(sandbox: Sandbox) -> None:
    sandbox.files.write("/home/user/a.txt", "content")
    moved = sandbox.files.rename("/home/user/a.txt", "/home/user/b.txt")
    assert moved.path == "/home/user/b.txt"
    assert not sandbox.files.exists("/home/user/a.txt")
    assert sandbox.files.read("/home/user/b.txt") == "content"
    sandbox.files.remove("/home/user/b.txt")
    assert not sandbox.files.exists("/home/user/b.txt")


def test_read_missing_file_is_not_found(sandbox: Sandbox) -> None:
    with pytest.raises(NotFoundException):
        sandbox.files.read("/home/user/does-not-exist")
