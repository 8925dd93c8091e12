"""Guarantee 5: after kill -9 of the server, a restart reattaches live sandboxes and cleans up
the rest, so the database and the host agree."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from e2b import Sandbox

from sandboxd.store.db import Database
from sandboxd.testing.server import Server, running_server, sdk_pointed_at, spawn, stop, wait_listening

from .hostcheck import netns_names, runsc_containers

pytestmark = pytest.mark.slow


def test_restart_after_kill_9_reattaches_or_cleans_up(data_dir: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    with running_server(data_dir, log_path) as server:
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
        row = db.get_sandbox(survivor_id)
        assert row is not None
        prefix = server.settings.net_prefix
        assert {n for n in netns_names() if n.startswith(f"{prefix}-")} == {f"{prefix}-{row.slot_index}",
                                                                            f"{prefix}-{row.slot_index}-g"}
        assert again.kill()
