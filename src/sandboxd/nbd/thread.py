"""Run an :class:`NbdServer` on its own event loop in a daemon thread, with blocking calls.

Why a thread: the orchestrator and runtimes are synchronous, and the server's I/O must go on
while they block (a VM boots from the server while ``start()`` waits for it). Every call into the
server runs *on its loop*, so the pool is only ever touched by one thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from sandboxd.nbd.exports import ExportEvent, ExportState
from sandboxd.nbd.server import NbdServer

T = TypeVar("T")


class NbdServerThread:
    """``with NbdServerThread(run_dir) as nbd: nbd.allocate(...)`` — or ``start()``/``close()``."""

    def __init__(self, run_dir: Path, pool_size: int = 4, max_exports: int = 1024) -> None:
        self.server = NbdServer(run_dir, pool_size=pool_size, max_exports=max_exports)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nbd-server", daemon=True)

    def start(self) -> NbdServerThread:
        self._thread.start()
        self._call(self.server.start())
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self.server.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> NbdServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _run(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()
        return self._call(call())

    def allocate(self, base: Path, cow_dir: Path, base_id: str, owner: str, block_size: int = 4096,
                 prefer: str | None = None) -> ExportState:
        return self._call(self.server.allocate(base, cow_dir, base_id, owner, block_size, prefer))

    def release(self, owner: str) -> bool:
        return self._call(self.server.release(owner))

    def state(self) -> list[ExportState]:
        return self._run(self.server.state)

    def export_of(self, owner: str) -> ExportState | None:
        return next((e for e in self.state() if e.owner == owner), None)

    def metrics(self) -> dict[str, int]:
        return self._run(self.server.metrics)

    def events(self) -> list[ExportEvent]:
        return self._run(lambda: list(self.server.events.recent))

    def clone_state(self, owner: str, dest_dir: Path) -> None:
        """Copy the owner's device state to ``dest_dir`` (on the loop: no write runs meanwhile)."""
        def clone() -> None:
            export = self.server.pool.by_owner(owner)
            if export is None or export.device is None:
                raise KeyError(f"{owner} has no export")
            export.device.clone_state(dest_dir)
        self._run(clone)
