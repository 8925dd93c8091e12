"""Quotas per API key: how many sandboxes it may have running at once, and their vCPUs and memory
in total. Over one → 429 in E2B's shape, naming the limit, with ``Should-Retry: false`` (waiting
a few seconds does not free a quota; ending a sandbox does).

Counted: the key's running sandboxes plus its creates and resumes in flight (reserved before they
start, so concurrent creates cannot all slip under the limit). Paused sandboxes hold no CPU or
memory and do not count, as on E2B.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from sandboxd.api.errors import ApiError
from sandboxd.store.db import ApiKey, Database


@dataclass(frozen=True)
class Need:
    cpu_count: int
    memory_mb: int


class Quotas:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._in_flight: dict[str, list[Need]] = {}

    @contextlib.contextmanager
    def reserve(self, key: ApiKey | None, need: Need) -> Iterator[None]:
        """Hold ``need`` against ``key``'s quotas while the body runs (a create or resume), or
        raise the 429 of the first limit it would pass."""
        if key is None or (key.max_sandboxes is None and key.max_vcpus is None and key.max_memory_mb is None):
            yield
            return
        with self._lock:
            self._check(key, need)
            self._in_flight.setdefault(key.key_hash, []).append(need)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[key.key_hash].remove(need)

    def _check(self, key: ApiKey, need: Need) -> None:
        running = [r for r in self.db.list_sandboxes() if r.owner == key.key_hash and r.state == "running"]
        pending = self._in_flight.get(key.key_hash, [])
        count = len(running) + len(pending) + 1
        cpus = sum(r.cpu_count for r in running) + sum(n.cpu_count for n in pending) + need.cpu_count
        memory = sum(r.memory_mb for r in running) + sum(n.memory_mb for n in pending) + need.memory_mb
        who = f"API key '{key.name}' ({key.key_id})"
        if key.max_sandboxes is not None and count > key.max_sandboxes:
            _over(f"You have reached the maximum number of concurrent sandboxes ({key.max_sandboxes}) of {who}: "
                  "kill or pause one first")
        if key.max_vcpus is not None and cpus > key.max_vcpus:
            _over(f"This sandbox's {need.cpu_count} vCPUs would take {who} to {cpus} vCPUs in running sandboxes, "
                  f"over its limit of {key.max_vcpus}")
        if key.max_memory_mb is not None and memory > key.max_memory_mb:
            _over(f"This sandbox's {need.memory_mb} MiB of memory would take {who} to {memory} MiB in running "
                  f"sandboxes, over its limit of {key.max_memory_mb} MiB")


def _over(message: str) -> None:
    raise ApiError(429, message, headers={"Should-Retry": "false"})
