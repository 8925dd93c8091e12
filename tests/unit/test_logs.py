"""The sandbox log store: bounded per sandbox, line-buffered output, E2B's v2 query."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sandboxd.orchestrator.logs import LogEntry, LogStore, OutputSink, select


def test_a_sandbox_log_stays_within_its_bound_and_says_what_it_dropped(tmp_path: Path) -> None:
    store = LogStore(tmp_path, max_bytes=4096)
    for i in range(500):
        store.event("sbx", f"event {i}")
    entries = store.entries("sbx")
    assert entries is not None
    assert (tmp_path / "sbx.jsonl").stat().st_size <= 4096
    assert entries[0].level == "warn" and "earlier log entries were dropped" in entries[0].message
    assert entries[-1].message == "event 499"
    numbers = [int(e.message.split()[1]) for e in entries[1:]]
    assert numbers == list(range(numbers[0], 500))  # the newest, in order, none lost in between
    assert store.entries("other") is None


def test_output_is_logged_line_by_line_with_stderr_as_warnings(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    sink = store.output_sink("sbx")
    sink.write("stdout", "hel")
    sink.write("stderr", "oops\n")
    sink.write("stdout", "lo\nwor")
    sink.close()
    got = [(e.level, e.message, e.fields["stream"]) for e in store.entries("sbx") or []]
    assert got == [("warn", "oops", "stderr"), ("info", "hello", "stdout"), ("info", "wor", "stdout")]


def test_an_endless_line_is_written_in_pieces() -> None:
    lines: list[str] = []
    sink = OutputSink(lambda _stream, line: lines.append(line))
    sink.write("stdout", "x" * (20 << 10))
    assert len(lines) == 1 and len(lines[0]) == 20 << 10


def test_logs_past_their_retention_are_pruned(tmp_path: Path) -> None:
    LogStore(tmp_path).event("old", "created")
    LogStore(tmp_path).event("new", "created")
    past = time.time() - 3600
    os.utime(tmp_path / "old.jsonl", (past, past))
    store = LogStore(tmp_path, retention_s=60)
    assert store.entries("old") is None and store.entries("new") is not None


def test_select_follows_e2b_v2_cursor_direction_level_and_search() -> None:
    entries = [LogEntry(1000, "info", "created"), LogEntry(2000, "warn", "disk low"),
               LogEntry(3000, "info", "paused"), LogEntry(4000, "error", "boom")]
    msgs = lambda es: [e.message for e in es]  # noqa: E731
    assert msgs(select(entries, cursor_ms=2000, limit=10)) == ["disk low", "paused", "boom"]
    assert msgs(select(entries, cursor_ms=3000, limit=2, backward=True)) == ["paused", "disk low"]
    assert msgs(select(entries, cursor_ms=None, limit=10, min_level="warn")) == ["disk low", "boom"]
    assert msgs(select(entries, cursor_ms=None, limit=10, search="pause")) == ["paused"]
    assert msgs(select(entries, cursor_ms=None, limit=1, backward=True)) == ["boom"]
