"""Where a new sandbox goes: the best of K nodes that have room.

Candidates are the active nodes whose last heartbeat is recent (by the database's clock) and
whose free vCPUs and memory (as they last reported) fit the sandbox. K of them are drawn at random (K = ``placement_choices``:
comparing a few spreads load without every API replica piling onto the same "best" node), and
ordered: a node that already holds the template's build first (no fetch), then the most free
room. The caller tries them in that order, then the remaining candidates.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from sandboxd.store.nodes_db import NodeRow


def _aware_age_s(row: NodeRow, now: datetime) -> float:
    beat = row.heartbeat_at if row.heartbeat_at.tzinfo else row.heartbeat_at.replace(tzinfo=UTC)
    return (now - beat) / timedelta(seconds=1)


def fits(row: NodeRow, vcpus: int, memory_mb: int) -> bool:
    return row.free_vcpus >= vcpus and row.free_memory_mb >= memory_mb


def score(row: NodeRow, build_id: str | None) -> tuple[bool, float]:
    """Higher is better: holds the build, then the larger share of its capacity free."""
    room = row.free_vcpus / max(row.vcpus, 1) + row.free_memory_mb / max(row.memory_mb, 1)
    return (build_id is not None and build_id in (row.builds or []), room)


def order(nodes: list[NodeRow], vcpus: int, memory_mb: int, build_id: str | None, k: int,
          stale_after_s: float, now: datetime, rng: random.Random | None = None) -> list[NodeRow]:
    """The nodes to try for one create, best first; empty: no node has room. ``now``: the
    database's time (``Nodes.clock``), which the heartbeats were written with."""
    rng = rng or random.Random()
    alive = [n for n in nodes if _aware_age_s(n, now) < stale_after_s and fits(n, vcpus, memory_mb)]
    rng.shuffle(alive)
    sample, rest = alive[:max(k, 1)], alive[max(k, 1):]
    sample.sort(key=lambda n: score(n, build_id), reverse=True)
    rest.sort(key=lambda n: score(n, build_id), reverse=True)
    return sample + rest
