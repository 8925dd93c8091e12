"""Guarantee 1: sandboxes never write to their template and never see each other's writes."""

from __future__ import annotations

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
