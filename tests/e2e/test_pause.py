"""Pause and resume on gVisor, the default runtime, through the SDK.

Two kinds of pause, as E2B has them: with memory (``pause()``: the sandbox is frozen in place —
its processes, their memory, /dev/shm and its files come back as they were) and with the
filesystem alone (``pause(mode="filesystem")``: the runtime stops and frees everything but the
sandbox's disk; resuming boots it again over its files).
"""

from __future__ import annotations

import time

import pytest
from e2b import GuestUnresponsiveException, Sandbox, SandboxQuery, SandboxState, ServiceBusyException

from sandboxd.orchestrator.disk import IMAGE_NAME
from sandboxd.store.db import Database

from .conftest import Server
from .hostcheck import CLEAN, mounts_under, processes_mentioning, runsc_status, traces

pytestmark = pytest.mark.slow

#: A process whose state lives only in its memory: it counts, and writes "<pid> <count>" out.
COUNTER = ("python3 -c 'import os, time\nn = 0\nwhile True:\n    n += 1\n"
           "    open(\"/home/user/counter.tmp\", \"w\").write(f\"{os.getpid()} {n}\")\n"
           "    os.replace(\"/home/user/counter.tmp\", \"/home/user/counter\")\n    time.sleep(0.05)'")


def _counter(sbx: Sandbox) -> tuple[int, int]:
    pid, n = sbx.files.read("/home/user/counter").split()
    return int(pid), int(n)


def _start_counter(sbx: Sandbox) -> None:
    sbx.commands.run(COUNTER, background=True)
    deadline = time.monotonic() + 15
    while not sbx.files.exists("/home/user/counter") and time.monotonic() < deadline:
        time.sleep(0.1)


def _row(server: Server, sandbox_id: str):  # SandboxRow
    row = Database(server.settings.db_url).get_sandbox(sandbox_id)
    assert row is not None
    return row


def test_pause_with_memory_freezes_the_sandbox_and_resume_brings_it_back(sdk_env: Server) -> None:
    sbx = Sandbox.create(timeout=120)
    try:
        sbx.files.write("/home/user/kept.txt", "on disk", metadata={"stage": "raw"})
        sbx.commands.run("echo in memory > /dev/shm/shm.txt")
        _start_counter(sbx)
        pid, before = _counter(sbx)

        assert sbx.pause() is True
        assert sbx.pause() is False  # already paused
        assert sbx.get_info().state == SandboxState.PAUSED
        paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        assert sbx.sandbox_id in [p.sandbox_id for p in paused]
        assert runsc_status(sdk_env.settings, sbx.sandbox_id) == "paused"
        assert _row(sdk_env, sbx.sandbox_id).paused_memory is True
        assert not sbx.is_running()
        time.sleep(2)  # a counter left running would add 40 in this time

        again = Sandbox.connect(sbx.sandbox_id, timeout=120)
        assert again.get_info().state == SandboxState.RUNNING
        same_pid, after = _counter(again)
        assert same_pid == pid and before <= after < before + 25  # the same process, frozen meanwhile
        assert again.files.read("/home/user/kept.txt") == "on disk"
        assert again.files.get_info("/home/user/kept.txt").metadata == {"stage": "raw"}
        assert again.commands.run("cat /dev/shm/shm.txt").stdout == "in memory\n"
        time.sleep(0.5)
        assert _counter(again)[1] > after  # and it runs on
    finally:
        sbx.kill()


def test_filesystem_pause_keeps_the_files_and_resume_boots_over_them(sdk_env: Server) -> None:
    sbx = Sandbox.create(timeout=120)
    sdir = sdk_env.settings.sandboxes_dir / sbx.sandbox_id
    try:
        sbx.files.write("/home/user/kept.txt", "on disk", metadata={"stage": "raw"})
        sbx.commands.run("echo tmp is on the disk too > /tmp/kept-tmp; echo gone > /dev/shm/shm.txt")
        sbx.commands.run("sleep 1000", background=True)

        assert sbx.pause(mode="filesystem") is True
        assert sbx.get_info().state == SandboxState.PAUSED
        assert _row(sdk_env, sbx.sandbox_id).paused_memory is False
        # nothing runs and nothing is mounted: the sandbox is its disk image
        assert runsc_status(sdk_env.settings, sbx.sandbox_id) is None
        assert processes_mentioning(sbx.sandbox_id) == []
        assert mounts_under(sdir) == [] and (sdir / IMAGE_NAME).is_file()

        again = Sandbox.connect(sbx.sandbox_id, timeout=120)
        assert again.files.read("/home/user/kept.txt") == "on disk"
        assert again.files.get_info("/home/user/kept.txt").metadata == {"stage": "raw"}
        assert again.commands.run("cat /tmp/kept-tmp").stdout == "tmp is on the disk too\n"
        assert not again.files.exists("/dev/shm/shm.txt")  # memory: gone
        assert "sleep 1000" not in again.commands.run("ps -eo args").stdout
        assert again.commands.run("whoami").stdout == "user\n"  # booted as the template says
    finally:
        sbx.kill()


def test_resume_with_reboot_drops_the_memory_of_a_frozen_sandbox(sdk_env: Server) -> None:
    sbx = Sandbox.create(timeout=120)
    try:
        sbx.files.write("/home/user/kept.txt", "on disk")
        sbx.commands.run("sleep 1000", background=True)
        assert sbx.pause() is True
        again = Sandbox.connect(sbx.sandbox_id, on_resume="reboot")
        assert again.files.read("/home/user/kept.txt") == "on disk"
        assert "sleep 1000" not in again.commands.run("ps -eo args").stdout
    finally:
        sbx.kill()


def test_auto_pause_on_timeout_with_memory_and_with_the_filesystem_alone(sdk_env: Server) -> None:
    full = Sandbox.create(timeout=60, lifecycle={"on_timeout": "pause"})
    disk = Sandbox.create(timeout=60, lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}})
    try:
        for sbx in (full, disk):
            sbx.files.write("/home/user/before-timeout", "kept")
        full.commands.run("sleep 1000", background=True)
        for sbx in (full, disk):
            sbx.set_timeout(2)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(s.get_info().state != SandboxState.PAUSED for s in (full, disk)):
            time.sleep(0.3)
        assert [s.get_info().state for s in (full, disk)] == [SandboxState.PAUSED, SandboxState.PAUSED]
        assert full.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": False}
        assert (_row(sdk_env, full.sandbox_id).paused_memory, _row(sdk_env, disk.sandbox_id).paused_memory) \
            == (True, False)
        assert "sleep 1000" in Sandbox.connect(full.sandbox_id).commands.run("ps -eo args").stdout
        assert Sandbox.connect(disk.sandbox_id).files.read("/home/user/before-timeout") == "kept"
    finally:
        full.kill()
        disk.kill()


def test_a_sandbox_whose_envd_does_not_answer(sdk_env: Server) -> None:
    """A strict or disk-only pause is refused (the sandbox runs on); a plain pause goes ahead but
    marks it, and it then resumes only by booting again (E2B's GuestUnresponsiveException)."""
    sbx = Sandbox.create(timeout=120)
    try:
        sbx.files.write("/home/user/kept.txt", "on disk")
        sbx.commands.run("sleep 1; kill -STOP $(pgrep -P 1 -f sandboxd.envd)", background=True, user="root")
        time.sleep(2.5)
        with pytest.raises(ServiceBusyException, match="not responding"):
            sbx.pause(strict=True)
        with pytest.raises(ServiceBusyException):
            sbx.pause(mode="filesystem")
        assert sbx.get_info().state == SandboxState.RUNNING
        assert sbx.pause() is True
        assert sbx.get_info().envd_unresponsive_at_pause is True
        with pytest.raises(GuestUnresponsiveException):
            Sandbox.connect(sbx.sandbox_id)
        again = Sandbox.connect(sbx.sandbox_id, on_resume="reboot")
        assert again.files.read("/home/user/kept.txt") == "on disk"
        assert again.get_info().envd_unresponsive_at_pause is None
    finally:
        sbx.kill()


def test_killing_a_paused_sandbox_removes_everything(sdk_env: Server) -> None:
    frozen, stopped = Sandbox.create(timeout=60), Sandbox.create(timeout=60)
    frozen.pause()
    stopped.pause(mode="filesystem")
    slots = {s.sandbox_id: _row(sdk_env, s.sandbox_id).slot_index for s in (frozen, stopped)}
    assert frozen.kill() and stopped.kill()
    deadline = time.monotonic() + 20
    while any(traces(sdk_env.settings, i, slot) != CLEAN for i, slot in slots.items()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {i: traces(sdk_env.settings, i, slot) for i, slot in slots.items()} == dict.fromkeys(slots, CLEAN)
