"""Node membership on a real SQLite file and a real PostgreSQL: register, heartbeat, the sweep
that gives up on silent nodes (and reports their sandboxes gone), and nodes coming back."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sandboxd.cluster.membership import Capacity, NodeAgent, Sweeper, usage_of
from sandboxd.store.db import Database, utcnow
from sandboxd.store.nodes_db import ACTIVE, DRAINING, GONE, Nodes, Usage


def _sandbox(db: Database, sandbox_id: str, state: str = "running", cpus: int = 2, mem: int = 512,
             **more: object) -> None:
    now = utcnow()
    db.add_sandbox(sandbox_id=sandbox_id, template_id="t", alias="base", build_id="b", runtime="gvisor",
                   state=state, slot_index=1, host_address="10.0.0.1", envd_access_token="", envd_version="0",
                   metadata_={}, env_vars={}, cpu_count=cpus, memory_mb=mem, disk_size_mb=1024, started_at=now,
                   end_at=now + timedelta(seconds=60), **more)


def test_a_node_sees_only_its_own_sandboxes(db_url: str) -> None:
    db = Database(db_url)
    a, b = db.scoped("node-a"), db.scoped("node-b")
    _sandbox(a, "s1")
    _sandbox(b, "s2")
    _sandbox(db, "s3")  # made before nodes were recorded
    assert [r.sandbox_id for r in a.list_sandboxes()] == ["s1"]
    assert {r.sandbox_id for r in db.list_sandboxes()} == {"s1", "s2", "s3"}
    assert a.adopt_unowned() == 1
    assert [r.sandbox_id for r in a.list_sandboxes()] == ["s1", "s3"]
    assert b.get_sandbox("s1") is not None  # ids are unique: any node may look one up


def test_usage_counts_what_holds_resources() -> None:
    from sandboxd.store.db import SandboxRow

    def row(state: str, memory: bool | None = None) -> SandboxRow:
        return SandboxRow(state=state, cpu_count=2, memory_mb=512, paused_memory=memory)

    rows = [row("running"), row("starting"), row("paused", True), row("paused", False)]
    assert usage_of(Capacity(16, 4096), rows, ["b1"]) == Usage(10, 4096 - 3 * 512, 4, ["b1"])


def test_silent_nodes_are_swept_with_their_sandboxes(db_url: str) -> None:
    db = Database(db_url)
    nodes = Nodes(db)
    for node_id in ("n1", "n2"):
        nodes.register(node_id, f"http://{node_id}", 8, 2048, Usage(8, 2048, 0, []))
    _sandbox(db.scoped("n1"), "on-n1")
    _sandbox(db.scoped("n2"), "on-n2")
    assert nodes.sweep(15) == []
    later = utcnow() + timedelta(seconds=20)
    nodes.heartbeat("n2", Usage(6, 1536, 1, ["b"]))
    assert nodes.sweep(15, now=later - timedelta(seconds=10)) == []
    assert sorted(nodes.sweep(15, now=later + timedelta(seconds=10))) == ["n1", "n2"]
    assert {n.node_id: n.state for n in nodes.all()} == {"n1": GONE, "n2": GONE}
    assert db.list_sandboxes() == []  # reported gone
    assert nodes.heartbeat("n1", Usage(8, 2048, 0, [])) == GONE  # a gone node is not revived by a beat
    assert nodes.get("n1").state == GONE  # type: ignore[union-attr]


def test_draining_survives_a_restart_and_active_lists_only_active(db_url: str) -> None:
    nodes = Nodes(Database(db_url))
    nodes.register("n1", "", 8, 2048, Usage(8, 2048, 0, []))
    nodes.register("n2", "", 8, 2048, Usage(8, 2048, 0, []))
    assert nodes.set_state("n1", DRAINING)
    nodes.register("n1", "", 8, 2048, Usage(8, 2048, 0, []))
    assert nodes.get("n1").state == DRAINING  # type: ignore[union-attr]
    assert [n.node_id for n in nodes.active()] == ["n2"]
    assert nodes.set_state("n1", ACTIVE) and len(nodes.active()) == 2


def test_an_agent_given_up_on_reconciles_then_registers_again(db_url: str) -> None:
    db = Database(db_url)
    nodes = Nodes(db)
    reconciled: list[int] = []
    agent = NodeAgent(nodes, "n1", "http://n1", Capacity(8, 2048), lambda: Usage(8, 2048, 0, ["b"]),
                      lambda: reconciled.append(1))
    agent.register()
    agent.beat()
    assert reconciled == [] and nodes.get("n1").builds == ["b"]  # type: ignore[union-attr]
    nodes.sweep(15, now=utcnow() + timedelta(seconds=60))
    agent.beat()
    assert reconciled == [1] and nodes.get("n1").state == ACTIVE  # type: ignore[union-attr]
    nodes.remove("n1")
    agent.beat()
    assert reconciled == [1, 1] and nodes.get("n1") is not None


def test_the_sweeper_gives_nodes_a_full_timeout_after_it_could_not_reach_the_database(db_url: str) -> None:
    """After a database outage every heartbeat is old: nobody is given up before the nodes had
    the whole timeout to beat again."""
    nodes = Nodes(Database(db_url))
    nodes.register("n1", "", 8, 2048, Usage(8, 2048, 0, []))
    with nodes.db.session() as s:  # its last beat long ago (as after an outage)
        from sandboxd.store.nodes_db import NodeRow

        row = s.get(NodeRow, "n1")
        assert row is not None
        row.heartbeat_at = utcnow() - timedelta(seconds=600)
    now = [1000.0]
    sweeper = Sweeper(nodes, 15, clock=lambda: now[0])
    assert sweeper.sweep() == []
    now[0] += 14
    assert sweeper.sweep() == []
    now[0] += 2
    assert sweeper.sweep() == ["n1"]


def test_heartbeats_are_written_and_judged_by_the_databases_clock(postgres: object,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes and API replicas with clocks an hour off (either way): a node beating is alive and
    one silent is not, because the heartbeat's time and the sweep's and placement's "now" are all
    PostgreSQL's ``now()``; what a process's clock says is never used."""
    from sandboxd.cluster import placement
    from sandboxd.store import db as db_module
    from sandboxd.store import nodes_db
    from sandboxd.testing.postgres import Postgres

    assert isinstance(postgres, Postgres)
    nodes = Nodes(Database(str(postgres.create_database())))
    real = utcnow()
    for node_id, skew in (("ahead", timedelta(hours=1)), ("behind", -timedelta(hours=1)), ("silent", timedelta(0))):
        monkeypatch.setattr(nodes_db, "utcnow", lambda skew=skew: utcnow() + skew)
        monkeypatch.setattr(db_module, "utcnow", lambda skew=skew: utcnow() + skew)
        nodes.register(node_id, f"http://{node_id}", 8, 2048, Usage(8, 2048, 0, []))
        nodes.heartbeat(node_id, Usage(8, 2048, 0, []))
    for row in nodes.all():
        assert abs(row.heartbeat_at - real) < timedelta(seconds=30), (row.node_id, row.heartbeat_at)
    with nodes.db.session() as s:  # "silent" last beat a minute ago by the database's clock
        from sandboxd.store.nodes_db import NodeRow

        silent = s.get(NodeRow, "silent")
        assert silent is not None
        silent.heartbeat_at = nodes_db.db_now(s) - timedelta(seconds=60)
    for skew in (timedelta(hours=1), -timedelta(hours=1)):  # the sweeping process's clock is off
        monkeypatch.setattr(nodes_db, "utcnow", lambda skew=skew: utcnow() + skew)
        monkeypatch.setattr(db_module, "utcnow", lambda skew=skew: utcnow() + skew)
        placed = placement.order(nodes.active(), 1, 128, None, 3, 15, nodes.clock())
        assert {n.node_id for n in placed} == {"ahead", "behind"}
    assert nodes.sweep(15) == ["silent"]
    assert {n.node_id: n.state for n in nodes.all()} == {"ahead": ACTIVE, "behind": ACTIVE, "silent": GONE}
