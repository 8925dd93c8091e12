"""Fixtures shared by the orchestrator and runtime tests: a private network slot pool.

Why a random prefix *and* a random /16: a developer's server (sbx, 10.213/16) and the e2e server
(sbt, 10.214/16) may run on this host at the same time; a test pool must collide with neither
their names nor their routes, and must clean up only what it made.
"""

from __future__ import annotations

import os
import random
import string
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.orchestrator.network import SlotPool

_RESERVED_SECOND_OCTETS = {213, 214}  # the default server and the e2e server


def _used_second_octets() -> set[int]:
    out = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    out += subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    return {int(word.split(".")[1]) for word in out.split() if word.startswith("10.") and word.count(".") >= 3}


@pytest.fixture
def net_prefix() -> str:
    """``sbt`` + three random letters (≤6 chars), never the e2e server's prefix."""
    return "sbt" + "".join(random.choices(string.ascii_lowercase, k=3))


@pytest.fixture
def net_cidr() -> str:
    """A 10.X.0.0/16 (X in 200..250) that no route or address on this host uses right now."""
    free = sorted(set(range(200, 251)) - _RESERVED_SECOND_OCTETS - _used_second_octets())
    if not free:
        pytest.skip("no free 10.200-250.0.0/16 network on this host")
    return f"10.{random.choice(free)}.0.0/16"


@pytest.fixture
def slot_pool(net_prefix: str, net_cidr: str) -> Iterator[SlotPool]:
    """A pool that leaves no slot of its prefix behind, whatever the test did."""
    pool = SlotPool(prefix=net_prefix, base_cidr=net_cidr)
    try:
        yield pool
    finally:
        pool.cleanup_stale(set())
        assert pool.existing() == [], "slots of the test prefix survived cleanup"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared test data dir (SANDBOXD_TEST_DATA_DIR): its content-addressed template store
    and verified caches are reused across runs, so the base template is built once."""
    d = Path(os.environ.get("SANDBOXD_TEST_DATA_DIR", "/var/lib/sandboxd-test"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build (or verify) the base template before the first slow test, outside every test's
    timeout: a cold build downloads Debian packages for minutes, which no single test should pay."""
    if not any(item.get_closest_marker("slow") for item in session.items):
        return
    from sandboxd.templates.base import build_base
    from sandboxd.templates.store import TemplateStore

    d = Path(os.environ.get("SANDBOXD_TEST_DATA_DIR", "/var/lib/sandboxd-test"))
    (d / "templates").mkdir(parents=True, exist_ok=True)
    build_base(TemplateStore(d / "templates"), lambda msg: print(f"[base] {msg}", flush=True))


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One throwaway real PostgreSQL for the session (testing/postgres.py), stopped at the end."""
    from sandboxd.testing.postgres import available, running_postgres

    why = available()
    if why is not None:
        pytest.fail(f"PostgreSQL tests need Debian's postgresql package: {why}")
    with running_postgres() as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store's tests run against both databases sandboxd supports: a SQLite file, and a fresh
    database in the session's real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite'}"
    pg = request.getfixturevalue("postgres")
    return str(pg.create_database())
