"""Guarantee 5: after kill -9 of the server, a restart reattaches live sandboxes and cleans up
the rest, so the database and the host agree."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from e2b import Sandbox, SandboxQuery, SandboxState

from sandboxd.orchestrator.disk import loop_devices_of
from sandboxd.orchestrator.rootfs import unmount_overlay
from sandboxd.store.db import Database
from sandboxd.testing.server import Server, running_server, sdk_pointed_at, spawn, stop, wait_listening

from .hostcheck import netns_names, runsc_containers

pytestmark = pytest.mark.slow


def test_restart_after_kill_9_reattaches_or_cleans_up(data_dir: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    # no warm pool: these tests assert the host's exact state (pooled sandboxes would add slots);
    # tests/e2e/test_pool.py checks that recovery removes the pool a crash left
    with running_server(data_dir, log_path, warm_pool_size=0) as server:
        with sdk_pointed_at(server):
            survivor = Sandbox.create(timeout=300)
            victim = Sandbox.create(timeout=300)
            survivor.files.write("/home/user/state", "kept")
            survivor.commands.run("sleep 1000", background=True)
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        # while the server is down, one sandbox dies on its own
        subprocess.run(["runsc", "--root", str(server.settings.runsc_root), "delete", "--force",
                        victim.sandbox_id], check=True, capture_output=True)
        assert survivor.sandbox_id in runsc_containers(server.settings)  # kill -9 did not take it along

        restarted = spawn(server.settings, log_path)
        try:
            wait_listening(server.url, restarted, log_path)
            _check_recovered(server, survivor.sandbox_id, victim.sandbox_id)
        finally:
            stop(restarted)


def _check_recovered(server: Server, survivor_id: str, victim_id: str) -> None:
    with sdk_pointed_at(server):
        again = Sandbox.connect(survivor_id)
        assert again.files.read("/home/user/state") == "kept"
        assert "sleep 1000" in again.commands.run("ps -eo args").stdout
        assert [s.sandbox_id for s in Sandbox.list().next_items()] == [survivor_id]
        db = Database(server.settings.db_url)
        assert [r.sandbox_id for r in db.list_sandboxes()] == [survivor_id]
        assert not (server.settings.sandboxes_dir / victim_id).exists()
        assert loop_devices_of(server.settings.sandboxes_dir / victim_id) == []  # its disk was let go
        row = db.get_sandbox(survivor_id)
        assert row is not None
        prefix = server.settings.net_prefix
        assert {n for n in netns_names() if n.startswith(f"{prefix}-")} == {f"{prefix}-{row.slot_index}",
                                                                            f"{prefix}-{row.slot_index}-g"}
        assert again.kill()


def test_paused_sandboxes_survive_kill_9_and_one_that_lost_its_memory_boots(data_dir: Path, tmp_path: Path) -> None:
    """kill -9 of the server: a frozen sandbox stays frozen, a disk-only one stays on disk. A
    frozen one whose runtime, mounts and network are gone too (what a host reboot does) is kept
    paused with its disk and boots on resume, in a slot made again."""
    log_path = tmp_path / "server.log"
    # no warm pool: these tests assert the host's exact state (pooled sandboxes would add slots);
    # tests/e2e/test_pool.py checks that recovery removes the pool a crash left
    with running_server(data_dir, log_path, warm_pool_size=0) as server:
        with sdk_pointed_at(server):
            frozen, on_disk, lost = (Sandbox.create(timeout=300) for _ in range(3))
            for sbx in (frozen, on_disk, lost):
                sbx.files.write("/home/user/state", sbx.sandbox_id)
                sbx.commands.run("sleep 1000", background=True)
                sbx.pause(mode="filesystem" if sbx is on_disk else "full")
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        lost_slot = Database(server.settings.db_url).get_sandbox(lost.sandbox_id).slot_index  # type: ignore[union-attr]
        _as_after_a_reboot(server, lost.sandbox_id, lost_slot)

        restarted = spawn(server.settings, log_path)
        try:
            wait_listening(server.url, restarted, log_path)
            with sdk_pointed_at(server):
                listed = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
                assert {s.sandbox_id for s in listed} == {frozen.sandbox_id, on_disk.sandbox_id, lost.sandbox_id}
                rows = {r.sandbox_id: r for r in Database(server.settings.db_url).list_sandboxes()}
                assert [rows[s.sandbox_id].paused_memory for s in (frozen, on_disk, lost)] == [True, False, False]
                for sbx, still_running in ((frozen, True), (on_disk, False), (lost, False)):
                    again = Sandbox.connect(sbx.sandbox_id)
                    assert again.files.read("/home/user/state") == sbx.sandbox_id
                    assert ("sleep 1000" in again.commands.run("ps -eo args").stdout) is still_running
                    assert again.kill()
        finally:
            stop(restarted)


def _as_after_a_reboot(server: Server, sandbox_id: str, slot_index: int) -> None:
    """Take away what a reboot of the host takes: the runtime's processes, the mounts, the slot."""
    settings = server.settings
    subprocess.run(["runsc", "--root", str(settings.runsc_root), "resume", sandbox_id], capture_output=True)
    subprocess.run(["runsc", "--root", str(settings.runsc_root), "delete", "--force", sandbox_id],
                   check=True, capture_output=True)
    unmount_overlay(settings.sandboxes_dir / sandbox_id)
    prefix = settings.net_prefix
    subprocess.run(["ip", "link", "del", f"{prefix}-{slot_index}-h"], check=True)
    for ns in (f"{prefix}-{slot_index}-g", f"{prefix}-{slot_index}"):
        subprocess.run(["ip", "netns", "del", ns], check=True)
