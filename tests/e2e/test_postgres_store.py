"""A real server whose store is PostgreSQL (``SANDBOXD_DATABASE_URL``), driven by the real SDK:
the records a cluster keeps in PostgreSQL work end to end, not only in the repository tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
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


def test_serve_is_a_cluster_of_one_node(pg_server: Server) -> None:
    """``serve`` registers itself as the one node and heartbeats what it has free; its sandboxes
    are recorded as that node's."""
    import httpx

    from sandboxd.store.nodes_db import ACTIVE, Nodes

    node_id = httpx.get(f"{pg_server.url}/health").json()["nodeId"]
    assert (pg_server.settings.data_dir / "node_id").read_text().strip() == node_id
    nodes = Nodes(Database(pg_server.settings.db_url))
    (node,) = nodes.all()
    assert node.node_id == node_id and node.state == ACTIVE and node.address == pg_server.url
    deadline = time.monotonic() + 10  # a heartbeat after the previous test's sandboxes went
    while (node := nodes.get(node_id)) is not None and node.sandboxes and time.monotonic() < deadline:  # type: ignore[assignment]
        time.sleep(0.2)
    assert node is not None and node.sandboxes == 0 and node.free_vcpus == node.vcpus
    idle_free = node.free_vcpus
    sbx = Sandbox.create(timeout=60)
    try:
        row = Database(pg_server.settings.db_url).get_sandbox(sbx.sandbox_id)
        assert row is not None and row.node_id == node_id
        deadline = time.monotonic() + 10
        while (n := nodes.get(node_id)) is not None and n.free_vcpus == idle_free and time.monotonic() < deadline:
            time.sleep(0.2)
        assert n is not None and n.free_vcpus == idle_free - row.cpu_count and n.sandboxes == 1
        assert row.build_id in n.builds
    finally:
        sbx.kill()


def test_a_node_given_up_on_tears_down_what_the_cluster_reported_gone(pg_server: Server) -> None:
    """The sweep (as another cluster member would run it, with a clock past the timeout) marks
    the node gone and deletes its sandboxes' records; the node's next heartbeat sees it, tears
    those sandboxes down on the host, and registers again."""
    from sandboxd.store.db import utcnow
    from sandboxd.store.nodes_db import ACTIVE, Nodes

    from .hostcheck import CLEAN, traces

    db = Database(pg_server.settings.db_url)
    nodes = Nodes(db)
    sbx = Sandbox.create(timeout=60)
    row = db.get_sandbox(sbx.sandbox_id)
    assert row is not None and row.node_id is not None
    assert nodes.sweep(pg_server.settings.node_timeout_s, now=utcnow() + timedelta(minutes=5)) == [row.node_id]
    assert db.get_sandbox(sbx.sandbox_id) is None
    deadline = time.monotonic() + 30
    while traces(pg_server.settings, sbx.sandbox_id, row.slot_index) != CLEAN and time.monotonic() < deadline:
        time.sleep(0.2)
    assert traces(pg_server.settings, sbx.sandbox_id, row.slot_index) == CLEAN
    node = nodes.get(row.node_id)
    assert node is not None and node.state == ACTIVE
    with pytest.raises(Exception, match=r"not found|404"):
        sbx.commands.run("true")
