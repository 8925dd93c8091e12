"""Sandbox logs: lifecycle events and the template start command's output, per sandbox.

E2B serves these through ``GET /sandboxes/{id}/logs`` (v1, read by the CLI's ``sandbox logs``) and
``GET /v2/sandboxes/{id}/logs``. Here each sandbox has one JSON-lines file under
``<data dir>/logs``, bounded in size: past ``max_bytes`` the oldest entries are dropped (a note
says how many). Files outlive their sandbox, as E2B's logs do, until ``retention_s`` after their
last write, so a killed or timed-out sandbox's logs can still be read.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("sandboxd.logs")

LEVELS = ("debug", "info", "warn", "error")
MAX_BYTES = 1 << 20  # per sandbox
MAX_MESSAGE = 16 << 10  # one entry's message; longer output lines are cut
RETENTION_S = 7 * 24 * 3600


@dataclass(frozen=True)
class LogEntry:
    timestamp_ms: int
    level: str
    message: str
    fields: dict[str, str] = field(default_factory=dict)

    def to_line(self) -> str:
        return json.dumps({"t": self.timestamp_ms, "l": self.level, "m": self.message, "f": self.fields},
                          ensure_ascii=False)

    @staticmethod
    def from_line(line: str) -> LogEntry:
        d = json.loads(line)
        return LogEntry(int(d["t"]), d["l"], d["m"], d.get("f") or {})


class LogStore:
    """Append-only per-sandbox logs, thread-safe (the API reads while sandboxes write)."""

    def __init__(self, root: Path, max_bytes: int = MAX_BYTES, retention_s: float = RETENTION_S) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.retention_s = retention_s
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        self.prune()

    def _path(self, sandbox_id: str) -> Path:
        return self.root / f"{sandbox_id}.jsonl"

    # -- writing -------------------------------------------------------------------------------

    def event(self, sandbox_id: str, message: str, level: str = "info", **fields: str) -> None:
        """A lifecycle event (created, paused, resumed, killed, timed out, ...)."""
        self._append(sandbox_id, LogEntry(_now_ms(), level, message, {"logger": "orchestrator", **fields}))

    def output_sink(self, sandbox_id: str, logger: str = "start_cmd") -> OutputSink:
        """Where a process's stdout/stderr goes, line by line (stderr lines at level warn)."""
        return OutputSink(lambda stream, line: self._append(sandbox_id, LogEntry(
            _now_ms(), "warn" if stream == "stderr" else "info", line[:MAX_MESSAGE],
            {"logger": logger, "stream": stream})))

    def _append(self, sandbox_id: str, entry: LogEntry) -> None:
        line = entry.to_line() + "\n"
        path = self._path(sandbox_id)
        try:
            with self._lock:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(line)
                    size = f.tell()
                if size > self.max_bytes:
                    self._shrink(path)
        except OSError as exc:  # a full disk must not fail the sandbox operation that logs
            log.warning("sandbox %s: log entry lost: %s", sandbox_id, exc)

    def _shrink(self, path: Path) -> None:
        """Keep the newest entries that fill half the bound, after a note of what was dropped."""
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept: list[str] = []
        budget = self.max_bytes // 2
        for line in reversed(lines):
            budget -= len(line.encode())
            if budget < 0:
                break
            kept.append(line)
        kept.reverse()
        dropped = len(lines) - len(kept)
        first_ts = LogEntry.from_line(kept[0]).timestamp_ms if kept else _now_ms()
        note = LogEntry(first_ts, "warn", f"{dropped} earlier log entries were dropped: the logs of one "
                                          f"sandbox are kept up to {self.max_bytes} bytes", {"logger": "sandboxd"})
        tmp = path.with_suffix(".tmp")
        tmp.write_text(note.to_line() + "\n" + "".join(kept), encoding="utf-8")
        os.replace(tmp, path)

    # -- reading -------------------------------------------------------------------------------

    def entries(self, sandbox_id: str) -> list[LogEntry] | None:
        """Every kept entry, oldest first; None if this sandbox never logged (or its logs expired)."""
        try:
            with self._lock:
                text = self._path(sandbox_id).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return [LogEntry.from_line(line) for line in text.splitlines() if line.strip()]

    def prune(self) -> list[str]:
        """Remove the logs of sandboxes not written to for ``retention_s``."""
        cutoff = time.time() - self.retention_s
        removed = []
        for path in self.root.glob("*.jsonl"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path.stem)
            except FileNotFoundError:
                pass
        return removed


class OutputSink:
    """Turns chunks of a process's output into whole lines (a partial line waits for its end)."""

    def __init__(self, write_line: Callable[[str, str], None]) -> None:
        self._write_line = write_line
        self._partial: dict[str, str] = {}

    def write(self, stream: str, text: str) -> None:
        *lines, rest = (self._partial.pop(stream, "") + text).split("\n")
        for line in lines:
            self._write_line(stream, line.rstrip("\r"))
        if len(rest) > MAX_MESSAGE:  # a very long line without a newline is written in pieces
            self._write_line(stream, rest)
            rest = ""
        if rest:
            self._partial[stream] = rest

    def close(self) -> None:
        for stream, rest in self._partial.items():
            self._write_line(stream, rest)
        self._partial.clear()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def select(entries: list[LogEntry], *, cursor_ms: int | None, limit: int, backward: bool = False,
           min_level: str | None = None, search: str | None = None) -> list[LogEntry]:
    """E2B's v2 query: from ``cursor_ms`` on (forward, oldest first) or back from it (newest
    first), at or above ``min_level``, whose message contains ``search``."""
    floor = LEVELS.index(min_level) if min_level else 0
    out = [e for e in entries
           if LEVELS.index(e.level) >= floor and (search is None or search in e.message)
           and (cursor_ms is None or (e.timestamp_ms <= cursor_ms if backward else e.timestamp_ms >= cursor_ms))]
    if backward:
        out.reverse()
    return out[:limit]
