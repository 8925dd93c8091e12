"""A command streaming while its sandbox is killed ends with E2B's "killed or reached its end of
life" error at once, not with a client-side timeout (the proxy ends the stream when the sandbox's
route goes away; the SDK then probes the sandbox and finds it gone)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from e2b import AsyncSandbox, Sandbox
from e2b.exceptions import SandboxNotRunningException

from .conftest import Server

pytestmark = pytest.mark.slow


def test_command_streaming_while_the_sandbox_is_killed(sdk_env: Server) -> None:
    sbx = Sandbox.create(timeout=120)
    started = threading.Event()
    outcome: list[BaseException | str] = []

    def run() -> None:
        try:
            sbx.commands.run("echo started; sleep 600", on_stdout=lambda _: started.set(), timeout=900,
                             request_timeout=900)
            outcome.append("returned")
        except BaseException as exc:  # noqa: BLE001 - the test inspects what it was
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(60)
    Sandbox.kill(sbx.sandbox_id)
    worker.join(120)  # far below the command's 900 s: ended by the kill, not by a timeout
    assert not worker.is_alive()
    assert isinstance(outcome[0], SandboxNotRunningException), outcome
    assert "killed or reached its end of life" in str(outcome[0])


def test_async_command_streaming_while_the_sandbox_is_killed(sdk_env: Server) -> None:
    async def main() -> BaseException | None:
        sbx = await AsyncSandbox.create(timeout=120)
        handle = await sbx.commands.run("sleep 600", background=True, timeout=900)
        await asyncio.sleep(1)
        await AsyncSandbox.kill(sbx.sandbox_id)
        try:
            await asyncio.wait_for(handle.wait(), 120)
        except SandboxNotRunningException as exc:
            return exc
        return None

    exc = asyncio.run(main())
    assert exc is not None and "killed or reached its end of life" in str(exc)
