"""Sandbox lifecycle through the SDK: list, info, timeout, connect, kill, and cleanup on the host."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import NotFoundException

from sandboxd.store.db import Database

from .conftest import Server
from .hostcheck import CLEAN, traces

pytestmark = pytest.mark.slow


def _slot(server: Server, sandbox_id: str) -> int:
    row = Database(server.settings.db_url).get_sandbox(sandbox_id)
    assert row is not None
    return row.slot_index


def _cleaned_up(server: Server, sandbox_id: str, slot: int, within_s: float = 15) -> bool:
    """Teardown runs in the background after kill (~1.5 s under ptrace): wait for it."""
    deadline = time.monotonic() + within_s
    while traces(server.settings, sandbox_id, slot) != CLEAN and time.monotonic() < deadline:
        time.sleep(0.1)
    return traces(server.settings, sandbox_id, slot) == CLEAN


def _all_ids(query: SandboxQuery | None = None) -> list[str]:
    paginator = Sandbox.list(query=query, limit=2)
    ids: list[str] = []
    while paginator.has_next:
        ids += [s.sandbox_id for s in paginator.next_items()]
    return ids


def test_list_get_info_and_metadata_filter(sdk_env: Server) -> None:
    a = Sandbox.create(metadata={"suite": "lifecycle", "who": "a b&c"}, timeout=60)
    b = Sandbox.create(metadata={"suite": "lifecycle", "who": "b"}, timeout=60)
    c = Sandbox.create(timeout=60)
    try:
        ids = _all_ids()  # pages of 2: the x-next-token header is followed
        assert {a.sandbox_id, b.sandbox_id, c.sandbox_id} <= set(ids)
        assert len(ids) == len(set(ids))
        assert _all_ids(SandboxQuery(metadata={"who": "a b&c"})) == [a.sandbox_id]
        assert set(_all_ids(SandboxQuery(metadata={"suite": "lifecycle"}))) == {a.sandbox_id, b.sandbox_id}
        assert _all_ids(SandboxQuery(state=[SandboxState.PAUSED])) == []
        info = a.get_info()
        assert info.sandbox_id == a.sandbox_id
        assert info.metadata == {"suite": "lifecycle", "who": "a b&c"}
        assert info.state == SandboxState.RUNNING
        assert info.name == "base"
        remaining = (info.end_at - datetime.now(UTC)).total_seconds()
        assert 30 < remaining <= 61
    finally:
        for s in (a, b, c):
            s.kill()


def test_set_timeout_and_connect(sdk_env: Server) -> None:
    sbx = Sandbox.create(timeout=30)
    try:
        sbx.set_timeout(600)
        remaining = (sbx.get_info().end_at - datetime.now(UTC)).total_seconds()
        assert 590 < remaining <= 601
        again = Sandbox.connect(sbx.sandbox_id)
        assert again.commands.run("echo via connect").stdout == "via connect\n"
        sbx.files.write("/home/user/x", "1")
        assert again.files.read("/home/user/x") == "1"
    finally:
        sbx.kill()


def test_kill_removes_everything(sdk_env: Server) -> None:
    sbx = Sandbox.create(timeout=60)
    slot = _slot(sdk_env, sbx.sandbox_id)
    assert traces(sdk_env.settings, sbx.sandbox_id, slot) != CLEAN
    assert sbx.kill() is True
    assert _cleaned_up(sdk_env, sbx.sandbox_id, slot)
    assert Sandbox.kill(sbx.sandbox_id) is False
    assert not sbx.is_running()
    with pytest.raises(NotFoundException):
        sbx.get_info()


def test_timeout_kills_and_cleans_up(sdk_env: Server) -> None:
    sbx = Sandbox.create()
    slot = _slot(sdk_env, sbx.sandbox_id)
    assert sbx.commands.run("echo alive").stdout == "alive\n"
    sbx.set_timeout(2)  # after the command: a slow create on a loaded host must not race the reaper
    deadline = time.monotonic() + 20
    while sbx.sandbox_id in _all_ids() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert sbx.sandbox_id not in _all_ids()
    assert _cleaned_up(sdk_env, sbx.sandbox_id, slot)
    assert not sbx.is_running()
    with pytest.raises(NotFoundException):
        Sandbox.connect(sbx.sandbox_id)
