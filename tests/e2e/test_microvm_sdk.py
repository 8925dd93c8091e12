"""The SDK against sandboxes on the microVM runtime (QEMU, NBD copy-on-write rootfs), selected
per template. Marked ``microvm``: each boot takes seconds under TCG, so this is the small subset."""

from __future__ import annotations

import time

import pytest
from e2b import CommandExitException, Sandbox

from sandboxd.store.db import Database

from .conftest import SLOW, Server
from .hostcheck import processes_mentioning

pytestmark = [pytest.mark.slow, pytest.mark.microvm]


def test_sdk_on_a_microvm(vm_env: Server, vm_template: str) -> None:
    a = Sandbox.create(template=vm_template, timeout=600, request_timeout=SLOW)
    b = Sandbox.create(template=vm_template, timeout=600, request_timeout=SLOW)
    try:
        row = Database(vm_env.settings.db_url).get_sandbox(a.sandbox_id)
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


def test_pause_and_resume_keep_memory_and_files(vm_env: Server, vm_template: str) -> None:
    from e2b import SandboxQuery, SandboxState

    sbx = Sandbox.create(template=vm_template, timeout=600, request_timeout=SLOW)
    try:
        sbx.files.write("/home/user/kept.txt", "on disk")
        sbx.commands.run("python3 -c 'import time; open(\"/tmp/in-tmpfs\", \"w\").write(\"in memory\"); "
                         "time.sleep(100000)'", background=True)
        # written before the pause (a command's first start after a restore can take seconds under TCG)
        sbx.commands.run("for i in $(seq 600); do [ -s /tmp/in-tmpfs ] && exit 0; sleep 0.1; done; exit 1")
        assert sbx.pause(request_timeout=SLOW) is True
        assert sbx.get_info().state == SandboxState.PAUSED
        paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        assert sbx.sandbox_id in [p.sandbox_id for p in paused]
        assert not sbx.is_running()
        again = Sandbox.connect(sbx.sandbox_id, timeout=120, request_timeout=SLOW)
        assert again.get_info().state == SandboxState.RUNNING
        assert again.files.read("/home/user/kept.txt") == "on disk"
        assert again.commands.run("cat /tmp/in-tmpfs").stdout == "in memory"
        assert "time.sleep(100000)" in again.commands.run("ps -eo args").stdout
    finally:
        sbx.kill()


def test_filesystem_pause_stops_the_vm_and_resume_boots_it_over_its_disk(vm_env: Server, vm_template: str) -> None:
    sbx = Sandbox.create(template=vm_template, timeout=600, request_timeout=SLOW)
    try:
        sbx.files.write("/home/user/kept.txt", "on disk", metadata={"stage": "raw"})
        sbx.commands.run("sleep 1000", background=True)
        assert sbx.pause(mode="filesystem", request_timeout=SLOW) is True
        assert processes_mentioning(sbx.sandbox_id) == []  # no QEMU while paused
        again = Sandbox.connect(sbx.sandbox_id, timeout=120, request_timeout=SLOW)
        assert again.files.read("/home/user/kept.txt") == "on disk"  # synced before QEMU was stopped
        assert again.files.get_info("/home/user/kept.txt").metadata == {"stage": "raw"}  # real xattrs on ext4
        assert "sleep 1000" not in again.commands.run("ps -eo args").stdout
    finally:
        sbx.kill()


def test_auto_pause_on_timeout_then_resume(vm_env: Server, vm_template: str) -> None:
    from e2b import SandboxState

    sbx = Sandbox.create(template=vm_template, timeout=4, lifecycle={"on_timeout": "pause"}, request_timeout=SLOW)
    try:
        sbx.files.write("/home/user/before-timeout", "kept")
        deadline = time.monotonic() + 60
        while sbx.get_info().state != SandboxState.PAUSED and time.monotonic() < deadline:
            time.sleep(0.5)
        assert sbx.get_info().state == SandboxState.PAUSED  # paused, not killed
        again = Sandbox.connect(sbx.sandbox_id, timeout=60, request_timeout=SLOW)
        assert again.files.read("/home/user/before-timeout") == "kept"
    finally:
        sbx.kill()
