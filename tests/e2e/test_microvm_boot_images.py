"""microVM creates restore their template's booted image (orchestrator/boot_images.py) through
the real SDK: the first create boots and the image is made behind it; later creates are restored
from it, each its own sandbox (env vars, files, envd token) with its own kernel randomness.
Marked ``microvm``: each boot or restore takes seconds under TCG."""

from __future__ import annotations

import pytest
from e2b import Sandbox

from sandboxd.orchestrator.boot_images import BootImages, ImageKey
from sandboxd.store.db import Database
from sandboxd.testing.server import Server

from .conftest import SLOW

pytestmark = [pytest.mark.slow, pytest.mark.microvm]
MICROVM_BOOT_IMAGES = 1  # vm_env: this module's server makes them
WARM_POOL_SIZE = 0  # a pool on (SANDBOXD_TEST_WARM_POOL_SIZE) would hand out b and c instead of restoring them


def _restored(server: Server, sandbox_id: str) -> bool:
    return f"sandbox {sandbox_id} (base-vm) restored from its template's booted image" in server.log()


def test_later_creates_restore_the_booted_image_each_its_own(vm_env: Server) -> None:
    db = Database(vm_env.settings.db_url)
    base = db.find_template("base")
    assert base is not None
    db.set_template("base-vm", base.build_id, runtime="microvm")
    first = Sandbox.create(template="base-vm", timeout=600, request_timeout=SLOW)
    made = [first]
    try:
        assert not _restored(vm_env, first.sandbox_id)  # no image yet: it booted
        row = db.get_sandbox(first.sandbox_id)
        assert row is not None
        key = ImageKey(base.build_id, row.cpu_count, row.memory_mb)
        images = BootImages(vm_env.settings.data_dir / "boot-images", lambda k, p: None)
        assert images.wait(key, timeout_s=SLOW) is not None, vm_env.log()[-3000:]
        b = Sandbox.create(template="base-vm", envs={"WHO": "b"}, timeout=600, request_timeout=SLOW)
        made.append(b)
        c = Sandbox.create(template="base-vm", envs={"WHO": "c"}, timeout=600, request_timeout=SLOW)
        made.append(c)
        assert _restored(vm_env, b.sandbox_id) and _restored(vm_env, c.sandbox_id), vm_env.log()[-3000:]
        assert b.commands.run("echo $WHO; whoami; pwd").stdout == "b\nuser\n/home/user\n"
        assert c.commands.run("echo $WHO").stdout == "c\n"
        b.files.write("/home/user/only-b.txt", "b")
        assert not c.files.exists("/home/user/only-b.txt")
        assert _token(db, b.sandbox_id) != _token(db, c.sandbox_id)
        rand = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
        assert b.commands.run(rand).stdout != c.commands.run(rand).stdout  # reseeded at /init
        assert b.commands.run("date +%s").stdout.strip().isdigit()
    finally:
        for s in made:
            s.kill()


def _token(db: Database, sandbox_id: str) -> str:
    row = db.get_sandbox(sandbox_id)
    assert row is not None
    return row.envd_access_token
