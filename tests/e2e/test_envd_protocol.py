"""The whole envd protocol through the real server, proxy and gVisor, with the sync and async SDK
(issue 3). Wire-level details are tested against envd directly in tests/envd/."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import subprocess
import threading
import time
from datetime import UTC, datetime

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    FileType,
    Sandbox,
    TimeoutException,
)
from e2b.sandbox.commands.command_handle import PtySize
from e2b.sandbox.filesystem.filesystem import WriteEntry
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType

from .conftest import Server

pytestmark = pytest.mark.slow


# -- processes ---------------------------------------------------------------------------------


def test_pty_input_resize_and_kill(sandbox: Sandbox) -> None:
    out = bytearray()
    pty = sandbox.pty.create(PtySize(rows=24, cols=80))
    ended: list[BaseException | None] = []

    def wait() -> None:
        try:
            pty.wait(on_pty=out.extend)
            ended.append(None)
        except CommandExitException as exc:  # killed below: the expected end
            ended.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 20
        while text not in out.decode(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert text in out.decode(errors="replace")

    sandbox.pty.send_stdin(pty.pid, b"stty size; echo marker-$((6*7))\n")
    wait_for("marker-42")
    assert "24 80" in out.decode()
    sandbox.pty.resize(pty.pid, PtySize(rows=30, cols=100))
    sandbox.pty.send_stdin(pty.pid, b"stty size; echo second-$((1+1))\n")
    wait_for("second-2")
    assert "30 100" in out.decode()
    assert sandbox.pty.kill(pty.pid)
    waiter.join(10)
    assert not waiter.is_alive() and ended and ended[0] is not None  # the kill ended the terminal


def test_connect_to_running_process_and_disconnect_keeps_it(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("for i in $(seq 1 30); do echo tick$i; sleep 0.1; done", background=True)
    handle.disconnect()
    assert handle.pid in [p.pid for p in sandbox.commands.list()]
    again = sandbox.commands.connect(handle.pid)
    assert "tick30" in again.wait().stdout


def test_command_timeout_kills_the_process(sandbox: Sandbox) -> None:
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30; echo never", timeout=1)
    assert "sleep 30" not in sandbox.commands.run("ps -eo args").stdout


def test_sigterm_and_sigkill(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("trap 'echo got-term; exit 9' TERM; while true; do sleep 0.1; done", background=True)
    time.sleep(0.5)
    sandbox.commands.run(f"kill -TERM {handle.pid}", user="root")
    with pytest.raises(CommandExitException) as info:
        handle.wait()
    assert info.value.exit_code == 9 and "got-term" in info.value.stdout
    stubborn = sandbox.commands.run("trap '' TERM; sleep 100", background=True)
    assert sandbox.commands.kill(stubborn.pid)
    with pytest.raises(CommandExitException):
        stubborn.wait()


def test_large_output_streams(sandbox: Sandbox) -> None:
    size = 50 * 1024 * 1024
    seen = 0

    def count(chunk: str) -> None:
        nonlocal seen
        seen += len(chunk)

    result = sandbox.commands.run(f"yes | head -c {size}", on_stdout=count, retain_output=False, timeout=300)
    assert seen == size and result.exit_code == 0


def test_user_environment(sandbox: Sandbox) -> None:
    r = sandbox.commands.run('echo "$HOME|$USER|$PATH"', user="root")
    home, user, path = r.stdout.strip().split("|")
    assert (home, user) == ("/root", "root") and "/usr/bin" in path
    with pytest.raises(AuthenticationException):
        sandbox.commands.run("true", user="no-such-user")


def _raw_start(server: Server, sandbox: Sandbox, cmd: str, args: list[str]) -> str:
    """process.Process/Start through the proxy as user ``user``; the whole reply as text."""
    body = json.dumps({"process": {"cmd": cmd, "args": args, "envs": {}}}).encode()
    headers = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1",
               "E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49983",
               "X-Access-Token": sandbox._envd_access_token or "",  # noqa: SLF001 - the user's own token
               "Authorization": "Basic " + base64.b64encode(b"user:").decode()}
    r = httpx.post(f"{server.url}/process.Process/Start", content=struct.pack(">BI", 0, len(body)) + body,
                   headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.content.decode(errors="replace")


def test_commands_run_with_their_users_ids_and_a_missing_program_fails_to_start(sdk_env: Server,
                                                                                 sandbox: Sandbox) -> None:
    # envd starts commands through the bundle's as-user (ids switched after a vfork): the same
    # uid, gid and groups the user database gives
    assert sandbox.commands.run("id -un; id -u; id -g").stdout == "user\n1000\n1000\n"
    assert sandbox.commands.run("id -G").stdout == sandbox.commands.run("id -G user", user="root").stdout
    assert sandbox.commands.run("id -G").stdout == sandbox.commands.run("id -G user").stdout
    assert sandbox.commands.run("id -un", user="root").stdout == "root\n"
    # a program that cannot be exec'd is a failed start (not a process exiting 127), as before
    reply = _raw_start(sdk_env, sandbox, "/no/such/program", [])
    assert "failed to start '/no/such/program': No such file or directory" in reply and '"start"' not in reply
    reply = _raw_start(sdk_env, sandbox, "/etc/hostname", [])
    assert "Permission denied" in reply
    # a bare name is searched in PATH
    reply = _raw_start(sdk_env, sandbox, "echo", ["found", "in", "PATH"])
    assert base64.b64encode(b"found in PATH\n").decode() in reply


# -- filesystem --------------------------------------------------------------------------------


def test_list_depth_symlinks_and_entry_info(sandbox: Sandbox) -> None:
    sandbox.commands.run("mkdir -p /home/user/t/a/b && echo x > /home/user/t/a/b/f && ln -s a/b/f /home/user/t/link")
    one = {e.path for e in sandbox.files.list("/home/user/t")}
    assert one == {"/home/user/t/a", "/home/user/t/link"}
    three = {e.path for e in sandbox.files.list("/home/user/t", depth=3)}
    assert {"/home/user/t/a/b", "/home/user/t/a/b/f"} <= three
    link = sandbox.files.get_info("/home/user/t/link")
    assert link.symlink_target == "/home/user/t/a/b/f"
    info = sandbox.files.get_info("/home/user/t/a/b/f")
    assert (info.type, info.size, info.owner) == (FileType.FILE, 2, "user")


def test_metadata_is_stored_with_the_file(sandbox: Sandbox) -> None:
    """gVisor's root refuses xattrs, so envd keeps the metadata in its index: it must still
    belong to the file — replaced by a rewrite (as E2B's envd does), kept by a rename through the
    API, gone with a removal, never passed on to a file that replaced it behind envd's back."""
    w = sandbox.files.write("/home/user/m.txt", "x", metadata={"Owner": "team-a", "stage": "raw"})
    assert w.metadata == {"owner": "team-a", "stage": "raw"}
    assert sandbox.files.get_info("/home/user/m.txt").metadata == {"owner": "team-a", "stage": "raw"}
    sandbox.files.write("/home/user/m.txt", "rewritten")  # a write replaces the metadata, as E2B's envd
    assert not sandbox.files.get_info("/home/user/m.txt").metadata
    sandbox.files.write("/home/user/m.txt", "again", metadata={"owner": "team-a", "stage": "raw"})
    sandbox.files.rename("/home/user/m.txt", "/home/user/d/m.txt")
    assert sandbox.files.get_info("/home/user/d/m.txt").metadata == {"owner": "team-a", "stage": "raw"}
    assert [e.metadata for e in sandbox.files.list("/home/user/d")] == [{"owner": "team-a", "stage": "raw"}]
    sandbox.files.rename("/home/user/d", "/home/user/e")  # a whole tree
    assert sandbox.files.get_info("/home/user/e/m.txt").metadata == {"owner": "team-a", "stage": "raw"}
    reused = 0
    for _ in range(5):  # the replacement often gets the old inode number (not always: allocator's choice)
        sandbox.files.write("/home/user/e/m.txt", "x", metadata={"k": "v"})
        inodes = sandbox.commands.run("cd /home/user/e && stat -c %i m.txt && rm m.txt && echo new > m.txt && "
                                      "stat -c %i m.txt").stdout.split()
        reused += inodes[0] == inodes[1]
        assert not sandbox.files.get_info("/home/user/e/m.txt").metadata  # same number or not: not inherited
    print(f"replacements that got the old inode number: {reused}/5")
    sandbox.files.write("/home/user/e/m.txt", "x", metadata={"k": "v"})
    sandbox.files.remove("/home/user/e")
    sandbox.files.write("/home/user/e/m.txt", "x")
    assert not sandbox.files.get_info("/home/user/e/m.txt").metadata


def test_write_many_octet_stream_and_gzip(sandbox: Sandbox) -> None:
    infos = sandbox.files.write_files([WriteEntry(path="/home/user/w/1", data="one"),
                                       WriteEntry(path="/home/user/w/2", data=b"two")])
    assert [i.path for i in infos] == ["/home/user/w/1", "/home/user/w/2"]
    blob = bytes(range(256)) * 1000
    sandbox.files.write("/home/user/w/gz", blob, gzip=True)
    sandbox.files.write("/home/user/w/oct", iter([blob[:1000], blob[1000:]]), use_octet_stream=True)
    assert bytes(sandbox.files.read("/home/user/w/gz", format="bytes", gzip=True)) == blob
    assert bytes(sandbox.files.read("/home/user/w/oct", format="bytes")) == blob


def test_watch_dir_sync(sandbox: Sandbox) -> None:
    sandbox.files.make_dir("/home/user/watched/sub")
    handle = sandbox.files.watch_dir("/home/user/watched", recursive=True)
    try:
        sandbox.files.write("/home/user/watched/new.txt", "1")
        sandbox.files.write("/home/user/watched/sub/deep.txt", "2")
        sandbox.commands.run("chmod 600 /home/user/watched/new.txt && mv /home/user/watched/new.txt /home/user/watched/moved.txt"
                             " && rm /home/user/watched/moved.txt")
        events: list = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events += handle.get_new_events()
            kinds = {e.type for e in events}
            if {FilesystemEventType.CREATE, FilesystemEventType.WRITE, FilesystemEventType.CHMOD,
                    FilesystemEventType.RENAME, FilesystemEventType.REMOVE} <= kinds:
                break
            time.sleep(0.2)
        names = {e.name for e in events}
        assert {"new.txt", "sub/deep.txt"} <= names
        assert {FilesystemEventType.CREATE, FilesystemEventType.WRITE, FilesystemEventType.CHMOD,
                FilesystemEventType.RENAME, FilesystemEventType.REMOVE} <= {e.type for e in events}
    finally:
        handle.stop()


# -- /files: signed URLs and tokens ------------------------------------------------------------


def test_signed_urls_work_with_curl(sandbox: Sandbox, tmp_path) -> None:
    sandbox.files.write("/home/user/shared.txt", "signed content")
    url = sandbox.download_url("/home/user/shared.txt", use_signature_expiration=60)
    assert "signature=" in url and "E2b-Sandbox-Id" not in url
    out = subprocess.run(["curl", "-sS", "-f", url], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "signed content"
    src = tmp_path / "up.txt"
    src.write_text("uploaded by curl")
    up = sandbox.upload_url("/home/user/from-curl.txt", use_signature_expiration=60)
    assert subprocess.run(["curl", "-sS", "-f", "-F", f"file=@{src}", up], capture_output=True).returncode == 0
    assert sandbox.files.read("/home/user/from-curl.txt") == "uploaded by curl"
    tampered = url.replace("signature=v1_", "signature=v1_x")
    assert httpx.get(tampered).status_code == 401


def test_expired_signature_is_rejected(sandbox: Sandbox) -> None:
    sandbox.files.write("/home/user/old.txt", "x")
    url = sandbox.download_url("/home/user/old.txt", use_signature_expiration=1)
    time.sleep(2.2)
    assert httpx.get(url).status_code == 401


def test_files_need_token_or_signature(sdk_env: Server, sandbox: Sandbox) -> None:
    headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49983"}
    with sdk_env.api() as api:
        assert api.get("/files", params={"path": "/etc/hostname"}, headers=headers).status_code == 401
        r = api.get("/files", params={"path": "/etc/hostname"},
                    headers={**headers, "X-Access-Token": "wrong"})
        assert r.status_code == 401


# -- metrics -----------------------------------------------------------------------------------


def test_metrics(sandbox: Sandbox) -> None:
    sandbox.commands.run("head -c 4000000 /dev/urandom > /home/user/blob")
    metrics = sandbox.get_metrics()
    assert len(metrics) == 1
    m = metrics[0]
    assert m.cpu_count >= 1 and 0 < m.mem_used <= m.mem_total
    assert 4_000_000 <= m.disk_used <= m.disk_total
    assert abs((m.timestamp - datetime.now(UTC)).total_seconds()) < 30


# -- async SDK ---------------------------------------------------------------------------------


def test_async_sdk_commands_files_and_watch(sdk_env: Server) -> None:
    async def scenario() -> None:
        sbx = await AsyncSandbox.create(timeout=60)
        try:
            r = await sbx.commands.run("echo async")
            assert r.stdout == "async\n"
            await sbx.files.make_dir("/home/user/aw")
            seen: list = []
            watcher = await sbx.files.watch_dir("/home/user/aw", on_event=seen.append, recursive=True)
            await sbx.files.write("/home/user/aw/f.txt", "hello")
            for _ in range(50):
                if any(e.name == "f.txt" for e in seen):
                    break
                await asyncio.sleep(0.1)
            await watcher.stop()
            assert any(e.name == "f.txt" and e.type == FilesystemEventType.CREATE for e in seen)
            assert await sbx.files.read("/home/user/aw/f.txt") == "hello"
            assert await sbx.files.exists("/home/user/aw/nope") is False
            handle = await sbx.commands.run("cat", background=True, stdin=True)
            await sbx.commands.send_stdin(handle.pid, "piped\n")
            await sbx.commands.close_stdin(handle.pid)
            assert (await handle.wait()).stdout == "piped\n"
        finally:
            await sbx.kill()
        assert await AsyncSandbox.kill(sbx.sandbox_id) is False

    asyncio.run(scenario())


def test_full_disk_is_not_enough_space(sandbox: Sandbox) -> None:
    """ENOSPC → 507 → NotEnoughSpaceException, on a 1 MiB tmpfs mounted inside the sandbox."""
    from e2b import NotEnoughSpaceException

    sandbox.commands.run("mkdir -p /mnt/small && mount -t tmpfs -o size=1m tmpfs /mnt/small && chmod 777 /mnt/small",
                         user="root")
    with pytest.raises(NotEnoughSpaceException):
        sandbox.files.write("/mnt/small/big", b"x" * (3 * 1024 * 1024))
    assert not sandbox.files.exists("/mnt/small/big")  # no partial file pretending to be complete
    sandbox.files.write("/mnt/small/ok", b"fits")
    assert sandbox.files.read("/mnt/small/ok") == "fits"
