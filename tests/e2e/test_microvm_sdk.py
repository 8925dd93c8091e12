"""The SDK against sandboxes on the microVM runtime (QEMU, NBD copy-on-write rootfs), selected
per template. Marked ``microvm``: each boot takes seconds under TCG, so this is the small subset."""

from __future__ import annotations

import time

import pytest
from e2b import CommandExitException, Sandbox

from sandboxd.store.db import Database

from .conftest import Server
from .hostcheck import processes_mentioning

pytestmark = [pytest.mark.slow, pytest.mark.microvm]


@pytest.fixture(scope="module")
def vm_template(sdk_env: Server) -> str:
    db = Database(sdk_env.settings.db_url)
    base = db.find_template("base")
    assert base is not None
    db.set_template("base-vm", base.build_id, runtime="microvm")
    return "base-vm"


def test_sdk_on_a_microvm(sdk_env: Server, vm_template: str) -> None:
    a = Sandbox.create(template=vm_template, timeout=120)
    b = Sandbox.create(template=vm_template, timeout=120)
    try:
        row = Database(sdk_env.settings.db_url).get_sandbox(a.sandbox_id)
        assert row is not None and row.runtime == "microvm"
        r = a.commands.run("uname -r; id -un; sudo -n id -u; findmnt -n -o SOURCE /")
        kernel, user, root_uid, root_dev = r.stdout.split()
        assert "cloud" in kernel and user == "user" and root_uid == "0" and root_dev == "/dev/vda"
        with pytest.raises(CommandExitException):
            a.commands.run("exit 5")
        a.files.write("/home/user/only-a", "a")
        assert a.files.read("/home/user/only-a") == "a"
        assert not b.files.exists("/home/user/only-a")
        assert {e.name for e in a.files.list("/home/user")} >= {"only-a"}
    finally:
        a.kill()
        b.kill()
    assert Sandbox.kill(a.sandbox_id) is False
    deadline = time.monotonic() + 20  # teardown runs in the background after kill
    while (left := processes_mentioning(a.sandbox_id) + processes_mentioning(b.sandbox_id)) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == []  # no QEMU left
