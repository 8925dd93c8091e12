"""Template build records: status, log entries and tags (same engine and ``Base`` as db.py).

Two ids, on purpose: the SDK's ``buildID`` is a request id (a UUID handed out by
``POST /v3/templates`` before any step is known), while the build itself is identified by its
content hash in the template store (``store_build_id``). A tag or alias always points at a
content id, so it can only ever name bytes that were built and verified.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import JSON, DateTime, Integer, String, Text, delete, select
from sqlalchemy.orm import Mapped, mapped_column

from sandboxd.store.db import Base, Database, SandboxRow, TemplateAlias, new_id, utcnow

DEFAULT_TAG = "default"
ACTIVE = ("waiting", "building")


class TemplateBuildRow(Base):
    """One build request and how it went."""

    __tablename__ = "template_builds"
    build_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    template_id: Mapped[str] = mapped_column(String(64), index=True)
    alias: Mapped[str] = mapped_column(String(200))
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16))  # waiting | building | ready | error
    store_build_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    reason_step: Mapped[str | None] = mapped_column(String(32), nullable=True)
    cpu_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    memory_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    min_free_disk_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: the node that runs the build (and keeps its COPY uploads): chosen when it is requested
    node_id: Mapped[str | None] = mapped_column(String(64), nullable=True, default=None)


class TemplateBuildLog(Base):
    """One log entry of a build; ``id`` gives the order the status endpoint serves them in."""

    __tablename__ = "template_build_logs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    build_id: Mapped[str] = mapped_column(String(64), index=True)
    timestamp: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    level: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(Text)
    step: Mapped[str | None] = mapped_column(String(32), nullable=True)


class TemplateTagRow(Base):
    """``name:tag`` → the build it names (request id for the SDK, content id for sandboxes)."""

    __tablename__ = "template_tags"
    template_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tag: Mapped[str] = mapped_column(String(200), primary_key=True)
    build_id: Mapped[str] = mapped_column(String(64))
    store_build_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


@dataclass(frozen=True)
class BuildResources:
    """What a template build asked its sandboxes to get; None: the server's default."""

    cpu_count: int | None = None
    memory_mb: int | None = None
    min_free_disk_mb: int | None = None


@dataclass(frozen=True)
class LogEntry:
    timestamp: datetime
    level: str
    message: str
    step: str | None


def split_name(name: str) -> tuple[str, str | None]:
    """``name:tag`` → (name, tag); a plain name has no tag."""
    alias, sep, tag = name.partition(":")
    return alias, (tag if sep else None)


class TemplateBuilds:
    """Repository for build requests, their logs and tags."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.create_tables()  # our tables, if this database predates them

    # -- requests ------------------------------------------------------------------------------

    def template_id_for(self, alias: str) -> str:
        """The template's id: the alias's, or one already handed out for a first build of it."""
        with self.db.session() as s:
            row = s.scalars(select(TemplateAlias).where(TemplateAlias.alias == alias)).first()
            if row is not None:
                return row.template_id
            pending = s.scalars(select(TemplateBuildRow.template_id).where(TemplateBuildRow.alias == alias)
                                .order_by(TemplateBuildRow.created_at)).first()
            return pending or new_id()

    def new_build(self, alias: str, tags: list[str], resources: BuildResources = BuildResources(),
                  node_id: str | None = None) -> TemplateBuildRow:
        row = TemplateBuildRow(build_id=str(uuid.uuid4()), template_id=self.template_id_for(alias), alias=alias,
                               tags=tags, status="waiting", cpu_count=resources.cpu_count,
                               memory_mb=resources.memory_mb, min_free_disk_mb=resources.min_free_disk_mb,
                               node_id=node_id)
        with self.db.session() as s:
            s.add(row)
        return row

    def get(self, build_id: str) -> TemplateBuildRow | None:
        with self.db.session() as s:
            return s.get(TemplateBuildRow, build_id)

    def set_status(self, build_id: str, status: str, *, store_build_id: str | None = None,
                   reason: str | None = None, step: str | None = None) -> None:
        with self.db.session() as s:
            row = s.get(TemplateBuildRow, build_id)
            if row is None:
                return
            row.status = status
            if store_build_id is not None:
                row.store_build_id = store_build_id
            if reason is not None:
                row.reason, row.reason_step = reason, step
            if status in ("ready", "error"):
                row.finished_at = utcnow()

    def latest(self, alias: str) -> TemplateBuildRow | None:
        """The newest build request of ``alias`` (a template may exist only as a build under way)."""
        with self.db.session() as s:
            return s.scalars(select(TemplateBuildRow).where(TemplateBuildRow.alias == alias)
                             .order_by(TemplateBuildRow.created_at.desc())).first()

    def active(self, node_id: str | None = None) -> list[TemplateBuildRow]:
        """Builds waiting or running (on ``node_id`` only, if given)."""
        q = select(TemplateBuildRow).where(TemplateBuildRow.status.in_(ACTIVE))
        if node_id is not None:
            q = q.where(TemplateBuildRow.node_id == node_id)
        with self.db.session() as s:
            return list(s.scalars(q))

    def newest(self, template_id: str) -> TemplateBuildRow | None:
        """The template's newest build request still waiting to start, else its newest one: where
        its COPY uploads go (the SDK uploads between the request and the start)."""
        with self.db.session() as s:
            rows = list(s.scalars(select(TemplateBuildRow).where(TemplateBuildRow.template_id == template_id)
                                  .order_by(TemplateBuildRow.created_at.desc()).limit(20)))
        return next((r for r in rows if r.status == "waiting"), rows[0] if rows else None)

    def fail(self, build_id: str, message: str, step: str | None = None) -> None:
        """End a build as failed, saying why (its last log entry and its reason)."""
        self.add_log(build_id, "error", message, step)
        self.set_status(build_id, "error", reason=message, step=step)

    # -- logs ----------------------------------------------------------------------------------

    def add_log(self, build_id: str, level: str, message: str, step: str | None = None) -> None:
        with self.db.session() as s:
            s.add(TemplateBuildLog(build_id=build_id, level=level, message=message, step=step))

    def logs(self, build_id: str, offset: int = 0, limit: int = 100) -> list[LogEntry]:
        with self.db.session() as s:
            rows = s.scalars(select(TemplateBuildLog).where(TemplateBuildLog.build_id == build_id)
                             .order_by(TemplateBuildLog.id).offset(offset).limit(limit))
            return [LogEntry(r.timestamp, r.level, r.message, r.step) for r in rows]

    def last_header(self, build_id: str) -> str | None:
        """The last step header logged (``[3/7] RUN ...``): how far a build got."""
        with self.db.session() as s:
            msg = s.scalars(select(TemplateBuildLog.message).where(TemplateBuildLog.build_id == build_id,
                                                                   TemplateBuildLog.message.like("[%"))
                            .order_by(TemplateBuildLog.id.desc())).first()
        return msg.splitlines()[0][:200] if msg else None

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, build_id: str, store_build_id: str, runtime: str | None) -> None:
        """A finished build: its tags point at it; the default tag also moves the alias (what
        ``Sandbox.create(name)`` starts). A template's first build makes the template exist even
        under another tag (``name`` then starts that build until a default is built or tagged)."""
        row = self.get(build_id)
        assert row is not None
        for tag in row.tags:
            self._set_tag(row.template_id, tag, build_id, store_build_id)
        if DEFAULT_TAG in row.tags or self.db.find_template(row.alias) is None:
            self.set_alias(row.alias, row.template_id, store_build_id, runtime, _resources(row))
        self.set_status(build_id, "ready", store_build_id=store_build_id)

    def set_alias(self, alias: str, template_id: str, store_build_id: str, runtime: str | None,
                  resources: BuildResources = BuildResources()) -> None:
        """Like ``Database.set_template`` but keeps the template id the SDK was given; records
        the resources the build asked for (its sandboxes get them)."""
        with self.db.session() as s:
            row = s.scalars(select(TemplateAlias).where(TemplateAlias.alias == alias)).first()
            if row is None:
                row = TemplateAlias(template_id=template_id, alias=alias, build_id=store_build_id, runtime=runtime)
                s.add(row)
            else:
                row.build_id, row.runtime, row.updated_at = store_build_id, runtime, utcnow()
            row.cpu_count, row.memory_mb = resources.cpu_count, resources.memory_mb
            row.min_free_disk_mb = resources.min_free_disk_mb

    def _set_tag(self, template_id: str, tag: str, build_id: str, store_build_id: str) -> None:
        with self.db.session() as s:
            row = s.get(TemplateTagRow, (template_id, tag))
            if row is None:
                s.add(TemplateTagRow(template_id=template_id, tag=tag, build_id=build_id,
                                     store_build_id=store_build_id))
            else:
                row.build_id, row.store_build_id, row.created_at = build_id, store_build_id, utcnow()

    # -- tags ----------------------------------------------------------------------------------

    def template(self, ref: str) -> TemplateAlias | None:
        return self.db.find_template(ref)

    def aliases(self) -> list[TemplateAlias]:
        """Every named template (``base`` and the built ones), oldest first."""
        with self.db.session() as s:
            return list(s.scalars(select(TemplateAlias).order_by(TemplateAlias.updated_at, TemplateAlias.alias)))

    def builds_of(self, template_id: str | None = None) -> list[TemplateBuildRow]:
        """Build requests of one template (or of all), newest first."""
        with self.db.session() as s:
            q = select(TemplateBuildRow).order_by(TemplateBuildRow.created_at.desc(), TemplateBuildRow.build_id)
            if template_id is not None:
                q = q.where(TemplateBuildRow.template_id == template_id)
            return list(s.scalars(q))

    def tags(self, template_id: str) -> list[TemplateTagRow]:
        with self.db.session() as s:
            return list(s.scalars(select(TemplateTagRow).where(TemplateTagRow.template_id == template_id)
                                  .order_by(TemplateTagRow.created_at, TemplateTagRow.tag)))

    def tag(self, template_id: str, tag: str) -> TemplateTagRow | None:
        with self.db.session() as s:
            return s.get(TemplateTagRow, (template_id, tag))

    def assign_tags(self, template_id: str, source: TemplateTagRow, tags: list[str], alias: str,
                    runtime: str | None) -> None:
        for tag in tags:
            self._set_tag(template_id, tag, source.build_id, source.store_build_id)
        if DEFAULT_TAG in tags:
            self.set_alias(alias, template_id, source.store_build_id, runtime, self._resources_of(source.build_id))

    def delete_tags(self, template_id: str, tags: list[str]) -> int:
        with self.db.session() as s:
            res = s.execute(delete(TemplateTagRow).where(TemplateTagRow.template_id == template_id,
                                                         TemplateTagRow.tag.in_(tags)))
            return int(getattr(res, "rowcount", 0) or 0)  # a CursorResult for DELETE

    def resolve(self, ref: str) -> str | None:
        """The content build id for ``name``, ``name:tag`` or a template id: the alias table for
        the default tag (it also holds ``base`` and other built-in templates), the tag table for
        any other tag."""
        name, tag = split_name(ref)
        row = self.db.find_template(name)
        if row is None:
            return None
        if tag in (None, DEFAULT_TAG):
            return row.build_id
        tagged = self.tag(row.template_id, tag)
        return tagged.store_build_id if tagged else None

    def lookup(self, ref: str) -> ResolvedTemplate | None:
        """The template ``ref`` names, its build id and that build's resources, from one read of
        its alias or tag: a tag moved meanwhile cannot pair one build with another's resources."""
        name, tag = split_name(ref)
        row = self.db.find_template(name)
        if row is None:
            return None
        if tag in (None, DEFAULT_TAG):
            return ResolvedTemplate(row, row.build_id, _resources(row))
        tagged = self.tag(row.template_id, tag)
        if tagged is None:
            return None
        return ResolvedTemplate(row, tagged.store_build_id, self._resources_of(tagged.build_id))

    def resources(self, ref: str) -> BuildResources:
        """What the build ``ref`` names asked its sandboxes to get."""
        name, tag = split_name(ref)
        row = self.db.find_template(name)
        if row is None:
            return BuildResources()
        if tag in (None, DEFAULT_TAG):
            return _resources(row)
        tagged = self.tag(row.template_id, tag)
        return self._resources_of(tagged.build_id) if tagged else BuildResources()

    def _resources_of(self, build_id: str) -> BuildResources:
        build = self.get(build_id)
        return _resources(build) if build else BuildResources()

    def referenced_builds(self) -> set[str]:
        """Content ids something points at (aliases, tags, sandboxes): never garbage."""
        with self.db.session() as s:
            ids = set(s.scalars(select(TemplateAlias.build_id)))
            ids |= set(s.scalars(select(TemplateTagRow.store_build_id)))
            ids |= set(s.scalars(select(SandboxRow.build_id)))
        return ids


@dataclass(frozen=True)
class ResolvedTemplate:
    """A template as one create sees it (see :meth:`TemplateBuilds.lookup`)."""

    template: TemplateAlias
    build_id: str
    resources: BuildResources


def _resources(row: TemplateBuildRow | TemplateAlias) -> BuildResources:
    return BuildResources(row.cpu_count, row.memory_mb, row.min_free_disk_mb)
