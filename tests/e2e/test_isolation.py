"""Guarantee 1: sandboxes never write to their template and never see each other's writes."""

from __future__ import annotations

import ipaddress
import time

import pytest
from e2b import Sandbox

from sandboxd.store.db import Database
from sandboxd.templates.store import TemplateStore, tree_checksum

from .conftest import Server

pytestmark = pytest.mark.slow


def test_two_sandboxes_see_only_their_own_writes_and_template_is_unchanged(sdk_env: Server) -> None:
    db = Database(sdk_env.settings.db_url)
    template = db.find_template("base")
    assert template is not None
    build = TemplateStore(sdk_env.settings.templates_dir).get(template.build_id)
    before = tree_checksum(build.rootfs)["sha256"]
    assert before == build.meta["rootfs"]["sha256"]

    a, b = Sandbox.create(timeout=60), Sandbox.create(timeout=60)
    try:
        for sbx, name in ((a, "a"), (b, "b")):
            sbx.files.write(f"/home/user/only-{name}", name)
            sbx.commands.run(f"echo {name} | sudo tee /etc/only-{name} >/dev/null && sudo rm /etc/hostname", user="user")
            sbx.commands.run(f"echo {name} >> /etc/passwd", user="root")
        for sbx, mine, other in ((a, "a", "b"), (b, "b", "a")):
            assert sbx.files.read(f"/home/user/only-{mine}") == mine
            assert not sbx.files.exists(f"/home/user/only-{other}")
            assert not sbx.files.exists(f"/etc/only-{other}")
            assert not sbx.files.exists("/etc/hostname")
            assert sbx.commands.run("tail -1 /etc/passwd").stdout == f"{mine}\n"
        fresh = Sandbox.create(timeout=60)
        try:
            assert fresh.files.exists("/etc/hostname")
            assert not fresh.files.exists("/home/user/only-a")
            assert "a\n" not in fresh.files.read("/etc/passwd").splitlines(keepends=True)[-1:]
        finally:
            fresh.kill()
    finally:
        a.kill()
        b.kill()
    assert tree_checksum(build.rootfs)["sha256"] == before


def _can_connect(sbx: Sandbox, host: str, port: int) -> bool:
    probe = (f"python3 -c 'import socket; socket.create_connection((\"{host}\", {port}), timeout=2)' "
             "2>/dev/null && echo open || echo closed")
    return sbx.commands.run(probe).stdout.strip() == "open"


def test_sandboxes_reach_neither_each_other_nor_the_host(sdk_env: Server) -> None:
    """Guarantee 6 (first part): a sandbox's only peer is the host connecting *to* it."""
    import socket

    db = Database(sdk_env.settings.db_url)
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))  # a host service on every address, the sandbox's slot side too
    listener.listen()
    port = listener.getsockname()[1]
    a, b = Sandbox.create(timeout=60), Sandbox.create(timeout=60)
    try:
        row_a, row_b = db.get_sandbox(a.sandbox_id), db.get_sandbox(b.sandbox_id)
        assert row_a is not None and row_b is not None
        host_side_a = str(ipaddress.ip_address(row_a.host_address) - 1)
        b.commands.run("python3 -m http.server 8080 >/dev/null 2>&1", background=True)
        deadline = time.monotonic() + 30  # python's http.server takes seconds to start under ptrace
        while not _can_connect(b, "127.0.0.1", 8080) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _can_connect(b, "127.0.0.1", 8080)  # b's own server is up (and a probe can succeed)
        assert not _can_connect(a, row_b.host_address, 8080)
        assert not _can_connect(a, row_b.host_address, 49983)
        assert not _can_connect(a, host_side_a, port)
        assert not _can_connect(a, "169.254.0.22", port)
        assert not _can_connect(a, "127.0.0.1", sdk_env.settings.port)  # its own loopback, not the host's
    finally:
        listener.close()
        a.kill()
        b.kill()


def test_envd_runs_in_a_template_without_python_or_libc(sdk_env: Server) -> None:
    """The tiny template is busybox-static only: envd brings its own interpreter and loader."""
    from sandboxd.templates.base import build_tiny

    build = build_tiny(TemplateStore(sdk_env.settings.templates_dir), print)
    Database(sdk_env.settings.db_url).set_template("tiny", build.build_id)
    with Sandbox.create(template="tiny", timeout=60) as sbx:
        r = sbx.commands.run("ls /usr/bin/python3 /lib/x86_64-linux-gnu/libc.so.6 2>&1; echo hi from busybox", user="root")
        assert r.stdout.endswith("hi from busybox\n") and "No such file" in r.stdout
        sbx.files.write("/root/note", "tiny", user="root")
        assert sbx.files.read("/root/note", user="root") == "tiny"
