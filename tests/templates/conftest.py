"""Fixtures for template tests.

The persistent data dir (default /var/lib/sandboxd-test, env SANDBOXD_TEST_DATA_DIR) keeps the
~40 s base build between runs. That is safe only because builds are content-addressed: any change
to the recipe, packages, mirror or envd bundle is a new build id, never a stale hit.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandboxd.templates.store import TemplateStore

import sandboxd


def _log(msg: str) -> None:
    print(msg, flush=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = Path(os.environ.get("SANDBOXD_TEST_DATA_DIR", "/var/lib/sandboxd-test"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def store(data_dir: Path) -> TemplateStore:
    return TemplateStore(data_dir / "templates")


@pytest.fixture
def tmp_store(tmp_path: Path) -> TemplateStore:
    return TemplateStore(tmp_path / "templates")


@pytest.fixture(scope="session")
def log():
    return _log


def envd_present() -> bool:
    """Whether sandboxd.envd has a runnable entry point yet (it is written concurrently)."""
    return (Path(sandboxd.__file__).parent / "envd" / "__main__.py").is_file()


@pytest.fixture(scope="session")
def content_check_level() -> str:
    """Gate for builds used by *content* tests (user, sudo, bash...): the production gate
    ("health") once envd exists, else "python" (a different build id, never served in production).
    The envd /health tests always use the production gate and fail until envd exists."""
    return "health" if envd_present() else "python"
