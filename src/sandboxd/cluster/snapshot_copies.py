"""Snapshots between nodes: a filesystem snapshot starts on any node, verified.

A snapshot's capture is in the data dir of the node that took it (its holder,
``snapshots.node_id``). The API places a sandbox from it on the holder first; when the holder
cannot take it (full, draining) another node gets it and fetches the capture from the holder by
snapshot id (``GET /internal/v1/snapshots/<id>``: a tar of the capture dir, sparse), unpacks it in
its ``snapshot-copies/.fetch-*`` and keeps it (``snapshot-copies/<id>-<sum>``) only if its
``capture_checksum`` is the one recorded when the snapshot was taken (``snapshots.checksum``),
never the sender's word; anything else is removed and no sandbox starts (502 naming the holder).

Only gVisor captures move (``movable``): a gVisor capture is a whole ext4 image of the sandbox's
writes over the build, which every node gets verified by build id. A microVM capture is its
disk's dirty blocks over the holder's own ``rootfs.ext4`` of the build, plus (by default) QEMU's
memory and device state, which another host's QEMU and CPU need not restore: those start on the
holder alone, and the API says so when it cannot take them.

A copy is named by the checksum it has, so a snapshot re-taken under its name (same id, new
contents, new sum) is fetched again, never served stale; copies of snapshots that are gone or
were re-taken are removed at the node's start and before each fetch, and the API asks every node
to drop its copies when a snapshot is deleted.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx

from sandboxd.cluster.auth import SECRET_HEADER
from sandboxd.cluster.builds import _download_into, stream_tar
from sandboxd.cluster.node_api import PREFIX
from sandboxd.cluster.tls import ClusterTls
from sandboxd.orchestrator.sandboxes import Resources, SandboxError, Seed
from sandboxd.orchestrator.snapshots import SnapshotService, capture_checksum
from sandboxd.store.nodes_db import GONE, Nodes
from sandboxd.store.snapshots_db import SnapshotRow, Snapshots
from sandboxd.templates.store import BuildError, remove_tree

log = logging.getLogger("sandboxd.cluster")
#: snapshot ids are ours (new_id) or names (E2B's alias rule): never a path
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def final_error(status: int, message: str) -> SandboxError:
    """An error the SDK is told not to retry (``Should-Retry: false``): retrying cannot help."""
    exc = SandboxError(status, message)
    exc.final = True
    return exc


def movable(snap: SnapshotRow) -> str | None:
    """None if another node may start a sandbox from a copy of ``snap``; else why not."""
    if snap.runtime != "gvisor":
        return (f"it is a {snap.runtime} capture (its disk's dirty blocks over node {snap.node_id}'s own "
                "image of the build, and its memory unless taken with mode='filesystem'), which only that "
                "node restores")
    if not snap.checksum:
        return "it was taken before snapshots recorded a checksum, so a copy of it could not be verified"
    return None


def tar_stream(captured: Path) -> Iterator[bytes]:
    """A capture dir as a tar (sparse: a disk image's holes are not sent), streamed."""
    return stream_tar(["--sparse", "--numeric-owner", "-C", str(captured), "-cf", "-", "."],
                      f"capture {captured.name}")


class SnapshotCopies:
    """A node's verified copies of other nodes' snapshots: ``seed_for(ref)`` fetches one if
    needed and returns what a create starts from (``SandboxError`` if it cannot be had)."""

    def __init__(self, snapshots: SnapshotService, nodes: Nodes, node_id: str, secret: str,
                 tls: ClusterTls | None = None) -> None:
        self.snapshots = snapshots
        self.records: Snapshots = snapshots.records
        self.nodes = nodes
        self.node_id = node_id
        self.root = snapshots.orch.settings.data_dir / "snapshot-copies"
        self.root.mkdir(parents=True, exist_ok=True)
        self._headers = {SECRET_HEADER.decode(): secret}
        self._tls = tls
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        for leftover in self.root.glob(".*"):  # a fetch cut short by a crash
            remove_tree(leftover)
        self.prune()

    def copy_path(self, snap: SnapshotRow) -> Path:
        return self.root / f"{snap.snapshot_id}-{snap.checksum}"

    def prune(self, snapshot_id: str | None = None) -> int:
        """Remove the copies of snapshots that are gone or re-taken (``snapshot_id``: every copy
        of that one); how many."""
        current = {self.copy_path(r).name for r in self.records.list() if r.checksum and r.snapshot_id != snapshot_id}
        removed = 0
        for d in self.root.iterdir():
            if not d.name.startswith(".") and d.name not in current:
                remove_tree(d)
                removed += 1
        return removed

    def seed_for(self, ref: str) -> Seed:
        """A seed over this node's verified copy of snapshot ``ref`` (fetched from its holder now
        if this node has none of its current contents)."""
        snap = self.snapshots.find(ref)
        if snap is None:
            raise SandboxError(404, f"snapshot '{ref}' not found")
        if snap.node_id == self.node_id:
            raise SandboxError(500, f"snapshot '{ref}': its capture is missing from node {self.node_id}, which "
                                    "took it (its data dir lost it)")
        if (why := movable(snap)) is not None:
            raise SandboxError(409, f"snapshot '{ref}' starts only on node {snap.node_id}: {why}")
        with self._guard:
            lock = self._locks.setdefault(snap.snapshot_id, threading.Lock())
        with lock:  # one fetch per snapshot; other creates wait for it
            path = self.copy_path(snap)
            if not path.is_dir():
                self.prune()
                self._fetch(snap, path)
        return Seed(captured=path, template_id=snap.snapshot_id, alias=snap.name or snap.snapshot_id,
                    build_id=snap.build_id, runtime=snap.runtime,
                    resources=Resources(snap.cpu_count, snap.memory_mb, snap.disk_size_mb))  # files alone

    def _fetch(self, snap: SnapshotRow, dest: Path) -> None:
        holder = self.nodes.get(snap.node_id) if snap.node_id else None
        if holder is None or holder.state == GONE:
            raise final_error(503, f"snapshot '{snap.name or snap.snapshot_id}' is held by node {snap.node_id}, "
                                    "which is not in the cluster now: its files are on that node alone")
        assert snap.checksum is not None
        tmp = self.root / f".fetch-{snap.snapshot_id}-{secrets.token_hex(4)}"
        tmp.mkdir()
        log.info("fetching snapshot %s from node %s", snap.snapshot_id, holder.node_id)
        try:
            try:
                _download_into(f"{holder.address.rstrip('/')}{PREFIX}/snapshots/{snap.snapshot_id}", self._headers,
                               tmp, ClusterTls.verify(self._tls))
            except (httpx.HTTPError, BuildError, OSError) as exc:
                raise SandboxError(503, f"snapshot '{snap.name or snap.snapshot_id}' could not be fetched from "
                                        f"node {holder.node_id}, which holds it: {exc}",
                                   headers={"Retry-After": "5"}) from exc
            actual = capture_checksum(tmp)
            if actual != snap.checksum:  # final: a retry would fetch the same bytes (Should-Retry: false)
                raise final_error(502, f"snapshot '{snap.name or snap.snapshot_id}': the copy fetched from node "
                                        f"{holder.node_id} was refused: its checksum {actual[:12]}… is not the "
                                        f"{snap.checksum[:12]}… recorded when it was taken (corrupt or partial); "
                                        "no sandbox was started from it")
            tmp.rename(dest)
        finally:
            if tmp.exists():
                remove_tree(tmp)
        log.info("snapshot %s fetched from node %s and verified (%s…)", snap.snapshot_id, holder.node_id,
                 snap.checksum[:12])


def valid_id(snapshot_id: str) -> bool:
    return _ID.fullmatch(snapshot_id) is not None
