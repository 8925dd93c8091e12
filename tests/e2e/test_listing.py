"""``Sandbox.list`` as on E2B: newest first, ``order``, pages that hold while sandboxes come and go,
running and paused mixed, ``started_after`` inclusive, the template filter, and bad input."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from e2b import AsyncSandbox, Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import SandboxException

from .conftest import Server

pytestmark = pytest.mark.slow


def _ids(query: SandboxQuery, limit: int | None = None, order: str | None = None) -> list[str]:
    paginator = Sandbox.list(query=query, limit=limit, order=order)
    ids: list[str] = []
    while paginator.has_next:
        ids += [s.sandbox_id for s in paginator.next_items()]
    return ids


def test_order_pages_states_and_filters(sdk_env: Server) -> None:
    tag = uuid.uuid4().hex
    mine = SandboxQuery(metadata={"suite": tag})
    a, b, c = (Sandbox.create(metadata={"suite": tag}, timeout=120) for _ in range(3))
    extra: list[Sandbox] = []
    try:
        infos = {s.sandbox_id: s.get_info() for s in (a, b, c)}
        assert _ids(mine) == [c.sandbox_id, b.sandbox_id, a.sandbox_id]  # newest first, as E2B
        assert _ids(mine, order="desc", limit=1) == [c.sandbox_id, b.sandbox_id, a.sandbox_id]
        assert _ids(mine, order="asc", limit=2) == [a.sandbox_id, b.sandbox_id, c.sandbox_id]

        # pages keep their place while sandboxes come and go between them
        paginator = Sandbox.list(query=mine, limit=1)
        seen = [s.sandbox_id for s in paginator.next_items()]
        extra.append(Sandbox.create(metadata={"suite": tag}, timeout=120))  # newer: before the cursor
        seen += [s.sandbox_id for s in paginator.next_items()]
        while paginator.has_next:
            seen += [s.sandbox_id for s in paginator.next_items()]
        assert seen == [c.sandbox_id, b.sandbox_id, a.sandbox_id]

        assert b.pause()
        assert _ids(SandboxQuery(metadata={"suite": tag}, state=[SandboxState.PAUSED])) == [b.sandbox_id]
        assert _ids(SandboxQuery(metadata={"suite": tag}, state=[SandboxState.RUNNING]), limit=1) == [
            extra[0].sandbox_id, c.sandbox_id, a.sandbox_id]
        listed = {s.sandbox_id: s for s in Sandbox.list(query=mine).next_items()}
        assert listed[b.sandbox_id].state == SandboxState.PAUSED
        assert listed[a.sandbox_id].state == SandboxState.RUNNING

        since_b = SandboxQuery(metadata={"suite": tag}, started_after=infos[b.sandbox_id].started_at)
        assert _ids(since_b) == [extra[0].sandbox_id, c.sandbox_id, b.sandbox_id]  # at or after: b itself too
        assert set(_ids(SandboxQuery(metadata={"suite": tag}, template="base"))) == {
            a.sandbox_id, b.sandbox_id, c.sandbox_id, extra[0].sandbox_id}
        assert _ids(SandboxQuery(metadata={"suite": tag}, template="no-such-template")) == []
        with pytest.raises(SandboxException, match="400: Invalid template: tags are not supported"):
            Sandbox.list(query=SandboxQuery(template="base:v1")).next_items()
    finally:
        for s in (a, b, c, *extra):
            s.kill()


def test_async_list_pages(sdk_env: Server) -> None:
    async def main() -> None:
        tag = uuid.uuid4().hex
        first = await AsyncSandbox.create(metadata={"suite": tag}, timeout=120)
        second = await AsyncSandbox.create(metadata={"suite": tag}, timeout=120)
        try:
            paginator = AsyncSandbox.list(query=SandboxQuery(metadata={"suite": tag}), limit=1, order="asc")
            ids = []
            while paginator.has_next:
                ids += [s.sandbox_id for s in await paginator.next_items()]
            assert ids == [first.sandbox_id, second.sandbox_id]
        finally:
            await first.kill()
            await second.kill()

    asyncio.run(main())


def test_list_bad_input_and_headers(sdk_env: Server) -> None:
    tag = uuid.uuid4().hex
    sbx = Sandbox.create(metadata={"suite": tag}, timeout=60)
    try:
        with sdk_env.api() as api:
            r = api.get("/v2/sandboxes", params={"metadata": f"suite={tag}", "limit": 1000})
            assert r.status_code == 200 and [s["sandboxID"] for s in r.json()] == [sbx.sandbox_id]  # clamped
            assert r.headers["x-total-running"] == "1"
            assert "x-next-token" not in r.headers
            for params, field in (({"nextToken": "garbage!"}, "nextToken"), ({"order": "sideways"}, "order"),
                                  ({"state": "running,sleeping"}, "state")):
                r = api.get("/v2/sandboxes", params=params)
                assert r.status_code == 400, r.text
                assert r.json()["code"] == 400 and field in r.json()["message"]
            # a cursor of one order is refused under the other
            both = [Sandbox.create(metadata={"suite": tag}, timeout=60)]
            try:
                r = api.get("/v2/sandboxes", params={"metadata": f"suite={tag}", "limit": 1})
                token = r.headers["x-next-token"]
                r = api.get("/v2/sandboxes", params={"metadata": f"suite={tag}", "order": "asc", "nextToken": token})
                assert r.status_code == 400 and "nextToken" in r.json()["message"]
            finally:
                for s in both:
                    s.kill()
            v1 = api.get("/sandboxes", params={"metadata": f"suite={tag}"})
            assert [s["sandboxID"] for s in v1.json()] == [sbx.sandbox_id]
    finally:
        sbx.kill()
