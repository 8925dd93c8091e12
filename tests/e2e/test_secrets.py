"""The SDK's ``Secret`` API (sync and async) against a real server: create, update (new version),
get_info, list (paged), exists, destroy; values never come back from any route and are sealed at
rest with a key that is not in the database; bad input is a 400/409 naming the field."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid

import pytest
from e2b import AsyncSecret, Secret
from e2b.exceptions import SecretException, SecretNotFoundException

from .conftest import Server

pytestmark = pytest.mark.slow


def test_secret_lifecycle(sdk_env: Server) -> None:
    name = f"Key-{uuid.uuid4().hex[:8]}"
    value = f"sk-{uuid.uuid4().hex}"
    info = Secret.create(name, value, metadata={"team": "parity"})
    assert info.name == name.lower() and info.version == 1 and info.metadata == {"team": "parity"}
    assert info.secret_id.startswith("sec_")
    try:
        assert Secret.exists(name) and Secret.exists(info.secret_id)
        assert Secret.get_info(name.upper()).secret_id == info.secret_id
        updated = Secret.update(info.secret_id, value + "-2")
        assert updated.version == 2 and updated.metadata == {"team": "parity"}  # kept without metadata
        assert Secret.update(name, value + "-3", metadata={}).metadata == {}

        others = [Secret.create(f"{name}-{i}", "x") for i in range(3)]
        paginator = Secret.list(limit=2)
        seen: list[str] = []
        while paginator.has_next:
            seen += [s.secret_id for s in paginator.next_items()]
        assert len(seen) == len(set(seen))
        assert {info.secret_id, *(o.secret_id for o in others)} <= set(seen)
        for o in others:
            assert Secret.destroy(o.secret_id)

        with sdk_env.api() as api:  # no route answers the value
            for r in (api.get(f"/secrets/{info.secret_id}"), api.get("/secrets")):
                assert r.status_code == 200 and value not in r.text
        db = sqlite3.connect(sdk_env.settings.data_dir / "db.sqlite")
        try:
            dump = "\n".join(db.iterdump())
        finally:
            db.close()
        assert value not in dump and info.secret_id in dump  # sealed at rest
        key = (sdk_env.settings.data_dir / "secrets.key")
        assert key.stat().st_mode & 0o077 == 0 and len(key.read_bytes()) == 32

        with pytest.raises(SecretException, match="already exists"):
            Secret.create(name, "again")
        with pytest.raises(SecretException, match="reserved"):
            Secret.create("sec_mine", "x")
        with pytest.raises(SecretException, match="metadata"):
            Secret.create(f"{name}-meta", "x", metadata={f"k{i}": "v" for i in range(33)})
    finally:
        assert Secret.destroy(info.secret_id) is True
    assert Secret.destroy(info.secret_id) is False
    assert not Secret.exists(name)
    with pytest.raises(SecretNotFoundException):
        Secret.get_info(name)
    with pytest.raises(SecretNotFoundException):
        Secret.update(name, "x")


def test_async_secret(sdk_env: Server) -> None:
    async def main() -> int:
        name = f"async-{uuid.uuid4().hex[:8]}"
        await AsyncSecret.create(name, "v")
        try:
            return (await AsyncSecret.update(name, "w")).version
        finally:
            await AsyncSecret.destroy(name)

    assert asyncio.run(main()) == 2
