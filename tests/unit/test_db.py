"""The control-plane database: every repository against a real SQLite file and a real PostgreSQL
(the ``db_url`` fixture runs each test on both)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import inspect, text

from sandboxd.store.db import Database


def test_api_keys_are_stored_only_hashed(db_url: str) -> None:
    db = Database(db_url)
    key = db.create_api_key("k")
    assert key.startswith("e2b_") and db.api_key_valid(key)
    assert not db.api_key_valid(key + "x") and not db.api_key_valid("")
    with db.engine.connect() as conn:
        raw = conn.execute(text("select * from api_keys")).fetchall()
    assert raw and all(key not in str(row) for row in raw)
    assert db.count_api_keys() == 1


def test_template_alias_repoints_without_new_id(db_url: str) -> None:
    db = Database(db_url)
    first = db.set_template("base", "a" * 32)
    second = db.set_template("base", "b" * 32)
    assert first.template_id == second.template_id
    found = db.find_template("base")
    assert found is not None and found.build_id == "b" * 32
    assert db.find_template(first.template_id).alias == "base"  # type: ignore[union-attr]
    assert db.find_template("nope") is None


def test_state_survives_reopen(db_url: str) -> None:
    key = Database(db_url).create_api_key()
    assert Database(db_url).api_key_valid(key)


def test_an_older_database_gets_new_columns(db_url: str) -> None:
    """A data dir made before a column existed keeps working after an upgrade (a boolean column
    with its default: PostgreSQL takes no integer for a boolean)."""
    db = Database(db_url)
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE sandboxes DROP COLUMN auto_pause"))
    assert "auto_pause" not in [c["name"] for c in inspect(db.engine).get_columns("sandboxes")]
    again = Database(db_url)
    assert "auto_pause" in [c["name"] for c in inspect(again.engine).get_columns("sandboxes")]


def test_sandbox_records_round_trip(db_url: str) -> None:
    """JSON, booleans and aware datetimes come back as they went in, on either database."""
    from datetime import UTC, datetime, timedelta

    db = Database(db_url)
    now = datetime.now(UTC).replace(microsecond=123456)
    db.add_sandbox(sandbox_id="s1", template_id="t", alias="base", build_id="b" * 32, runtime="gvisor",
                   state="running", slot_index=3, host_address="10.0.0.1", envd_access_token="tok",
                   envd_version="0.1", metadata_={"a": "b é"}, env_vars={}, cpu_count=2, memory_mb=512,
                   disk_size_mb=2048, started_at=now, end_at=now + timedelta(seconds=60),
                   https_ports=[8443], egress={"allow": ["1.1.1.1"]}, idempotency_key="k:1")
    row = db.get_sandbox("s1")
    assert row is not None
    assert row.metadata_ == {"a": "b é"} and row.https_ports == [8443] and row.egress == {"allow": ["1.1.1.1"]}
    assert row.auto_pause is False and row.allow_internet_access is True
    started = row.started_at if row.started_at.tzinfo else row.started_at.replace(tzinfo=UTC)
    assert started == now
    assert db.find_sandbox_by_idempotency_key("k:1") is not None
    db.update_sandbox("s1", state="paused", paused_memory=True)
    assert [(r.sandbox_id, r.state, r.paused_memory) for r in db.list_sandboxes()] == [("s1", "paused", True)]
    assert db.delete_sandbox("s1") and not db.delete_sandbox("s1") and db.get_sandbox("s1") is None


def test_a_template_keeps_the_resources_its_build_asked_for(db_url: str) -> None:
    """Sandboxes of ``name`` get the resources of the build the default tag names; ``name:tag``
    those of the build that tag names; nothing asked for is None (the server's default)."""
    from sandboxd.store.templates_db import BuildResources, TemplateBuilds

    builds = TemplateBuilds(Database(db_url))
    small = builds.new_build("t", ["default"], BuildResources(1, 256, 4096))
    builds.publish(small.build_id, "a" * 32, runtime=None)
    big = builds.new_build("t", ["big"], BuildResources(4, 2048))
    builds.publish(big.build_id, "b" * 32, runtime=None)
    assert builds.resources("t") == builds.resources("t:default") == BuildResources(1, 256, 4096)
    assert builds.resources("t:big") == BuildResources(4, 2048, None)
    assert builds.resources("t:nope") == builds.resources("missing") == BuildResources()
    builds.assign_tags(small.template_id, builds.tag(small.template_id, "big"), ["default"], "t", None)
    assert builds.resources("t") == BuildResources(4, 2048, None)  # the alias follows its build


def test_build_logs_keep_their_order_and_tags_delete(db_url: str) -> None:
    from sandboxd.store.templates_db import TemplateBuilds

    builds = TemplateBuilds(Database(db_url))
    row = builds.new_build("t", ["default", "v1"])
    for i in range(5):
        builds.add_log(row.build_id, "info", f"[{i}/5] RUN step {i}" if i % 2 else f"line {i}")
    assert [e.message for e in builds.logs(row.build_id, offset=1, limit=3)] == \
        ["[1/5] RUN step 1", "line 2", "[3/5] RUN step 3"]
    assert builds.last_header(row.build_id) == "[3/5] RUN step 3"
    builds.publish(row.build_id, "c" * 32, runtime="gvisor")
    assert builds.resolve("t:v1") == builds.resolve("t") == "c" * 32
    assert builds.delete_tags(row.template_id, ["v1", "nope"]) == 1
    assert builds.resolve("t:v1") is None and builds.referenced_builds() == {"c" * 32}


def test_secrets_are_sealed_in_either_database(db_url: str, tmp_path: Path) -> None:
    """Binary columns (nonce, ciphertext) round-trip; the value is nowhere in the table."""
    from sandboxd.store.secrets_db import Secrets

    secrets = Secrets(Database(db_url), tmp_path / "secrets.key")
    row = secrets.create("Token", "s3cret-value", {"env": "prod"})
    secrets.update(row.secret_id, "second-value", None)
    assert secrets.value("token") == "second-value" and secrets.value(row.secret_id, 1) == "s3cret-value"
    with secrets.db.engine.connect() as conn:
        raw = conn.execute(text("select * from secret_versions")).fetchall()
    assert len(raw) == 2 and all(b"value" not in bytes(r[3]) for r in raw)
    assert secrets.destroy("token") and secrets.find("token") is None


def test_snapshot_records_replace_by_id(db_url: str) -> None:
    from sandboxd.store.snapshots_db import Snapshots

    snaps = Snapshots(Database(db_url))
    fields = dict(snapshot_id="sn1", name="named", sandbox_id="s", template_id="t", build_id="b",
                  runtime="gvisor", cpu_count=1, memory_mb=256, disk_size_mb=1024, env_vars={"A": "1"})
    snaps.put(**fields)
    snaps.put(**{**fields, "env_vars": {"A": "2"}})
    found = snaps.find("named")
    assert found is not None and found.env_vars == {"A": "2"} and len(snaps.list()) == 1
    assert snaps.delete("sn1") and snaps.find("sn1") is None


def test_two_processes_creating_the_schema_at_once(db_url: str) -> None:
    """API replicas and nodes start together against one empty database: both come up."""
    import threading

    errors: list[BaseException] = []

    def open_db() -> None:
        try:
            Database(db_url).count_api_keys()
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=open_db) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_named_lock_holds_against_every_holder_of_the_database(db_url: str) -> None:
    """Two Database objects (as two API replicas) contend for one name; another name is free. On
    PostgreSQL the lock is the server's (an advisory lock), so replicas on other hosts contend too."""
    import threading

    first, second = Database(db_url), Database(db_url)
    entered = threading.Event()

    def other() -> None:
        with second.lock("idempotency:k"):
            entered.set()

    with first.lock("idempotency:k"):
        waiter = threading.Thread(target=other)
        waiter.start()
        assert not entered.wait(0.5)  # held: the other waits
        with second.lock("idempotency:other"):
            pass
    assert entered.wait(10)
    waiter.join()
    with first.lock("idempotency:k"):  # released by the other, taken again
        pass
