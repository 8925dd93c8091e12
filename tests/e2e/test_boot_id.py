"""``/proc/sys/kernel/random/boot_id`` exists in every sandbox and changes exactly when its system
restarts (the SDK relies on it): a pause that keeps memory keeps it, a filesystem-only pause (the
sandbox boots again on resume) changes it."""

from __future__ import annotations

import pytest
from e2b import Sandbox

from .conftest import Server

pytestmark = pytest.mark.slow

BOOT_ID = "cat /proc/sys/kernel/random/boot_id"


def test_boot_id_follows_restarts(sdk_env: Server) -> None:
    sbx = Sandbox.create(timeout=180)
    try:
        first = sbx.commands.run(BOOT_ID).stdout.strip()
        assert len(first) == 36 and first == sbx.commands.run(BOOT_ID).stdout.strip()
        assert sbx.pause()
        kept = Sandbox.connect(sbx.sandbox_id)
        assert kept.commands.run(BOOT_ID).stdout.strip() == first  # memory kept: same boot
        assert kept.pause(mode="filesystem")
        rebooted = Sandbox.connect(sbx.sandbox_id)
        second = rebooted.commands.run(BOOT_ID).stdout.strip()
        assert len(second) == 36 and second != first
        other = Sandbox.create(timeout=60)
        try:
            assert other.commands.run(BOOT_ID).stdout.strip() not in (first, second)
        finally:
            other.kill()
    finally:
        sbx.kill()
