"""The unmodified e2b SDK against envd, in the SDK's debug mode (envd at http://localhost:49983).

Debug mode makes ``Sandbox.create()`` skip the control plane, so this exercises envd alone, exactly
as the SDK speaks to it. It needs port 49983: if something else holds it the module fails loudly
(no skip). The tests share one envd and one sandbox object and run in file order.
"""

from __future__ import annotations

import gzip
import io
import os
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from e2b import CommandExitException, FileType, NotFoundException, Sandbox, TimeoutException
from e2b.exceptions import FileNotFoundException

from .conftest import Envd, port_in_use, run_envd

SDK_PORT = 49983


@pytest.fixture(scope="module")
def sdk_envd(sandbox_user) -> Iterator[Envd]:
    if port_in_use(SDK_PORT):
        pytest.fail(f"port {SDK_PORT} is busy: the SDK's debug mode only talks to localhost:{SDK_PORT}; "
                    "stop whatever listens there (another envd?) and re-run")
    with run_envd(SDK_PORT) as e:
        e.init(defaultUser=sandbox_user.pw_name, envVars={"FROM_INIT": "yes"})
        yield e


@pytest.fixture(scope="module")
def sbx(sdk_envd: Envd) -> Iterator[Sandbox]:
    with pytest.MonkeyPatch.context() as mp:
        for k in list(os.environ):
            if k.startswith("E2B_"):
                mp.delenv(k)
        mp.setenv("E2B_DEBUG", "true")
        mp.setenv("E2B_API_KEY", "e2b_unused_in_debug_mode")
        sandbox = Sandbox.create()
        assert sandbox.sandbox_id == "debug_sandbox_id"
        yield sandbox


@pytest.fixture
def home(sandbox_user) -> str:
    return sandbox_user.pw_dir


def test_is_running(sbx: Sandbox) -> None:
    assert sbx.is_running()


def test_run_stdout_stderr(sbx: Sandbox) -> None:
    r = sbx.commands.run("echo hello; echo err >&2")
    assert (r.stdout, r.stderr, r.exit_code, r.error) == ("hello\n", "err\n", 0, None)


def test_nonzero_exit_raises(sbx: Sandbox) -> None:
    with pytest.raises(CommandExitException) as ei:
        sbx.commands.run("echo out; echo bad >&2; exit 3")
    assert ei.value.exit_code == 3 and ei.value.stdout == "out\n" and ei.value.stderr == "bad\n"


def test_streaming_callbacks(sbx: Sandbox) -> None:
    seen: list[tuple[float, str]] = []
    t0 = time.monotonic()
    sbx.commands.run("echo one; sleep 0.6; echo two", on_stdout=lambda s: seen.append((time.monotonic() - t0, s)))
    text = "".join(s for _, s in seen)
    assert text == "one\ntwo\n"
    assert seen[0][0] < 0.5, "first line must arrive before the command ends"


def test_envs_cwd_and_init_env(sbx: Sandbox) -> None:
    r = sbx.commands.run('pwd; echo "$FOO $FROM_INIT"', envs={"FOO": "bar"}, cwd="/tmp")
    assert r.stdout == "/tmp\nbar yes\n"


def test_default_user_vs_root(sbx: Sandbox, sandbox_user) -> None:
    out = sbx.commands.run("whoami; echo $HOME; pwd").stdout.split()
    assert out == [sandbox_user.pw_name, sandbox_user.pw_dir, sandbox_user.pw_dir]
    assert sbx.commands.run("whoami; echo $HOME", user="root").stdout.split() == ["root", "/root"]


def test_background_stdin_stream_send_close(sbx: Sandbox) -> None:
    h = sbx.commands.run("cat", background=True, stdin=True)
    assert h.pid in [p.pid for p in sbx.commands.list()]
    sbx.commands.stream_input(h.pid, ["a\n", b"b\n"])
    sbx.commands.send_stdin(h.pid, "c\n")
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout == "a\nb\nc\n" and r.exit_code == 0


def test_background_kill(sbx: Sandbox) -> None:
    h = sbx.commands.run("sleep 30", background=True)
    assert sbx.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException) as ei:
        h.wait()
    assert ei.value.exit_code == -1
    assert sbx.commands.kill(h.pid) is False
    assert h.pid not in [p.pid for p in sbx.commands.list()]


def test_disconnect_then_connect(sbx: Sandbox) -> None:
    h = sbx.commands.run("sleep 1; echo after", background=True)
    h.disconnect()
    assert h.pid in [p.pid for p in sbx.commands.list()]
    r = sbx.commands.connect(h.pid).wait()
    assert r.stdout == "after\n"


def test_timeout(sbx: Sandbox) -> None:
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 10", timeout=1)


def test_connect_unknown_pid(sbx: Sandbox) -> None:
    with pytest.raises(NotFoundException):
        sbx.commands.connect(999999).wait()


def test_pty_create_input_resize(sbx: Sandbox) -> None:
    from e2b.sandbox.commands.command_handle import PtySize

    h = sbx.pty.create(PtySize(rows=24, cols=80), user="root")
    sbx.pty.resize(h.pid, PtySize(rows=50, cols=132))
    sbx.pty.send_stdin(h.pid, b"stty size; tty; echo $TERM; exit 7\n")
    out: list[bytes] = []
    with pytest.raises(CommandExitException) as ei:
        h.wait(on_pty=out.append)
    assert ei.value.exit_code == 7
    text = b"".join(out).decode()
    assert "50 132" in text and "/dev/pts/" in text and "xterm-256color" in text


def test_files_roundtrip(sbx: Sandbox, home: str, sandbox_user) -> None:
    d = f"{home}/sdk-{uuid.uuid4().hex}"
    info = sbx.files.write(f"{d}/hello.txt", "hi")
    assert info.path == f"{d}/hello.txt" and info.name == "hello.txt"
    assert sbx.files.read(f"{d}/hello.txt") == "hi"
    assert os.stat(f"{d}/hello.txt").st_uid == sandbox_user.pw_uid
    assert bytes(sbx.files.read(f"{d}/hello.txt", format="bytes")) == b"hi"
    assert b"".join(sbx.files.read(f"{d}/hello.txt", format="stream")) == b"hi"
    entries = sbx.files.list(d)
    assert [(e.name, e.type, e.size) for e in entries] == [("hello.txt", FileType.FILE, 2)]
    assert sbx.files.exists(f"{d}/hello.txt") and not sbx.files.exists(f"{d}/nope")
    info = sbx.files.get_info(f"{d}/hello.txt")
    assert info.owner == sandbox_user.pw_name and info.permissions == "-rw-r--r--"


def test_files_relative_paths_and_user(sbx: Sandbox, home: str) -> None:
    name = f"rel-{uuid.uuid4().hex}.txt"
    sbx.files.write(name, "rel")
    assert open(f"{home}/{name}").read() == "rel"
    sbx.files.write(f"/root/{name}", "as root", user="root")
    assert sbx.files.read(f"/root/{name}", user="root") == "as root"
    os.unlink(f"/root/{name}")


def test_files_write_many_octet_and_gzip(sbx: Sandbox, home: str) -> None:
    from e2b.sandbox.filesystem.filesystem import WriteEntry

    d = f"{home}/many-{uuid.uuid4().hex}"
    infos = sbx.files.write_files([WriteEntry(path=f"{d}/a", data="A"), WriteEntry(path=f"{d}/b/c", data=b"C")])
    assert [i.path for i in infos] == [f"{d}/a", f"{d}/b/c"]
    sbx.files.write(f"{d}/stream.bin", io.BytesIO(b"x" * 100_000))
    assert os.path.getsize(f"{d}/stream.bin") == 100_000
    sbx.files.write(f"{d}/gz.txt", "zip " * 1000, gzip=True)
    assert sbx.files.read(f"{d}/gz.txt", gzip=True) == "zip " * 1000
    assert {e.name for e in sbx.files.list(d, depth=2)} == {"a", "b", "c", "stream.bin", "gz.txt"}


def test_files_dirs_rename_remove(sbx: Sandbox, home: str) -> None:
    d = f"{home}/dirs-{uuid.uuid4().hex}"
    assert sbx.files.make_dir(f"{d}/x/y") is True
    assert sbx.files.make_dir(f"{d}/x/y") is False
    sbx.files.write(f"{d}/x/f.txt", "f")
    moved = sbx.files.rename(f"{d}/x/f.txt", f"{d}/g.txt")
    assert moved.path == f"{d}/g.txt" and moved.type == FileType.FILE
    assert not sbx.files.exists(f"{d}/x/f.txt")
    sbx.files.remove(d)
    assert not sbx.files.exists(d)


def test_watch_dir_sync_polling(sbx: Sandbox, home: str) -> None:
    from e2b import FilesystemEventType

    d = f"{home}/watch-{uuid.uuid4().hex}"
    sbx.files.make_dir(d)
    handle = sbx.files.watch_dir(d, recursive=True)
    sbx.files.write(f"{d}/new.txt", "x")
    events = []
    deadline = time.monotonic() + 5
    while not any(e.name == "new.txt" and e.type == FilesystemEventType.WRITE for e in events):
        assert time.monotonic() < deadline, events
        events += handle.get_new_events()
        time.sleep(0.05)
    handle.stop()


def test_watch_dir_async_stream(sdk_envd: Envd, home: str) -> None:
    import asyncio

    from e2b import AsyncSandbox, FilesystemEventType

    d = f"{home}/awatch-{uuid.uuid4().hex}"
    os.makedirs(d)

    async def main() -> list:
        sandbox = await AsyncSandbox.create()
        got: list = []
        seen = asyncio.Event()

        def on_event(e) -> None:
            got.append(e)
            if e.name == "a.txt" and e.type == FilesystemEventType.CREATE:
                seen.set()

        handle = await sandbox.files.watch_dir(d, on_event=on_event)
        await sandbox.files.write(f"{d}/a.txt", "x")
        await asyncio.wait_for(seen.wait(), 5)
        await handle.stop()
        return got

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("E2B_DEBUG", "true")
        got = asyncio.run(main())
    assert any(e.name == "a.txt" for e in got)


def test_files_read_missing(sbx: Sandbox, home: str) -> None:
    with pytest.raises(FileNotFoundException):
        sbx.files.read(f"{home}/definitely-missing.txt")
    with pytest.raises(FileNotFoundException):
        sbx.files.get_info(f"{home}/definitely-missing.txt")


def test_envd_logs_have_no_tracebacks(sdk_envd: Envd) -> None:
    log = open(f"/tmp/envd-test-{sdk_envd.port}.log").read()
    assert "Traceback" not in log, log


def test_raw_gzip_download_is_identity(sdk_envd: Envd, home: str) -> None:
    path = f"{home}/identity.txt"
    with open(path, "w") as f:
        f.write("plain")
    r = httpx.get(f"{sdk_envd.url}/files", params={"path": path}, headers={"accept-encoding": "gzip"})
    assert r.status_code == 200 and r.content == b"plain"
    assert gzip  # imported for symmetry with uploads
