"""Volumes in cluster mode, the API replica's side: the :class:`Volumes` shape (api/volumes.py
cannot tell), each volume's files on one node.

A volume is made by a node (placed as a sandbox is, needing no room) in its own data dir, and its
record names that node (``volumes.node_id``). Listing and lookups read the records; destroying
goes to that node (the record alone once the node is gone); the content API
(``/volumecontent/<id>/...``) is forwarded there by the cluster proxy; a sandbox mounting it is
placed there (``ClusterOrchestrator.create``).
"""

from __future__ import annotations

from sandboxd.cluster.placement import order
from sandboxd.cluster.remote import MAX_TRIES, ClusterOrchestrator
from sandboxd.orchestrator.sandboxes import SandboxError
from sandboxd.orchestrator.volumes import VolumeError, VolumeRow, Volumes
from sandboxd.store.nodes_db import GONE


class ClusterVolumes(Volumes):
    """``create`` and ``destroy`` carried out by the volume's node; the rest reads the records."""

    def __init__(self, orch: ClusterOrchestrator) -> None:
        super().__init__(orch.db, orch.settings.data_dir)
        self.orch = orch

    def create(self, name: str) -> VolumeRow:
        candidates = order(self.orch.nodes.active(), 0, 0, None, self.orch.settings.placement_choices,
                           self.orch.settings.node_timeout_s, self.orch.nodes.clock())
        if not candidates:
            raise VolumeError(503, "no active node can hold a volume right now; try again later")
        last: SandboxError | None = None
        for node in candidates[:MAX_TRIES]:
            try:
                volume_id = self.orch.clients.get(node.node_id, node.address).create_volume(name)
            except SandboxError as exc:
                if exc.status != 503:
                    raise VolumeError(exc.status, exc.message) from exc
                last = exc
                continue
            row = self.find(volume_id)
            if row is None:
                raise VolumeError(500, f"volume {volume_id} was made on node {node.node_id} but has no record")
            return row
        raise VolumeError(503, f"no node could make the volume: {last.message if last else '?'}")

    def destroy(self, volume_id: str, users: list[str]) -> bool:
        row = self.destroyable(volume_id, users)
        if row is None:
            return False
        node = self.orch.nodes.get(row.node_id) if row.node_id else None
        if node is None or node.state == GONE:  # its files went with its node: the record alone
            return super().destroy(volume_id, [])
        try:
            return self.orch.clients.get(node.node_id, node.address).destroy_volume(volume_id)
        except SandboxError as exc:
            raise VolumeError(exc.status, exc.message) from exc
