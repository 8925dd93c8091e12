"""Build slots: a pool of their own beside the sandboxes', and what a crashed builder left is
removed — never a slot another process's step may be using."""

from __future__ import annotations

import time
from ipaddress import ip_address
from pathlib import Path

import pytest

from sandboxd.config import Settings
from sandboxd.orchestrator.network import SlotPool
from sandboxd.templates.contained import STALE_SLOT_MARGIN_S, BuildLimits, StepSandbox, build_pool, slot_created


def test_the_build_pool_has_its_own_prefix_and_addresses_after_the_sandboxes():
    settings = Settings(net_prefix="sbx", net_cidr="10.213.0.0/16", max_sandboxes=256)
    pool = build_pool(settings)
    assert pool.prefix == "sbxb" and str(pool.network) == "10.213.252.0/22"
    sandboxes = SlotPool(settings.net_prefix, settings.net_cidr, settings.max_sandboxes)
    last_sandbox = sandboxes.slot(settings.max_sandboxes - 1).host_address
    assert all(ip_address(pool.slot(i).host_side_address) > ip_address(last_sandbox) for i in range(pool.max_slots))
    with pytest.raises(ValueError, match="no room for build slots"):
        build_pool(Settings(net_cidr="10.213.0.0/16", max_sandboxes=16300))
    with pytest.raises(ValueError, match="too small"):
        build_pool(Settings(net_cidr="10.213.0.0/24"))


def test_a_crashed_builders_slot_is_removed_and_a_live_ones_kept(net_prefix: str, net_cidr: str, tmp_path: Path):
    pool = SlotPool(net_prefix, net_cidr, 8)
    steps = StepSandbox(pool, tmp_path / "lib", limits=BuildLimits(timeout_s=60))
    left = pool.acquire()
    time.sleep(1.1)
    live = pool.acquire()
    try:
        # as seen a step's lifetime after the live slot was made: the older one is past it
        now = slot_created(live) + 60 + STALE_SLOT_MARGIN_S - 0.5
        assert slot_created(left) < slot_created(live) - 1
        assert steps.remove_stale_slots(now) == [left.index]
        assert pool.existing() == [live.index]
        assert steps.remove_stale_slots() == []  # now: neither is stale
    finally:
        pool.cleanup_stale(set())
