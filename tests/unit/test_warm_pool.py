"""The warm pool's scheduling (orchestrator/pool.py) with boots that take a set time in a thread:
what is booted when, how many at once, who waits for which boot, and when the pool shrinks. What a
pooled sandbox is (indistinguishable from a fresh one) is tested with real sandboxes in
tests/e2e/test_pool.py."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from sandboxd.orchestrator.network import NetworkSlot
from sandboxd.orchestrator.pool import GIVE_UP_AFTER, PoolKey, WarmPool, WarmSandbox

KEY = PoolKey("build", "gvisor", 2, 512, 2048)
SLOT = NetworkSlot(0, "t-0", "t-0-g", "10.99.0.2", "10.99.0.1", "t-0-h")


class Boots:
    """Boots that take ``seconds`` each; records how many ran at once and what was discarded."""

    def __init__(self, seconds: float, fail: Callable[[PoolKey], bool] = lambda _key: False) -> None:
        self.seconds = seconds
        self.fail = fail
        self.running = 0
        self.most_at_once = 0
        self.started = 0
        self.started_of: dict[PoolKey, int] = {}
        self.discarded: list[WarmSandbox] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def boot(self, key: PoolKey) -> WarmSandbox:
        with self._lock:
            self.running += 1
            self.started += 1
            self.started_of[key] = self.started_of.get(key, 0) + 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(self.seconds)
            if self.fail(key):
                raise RuntimeError("boot failed")
            return WarmSandbox(f"sbx{next(self._ids)}", key, SLOT)
        finally:
            with self._lock:
                self.running -= 1

    def discard(self, sandbox: WarmSandbox) -> None:
        self.discarded.append(sandbox)


def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def pools() -> Iterator[Callable[..., tuple[WarmPool, Boots]]]:
    made: list[WarmPool] = []

    def make(size: int = 2, seconds: float = 0.2, **kw: object) -> tuple[WarmPool, Boots]:
        fail = kw.pop("fail", lambda _key: False)
        boots = Boots(seconds, fail)  # type: ignore[arg-type]
        pool = WarmPool(size, boots.boot, boots.discard, **kw)  # type: ignore[arg-type]
        made.append(pool)
        return pool, boots

    yield make
    for pool in made:
        pool.close()


def test_boots_run_in_parallel_up_to_the_limit(pools: Callable[..., tuple[WarmPool, Boots]]) -> None:
    pool, boots = pools(size=4, seconds=0.3, parallel=2)
    pool.want(KEY)
    pool.start()
    assert pool.wait_filled(10)
    assert boots.most_at_once == 2
    serial, serial_boots = pools(size=3, seconds=0.1, parallel=1)
    serial.want(KEY)
    serial.start()
    assert serial.wait_filled(10)
    assert serial_boots.most_at_once == 1


def test_a_claim_with_none_ready_waits_for_a_boot_under_way(pools: Callable[..., tuple[WarmPool, Boots]]) -> None:
    pool, boots = pools(size=1, seconds=0.5, parallel=1)
    pool.want(KEY)
    pool.start()
    assert pool.wait_filled(10)
    first = pool.claim(KEY)
    assert first is not None
    until(lambda: boots.running == 1)  # the claim started the refill at once
    t0 = time.monotonic()
    second = pool.claim(KEY, wait_s=5)
    assert second is not None and second != first
    assert time.monotonic() - t0 < 0.5  # the boot was already under way when the claim came
    # nothing booting that no one waits for: None at once, the create boots its own
    assert pool.claim(KEY, wait_s=0) is None


def test_two_claims_never_wait_for_one_boot(pools: Callable[..., tuple[WarmPool, Boots]]) -> None:
    pool, boots = pools(size=1, seconds=0.6, parallel=1)
    pool.want(KEY)
    pool.start()
    assert pool.wait_filled(10)
    assert pool.claim(KEY) is not None
    until(lambda: boots.running == 1)
    got: list[WarmSandbox | None] = []
    waiter = threading.Thread(target=lambda: got.append(pool.claim(KEY, wait_s=5)))
    waiter.start()
    until(lambda: pool._waiting.get(KEY, 0) == 1)  # noqa: SLF001 - the first claim is waiting
    t0 = time.monotonic()
    assert pool.claim(KEY, wait_s=5) is None  # the one boot under way is promised to the first
    assert time.monotonic() - t0 < 0.2
    waiter.join()
    assert got[0] is not None


def test_a_failed_boot_releases_its_waiter(pools: Callable[..., tuple[WarmPool, Boots]]) -> None:
    pool, boots = pools(size=1, seconds=0.3, parallel=1, fail=lambda _key: True)
    pool.want(KEY)
    pool.start()
    until(lambda: boots.running == 1)
    t0 = time.monotonic()
    assert pool.claim(KEY, wait_s=10) is None
    assert time.monotonic() - t0 < 2


def test_a_burst_grows_the_pool_and_it_shrinks_back_after_the_window(
        pools: Callable[..., tuple[WarmPool, Boots]]) -> None:
    pool, boots = pools(size=1, seconds=0.05, parallel=2, max_size=4, burst_window_s=1.0)
    for _ in range(4):
        pool.want(KEY)
    pool.start()
    until(lambda: pool.ready_count(KEY) == 4)
    newest = pool._ready[KEY][-1].sandbox_id  # noqa: SLF001 - the last booted
    until(lambda: pool.ready_count(KEY) == 1, timeout_s=40)  # the window passed: back to size
    assert len(boots.discarded) == 3
    assert [s.sandbox_id for s in pool._ready[KEY]] == [newest]  # noqa: SLF001 - the oldest went
    assert boots.started == 4  # and nothing was booted again


BROKEN = PoolKey("broken-build", "gvisor", 2, 512, 2048)


def test_a_failing_key_backs_off_alone_and_the_others_fill(pools: Callable[..., tuple[WarmPool, Boots]]) -> None:
    """One filler, a broken build wanted first: the good key fills while the broken one waits out
    its back-off (a global back-off used to put the filler to sleep for every key)."""
    pool, boots = pools(size=2, seconds=0.05, parallel=1, backoff_s=30.0, fail=lambda key: key == BROKEN)
    pool.want(BROKEN)
    pool.want(KEY)
    pool.start()
    until(lambda: pool.ready_count(KEY) == 2, timeout_s=1.5)  # a shared back-off would sleep ≥ 2 s first
    assert boots.started_of[BROKEN] == 1


def test_a_key_failing_in_a_row_is_given_up_until_a_create_asks_again(
        pools: Callable[..., tuple[WarmPool, Boots]]) -> None:
    pool, boots = pools(size=1, seconds=0.02, parallel=2, backoff_s=0.05, fail=lambda key: key == BROKEN)
    pool.want(BROKEN)
    pool.start()
    until(lambda: boots.started_of.get(BROKEN) == GIVE_UP_AFTER)
    pool.want(KEY)  # the fillers run a job for this key: a broken key still wanted would be booted too
    until(lambda: pool.ready_count(KEY) == 1)
    time.sleep(0.5)  # ten back-offs' worth
    assert boots.started_of[BROKEN] == GIVE_UP_AFTER
    pool.want(BROKEN)  # a create asks: the pool tries again
    until(lambda: boots.started_of[BROKEN] == GIVE_UP_AFTER + 1)
