"""Snapshot records: what a sandbox created from a snapshot starts from (its template build, its
resources and env vars), beside the snapshot's disk image (see orchestrator/snapshots.py)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, DateTime, Integer, String, select
from sqlalchemy.orm import Mapped, mapped_column

from sandboxd.store.db import Base, Database, utcnow


class SnapshotRow(Base):
    """One snapshot. ``name`` (optional, unique) is what E2B calls the snapshot template's alias;
    taking a snapshot under an existing name gives that snapshot new contents."""

    __tablename__ = "snapshots"
    snapshot_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200), unique=True, nullable=True)
    sandbox_id: Mapped[str] = mapped_column(String(64), index=True)  # the sandbox it was taken of
    template_id: Mapped[str] = mapped_column(String(64))  # that sandbox's template
    build_id: Mapped[str] = mapped_column(String(64))
    runtime: Mapped[str] = mapped_column(String(32))
    cpu_count: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_size_mb: Mapped[int] = mapped_column(Integer)
    env_vars: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    #: the node whose data dir holds the capture (cluster mode: sandboxes from it start there)
    node_id: Mapped[str | None] = mapped_column(String(64), nullable=True, default=None)
    #: sha256 of the capture's files (``capture_checksum``), recorded when it was taken: a node
    #: fetching the capture from ``node_id`` checks its copy against this before any sandbox
    #: starts from it (None: taken before checksums were recorded, or a capture with memory)
    checksum: Mapped[str | None] = mapped_column(String(64), nullable=True, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Snapshots:
    """Repository for snapshot records."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.create_tables()  # our table, if this database predates it

    def put(self, **fields: object) -> SnapshotRow:
        """Add a snapshot, or replace the record of the one with this id."""
        with self.db.session() as s:
            row = s.get(SnapshotRow, fields["snapshot_id"])
            if row is None:
                row = SnapshotRow(**fields)
                s.add(row)
            else:
                for k, v in fields.items():
                    setattr(row, k, v)
            return row

    def find(self, ref: str) -> SnapshotRow | None:
        """By snapshot id or name."""
        with self.db.session() as s:
            row = s.get(SnapshotRow, ref)
            return row or s.scalars(select(SnapshotRow).where(SnapshotRow.name == ref)).first()

    def list(self) -> list[SnapshotRow]:
        with self.db.session() as s:
            return list(s.scalars(select(SnapshotRow)))

    def delete(self, snapshot_id: str) -> bool:
        with self.db.session() as s:
            row = s.get(SnapshotRow, snapshot_id)
            if row is None:
                return False
            s.delete(row)
            return True
