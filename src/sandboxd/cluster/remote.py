"""The API replica's orchestrator: the Orchestrator's method shapes, carried out by the nodes.

``sandboxd api`` gives the unchanged API routes this object where ``serve`` gives them its
local :class:`~sandboxd.orchestrator.sandboxes.Orchestrator`: a create is placed on a node
(placement.py) and sent there; every call naming a sandbox goes to the node its record names.
Records are read from the shared database (unscoped: every node's).
"""

from __future__ import annotations

import logging
from typing import Any

from sandboxd.cluster.node_client import NodeClient, NodeClients, NodeUnreachable
from sandboxd.cluster.placement import order
from sandboxd.cluster.snapshot_copies import final_error, movable
from sandboxd.config import Settings
from sandboxd.orchestrator.egress import EgressPolicy
from sandboxd.orchestrator.logs import LogEntry
from sandboxd.orchestrator.sandboxes import CreateRequest, Resources, SandboxError, resources_of
from sandboxd.proxy.asgi import Upstream
from sandboxd.store.db import Database, SandboxRow
from sandboxd.store.nodes_db import ACTIVE, GONE, NodeRow, Nodes
from sandboxd.store.snapshots_db import SnapshotRow, Snapshots
from sandboxd.store.templates_db import TemplateBuilds

log = logging.getLogger("sandboxd.cluster")
#: nodes one create tries before it gives up (each refusal is "full" or "unreachable")
MAX_TRIES = 3
#: what the SDK is told to wait before it tries a create again when no node has room
FULL_RETRY_AFTER_S = 5


class NoPool:
    """The API replica runs no sandboxes, so no warm pool (its ``/health`` says 0)."""

    @staticmethod
    def ready_count(_key: object = None) -> int:
        return 0


class RemoteLogs:
    """The log store's ``entries`` over the nodes: the node the sandbox's record names, or, for a
    sandbox already killed (no record), every node that is not gone (its node keeps its logs)."""

    def __init__(self, orch: ClusterOrchestrator) -> None:
        self._orch = orch

    def entries(self, sandbox_id: str) -> list[LogEntry] | None:
        client = self._orch.client_of(sandbox_id)
        if client is not None:
            clients = [client]
        else:
            clients = [self._orch.clients.get(n.node_id, n.address) for n in self._orch.nodes.all() if n.state != GONE]
        for c in clients:
            try:
                lines = c.log_lines(sandbox_id)
            except NodeUnreachable:
                continue
            if lines is not None:
                return [LogEntry.from_line(line) for line in lines]
        return None


class RemoteSamples:
    """The metric samples' ``series``/``latest`` over the nodes: each node samples its own
    sandboxes (its lifespan's sampler) and serves them; a sandbox whose node is not known (killed,
    node gone) has none here."""

    def __init__(self, orch: ClusterOrchestrator) -> None:
        self._orch = orch

    def series(self, sandbox_id: str, start: int | None = None, end: int | None = None) -> list[dict[str, Any]] | None:
        client = self._orch.client_of(sandbox_id)
        data = client.metrics(sandbox_id, start, end) if client is not None else None
        return None if data is None else data.get("series")

    def latest(self, sandbox_id: str) -> dict[str, Any] | None:
        client = self._orch.client_of(sandbox_id)
        data = client.metrics(sandbox_id, latest=True) if client is not None else None
        return None if data is None else data.get("latest")

    @staticmethod
    def sample_one(_row: SandboxRow, _address: str) -> None:
        """Never called: the API replica has no route to a sandbox (``upstream`` is None); the
        node samples on demand."""
        return None


class ClusterOrchestrator:
    """What the API routes call in cluster mode (see module doc)."""

    def __init__(self, settings: Settings, db: Database, clients: NodeClients) -> None:
        self.settings = settings
        self.db = db
        self.nodes = Nodes(db)
        self.clients = clients
        self.pool = NoPool()
        self.logs = RemoteLogs(self)

    # -- placing a create ----------------------------------------------------------------------

    def resources_for(self, template: str) -> Resources:
        return resources_of(self.settings, TemplateBuilds(self.db).resources(template))

    def create(self, req: CreateRequest) -> SandboxRow:
        """On the best node with room; a node that is full or does not answer passes it on. All
        full: 503 with Retry-After, in E2B's error shape."""
        holder = self._holder_of_volumes(req.volume_mounts) if req.volume_mounts else None
        bound = ""  # why the sandbox can start on its snapshot's node alone
        if req.seed is not None:
            need = req.seed.resources
            snap, of_snapshot = self._holder_of_snapshot(req.seed.template_id)
            bound = movable(snap) or ""
            name = snap.name or snap.snapshot_id
            if holder is not None and holder.node_id != of_snapshot.node_id and bound:
                raise SandboxError(400, f"volumeMounts: the volumes are on node {holder.node_id} and the snapshot "
                                        f"on node {of_snapshot.node_id}; a sandbox starts where both are "
                                        f"(snapshot '{name}' cannot move: {bound})")
            if holder is not None:  # the volumes' node (it fetches the snapshot if it is not the holder)
                candidates = [holder]
            elif bound:
                if of_snapshot.state != ACTIVE:
                    raise final_error(503, f"snapshot '{name}' starts only on node {of_snapshot.node_id}, which is "
                                            f"{of_snapshot.state}: {bound}")
                candidates = [of_snapshot]
            else:  # the holder if it can take it, else another node, which fetches the snapshot verified
                placeable = order(self.nodes.active(), need.cpu_count, need.memory_mb, snap.build_id,
                                  self.settings.placement_choices, self.settings.node_timeout_s, self.nodes.clock())
                candidates = ([n for n in placeable if n.node_id == of_snapshot.node_id]
                              + [n for n in placeable if n.node_id != of_snapshot.node_id])
        elif holder is not None:
            need = self.resources_for(req.template)
            candidates = [holder]
        else:
            need = self.resources_for(req.template)
            found = TemplateBuilds(self.db).lookup(req.template)
            candidates = order(self.nodes.active(), need.cpu_count, need.memory_mb,
                               found.build_id if found else None, self.settings.placement_choices,
                               self.settings.node_timeout_s, self.nodes.clock())
        if not candidates:
            raise SandboxError(503, f"no node has room for a sandbox of {need.cpu_count} vCPUs and "
                                    f"{need.memory_mb} MiB right now; try again later",
                               headers={"Retry-After": str(FULL_RETRY_AFTER_S)})
        refusals: list[str] = []
        for node in candidates[:MAX_TRIES]:
            client = self.clients.get(node.node_id, node.address)
            try:
                sandbox_id = client.create(req)
            except NodeUnreachable as exc:
                refusals.append(exc.message)
                log.warning("create passed on: %s", exc.message)
                continue
            except SandboxError as exc:
                if exc.error_code != "node_full":
                    raise
                refusals.append(exc.message)
                log.info("create passed on: %s", exc.message)
                continue
            row = self.db.get_sandbox(sandbox_id)
            if row is None:  # killed (or its node given up) between its start and this read
                raise SandboxError(500, f"sandbox {sandbox_id} ended right after it started on node {node.node_id}")
            return row
        why = f" (the snapshot starts only on its node: {bound})" if bound else ""
        raise SandboxError(503, "no node could take the sandbox: " + "; ".join(refusals) + why,
                           headers={"Retry-After": str(FULL_RETRY_AFTER_S)})

    def _holder_of_snapshot(self, snapshot_id: str) -> tuple[SnapshotRow, NodeRow]:
        """The snapshot and the node whose data dir holds its capture. A holder that has left the
        cluster (given up: no heartbeat) took the files with it: 503 naming it (it may come back)."""
        snap = Snapshots(self.db).find(snapshot_id)
        if snap is None:
            raise SandboxError(404, f"snapshot '{snapshot_id}' not found")
        node = self.nodes.get(snap.node_id) if snap.node_id else None
        if node is None or node.state == GONE:
            raise final_error(503, f"snapshot '{snap.name or snap.snapshot_id}' is held by node {snap.node_id}, "
                                    "which is not in the cluster now (its files are on that node alone); it can "
                                    "start again once that node is back")
        return snap, node

    def _holder_of_volumes(self, mounts: tuple[dict[str, str], ...]) -> NodeRow:
        """The one node whose data dir holds every volume a create mounts (they are bound, not copied)."""
        from sandboxd.orchestrator.volumes import Volumes

        volumes = Volumes(self.db, self.settings.data_dir)
        held: dict[str, str] = {}
        for m in mounts:
            row = volumes.find(m["volumeID"])
            held[m["volumeID"]] = row.node_id if row is not None and row.node_id else "?"
        if len(set(held.values())) > 1:
            raise SandboxError(400, "volumeMounts: the volumes are on different nodes ("
                                    + ", ".join(f"{v} on {n}" for v, n in held.items())
                                    + "); a sandbox can mount the volumes of one node")
        node_id = next(iter(held.values()))
        node = self.nodes.get(node_id)
        if node is None or node.state == GONE:
            raise SandboxError(503, f"volumeMounts: the volumes are held by node {node_id}, which is not in "
                                    "the cluster now")
        return node

    # -- calls naming a sandbox ----------------------------------------------------------------

    def client_of(self, sandbox_id: str) -> NodeClient | None:
        """The client of the node that holds the sandbox; None: no such sandbox (anymore)."""
        row = self.db.get_sandbox(sandbox_id)
        if row is None or row.node_id is None:
            return None
        node = self.nodes.get(row.node_id)
        if node is None or node.state == GONE:
            return None
        return self.clients.get(node.node_id, node.address)

    def kill(self, sandbox_id: str, wait: bool = False, reason: str = "api") -> bool:
        client = self.client_of(sandbox_id)
        return client is not None and client.kill(sandbox_id)

    def pause(self, sandbox_id: str, memory: bool = True, strict: bool = False) -> bool | None:
        client = self.client_of(sandbox_id)
        return None if client is None else client.pause(sandbox_id, memory, strict)

    def resume(self, sandbox_id: str, timeout_s: int | None, memory: bool = True) -> SandboxRow | None:
        client = self.client_of(sandbox_id)
        if client is None or not client.resume(sandbox_id, timeout_s, memory):
            return None
        return self.db.get_sandbox(sandbox_id)

    def connect(self, sandbox_id: str, timeout_s: int | None) -> SandboxRow | None:
        row = self.db.get_sandbox(sandbox_id)
        if row is None or row.state != "running":
            return None  # a paused one: the route resumes it (resume goes to its node)
        client = self.client_of(sandbox_id)
        if client is None or not client.connect(sandbox_id, timeout_s):
            return None
        return self.db.get_sandbox(sandbox_id)

    def set_timeout(self, sandbox_id: str, timeout_s: int) -> bool:
        client = self.client_of(sandbox_id)
        return client is not None and client.set_timeout(sandbox_id, timeout_s)

    def update_network(self, sandbox_id: str, policy: EgressPolicy) -> SandboxRow | None:
        client = self.client_of(sandbox_id)
        if client is None or not client.update_network(sandbox_id, policy):
            return None
        return self.db.get_sandbox(sandbox_id)

    def upstream(self, sandbox_id: str) -> Upstream | None:
        """Sandboxes are not reached from the API replica directly (the proxy forwards to their
        node), so on-demand metric samples are not taken here."""
        return None
