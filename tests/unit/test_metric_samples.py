"""The metric sample store: a series per sandbox, one sample per second, bounded, ranged."""

from __future__ import annotations

from pathlib import Path

from sandboxd.orchestrator.samples import MetricSamples


def _sample(ts: int) -> dict[str, int]:
    return {"ts": ts, "cpu_count": 1, "cpu_used_pct": 0, "mem_total": 1, "mem_used": 0, "disk_total": 1, "disk_used": 0}


def test_series_ranges_dedupes_and_stays_bounded(tmp_path: Path) -> None:
    store = MetricSamples(tmp_path, max_samples=10)
    assert store.series("a") is None
    for ts in (100, 100, 105, 110):  # the second 100 (an on-demand sample meeting the sampler's) is dropped
        store.add("a", _sample(ts))
    assert [s["ts"] for s in store.series("a") or []] == [100, 105, 110]
    assert [s["ts"] for s in store.series("a", start=105) or []] == [105, 110]
    assert [s["ts"] for s in store.series("a", end=104) or []] == [100]
    assert store.latest("a") == _sample(110)
    for ts in range(200, 220):
        store.add("a", _sample(ts))
    kept = [s["ts"] for s in store.series("a") or []]
    assert len(kept) <= 10 and kept[-1] == 219 and kept == sorted(kept)
    assert store.series("b") is None  # series are per sandbox
