"""Fixtures for NBD tests: a random base image and a running server with its own run dir."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbd_helpers import BASE_SIZE

from sandboxd.nbd.thread import NbdServerThread


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """An 8 MiB image of random bytes, read-only like a published template image."""
    path = tmp_path / "base.img"
    path.write_bytes(os.urandom(BASE_SIZE))
    path.chmod(0o444)
    return path


@pytest.fixture
def nbd(tmp_path: Path) -> Iterator[NbdServerThread]:
    server = NbdServerThread(tmp_path / "run", pool_size=2).start()
    yield server
    server.close()
