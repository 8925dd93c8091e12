"""One scenario for every released Python ``e2b`` in the matrix (1.x to the newest), run with
that release's own venv: create, commands with streaming, background + stdin, files, pty, list,
timeout, kill, and pause/resume where the release has it. It speaks only the public API of the
release it runs under (feature-tested, as user code written for that release would be).

Prints one line per step; exits non-zero at the first failure.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from importlib.metadata import version

import e2b
from e2b import Sandbox


def step(name: str) -> None:
    print(f"[e2b {version('e2b')}] {name}", flush=True)


def create(**kw: object) -> Sandbox:
    if hasattr(Sandbox, "create"):  # 2.x
        return Sandbox.create(**kw)
    return Sandbox(**kw)  # 1.x: the constructor creates


def listed_ids() -> set[str]:
    found = Sandbox.list()
    if isinstance(found, list):  # 1.x: a plain list
        return {s.sandbox_id for s in found}
    ids: set[str] = set()
    while found.has_next:  # 2.x: a paginator
        ids |= {s.sandbox_id for s in found.next_items()}
    return ids


def main() -> None:
    step("create")
    sbx = create(template="base", timeout=120)
    try:
        assert sbx.get_host(8080) == f"8080-{sbx.sandbox_id}.{os.environ['E2B_DOMAIN']}"

        step("commands: streaming stdout and stderr, exit codes")
        out: list[str] = []
        err: list[str] = []
        r = sbx.commands.run("for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.1; done",
                             on_stdout=out.append, on_stderr=err.append)
        assert r.exit_code == 0 and r.stdout == "out1\nout2\nout3\n", r
        assert "".join(out) == r.stdout and "".join(err) == "err1\nerr2\nerr3\n", (out, err)
        try:
            sbx.commands.run("exit 3")
            raise AssertionError("exit 3 did not raise")
        except e2b.CommandExitException as exc:
            assert exc.exit_code == 3
        assert sbx.commands.run("whoami").stdout == "user\n"

        step("commands: background, stdin, kill")
        has_stdin_flag = "stdin" in inspect.signature(sbx.commands.run).parameters  # before: always open
        h = sbx.commands.run("read line; echo got:$line", background=True,
                             **({"stdin": True} if has_stdin_flag else {}))
        sbx.commands.send_stdin(h.pid, "hello\n")
        assert h.wait().stdout == "got:hello\n"
        sleeper = sbx.commands.run("sleep 600", background=True)
        assert sbx.commands.kill(sleeper.pid) is True

        step("files: write, read, list, exists, remove")
        sbx.files.write("/home/user/matrix.txt", "from the matrix")
        assert sbx.files.read("/home/user/matrix.txt") == "from the matrix"
        assert "matrix.txt" in [e.name for e in sbx.files.list("/home/user")]
        assert sbx.files.exists("/home/user/matrix.txt")
        sbx.files.remove("/home/user/matrix.txt")
        assert not sbx.files.exists("/home/user/matrix.txt")
        assert sbx.commands.run("cat /etc/hostname >/dev/null; echo ok").stdout == "ok\n"

        step("pty")
        from e2b import PtySize

        chunks: list[bytes] = []
        term = sbx.pty.create(PtySize(rows=24, cols=80))
        sbx.pty.send_stdin(term.pid, b"echo pty-$((6*7))\nexit\n")
        term.wait(on_pty=chunks.append)
        assert b"pty-42" in b"".join(chunks), chunks

        step("list")
        assert sbx.sandbox_id in listed_ids()

        if hasattr(sbx, "pause") or hasattr(sbx, "beta_pause"):
            step("pause and resume (connect)")
            sbx.files.write("/home/user/kept.txt", "kept")
            (sbx.pause if hasattr(sbx, "pause") else sbx.beta_pause)()
            again = Sandbox.connect(sbx.sandbox_id)
            assert again.files.read("/home/user/kept.txt") == "kept"
            assert again.commands.run("echo resumed").stdout == "resumed\n"

        step("timeout")
        short = create(template="base", timeout=60)
        short.set_timeout(2)
        deadline = time.monotonic() + 30
        while short.is_running():
            assert time.monotonic() < deadline, "the sandbox outlived its timeout"
            time.sleep(0.5)
        assert short.sandbox_id not in listed_ids()
    finally:
        step("kill")
        assert sbx.kill() in (True, None)  # 1.x's instance kill() returns None
    assert sbx.sandbox_id not in listed_ids()
    step("ok")


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001 - the traceback is the scenario's report
        import traceback

        traceback.print_exc()
        sys.exit(1)
