"""The control-plane database (real SQLite files)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sandboxd.store.db import Database


def test_api_keys_are_stored_only_hashed(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    key = db.create_api_key("k")
    assert key.startswith("e2b_") and db.api_key_valid(key)
    assert not db.api_key_valid(key + "x") and not db.api_key_valid("")
    raw = sqlite3.connect(tmp_path / "db.sqlite").execute("select * from api_keys").fetchall()
    assert raw and all(key not in str(row) for row in raw)
    assert db.count_api_keys() == 1


def test_template_alias_repoints_without_new_id(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    first = db.set_template("base", "a" * 32)
    second = db.set_template("base", "b" * 32)
    assert first.template_id == second.template_id
    found = db.find_template("base")
    assert found is not None and found.build_id == "b" * 32
    assert db.find_template(first.template_id).alias == "base"  # type: ignore[union-attr]
    assert db.find_template("nope") is None


def test_state_survives_reopen(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    key = Database(url).create_api_key()
    assert Database(url).api_key_valid(key)


def test_an_older_database_gets_new_columns(tmp_path: Path) -> None:
    """A data dir made before a column existed keeps working after an upgrade."""
    path = tmp_path / "db.sqlite"
    Database(f"sqlite:///{path}")
    con = sqlite3.connect(path)
    con.execute("ALTER TABLE sandboxes DROP COLUMN auto_pause")
    con.commit()
    assert "auto_pause" not in [r[1] for r in con.execute("PRAGMA table_info(sandboxes)")]
    Database(f"sqlite:///{path}")
    assert "auto_pause" in [r[1] for r in con.execute("PRAGMA table_info(sandboxes)")]


def test_a_template_keeps_the_resources_its_build_asked_for(tmp_path: Path) -> None:
    """Sandboxes of ``name`` get the resources of the build the default tag names; ``name:tag``
    those of the build that tag names; nothing asked for is None (the server's default)."""
    from sandboxd.store.templates_db import BuildResources, TemplateBuilds

    builds = TemplateBuilds(Database(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    small = builds.new_build("t", ["default"], BuildResources(1, 256, 4096))
    builds.publish(small.build_id, "a" * 32, runtime=None)
    big = builds.new_build("t", ["big"], BuildResources(4, 2048))
    builds.publish(big.build_id, "b" * 32, runtime=None)
    assert builds.resources("t") == builds.resources("t:default") == BuildResources(1, 256, 4096)
    assert builds.resources("t:big") == BuildResources(4, 2048, None)
    assert builds.resources("t:nope") == builds.resources("missing") == BuildResources()
    builds.assign_tags(small.template_id, builds.tag(small.template_id, "big"), ["default"], "t", None)
    assert builds.resources("t") == BuildResources(4, 2048, None)  # the alias follows its build
