"""Node membership: which nodes exist, what each can still take, and whether it is alive.

Every node (``sandboxd serve`` is one, ``sandboxd node`` one per machine) registers a row and
rewrites its heartbeat, free resources and the template builds it holds every few seconds. A
heartbeat's time is the database's (``now()`` on PostgreSQL), and so is the time it is judged
against: the nodes' and API replicas' own clocks, skewed or not, never decide who is alive. Any
process may :meth:`Nodes.sweep`: a node whose heartbeat is older than the timeout becomes ``gone``
and its sandbox records are deleted in the same transaction (the API reports them gone; the node,
should it come back, tears down what it still runs: ``cluster/membership.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import JSON, DateTime, Integer, String, delete, select, update
from sqlalchemy.orm import Mapped, mapped_column

from sandboxd.store.db import Base, Database, SandboxRow, db_now, utcnow
from sandboxd.store.templates_db import ACTIVE as BUILDING
from sandboxd.store.templates_db import TemplateBuildLog, TemplateBuildRow

ACTIVE, DRAINING, GONE = "active", "draining", "gone"
STATES = (ACTIVE, DRAINING, GONE)


class NodeRow(Base):
    """One node. ``address`` is where the API reaches its internal API (empty: in-process)."""

    __tablename__ = "nodes"
    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(256), default="")
    state: Mapped[str] = mapped_column(String(16), default=ACTIVE)
    vcpus: Mapped[int] = mapped_column(Integer)  # capacity: vCPUs its sandboxes may be given in total
    memory_mb: Mapped[int] = mapped_column(Integer)
    free_vcpus: Mapped[int] = mapped_column(Integer)
    free_memory_mb: Mapped[int] = mapped_column(Integer)
    sandboxes: Mapped[int] = mapped_column(Integer, default=0)
    #: template build ids this node holds (placement prefers a node that need not fetch one)
    builds: Mapped[list[str]] = mapped_column(JSON, default=list)
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BuildChecksumRow(Base):
    """The rootfs checksum of a template build, recorded by the node that built (and verified) it:
    a node fetching the build from another checks what it got against this, not the sender's word."""

    __tablename__ = "build_checksums"
    build_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    recorded_by: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


@dataclass(frozen=True)
class Usage:
    """What a node reports on each heartbeat."""

    free_vcpus: int
    free_memory_mb: int
    sandboxes: int
    builds: list[str]


class Nodes:
    """Repository of node rows."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.create_tables()

    def register(self, node_id: str, address: str, vcpus: int, memory_mb: int, usage: Usage) -> NodeRow:
        """Add the node, or bring it back: a node that was ``gone`` is ``active`` again; one
        that was draining stays draining (an operator asked for it)."""
        with self.db.session() as s:
            now = db_now(s)
            row = s.get(NodeRow, node_id)
            if row is None:
                row = NodeRow(node_id=node_id, registered_at=now)
                s.add(row)
            if row.state != DRAINING:
                row.state = ACTIVE
            row.address, row.vcpus, row.memory_mb, row.heartbeat_at = address, vcpus, memory_mb, now
            _apply(row, usage)
            return row

    def heartbeat(self, node_id: str, usage: Usage) -> str | None:
        """Record that the node is alive and what it has free; its state before this beat
        (None: no row: it was removed). A ``gone`` node is not revived here: the caller
        reconciles first (its sandboxes' records were deleted) and registers again."""
        with self.db.session() as s:
            row = s.get(NodeRow, node_id)
            if row is None:
                return None
            if row.state != GONE:
                row.heartbeat_at = db_now(s)  # the database's clock: a node's own may be skewed
                _apply(row, usage)
            return row.state

    def sweep(self, timeout_s: float, now: datetime | None = None) -> list[str]:
        """Mark every node silent for longer than ``timeout_s`` gone, delete its sandboxes' records
        and fail the template builds it had, together; the ids of the nodes it marked. Judged by
        the database's clock (the one the heartbeats were written with), never the sweeping
        process's."""
        with self.db.session() as s:
            cutoff = (now or db_now(s)) - timedelta(seconds=timeout_s)
            stale = list(s.scalars(select(NodeRow.node_id).where(NodeRow.state != GONE,
                                                                 NodeRow.heartbeat_at < cutoff)
                                   .with_for_update(skip_locked=True)))
            if not stale:
                return []
            s.execute(update(NodeRow).where(NodeRow.node_id.in_(stale)).values(state=GONE))
            s.execute(delete(SandboxRow).where(SandboxRow.node_id.in_(stale)))
            for build in s.scalars(select(TemplateBuildRow).where(TemplateBuildRow.node_id.in_(stale),
                                                                  TemplateBuildRow.status.in_(BUILDING))):
                why = node_lost(build.node_id or "?", timeout_s)
                s.add(TemplateBuildLog(build_id=build.build_id, level="error", message=why))
                build.status, build.reason, build.reason_step, build.finished_at = "error", why, None, utcnow()
            return stale

    def set_state(self, node_id: str, state: str) -> bool:
        if state not in STATES:
            raise ValueError(f"node state must be one of {', '.join(STATES)}")
        with self.db.session() as s:
            row = s.get(NodeRow, node_id)
            if row is None:
                return False
            row.state = state
            return True

    def get(self, node_id: str) -> NodeRow | None:
        with self.db.session() as s:
            return s.get(NodeRow, node_id)

    def clock(self) -> datetime:
        """The database's time, which heartbeats are written and judged by."""
        with self.db.session() as s:
            return db_now(s)

    def all(self) -> list[NodeRow]:
        with self.db.session() as s:
            return list(s.scalars(select(NodeRow).order_by(NodeRow.registered_at, NodeRow.node_id)))

    def active(self) -> list[NodeRow]:
        """Nodes new sandboxes may be placed on."""
        with self.db.session() as s:
            return list(s.scalars(select(NodeRow).where(NodeRow.state == ACTIVE).order_by(NodeRow.node_id)))

    def record_checksums(self, node_id: str, checksums: dict[str, str]) -> None:
        """Record builds' rootfs checksums; one already recorded is kept (the first word stands:
        a build id names its bytes, so a second, different checksum would be a corrupt copy)."""
        with self.db.session() as s:
            known = set(s.scalars(select(BuildChecksumRow.build_id)
                                  .where(BuildChecksumRow.build_id.in_(list(checksums)))))
            for build_id, sha in checksums.items():
                if build_id not in known:
                    s.add(BuildChecksumRow(build_id=build_id, sha256=sha, recorded_by=node_id))

    def checksum(self, build_id: str) -> str | None:
        with self.db.session() as s:
            row = s.get(BuildChecksumRow, build_id)
            return row.sha256 if row else None

    def holders(self, build_id: str) -> list[NodeRow]:
        """Nodes, not gone, that reported holding the build (freshest heartbeat first)."""
        return sorted((n for n in self.all() if n.state != GONE and build_id in (n.builds or [])),
                      key=lambda n: n.heartbeat_at, reverse=True)

    def remove(self, node_id: str) -> bool:
        with self.db.session() as s:
            row = s.get(NodeRow, node_id)
            if row is None:
                return False
            s.delete(row)
            return True


def node_lost(node_id: str, timeout_s: float | None = None) -> str:
    """Why a build ended when its node did."""
    silent = f" (no heartbeat for {timeout_s:.0f}s)" if timeout_s is not None else ""
    return f"the node running this build, {node_id}, left the cluster{silent}; the build was lost: build again"


def _apply(row: NodeRow, usage: Usage) -> None:
    row.free_vcpus, row.free_memory_mb = usage.free_vcpus, usage.free_memory_mb
    row.sandboxes, row.builds = usage.sandboxes, sorted(usage.builds)
