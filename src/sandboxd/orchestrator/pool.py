"""The warm pool: sandboxes booted ahead of demand, one queue per template build, each handed
out once.

Why: a cold create spends nearly all its time booting (network slot, overlay, runsc, envd's
Python start-up: ~1.4 s here). A claim only personalizes a sandbox that already runs: envd's
``/init`` with the access token, env vars, default user and clock, then the template's start and
ready commands, the record with metadata and timeout, the proxy's route.

What a pooled sandbox is until it is claimed: booted over a fresh disk in a slot with internet
access (the default), with no record in the database, no access token, no env vars, and no
route in the proxy; only the host can reach its envd. A server crash leaves its directory,
container and slot without a record, which :meth:`Orchestrator.recover` removes like any stray.

A pool is kept for the default template from the start and for every template build created
from since (recent demand), ``size`` sandboxes each — or, for a build asked for in bursts, as
many as creates asked for it in the last ``burst_window_s`` (up to ``max_size``), so an agent
or RL loop that creates 8 at a time finds 8 booted the next time; a build nobody asked for
during ``idle_s`` is drained (so is, in time, one its template no longer points at). Once a
burst's creates have all fallen out of the window the pool shrinks back to ``size`` (the oldest
go first): idle memory is not held for a burst that is over.
Sandboxes older than ``max_age_s`` are replaced, so a claimed one never has a long uptime.

Keeping up with creates in a row: a claim wakes the fillers at once, and up to ``parallel`` boots
run together, so a refill starts at claim time and more than one runs ahead when claims come
faster than a boot takes. A create finding the pool empty while a boot of its key is under way
(and not already promised to an earlier create) waits for that boot instead of starting its own
cold: the boot is further along than a new one would be, and the host does not boot twice.

A key whose boots fail (a broken build, a runtime that refuses its shape) backs off on its own —
2 then 4 s (``backoff_s``, doubling) before its next tries — while the other keys keep filling;
after ``GIVE_UP_AFTER`` failures in a row the pool stops keeping it until a create asks for it
again (that create fails or succeeds on its own, and tells the pool whether the build boots).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sandboxd.orchestrator.network import NetworkSlot

log = logging.getLogger("sandboxd.orchestrator.pool")

GIVE_UP_AFTER = 3  # failed boots in a row before a key is no longer kept (until a create asks)


@dataclass(frozen=True)
class PoolKey:
    """What a pooled sandbox was booted as; a create may only claim one of exactly this."""

    build_id: str
    runtime: str
    cpu_count: int
    memory_mb: int
    disk_mb: int


@dataclass(frozen=True)
class WarmSandbox:
    sandbox_id: str
    key: PoolKey
    slot: NetworkSlot
    booted_at: float = field(default_factory=time.monotonic)


class WarmPool:
    """Keeps ``size`` booted sandboxes per wanted key (more while creates come in bursts), filled
    by ``parallel`` background threads: at most that many boots at once, so on a small host the
    pool does not starve the creates it is there to speed up."""

    def __init__(self, size: int, boot: Callable[[PoolKey], WarmSandbox], discard: Callable[[WarmSandbox], None],
                 idle_s: float = 600.0, max_age_s: float = 900.0, max_size: int = 8,
                 burst_window_s: float = 30.0, parallel: int = 2, backoff_s: float = 2.0) -> None:
        self.size = size
        self.max_size = max(size, max_size)
        self.burst_window_s = burst_window_s
        self.parallel = max(1, parallel)
        self.backoff_s = backoff_s
        self._boot = boot
        self._discard = discard
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self._ready: dict[PoolKey, list[WarmSandbox]] = {}
        self._wanted: dict[PoolKey, float] = {}  # key → last time a create asked for it
        self._asks: dict[PoolKey, deque[float]] = {}  # key → when creates asked, last burst_window_s
        self._booting: dict[PoolKey, int] = {}  # key → boots under way
        self._waiting: dict[PoolKey, int] = {}  # key → creates waiting for one of those boots
        self._cond = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._failures: dict[PoolKey, int] = {}  # key → boots failed in a row
        self._retry_at: dict[PoolKey, float] = {}  # key → no boot before this (backing off)

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def start(self) -> None:
        if self.enabled and not self._threads:
            self._threads = [threading.Thread(target=self._fill_forever, name=f"warm-pool-{i}", daemon=True)
                             for i in range(self.parallel)]
            for thread in self._threads:
                thread.start()

    def want(self, key: PoolKey) -> None:
        """A create asked for ``key``: keep a pool of it (from now on, or for longer)."""
        if not self.enabled:
            return
        now = time.monotonic()
        with self._cond:
            self._wanted[key] = now
            self._asks.setdefault(key, deque()).append(now)
            self._cond.notify_all()

    def target(self, key: PoolKey) -> int:
        """How many of ``key`` to keep booted: ``size``, or the recent burst's size (at most
        ``max_size``). Called under the lock."""
        asks = self._asks.get(key)
        if asks is None:
            return self.size
        while asks and time.monotonic() - asks[0] > self.burst_window_s:
            asks.popleft()
        return min(self.max_size, max(self.size, len(asks)))

    def claim(self, key: PoolKey, wait_s: float = 0.0) -> WarmSandbox | None:
        """A booted sandbox of ``key``, removed from the pool (so never handed out twice), or None.

        With none ready, waits up to ``wait_s`` for a boot of ``key`` already under way that no
        earlier claim is waiting for (None at once if there is none, or if it fails)."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            self._cond.notify_all()  # a claim starts a refill, whatever it finds
            while True:
                ready = self._ready.get(key)
                if ready:
                    sandbox = ready.pop(0)
                    self._cond.notify_all()
                    return sandbox
                left = deadline - time.monotonic()
                if self._closed or left <= 0 or self._booting.get(key, 0) <= self._waiting.get(key, 0):
                    return None
                self._waiting[key] = self._waiting.get(key, 0) + 1
                try:
                    self._cond.wait(left)
                finally:
                    self._waiting[key] -= 1

    def ready_count(self, key: PoolKey | None = None) -> int:
        with self._cond:
            return sum(len(v) for k, v in self._ready.items() if key is None or k == key)

    def wait_filled(self, timeout_s: float) -> bool:
        """Until every wanted key has ``size`` sandboxes (benchmarks, tests)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while any(len(self._ready.get(k, [])) < self.size for k in self._wanted):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        """Stop filling and remove every pooled sandbox (server shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        with self._cond:
            left = [s for v in self._ready.values() for s in v]
            self._ready.clear()
        for sandbox in left:
            self._discard_quietly(sandbox)

    # -- the filler ----------------------------------------------------------------------------

    def _next_job(self) -> tuple[PoolKey | None, list[WarmSandbox]]:
        """Under the lock: what to boot next (or None) and what to remove now: sandboxes of keys
        nobody wants any more, too old, or beyond ``size`` once no burst is under way (the oldest
        first; while creates keep coming, the pool keeps what it has)."""
        now = time.monotonic()
        drop: list[WarmSandbox] = []
        for key in [k for k, t in self._wanted.items() if now - t > self.idle_s]:
            self._forget(key)
        for key in list(self._ready):
            keep = [s for s in self._ready[key] if key in self._wanted and now - s.booted_at < self.max_age_s]
            if key in self._wanted and len(keep) > self.size and self.target(key) == self.size:
                keep = keep[len(keep) - self.size:]  # the burst is over; ready lists are in boot order
            drop += [s for s in self._ready[key] if s not in keep]
            self._ready[key] = keep
        # a boot under way counts as ready, except for those creates are already waiting for
        short = [k for k in self._wanted if self._retry_at.get(k, 0.0) <= now
                 and len(self._ready.get(k, [])) + self._booting.get(k, 0) - self._waiting.get(k, 0) < self.target(k)]
        return (min(short, key=lambda k: len(self._ready.get(k, []))) if short else None), drop

    def _fill_forever(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                key, drop = self._next_job()
                if key is None and not drop:
                    self._cond.wait(timeout=self._idle_wait())
                    continue
                if key is not None:
                    self._booting[key] = self._booting.get(key, 0) + 1
            for sandbox in drop:
                self._discard_quietly(sandbox)
            if key is not None:
                self._boot_one(key)

    def _boot_one(self, key: PoolKey) -> None:
        """Boot one sandbox of ``key`` (counted in ``_booting`` by the caller) into the pool."""
        try:
            sandbox = self._boot(key)
        except Exception as exc:  # noqa: BLE001 - a failed boot is logged and retried later
            with self._cond:
                self._booting[key] -= 1
                self._back_off(key, exc)
                self._cond.notify_all()  # a create waiting for this boot starts its own
            return
        with self._cond:
            self._failures.pop(key, None)
            self._retry_at.pop(key, None)
            self._booting[key] -= 1
            self._cond.notify_all()
            if not self._closed and key in self._wanted:
                self._ready.setdefault(key, []).append(sandbox)
                self._cond.notify_all()
                return
        self._discard_quietly(sandbox)

    def _back_off(self, key: PoolKey, exc: Exception) -> None:
        """Under the lock: no boot of ``key`` for a while, or none at all once it has failed
        ``GIVE_UP_AFTER`` times in a row; other keys are not held up."""
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        if failures >= GIVE_UP_AFTER:
            log.warning("warm pool: booting a sandbox of build %s failed %d times in a row; not kept until a "
                        "create asks for it again: %s", key.build_id, failures, exc)
            self._forget(key)
            return
        delay = min(60.0, self.backoff_s * 2.0 ** (failures - 1))
        self._retry_at[key] = time.monotonic() + delay
        log.warning("warm pool: booting a sandbox of build %s failed (retry in %.0fs): %s", key.build_id, delay, exc)

    def _forget(self, key: PoolKey) -> None:
        """Under the lock: stop keeping ``key`` (its ready sandboxes go at the next job)."""
        self._wanted.pop(key, None)
        self._asks.pop(key, None)
        self._failures.pop(key, None)
        self._retry_at.pop(key, None)

    def _idle_wait(self) -> float:
        """How long a filler with nothing to do sleeps: until the next retry of a key backing
        off, or a burst window (a burst ending shrinks the pool)."""
        now = time.monotonic()
        retries = [t - now for k, t in self._retry_at.items() if k in self._wanted]
        return max(0.05, min([30.0, self.burst_window_s, *retries]))

    def _discard_quietly(self, sandbox: WarmSandbox) -> None:
        try:
            self._discard(sandbox)
        except Exception:  # noqa: BLE001 - the teardown logs what failed; the pool goes on
            log.exception("warm pool: removing %s failed", sandbox.sandbox_id)
