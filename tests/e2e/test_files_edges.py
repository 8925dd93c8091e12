"""``sandbox.files`` at its edges, as E2B's envd answers them: missing paths, directories where a
file is expected, permissions, symlinks, a large file, several files in one write, rename,
``make_dir`` of what exists, and a recursive watch that sees directories made after it started."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest
from e2b import AsyncSandbox, CommandExitException, FileType, NotFoundException, Sandbox
from e2b.exceptions import InvalidArgumentException, SandboxException
from e2b.sandbox.filesystem.filesystem import WriteEntry

from .conftest import Server

pytestmark = pytest.mark.slow


def test_missing_paths(sandbox: Sandbox) -> None:
    sandbox.files.remove("/home/user/never-was")  # E2B's envd removes like os.RemoveAll: no error
    with pytest.raises(NotFoundException):
        sandbox.files.read("/home/user/never-was")
    with pytest.raises(NotFoundException):
        sandbox.files.get_info("/home/user/never-was")
    with pytest.raises(NotFoundException):
        sandbox.files.list("/home/user/never-was")
    with pytest.raises(NotFoundException):
        sandbox.files.rename("/home/user/never-was", "/home/user/still-not")
    assert not sandbox.files.exists("/home/user/never-was")


def test_directories_and_files_mixed_up(sandbox: Sandbox) -> None:
    sandbox.files.write("/home/user/plain.txt", "x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read("/home/user")  # a directory
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list("/home/user/plain.txt")  # a file
    with pytest.raises(SandboxException):
        sandbox.files.write("/home/user/plain.txt/under-a-file", "x")
    assert sandbox.files.make_dir("/home/user/newdir") is True
    assert sandbox.files.make_dir("/home/user/newdir") is False  # exists: False, not an error
    with pytest.raises(InvalidArgumentException):
        sandbox.files.make_dir("/home/user/plain.txt")  # exists, and is not a directory


def test_permissions_are_envds_not_the_users(sandbox: Sandbox) -> None:
    """As on E2B, envd acts as root on the user's behalf: a write lands owned by the user wherever
    it is asked for (``/root`` too); processes the user runs are held to the file modes."""
    sandbox.files.write("/root/by-user.txt", "x")
    assert sandbox.commands.run("stat -c %U /root/by-user.txt", user="root").stdout == "user\n"
    sandbox.files.write("/root/root-only.txt", "secret", user="root")
    sandbox.commands.run("chmod 600 /root/root-only.txt && chmod 700 /root", user="root")
    with pytest.raises(CommandExitException, match="ermission denied"):
        sandbox.commands.run("cat /root/root-only.txt")
    assert sandbox.files.read("/root/root-only.txt", user="root") == "secret"


def test_symlinks(sandbox: Sandbox) -> None:
    sandbox.files.write("/home/user/target.txt", "12345")
    sandbox.files.make_dir("/home/user/target-dir")
    sandbox.commands.run("chmod 640 /home/user/target.txt && cd /home/user && ln -s target.txt link "
                         "&& ln -s target-dir dirlink && ln -s gone dangling")
    info = sandbox.files.get_info("/home/user/link")
    # the wire carries the target's type and mode plus is_symlink (E2B's envd); the SDK shows SYMLINK
    assert info.type == FileType.SYMLINK
    assert info.symlink_target == "/home/user/target.txt"
    assert info.mode == 0o640
    assert sandbox.files.read("/home/user/link") == "12345"
    assert sandbox.files.get_info("/home/user/dirlink").symlink_target == "/home/user/target-dir"
    assert {e.name for e in sandbox.files.list("/home/user/dirlink")} == set()
    dangling = sandbox.files.get_info("/home/user/dangling")
    assert dangling.symlink_target is not None
    sandbox.files.remove("/home/user/link")  # the link, not its target
    assert not sandbox.files.exists("/home/user/link")
    assert sandbox.files.read("/home/user/target.txt") == "12345"


def test_large_file_and_several_files_in_one_write(sandbox: Sandbox) -> None:
    blob = os.urandom(64 << 20)
    info = sandbox.files.write("/home/user/large.bin", blob)
    assert info.path == "/home/user/large.bin"
    assert sandbox.files.get_info("/home/user/large.bin").size == len(blob)
    assert bytes(sandbox.files.read("/home/user/large.bin", format="bytes")) == blob
    written = sandbox.files.write_files([
        WriteEntry(path="/home/user/many/a.txt", data="A"),
        WriteEntry(path="/home/user/many/sub/b.bin", data=b"\x00B"),
    ])
    assert sorted(w.path for w in written) == ["/home/user/many/a.txt", "/home/user/many/sub/b.bin"]
    assert sandbox.files.read("/home/user/many/a.txt") == "A"
    assert bytes(sandbox.files.read("/home/user/many/sub/b.bin", format="bytes")) == b"\x00B"


def test_rename_over_and_into_new_directories(sandbox: Sandbox) -> None:
    sandbox.files.write("/home/user/r1.txt", "one")
    sandbox.files.write("/home/user/r2.txt", "two")
    sandbox.files.rename("/home/user/r1.txt", "/home/user/r2.txt")  # replaces, as rename(2)
    assert sandbox.files.read("/home/user/r2.txt") == "one"
    moved = sandbox.files.rename("/home/user/r2.txt", "/home/user/deep/er/r3.txt")  # parents made
    assert moved.path == "/home/user/deep/er/r3.txt"
    assert sandbox.commands.run("stat -c %U /home/user/deep/er").stdout == "user\n"


def _wait_for(names: set[str], seen: set[str], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not names <= seen and time.monotonic() < deadline:
        time.sleep(0.2)


def test_recursive_watch_sees_new_directories_and_their_files(sandbox: Sandbox) -> None:
    sandbox.files.make_dir("/home/user/watched")
    handle = sandbox.files.watch_dir("/home/user/watched", recursive=True)
    try:
        sandbox.commands.run("mkdir -p /home/user/watched/a/b && echo hi > /home/user/watched/a/b/f.txt")
        sandbox.files.write("/home/user/watched/a/b/g.txt", "later")
        wanted = {"a", "a/b", "a/b/f.txt", "a/b/g.txt"}
        seen: set[str] = set()
        deadline = time.monotonic() + 15
        while not wanted <= seen and time.monotonic() < deadline:
            seen |= {e.name for e in handle.get_new_events()}
            time.sleep(0.2)
        assert wanted <= seen
    finally:
        handle.stop()


def test_async_recursive_watch(sdk_env: Server) -> None:
    async def main() -> set[str]:
        sbx = await AsyncSandbox.create(timeout=120)
        seen: set[str] = set()
        try:
            await sbx.files.make_dir("/home/user/w")
            handle = await sbx.files.watch_dir("/home/user/w", lambda e: seen.add(e.name), recursive=True)
            await sbx.commands.run("mkdir -p /home/user/w/x/y && touch /home/user/w/x/y/z")
            for _ in range(75):
                if {"x", "x/y", "x/y/z"} <= seen:
                    break
                await asyncio.sleep(0.2)
            await handle.stop()
            await sbx.files.remove("/home/user/w/not-there")
        finally:
            await sbx.kill()
        return seen

    assert {"x", "x/y", "x/y/z"} <= asyncio.run(main())


def test_expired_signed_url_answers_envds_message(sandbox: Sandbox) -> None:
    sandbox.files.write("/home/user/signed.txt", "s")
    signed_at = time.monotonic()
    url = sandbox.download_url("/home/user/signed.txt", use_signature_expiration=4)  # 1 s expired under load
    assert httpx.get(url, verify=False).content == b"s"
    time.sleep(max(0.0, signed_at + 5.1 - time.monotonic()))
    r = httpx.get(url, verify=False)
    assert r.status_code == 401 and r.json() == {"code": 401, "message": "signature is already expired"}


def test_writing_a_file_again_replaces_its_metadata(sandbox: Sandbox) -> None:
    sandbox.files.write("/home/user/meta.txt", "1", metadata={"owner": "a", "stage": "draft"})
    assert sandbox.files.get_info("/home/user/meta.txt").metadata == {"owner": "a", "stage": "draft"}
    sandbox.files.write("/home/user/meta.txt", "2", metadata={"owner": "b"})
    assert sandbox.files.get_info("/home/user/meta.txt").metadata == {"owner": "b"}
    sandbox.files.write("/home/user/meta.txt", "3")  # no metadata: the stale set is cleared
    assert not sandbox.files.get_info("/home/user/meta.txt").metadata
