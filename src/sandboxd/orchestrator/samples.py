"""Sandbox metrics over time: every running sandbox's envd ``/metrics``, sampled periodically.

E2B samples each sandbox every few seconds and ``GET /sandboxes/{id}/metrics?start&end`` returns
the series over the sandbox's life (a paused sandbox keeps its history; nothing is sampled while it
is paused). Here each sandbox has one JSON-lines file under ``<data dir>/metrics`` (one line per
sample, envd's own keys), bounded to ``max_samples`` (the oldest half goes first). Like the logs,
a file outlives its sandbox until ``retention_s`` after its last sample.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sandboxd.orchestrator.envd_client import EnvdNotReady, fetch_metrics
from sandboxd.store.db import SandboxRow

log = logging.getLogger("sandboxd.metrics")

INTERVAL_S = 5.0  # E2B's sampling period
MAX_SAMPLES = 24 * 3600 // 5  # a day of samples per sandbox
RETENTION_S = 7 * 24 * 3600
_PARALLEL = 8


class MetricSamples:
    """Per-sandbox series of envd metric samples (``ts`` in Unix seconds), thread-safe."""

    def __init__(self, root: Path, max_samples: int = MAX_SAMPLES, retention_s: float = RETENTION_S) -> None:
        self.root = root
        self.max_samples = max_samples
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._last_ts: dict[str, int] = {}  # sandbox id -> second of its newest sample
        root.mkdir(parents=True, exist_ok=True)
        self.prune()

    def _path(self, sandbox_id: str) -> Path:
        return self.root / f"{sandbox_id}.jsonl"

    def add(self, sandbox_id: str, sample: dict[str, Any]) -> None:
        """Keep ``sample``; one per second at most (an on-demand sample and the sampler's may meet)."""
        path = self._path(sandbox_id)
        try:
            with self._lock:
                if self._last_ts.get(sandbox_id) == int(sample["ts"]):
                    return
                self._last_ts[sandbox_id] = int(sample["ts"])
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(sample) + "\n")
                count = self._counts.get(sandbox_id)
                if count is None:
                    with open(path, encoding="utf-8") as written:
                        count = sum(1 for _ in written)
                else:
                    count += 1
                if count > self.max_samples:
                    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[-(self.max_samples // 2):]
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text("".join(lines), encoding="utf-8")
                    os.replace(tmp, path)
                    count = len(lines)
                self._counts[sandbox_id] = count
        except OSError as exc:  # a full disk must not stop the sampler
            log.warning("sandbox %s: metric sample lost: %s", sandbox_id, exc)

    def series(self, sandbox_id: str, start: int | None = None, end: int | None = None) -> list[dict[str, Any]] | None:
        """Samples with ``start <= ts <= end``, oldest first; None if the sandbox never had one."""
        try:
            with self._lock:
                text = self._path(sandbox_id).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        out = []
        for line in text.splitlines():
            if not line.strip():
                continue
            sample = json.loads(line)
            ts = int(sample["ts"])
            if (start is None or ts >= start) and (end is None or ts <= end):
                out.append(sample)
        return out

    def latest(self, sandbox_id: str) -> dict[str, Any] | None:
        found = self.series(sandbox_id)
        return found[-1] if found else None

    def prune(self) -> None:
        """Remove the series of sandboxes not sampled for ``retention_s``."""
        cutoff = time.time() - self.retention_s
        for path in self.root.glob("*.jsonl"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    with self._lock:
                        self._counts.pop(path.stem, None)
                        self._last_ts.pop(path.stem, None)
            except FileNotFoundError:
                pass

    # -- sampling ------------------------------------------------------------------------------

    def sample_one(self, row: SandboxRow, address: str) -> dict[str, Any] | None:
        """Ask one sandbox's envd now and keep the answer; None if it did not answer."""
        try:
            sample = fetch_metrics(address, row.envd_access_token)
        except EnvdNotReady as exc:
            log.debug("sandbox %s: no metric sample: %s", row.sandbox_id, exc)
            return None
        self.add(row.sandbox_id, sample)
        return sample

    def sample_all(self, running: Iterable[SandboxRow], address_of: Callable[[str], str | None]) -> int:
        """One sample of every running sandbox that answers here; how many were taken."""
        targets = [(row, addr) for row in running if (addr := address_of(row.sandbox_id)) is not None]
        if not targets:
            return 0
        with ThreadPoolExecutor(max_workers=min(_PARALLEL, len(targets)), thread_name_prefix="metrics") as pool:
            return sum(1 for s in pool.map(lambda t: self.sample_one(*t), targets) if s is not None)
