"""A real server whose store is PostgreSQL (``SANDBOXD_DATABASE_URL``), driven by the real SDK:
the records a cluster keeps in PostgreSQL work end to end, not only in the repository tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import Sandbox

from sandboxd.store.db import Database
from sandboxd.testing.postgres import Postgres
from sandboxd.testing.server import Server, running_server, sdk_pointed_at

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pg_server(data_dir: Path, postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("pg-server") / "server.log"
    try:
        with running_server(data_dir, log_path, database_url=postgres.create_database()) as srv, \
                sdk_pointed_at(srv):
            yield srv
    finally:
        if log_path.exists():
            print(f"--- server log tail ---\n{log_path.read_text(errors='replace')[-3000:]}")


def test_create_list_run_kill_on_postgresql(pg_server: Server) -> None:
    assert pg_server.settings.db_url.startswith("postgresql+psycopg://")
    assert not (pg_server.settings.data_dir / "db.sqlite").exists()
    db = Database(pg_server.settings.db_url)
    sbx = Sandbox.create(metadata={"store": "postgresql"}, timeout=60)
    try:
        row = db.get_sandbox(sbx.sandbox_id)
        assert row is not None and row.state == "running" and row.metadata_ == {"store": "postgresql"}
        listed = [s.sandbox_id for s in Sandbox.list().next_items()]
        assert sbx.sandbox_id in listed
        assert sbx.commands.run("echo hello from $((6*7))").stdout == "hello from 42\n"
        sbx.set_timeout(90)
        info = sbx.get_info()
        assert (info.end_at - info.started_at).total_seconds() > 80
    finally:
        assert sbx.kill()
    assert db.get_sandbox(sbx.sandbox_id) is None
    assert sbx.sandbox_id not in [s.sandbox_id for s in Sandbox.list().next_items()]
