"""A node's membership: register with its capacity, heartbeat what it has free, and come back
right after the cluster gave it up; and the sweep that gives up on silent nodes.

``sandboxd serve`` runs both with itself as the one node (the same code as a cluster's
``sandboxd node``), so a single machine is a cluster of one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.config import Settings
from sandboxd.orchestrator.lifecycle import SandboxState
from sandboxd.store.db import SandboxRow, new_id
from sandboxd.store.nodes_db import GONE, Nodes, Usage

if TYPE_CHECKING:
    from sandboxd.orchestrator.sandboxes import Orchestrator

log = logging.getLogger("sandboxd.cluster")
#: vCPUs a node offers per host CPU unless configured: a sandbox's CPU count is a quota of time,
#: most sandboxes idle most of the time
CPU_OVERCOMMIT = 8


def node_id_of(settings: Settings) -> str:
    """The configured id, else the one made on this data dir's first start (kept across restarts:
    recovery finds the node's sandboxes by it)."""
    if settings.node_id:
        return settings.node_id
    path = settings.data_dir / "node_id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        node_id = "node-" + new_id()[:12]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(node_id + "\n")
        os.replace(tmp, path)
        return node_id


@dataclass(frozen=True)
class Capacity:
    vcpus: int
    memory_mb: int


def capacity_of(settings: Settings) -> Capacity:
    return Capacity(settings.node_vcpus or (os.cpu_count() or 1) * CPU_OVERCOMMIT,
                    settings.node_memory_mb or _host_memory_mb())


def _host_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def holds_resources(row: SandboxRow) -> bool:
    """A sandbox counts against its node while it runs, starts, or is paused with its memory."""
    return row.state in (SandboxState.STARTING, SandboxState.RUNNING) or (
        row.state == SandboxState.PAUSED and bool(row.paused_memory))


def usage_of(capacity: Capacity, rows: list[SandboxRow], builds: list[str]) -> Usage:
    held = [r for r in rows if holds_resources(r)]
    return Usage(free_vcpus=capacity.vcpus - sum(r.cpu_count for r in held),
                 free_memory_mb=capacity.memory_mb - sum(r.memory_mb for r in held),
                 sandboxes=len(rows), builds=builds)


class NodeAgent:
    """Keeps one node's row alive. ``usage`` says what the node has free now; ``forget_missing``
    tears down what the node runs whose records were deleted while it was cut off."""

    def __init__(self, nodes: Nodes, node_id: str, address: str, capacity: Capacity,
                 usage: Callable[[], Usage], forget_missing: Callable[[], object],
                 checksums: Callable[[set[str]], dict[str, str]] | None = None) -> None:
        self.nodes = nodes
        self.node_id = node_id
        self.address = address
        self.capacity = capacity
        self._usage = usage
        self._forget_missing = forget_missing
        self._checksums = checksums
        self._recorded: set[str] = set()  # builds whose checksum this agent saw recorded
        self._beating = threading.Lock()  # the loop's beats and a finished build's (jobs.on_built)

    def register(self) -> None:
        self.nodes.register(self.node_id, self.address, self.capacity.vcpus, self.capacity.memory_mb, self._usage())
        log.info("node %s registered (%s, %d vCPUs, %d MiB)", self.node_id, self.address or "in-process",
                 self.capacity.vcpus, self.capacity.memory_mb)

    def beat(self) -> None:
        """One heartbeat. A node the cluster gave up on (or removed) first agrees with the
        database (its sandboxes were reported gone), then registers again. Also called when a
        build finishes here: its checksum and holder are recorded before it is marked ready."""
        with self._beating:
            self._beat()

    def _beat(self) -> None:
        state = self.nodes.heartbeat(self.node_id, self._usage())
        if state is None or state == GONE:
            log.warning("node %s was %s: reconciling and registering again", self.node_id,
                        "declared gone" if state == GONE else "removed")
            self._forget_missing()
            self.register()
        if self._checksums is not None and (new := self._checksums(self._recorded)):
            self.nodes.record_checksums(self.node_id, new)  # builds made here: others fetch them verified
            self._recorded |= set(new)

    async def run(self, interval_s: float) -> None:
        """Heartbeat until cancelled; a database that does not answer is retried, not fatal."""
        while True:
            try:
                await asyncio.to_thread(self.beat)
            except Exception as exc:  # noqa: BLE001 - the database may be restarting: keep beating
                log.warning("node %s: heartbeat failed: %s", self.node_id, exc)
            await asyncio.sleep(interval_s)


class Sweeper:
    """Gives up on nodes silent for longer than ``timeout_s``. It judges only after it has itself
    reached the database for that long without a gap: after a database outage every node's last
    heartbeat is old, and the nodes get a full timeout to beat again before any is given up."""

    def __init__(self, nodes: Nodes, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.nodes = nodes
        self.timeout_s = timeout_s
        self._clock = clock
        self._reachable_since: float | None = None

    def sweep(self) -> list[str]:
        try:
            if self._reachable_since is None:
                self.nodes.all()  # is the database there at all?
                self._reachable_since = self._clock()
            if self._clock() - self._reachable_since < self.timeout_s:
                return []
            gone = self.nodes.sweep(self.timeout_s)
        except Exception:
            self._reachable_since = None
            raise
        for node_id in gone:
            log.warning("node %s missed its heartbeats for %.0fs: it and its sandboxes are gone", node_id,
                        self.timeout_s)
        return gone

    async def run(self, interval_s: float) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sweep)
            except Exception as exc:  # noqa: BLE001 - the database may be restarting: sweep again later
                log.warning("node sweep failed: %s", exc)
            await asyncio.sleep(interval_s)


def agent_for(orch: Orchestrator, address: str = "") -> NodeAgent:
    """The agent of the node ``orch`` runs (its database is scoped to the node's id)."""
    node_id = orch.db.node_id
    assert node_id is not None, "a node's orchestrator has a database scoped to its id"
    capacity = capacity_of(orch.settings)

    def usage() -> Usage:
        return usage_of(capacity, orch.db.list_sandboxes(), orch.templates.list())

    from sandboxd.cluster.builds import checksums_of

    return NodeAgent(Nodes(orch.db), node_id, address, capacity, usage, orch.forget_missing,
                     lambda skip: checksums_of(orch.templates, skip))
