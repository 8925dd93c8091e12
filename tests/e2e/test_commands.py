"""``sandbox.commands`` through the real SDK, server and gVisor sandbox."""

from __future__ import annotations

import time

import pytest
from e2b import CommandExitException, Sandbox

pytestmark = pytest.mark.slow


def test_stdout_stderr_and_exit_code(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("echo out; echo err >&2")
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 0)


def test_nonzero_exit_raises_command_exit_exception(sandbox: Sandbox) -> None:
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("echo partial; exit 3")
    assert info.value.exit_code == 3
    assert info.value.stdout == "partial\n"


def test_envs_and_cwd(sandbox: Sandbox) -> None:
    r = sandbox.commands.run('echo "$GREETING" && pwd', envs={"GREETING": "hi there"}, cwd="/tmp")
    assert r.stdout == "hi there\n/tmp\n"


def test_create_env_vars_reach_every_command() -> None:
    with Sandbox.create(envs={"FROM_CREATE": "yes"}, timeout=60) as sbx:
        assert sbx.commands.run("echo $FROM_CREATE").stdout == "yes\n"


def test_default_user_is_user_and_root_on_request(sandbox: Sandbox) -> None:
    r = sandbox.commands.run('id -un; id -u; echo "$HOME"; pwd')
    assert r.stdout.split() == ["user", "1000", "/home/user", "/home/user"]
    r = sandbox.commands.run("id -un; echo $HOME", user="root")
    assert r.stdout.split() == ["root", "/root"]
    assert sandbox.commands.run("sudo -n id -u").stdout == "0\n"


def test_base_template_has_bash_and_python(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("bash --version | head -1; python3 -c 'print(6*7)'")
    assert "GNU bash" in r.stdout and r.stdout.endswith("42\n")


def test_background_process_with_stdin(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "line one\n")
    sandbox.commands.send_stdin(handle.pid, "line two\n")
    sandbox.commands.close_stdin(handle.pid)
    result = handle.wait()
    assert result.stdout == "line one\nline two\n"


def test_background_process_kill(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 600", background=True)
    assert handle.pid in [p.pid for p in sandbox.commands.list()]
    assert sandbox.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException):
        handle.wait()
    deadline = time.monotonic() + 10
    while handle.pid in [p.pid for p in sandbox.commands.list()] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert handle.pid not in [p.pid for p in sandbox.commands.list()]
    assert sandbox.commands.kill(handle.pid) is False


def test_output_callbacks_stream(sandbox: Sandbox) -> None:
    seen: list[str] = []
    sandbox.commands.run("for i in 1 2 3; do echo $i; sleep 0.1; done", on_stdout=seen.append)
    assert "".join(seen) == "1\n2\n3\n"


def test_passwordless_sudo_for_user_only(sandbox: Sandbox) -> None:
    """gVisor blocks setuid; sudo still behaves like E2B's (see sandboxd.envd.sudo_broker)."""
    r = sandbox.commands.run("echo secret | sudo tee /root/by-user >/dev/null && sudo cat /root/by-user && sudo -u user id -un")
    assert r.stdout == "secret\nuser\n"
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("sudo sh -c 'echo to-stderr >&2; exit 7'")
    assert info.value.exit_code == 7 and info.value.stderr == "to-stderr\n"
    sandbox.commands.run("useradd -m outsider", user="root")
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("sudo -n id -u", user="outsider")
    assert "not in the sudoers file" in info.value.stderr
    assert not sandbox.files.exists("/root/by-outsider")
