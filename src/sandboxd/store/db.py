"""The control plane's state: API keys, template aliases and sandbox records (SQLAlchemy 2.0).

SQLite in the data dir by default; any SQLAlchemy URL (PostgreSQL for a cluster) works, because
only portable column types are used. The repository functions below are the only code that
touches the tables, so the API and the orchestrator never write SQL.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, String, create_engine, event, inspect, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

API_KEY_PREFIX = "e2b_"


def utcnow() -> datetime:
    return datetime.now(UTC)


def db_now(s: Session) -> datetime:
    """The database's time (UTC): on PostgreSQL its server's ``now()``, the one clock every node
    and API replica shares (theirs may be skewed); SQLite is a file on this host, whose clock it is."""
    if s.get_bind().dialect.name == "postgresql":
        now = s.execute(text("SELECT now()")).scalar_one()
        assert isinstance(now, datetime)
        return now.astimezone(UTC)
    return utcnow()


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    """An API key, stored only as its SHA-256: a leaked database leaks no usable key."""

    __tablename__ = "api_keys"
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    mask: Mapped[str] = mapped_column(String(32))  # e2b_ab…yz, to tell keys apart in listings
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: quotas over the key's running sandboxes; None: no limit but the node's
    max_sandboxes: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    max_vcpus: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    max_memory_mb: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)

    @property
    def key_id(self) -> str:
        """What ``sandboxd keys`` names a key by (the start of its hash: no secret)."""
        return self.key_hash[:12]


class TemplateAlias(Base):
    """A template name (``base``) and the build id it currently points at."""

    __tablename__ = "templates"
    template_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    alias: Mapped[str] = mapped_column(String(200), unique=True)
    build_id: Mapped[str] = mapped_column(String(64))
    runtime: Mapped[str | None] = mapped_column(String(32), nullable=True)
    #: the resources of the build published under this alias (None: the server's defaults)
    cpu_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    memory_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    min_free_disk_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SandboxRow(Base):
    """One sandbox on this node. ``state`` is ``starting`` until envd answered, then ``running``."""

    __tablename__ = "sandboxes"
    sandbox_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    template_id: Mapped[str] = mapped_column(String(64))
    alias: Mapped[str | None] = mapped_column(String(200), nullable=True)
    build_id: Mapped[str] = mapped_column(String(64))
    runtime: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    slot_index: Mapped[int] = mapped_column(Integer)
    host_address: Mapped[str] = mapped_column(String(64))
    envd_access_token: Mapped[str] = mapped_column(String(128))
    envd_version: Mapped[str] = mapped_column(String(32))
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSON, default=dict)
    env_vars: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    cpu_count: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_size_mb: Mapped[int] = mapped_column(Integer)
    allow_internet_access: Mapped[bool] = mapped_column(default=True)
    auto_pause: Mapped[bool] = mapped_column(default=False)  # on timeout: pause instead of kill
    auto_pause_memory: Mapped[bool] = mapped_column(default=True)  # ... keeping memory, or the disk alone
    #: while paused: whether processes and memory were kept (else only the disk; resume boots)
    paused_memory: Mapped[bool | None] = mapped_column(nullable=True, default=None)
    envd_unresponsive_at_pause: Mapped[bool] = mapped_column(default=False)  # then it resumes only by booting
    #: egress rules (``EgressPolicy.to_json``); None: every public address, or none without internet access
    egress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, default=None)
    #: set when created with ``allowPublicTraffic: false``: the proxy then demands it on every port
    traffic_access_token: Mapped[str | None] = mapped_column(String(128), nullable=True, default=None)
    mask_request_host: Mapped[str | None] = mapped_column(String(256), nullable=True, default=None)
    https_ports: Mapped[list[int] | None] = mapped_column(JSON, nullable=True, default=None)
    auto_resume: Mapped[bool] = mapped_column(default=False)  # traffic to it while paused resumes it
    #: the SHA-256 of the API key that created it (its quota counts it); None: made before keys had quotas
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, default=None)
    #: volumes bound into it: [{"volumeID", "path"}] (E2B's volumeMounts, names resolved)
    volume_mounts: Mapped[list[dict[str, str]] | None] = mapped_column(JSON, nullable=True, default=None)
    #: ``<api key hash>:<Idempotency-Key>`` of the create that made it: a retried create returns it
    idempotency_key: Mapped[str | None] = mapped_column(String(320), nullable=True, default=None)
    #: the node that runs it (store/nodes_db.py); None: made before nodes were recorded (serve adopts it)
    node_id: Mapped[str | None] = mapped_column(String(64), nullable=True, default=None, index=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    end_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    def as_dict(self) -> dict[str, Any]:
        return {c.key: getattr(self, c.key) for c in self.__mapper__.column_attrs}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL so readers never wait for the writer; a busy timeout instead of 'database is locked'."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Database:
    """Engine + sessions + the repository operations the server needs.

    A node's orchestrator gets a database scoped to its ``node_id``: the sandboxes it lists (for
    recovery, the reaper, the sampler) are its own, and those it adds are recorded as its own. The
    API of a cluster lists every node's (unscoped). ``scoped`` shares the engine."""

    def __init__(self, url: str, node_id: str | None = None) -> None:
        self.engine: Engine = _engine(url)
        self.node_id = node_id
        self.create_tables()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def scoped(self, node_id: str | None) -> Database:
        """The same database (engine, pool) seen by one node."""
        other = object.__new__(Database)
        other.engine, other.node_id, other._sessions = self.engine, node_id, self._sessions
        return other

    def adopt_unowned(self) -> int:
        """Record sandboxes made before nodes were recorded as this node's (a single-node server
        upgraded in place: they are all its own)."""
        assert self.node_id is not None
        with self.session() as s:
            res = s.execute(update(SandboxRow).where(SandboxRow.node_id.is_(None)).values(node_id=self.node_id))
            return int(getattr(res, "rowcount", 0) or 0)

    def create_tables(self) -> None:
        """Every table of ``Base`` this database lacks, and every column added since it was made.
        On PostgreSQL under an advisory lock: API replicas and nodes starting together would
        otherwise race to create the same table; on SQLite in an exclusive transaction, for the same
        reason (two servers on one data dir, a CLI command beside a server)."""
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK})
            else:  # pysqlite runs DDL outside any transaction unless one is begun explicitly
                conn.exec_driver_sql("BEGIN EXCLUSIVE")
            Base.metadata.create_all(conn)
            _add_missing_columns(conn)
            conn.commit()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold ``name`` against every process on this database while the block runs (e.g. one
        create per Idempotency-Key across all API replicas). PostgreSQL: a session advisory lock
        on a connection kept for the block (a process that dies releases it with its connection);
        SQLite: a lock of this process (one host, one server)."""
        if self.engine.dialect.name != "postgresql":
            with _local_lock(name):
                yield
            return
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                try:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
                except Exception:  # a lost connection already released it; never reuse one holding it
                    conn.invalidate()
                    raise

    # -- API keys ----------------------------------------------------------------------------

    def create_api_key(self, name: str = "default", max_sandboxes: int | None = None,
                       max_vcpus: int | None = None, max_memory_mb: int | None = None) -> str:
        """A new key; the plain text is returned once and never stored."""
        key = API_KEY_PREFIX + secrets.token_hex(20)
        with self.session() as s:
            s.add(ApiKey(key_hash=_hash_key(key), name=name, mask=f"{key[:6]}…{key[-4:]}",
                         max_sandboxes=max_sandboxes, max_vcpus=max_vcpus, max_memory_mb=max_memory_mb))
        return key

    def api_key_valid(self, key: str) -> bool:
        with self.session() as s:
            return s.get(ApiKey, _hash_key(key)) is not None

    def get_api_key(self, key: str) -> ApiKey | None:
        with self.session() as s:
            return s.get(ApiKey, _hash_key(key))

    def list_api_keys(self) -> list[ApiKey]:
        with self.session() as s:
            return list(s.scalars(select(ApiKey).order_by(ApiKey.created_at)))

    def find_api_keys(self, ref: str) -> list[ApiKey]:
        """Keys whose id (hash prefix) starts with ``ref``, or whose name is ``ref``."""
        return [k for k in self.list_api_keys() if k.key_id.startswith(ref.lower()) or k.name == ref]

    def update_api_key(self, key_hash: str, **fields: Any) -> None:
        with self.session() as s:
            row = s.get(ApiKey, key_hash)
            if row is not None:
                for k, v in fields.items():
                    setattr(row, k, v)

    def delete_api_key(self, key_hash: str) -> bool:
        with self.session() as s:
            row = s.get(ApiKey, key_hash)
            if row is None:
                return False
            s.delete(row)
            return True

    def count_api_keys(self) -> int:
        with self.session() as s:
            return len(s.scalars(select(ApiKey.key_hash)).all())

    # -- templates ---------------------------------------------------------------------------

    def set_template(self, alias: str, build_id: str, runtime: str | None = None) -> TemplateAlias:
        """Point ``alias`` at ``build_id`` (creating the template on first use)."""
        with self.session() as s:
            row = s.scalars(select(TemplateAlias).where(TemplateAlias.alias == alias)).first()
            if row is None:
                row = TemplateAlias(template_id=new_id(), alias=alias, build_id=build_id, runtime=runtime)
                s.add(row)
            else:
                row.build_id, row.runtime, row.updated_at = build_id, runtime, utcnow()
            return row

    def find_template(self, ref: str) -> TemplateAlias | None:
        """By template id or alias; a ``:tag`` suffix other than ``default`` is not supported yet."""
        with self.session() as s:
            row = s.get(TemplateAlias, ref)
            return row or s.scalars(select(TemplateAlias).where(TemplateAlias.alias == ref)).first()

    # -- sandboxes ---------------------------------------------------------------------------

    def add_sandbox(self, **fields: Any) -> SandboxRow:
        fields.setdefault("node_id", self.node_id)
        with self.session() as s:
            row = SandboxRow(**fields)
            s.add(row)
            return row

    def update_sandbox(self, sandbox_id: str, **fields: Any) -> SandboxRow | None:
        with self.session() as s:
            row = s.get(SandboxRow, sandbox_id)
            if row is not None:
                for k, v in fields.items():
                    setattr(row, k, v)
            return row

    def get_sandbox(self, sandbox_id: str) -> SandboxRow | None:
        with self.session() as s:
            return s.get(SandboxRow, sandbox_id)

    def delete_sandbox(self, sandbox_id: str) -> bool:
        with self.session() as s:
            row = s.get(SandboxRow, sandbox_id)
            if row is None:
                return False
            s.delete(row)
            return True

    def find_sandbox_by_idempotency_key(self, key: str) -> SandboxRow | None:
        with self.session() as s:
            return s.scalars(select(SandboxRow).where(SandboxRow.idempotency_key == key)).first()

    def list_sandboxes(self) -> list[SandboxRow]:
        """Every sandbox (of this node, when scoped), oldest first."""
        q = select(SandboxRow).order_by(SandboxRow.started_at, SandboxRow.sandbox_id)
        if self.node_id is not None:
            q = q.where(SandboxRow.node_id == self.node_id)
        with self.session() as s:
            return list(s.scalars(q))


_local_locks: dict[str, tuple[threading.Lock, list[int]]] = {}  # name → (lock, [holders and waiters])
_local_guard = threading.Lock()


@contextmanager
def _local_lock(name: str) -> Iterator[None]:
    """This process's lock on ``name``, forgotten when nobody holds or waits for it."""
    with _local_guard:
        lock, holders = _local_locks.setdefault(name, (threading.Lock(), [0]))
        holders[0] += 1
    try:
        with lock:
            yield
    finally:
        with _local_guard:
            holders[0] -= 1
            if holders[0] == 0:
                del _local_locks[name]


#: the key of the advisory lock schema changes hold on PostgreSQL (any constant of our own)
_SCHEMA_LOCK = 0x5A4E_D5C4


def _engine(url: str) -> Engine:
    """SQLite: WAL and a busy timeout. PostgreSQL (psycopg 3): connections checked before use, so
    a restarted server costs the next request nothing but a reconnect, and a pool as large as
    the API's thread pool (its routes are blocking ``def`` functions, one connection each)."""
    if url.startswith("sqlite"):
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=40, pool_recycle=1800)


def _add_missing_columns(conn: Connection) -> None:
    """Columns added to a model after a database was created (``create_all`` only makes tables):
    added with their default, so an existing data dir keeps working after an upgrade."""
    inspector = inspect(conn)
    for table in Base.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            arg = getattr(column.default, "arg", None)  # a scalar default (not a callable one) fills old rows
            default = arg if arg is not None and not callable(arg) else None
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column.type.compile(conn.dialect)}"
            if default is not None:
                ddl += f" DEFAULT {_sql_literal(default)}"
            conn.execute(text(ddl))


def _sql_literal(value: Any) -> str:
    """A column default as SQL both SQLite and PostgreSQL read (TRUE/FALSE, not 1/0: PostgreSQL's
    boolean takes no integer)."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def hash_key(key: str) -> str:
    return _hash_key(key)


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_id() -> str:
    """A DNS-label-safe random id (sandbox ids appear in ``<port>-<id>.<domain>`` host names)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(20))

