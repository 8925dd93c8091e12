"""Snapshots and forks through the real SDK (sync and async) on gVisor: sandboxes made from a
snapshot or a fork have the source's files and their own writes, the source runs on unaffected,
and bad input (unknown, paused, a template's name, memory asked for) is a clear error."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from e2b import AsyncSandbox, Sandbox
from e2b.exceptions import NotFoundException, SandboxException

from .conftest import Server

pytestmark = pytest.mark.slow


def _snapshot_ids(**query: str) -> list[str]:
    paginator = Sandbox.list_snapshots(**query)
    ids: list[str] = []
    while paginator.has_next:
        ids += [s.snapshot_id for s in paginator.next_items()]
    return ids


def test_snapshot_then_sandboxes_from_it(sdk_env: Server) -> None:
    source = Sandbox.create(envs={"FROM": "source"}, timeout=180)
    made: list[Sandbox] = []
    try:
        source.files.write("/home/user/state.txt", "v1")
        source.commands.run("mkdir -p /home/user/proj && echo built > /home/user/proj/out")
        snap = source.create_snapshot()
        assert snap.snapshot_id.endswith(":default") and snap.names == []
        source.files.write("/home/user/state.txt", "v2")  # after the snapshot: not in it
        assert source.commands.run("cat /home/user/proj/out").stdout == "built\n"  # runs on

        a, b = Sandbox.create(snap.snapshot_id, timeout=120), Sandbox.create(snap.snapshot_id, timeout=120)
        made += [a, b]
        for s in (a, b):
            assert s.files.read("/home/user/state.txt") == "v1"
            assert s.commands.run("cat /home/user/proj/out").stdout == "built\n"
            assert s.commands.run("echo $FROM").stdout == "source\n"
        a.files.write("/home/user/state.txt", "mine")
        assert b.files.read("/home/user/state.txt") == "v1"  # each its own writes
        assert source.files.read("/home/user/state.txt") == "v2"
        assert a.get_info().template_id == snap.snapshot_id.removesuffix(":default")

        assert snap.snapshot_id in _snapshot_ids()
        assert _snapshot_ids(sandbox_id=source.sandbox_id) == [snap.snapshot_id]
        assert source.list_snapshots().next_items()[0].snapshot_id == snap.snapshot_id

        assert Sandbox.delete_snapshot(snap.snapshot_id) is True
        assert Sandbox.delete_snapshot(snap.snapshot_id) is False
        assert snap.snapshot_id not in _snapshot_ids()
        with pytest.raises(SandboxException, match="not found"):
            Sandbox.create(snap.snapshot_id, timeout=60)
        assert a.files.read("/home/user/state.txt") == "mine"  # deleting the snapshot took nothing
    finally:
        for s in (source, *made):
            s.kill()


def test_named_snapshot_gets_new_contents_under_its_name(sdk_env: Server) -> None:
    name = f"snap-{uuid.uuid4().hex[:8]}"
    source = Sandbox.create(timeout=180)
    made: list[Sandbox] = []
    try:
        source.files.write("/home/user/v.txt", "first")
        first = Sandbox.create_snapshot(source.sandbox_id, name)
        assert first.snapshot_id == f"{name}:default" and first.names == [f"{name}:default"]
        source.files.write("/home/user/v.txt", "second")
        again = source.create_snapshot(name)
        assert again.snapshot_id == first.snapshot_id
        assert _snapshot_ids(name=name) == [first.snapshot_id]
        made.append(Sandbox.create(name, timeout=120))
        assert made[0].files.read("/home/user/v.txt") == "second"
        assert Sandbox.delete_snapshot(name) is True
    finally:
        for s in (source, *made):
            s.kill()


def test_snapshot_bad_input(sdk_env: Server) -> None:
    sbx = Sandbox.create(timeout=120)
    try:
        with pytest.raises(NotFoundException):
            Sandbox.create_snapshot("nosuchsandbox")
        with pytest.raises(SandboxException, match="memory"):
            sbx.create_snapshot(mode="full")  # memory cannot be captured here: said so, not dropped
        with pytest.raises(SandboxException, match="template's name"):
            sbx.create_snapshot("base")
        with pytest.raises(SandboxException, match="Invalid name"):
            sbx.create_snapshot("Not A Name")
        assert sbx.pause()
        with pytest.raises(SandboxException, match="paused"):
            sbx.create_snapshot()
        with pytest.raises(SandboxException, match="paused"):
            sbx.fork()
        assert Sandbox.delete_snapshot("nosuchsnapshot") is False
        with sdk_env.api() as api:
            for count in (0, 101):
                r = api.post(f"/sandboxes/{sbx.sandbox_id}/fork", json={"count": count})
                assert r.status_code == 400 and "count" in r.json()["message"]
            r = api.post(f"/sandboxes/{sbx.sandbox_id}/snapshots", json={"nmae": "typo"})
            assert r.status_code == 400 and "nmae" in r.json()["message"]
            r = api.delete("/templates/base")
            assert r.status_code == 501, r.text  # deleting templates (not snapshots) is not implemented
        assert Sandbox.connect(sbx.sandbox_id).commands.run("echo still here").stdout == "still here\n"
    finally:
        sbx.kill()


def test_fork_copies_files_and_leaves_the_parent_running(sdk_env: Server) -> None:
    parent = Sandbox.create(metadata={"role": "parent"}, timeout=180)
    forks: list = []
    try:
        parent.files.write("/home/user/shared.txt", "from parent")
        forks = parent.fork(count=2, timeout=120)
        assert all(isinstance(f, Sandbox) for f in forks), forks
        assert len({f.sandbox_id for f in forks} | {parent.sandbox_id}) == 3
        for f in forks:
            assert f.files.read("/home/user/shared.txt") == "from parent"
            assert f.get_info().metadata == {"role": "parent"}
        forks[0].files.write("/home/user/shared.txt", "fork 0")
        assert forks[1].files.read("/home/user/shared.txt") == "from parent"
        assert parent.files.read("/home/user/shared.txt") == "from parent"
        assert parent.is_running()
        forks += Sandbox.fork(parent.sandbox_id)
        assert forks[2].files.read("/home/user/shared.txt") == "from parent"
        with pytest.raises(NotFoundException):
            Sandbox.fork("nosuchsandbox")
    finally:
        for s in (parent, *forks):
            if isinstance(s, Sandbox):
                s.kill()


def test_async_snapshot_and_fork(sdk_env: Server) -> None:
    async def main() -> None:
        sbx = await AsyncSandbox.create(timeout=180)
        made: list = []
        try:
            await sbx.files.write("/home/user/a.txt", "async")
            snap = await sbx.create_snapshot()
            made.append(await AsyncSandbox.create(snap.snapshot_id, timeout=120))
            made += await sbx.fork()
            for s in made:
                assert await s.files.read("/home/user/a.txt") == "async"
            assert await AsyncSandbox.delete_snapshot(snap.snapshot_id) is True
        finally:
            for s in (sbx, *made):
                if isinstance(s, AsyncSandbox):
                    await s.kill()

    asyncio.run(main())
