"""Secrets (E2B's ``Secret`` API): write-only values, each update a new version, encrypted at rest.

Values are sealed with AES-256-GCM under a key that is not in the database: the file
``<data dir>/secrets.key`` (made on first use, mode 0600), or the one ``SANDBOXD_SECRETS_KEY_FILE``
names — keep it elsewhere than the database (another disk, a secrets manager's mount) and a
leaked database leaks no value. Each version's nonce is random and its secret id and version are
bound to the ciphertext (associated data), so a sealed value cannot be moved to another secret or
version. No route ever returns a value: reading one is :meth:`Secrets.value`, for the runtime.
"""

from __future__ import annotations

import os
import re
import secrets
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import JSON, DateTime, ForeignKey, Integer, LargeBinary, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from sandboxd.store.db import Base, Database, utcnow

ID_PREFIX = "sec_"
#: E2B's limits on a secret's metadata
MAX_METADATA_ENTRIES, MAX_KEY_BYTES, MAX_VALUE_BYTES, MAX_METADATA_BYTES = 32, 128, 1024, 8192
MAX_NAME = 256
MAX_VALUE = 64 * 1024
_BAD_NAME_CHARS = re.compile(r"[{}\x00-\x1f\x7f-\x9f]")  # the SDK's rule: it goes into ${e2b.secrets.<name>}


class SecretError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SecretRow(Base):
    __tablename__ = "secrets"
    secret_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME), unique=True)
    current_version: Mapped[int] = mapped_column(Integer)
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SecretVersionRow(Base):
    __tablename__ = "secret_versions"
    secret_id: Mapped[str] = mapped_column(String(64), ForeignKey("secrets.secret_id", ondelete="CASCADE"),
                                           primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    nonce: Mapped[bytes] = mapped_column(LargeBinary(12))
    sealed: Mapped[bytes] = mapped_column(LargeBinary)


def load_key(path: Path) -> bytes:
    """The 32-byte key in ``path``, made (0600) if the file does not exist yet."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = AESGCM.generate_key(bit_length=256)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
    if len(key) != 32:
        raise ValueError(f"secrets key {path} must hold exactly 32 bytes (it has {len(key)})")
    return key


def check_name(name: str) -> str:
    """E2B's canonical form (lower-cased); 400 naming ``name`` for one that cannot be used."""
    canonical = name.lower()
    if not canonical or len(canonical) > MAX_NAME or _BAD_NAME_CHARS.search(canonical):
        raise SecretError(400, f"name: {name!r} is not usable (1-{MAX_NAME} characters, no '{{', '}}' or "
                               "control characters)")
    if canonical.startswith(ID_PREFIX):
        raise SecretError(400, f"name: the {ID_PREFIX!r} prefix is reserved for secret identifiers")
    return canonical


def check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise SecretError(400, f"metadata: at most {MAX_METADATA_ENTRIES} entries")
    total = 0
    for k, v in metadata.items():
        if len(k.encode()) > MAX_KEY_BYTES or len(v.encode()) > MAX_VALUE_BYTES:
            raise SecretError(400, f"metadata.{k}: keys up to {MAX_KEY_BYTES} bytes, values up to "
                                   f"{MAX_VALUE_BYTES}")
        total += len(k.encode()) + len(v.encode())
    if total > MAX_METADATA_BYTES:
        raise SecretError(400, f"metadata: at most {MAX_METADATA_BYTES} bytes in total")
    return metadata


class Secrets:
    """Repository of secrets; values go in sealed and come out only through :meth:`value`."""

    def __init__(self, db: Database, key_file: Path) -> None:
        self.db = db
        self._aead = AESGCM(load_key(key_file))
        db.create_tables()  # our tables, if this database predates them

    def _seal(self, secret_id: str, version: int, value: str) -> SecretVersionRow:
        if len(value.encode()) > MAX_VALUE:
            raise SecretError(400, f"value: at most {MAX_VALUE} bytes")
        nonce = secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, value.encode(), f"{secret_id}:{version}".encode())
        return SecretVersionRow(secret_id=secret_id, version=version, nonce=nonce, sealed=sealed)

    def create(self, name: str, value: str, metadata: dict[str, str]) -> SecretRow:
        name = check_name(name)
        metadata = check_metadata(metadata)
        if self.find(name) is not None:
            raise SecretError(409, f"name: a secret named '{name}' already exists")
        secret_id = ID_PREFIX + secrets.token_hex(12)
        now = utcnow()
        row = SecretRow(secret_id=secret_id, name=name, current_version=1, metadata_=metadata,
                        created_at=now, updated_at=now)
        with self.db.session() as s:
            s.add(row)
            s.flush()
            s.add(self._seal(secret_id, 1, value))
        return row

    def update(self, ref: str, value: str, metadata: dict[str, str] | None) -> SecretRow | None:
        if metadata is not None:
            check_metadata(metadata)
        with self.db.session() as s:
            row = self._find(s, ref)
            if row is None:
                return None
            row.current_version += 1
            s.add(self._seal(row.secret_id, row.current_version, value))
            if metadata is not None:
                row.metadata_ = metadata
            row.updated_at = utcnow()
            return row

    @staticmethod
    def _find(s: Session, ref: str) -> SecretRow | None:
        row = s.get(SecretRow, ref)
        return row or s.scalars(select(SecretRow).where(SecretRow.name == ref.lower())).first()

    def find(self, ref: str) -> SecretRow | None:
        """By id or name (names compare lower-cased)."""
        with self.db.session() as s:
            return self._find(s, ref)

    def all(self) -> list[SecretRow]:
        with self.db.session() as s:
            return list(s.scalars(select(SecretRow).order_by(SecretRow.created_at, SecretRow.secret_id)))

    def destroy(self, ref: str) -> bool:
        with self.db.session() as s:
            row = self._find(s, ref)
            if row is None:
                return False
            for v in s.scalars(select(SecretVersionRow).where(SecretVersionRow.secret_id == row.secret_id)):
                s.delete(v)
            s.delete(row)
            return True

    def value(self, ref: str, version: int | None = None) -> str | None:
        """A secret's value (its current version unless named): for the runtime, never a route."""
        with self.db.session() as s:
            row = self._find(s, ref)
            if row is None:
                return None
            sealed = s.get(SecretVersionRow, (row.secret_id, version or row.current_version))
            if sealed is None:
                return None
            return self._aead.decrypt(sealed.nonce, sealed.sealed, f"{row.secret_id}:{sealed.version}".encode()).decode()
