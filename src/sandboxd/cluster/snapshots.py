"""Snapshots and forks in cluster mode, the API replica's side: the SnapshotService's shape
(api/snapshots.py and api/sandboxes.py cannot tell), the work done by the node that holds the
sandbox or the snapshot.

A capture lives in one node's data dir; its record in PostgreSQL names that node
(``snapshots.node_id``). Taking and forking go to the sandbox's node (a fork's capture never
leaves it: its sandboxes start there too); listing reads the records; deleting goes to the
snapshot's node (the record alone, once that node is gone), then every other node drops the
copies it fetched; a create naming a snapshot gets a :class:`Seed` that says which snapshot, and
``ClusterOrchestrator.create`` places it on that node first, else (a filesystem snapshot) on
another node, which fetches it verified (cluster/snapshot_copies.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from sandboxd.cluster.node_client import NodeClient
from sandboxd.cluster.remote import ClusterOrchestrator
from sandboxd.orchestrator.sandboxes import Resources, SandboxError, Seed
from sandboxd.store.db import SandboxRow
from sandboxd.store.nodes_db import GONE
from sandboxd.store.snapshots_db import SnapshotRow, Snapshots
from sandboxd.store.templates_db import split_name

log = logging.getLogger("sandboxd.cluster")


class ClusterSnapshots:
    """``take``, ``fork``, ``find``, ``records``, ``delete``, ``seed_for``, ``env_of`` over the nodes."""

    def __init__(self, orch: ClusterOrchestrator) -> None:
        self.orch = orch
        self.records = Snapshots(orch.db)

    def _sandbox_node(self, sandbox_id: str) -> NodeClient:
        client = self.orch.client_of(sandbox_id)
        if client is None:
            raise SandboxError(404, f"sandbox '{sandbox_id}' not found")
        return client

    def take(self, sandbox_id: str, name: str | None, memory: bool | None) -> SnapshotRow:
        snapshot_id = self._sandbox_node(sandbox_id).snapshot(sandbox_id, name, memory)
        snap = self.records.find(snapshot_id) if snapshot_id is not None else None
        if snap is None:
            raise SandboxError(404, f"sandbox '{sandbox_id}' not found")
        return snap

    def fork(self, sandbox_id: str, count: int, timeout_s: int) -> list[SandboxRow | SandboxError]:
        results = self._sandbox_node(sandbox_id).fork(sandbox_id, count, timeout_s)
        if results is None:
            raise SandboxError(404, f"sandbox '{sandbox_id}' not found")
        out: list[SandboxRow | SandboxError] = []
        for r in results:
            if isinstance(r, SandboxError):
                out.append(r)
                continue
            row = self.orch.db.get_sandbox(r)
            out.append(row if row is not None else SandboxError(500, f"fork {r} ended right after it started"))
        return out

    def find(self, ref: str) -> SnapshotRow | None:
        """By id or name, with or without the ``:default`` tag (as SnapshotService.find)."""
        name, tag = split_name(ref)
        return self.records.find(name) if tag in (None, "default") else None

    def delete(self, ref: str) -> bool:
        snap = self.find(ref)
        if snap is None:
            return False
        node = self.orch.nodes.get(snap.node_id) if snap.node_id else None
        if node is None or node.state == GONE:  # its capture went with its node
            deleted = self.records.delete(snap.snapshot_id)
        else:
            deleted = self.orch.clients.get(node.node_id, node.address).delete_snapshot(snap.snapshot_id)
        if deleted and snap.checksum:  # copies other nodes fetched (cluster/snapshot_copies.py)
            for other in self.orch.nodes.all():
                if other.state == GONE or other.node_id == snap.node_id:
                    continue
                try:  # a node missed here drops them at its start or its next fetch
                    self.orch.clients.get(other.node_id, other.address).drop_snapshot_copies(snap.snapshot_id)
                except SandboxError as exc:
                    log.warning("snapshot %s: node %s kept its copies: %s", snap.snapshot_id, other.node_id,
                                exc.message)
        return deleted

    def seed_for(self, ref: str) -> Seed | None:
        """Which snapshot a create starts from (its capture is on ``node_of``'s node, which
        seeds the sandbox from it: ``captured`` is only a name here)."""
        snap = self.find(ref)
        if snap is None:
            return None
        return Seed(captured=Path(snap.snapshot_id), template_id=snap.snapshot_id,
                    alias=snap.name or snap.snapshot_id, build_id=snap.build_id, runtime=snap.runtime,
                    resources=Resources(snap.cpu_count, snap.memory_mb, snap.disk_size_mb))

    def env_of(self, ref: str) -> dict[str, str]:
        snap = self.find(ref)
        return dict(snap.env_vars or {}) if snap else {}
