"""``get_metrics`` returns the sampled series over the sandbox's life (E2B samples every 5 s), a
paused sandbox keeps its history, and the many-sandbox route answers each one's newest sample."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from e2b import AsyncSandbox, Sandbox
from e2b.exceptions import NotFoundException, SandboxException

from .conftest import Server

pytestmark = pytest.mark.slow


def _until(count: int, sbx: Sandbox, timeout_s: float = 40) -> list:
    deadline = time.monotonic() + timeout_s
    found = sbx.get_metrics()
    while len(found) < count and time.monotonic() < deadline:
        time.sleep(1)
        found = sbx.get_metrics()
    return found


def test_metrics_series_over_the_sandbox_life(sdk_env: Server) -> None:
    sbx = Sandbox.create(timeout=120)
    try:
        first = sbx.get_metrics()  # right after create: sampled on demand
        assert len(first) >= 1 and first[0].mem_total > 0 and first[0].cpu_count >= 1
        series = _until(3, sbx)
        assert len(series) >= 3
        stamps = [m.timestamp for m in series]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        assert all(m.mem_total > 0 and m.disk_total > 0 for m in series)
        later = sbx.get_metrics(start=stamps[1])
        assert [m.timestamp for m in later] == [t for t in stamps if t >= stamps[1]][:len(later)]
        # a window that ends before the first sample (its start given: a pooled sandbox's start is
        # its claim, in the first sample's second, and a default start after the end is a 400)
        before = stamps[0] - timedelta(seconds=1)
        assert sbx.get_metrics(start=before - timedelta(seconds=60), end=before) == []
        with pytest.raises(SandboxException, match="400"):
            sbx.get_metrics(start=datetime.now(UTC) + timedelta(hours=1))  # start after end

        assert sbx.pause()
        kept = Sandbox.get_metrics(sbx.sandbox_id)
        assert len(kept) >= len(series)
        assert [m.timestamp for m in kept][:len(series)] == stamps
        with sdk_env.api() as api:  # not running: left out of the many-sandbox answer
            r = api.get("/sandboxes/metrics", params={"sandbox_ids": sbx.sandbox_id})
            assert r.status_code == 200 and r.json() == {"sandboxes": {}}
    finally:
        sbx.kill()
    with pytest.raises(NotFoundException):
        Sandbox.get_metrics(sbx.sandbox_id)
    with pytest.raises(NotFoundException):
        Sandbox.get_metrics("nosuchsandbox")


def test_async_metrics(sdk_env: Server) -> None:
    async def main() -> int:
        sbx = await AsyncSandbox.create(timeout=60)
        try:
            return len(await sbx.get_metrics())
        finally:
            await sbx.kill()

    assert asyncio.run(main()) >= 1
