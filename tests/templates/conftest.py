"""Fixtures for template tests.

The persistent data dir (default /var/lib/sandboxd-test, env SANDBOXD_TEST_DATA_DIR) keeps the
~40 s base build between runs. That is safe only because builds are content-addressed: any change
to the recipe, packages, mirror or envd bundle is a new build id, never a stale hit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd.templates.store import TemplateStore


def _log(msg: str) -> None:
    print(msg, flush=True)


@pytest.fixture(scope="session")
def store(data_dir: Path) -> TemplateStore:
    return TemplateStore(data_dir / "templates")


@pytest.fixture
def tmp_store(tmp_path: Path) -> TemplateStore:
    return TemplateStore(tmp_path / "templates")


@pytest.fixture(scope="session")
def log():
    return _log


@pytest.fixture(scope="session")
def content_check_level() -> str:
    """Builds used by content tests (user, sudo, bash...) pass the production gate: envd answers."""
    return "health"
