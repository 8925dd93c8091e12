"""What the node looks like right now, read at each scrape: sandboxes by state and template, each
running sandbox's CPU and memory (from its envd), template builds by status, the NBD export pool,
and the node's capacity. Nothing is cached: a scrape is a handful of queries and one envd call per
running sandbox (in parallel, each bounded by envd_client's timeout).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, select

from sandboxd.orchestrator.envd_client import EnvdNotReady, fetch_metrics
from sandboxd.orchestrator.sandboxes import Orchestrator
from sandboxd.store.db import SandboxRow, TemplateAlias
from sandboxd.store.templates_db import TemplateBuildRow

STATES = ("starting", "running", "paused")
BUILD_STATUSES = ("waiting", "building", "ready", "error")
#: NBD export-pool values that go up and down; the rest of ExportPool.metrics() only go up.
NBD_GAUGES = ("exports", "exports_free", "exports_in_use", "exports_connected", "dirty_blocks")
SAMPLE_WORKERS = 8
#: Seconds a scrape waits for envd samples in all (Prometheus' default scrape timeout is 10 s).
SCRAPE_BUDGET_S = 3.0


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


class NodeCollector:
    """A prometheus_client collector over one orchestrator."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch

    def collect(self) -> Iterator[Metric]:
        rows = self.orch.db.list_sandboxes()
        with self.orch.db.session() as s:
            aliases = set(s.scalars(select(TemplateAlias.alias)))
        yield from self._sandboxes(rows, aliases)
        yield from self._samples([r for r in rows if r.state == "running"])
        yield from self._templates(len(aliases))
        yield from self._nbd()
        yield from self._pool()
        yield from self._node(rows)

    def _sandboxes(self, rows: list[SandboxRow], aliases: set[str]) -> Iterator[Metric]:
        g = GaugeMetricFamily("sandboxd_sandboxes", "Sandboxes on this node by state and template",
                              labels=["state", "template"])
        counts = collections.Counter((r.state, r.alias or r.template_id) for r in rows)
        for template in sorted(aliases | {t for _, t in counts}):  # zeros too: a line on every dashboard
            for state in STATES:
                g.add_metric([state, template], counts.get((state, template), 0))
        yield g

    def _samples(self, running: list[SandboxRow]) -> Iterator[Metric]:
        labels = ["sandbox_id", "template"]
        cpu = GaugeMetricFamily("sandboxd_sandbox_cpu_used_percent", "CPU use of a running sandbox, in percent "
                                "of its CPUs (as its envd measures it)", labels=labels)
        cpus = GaugeMetricFamily("sandboxd_sandbox_cpu_count", "CPUs a running sandbox has", labels=labels)
        mem = GaugeMetricFamily("sandboxd_sandbox_memory_used_bytes", "Memory a running sandbox uses", labels=labels)
        mem_total = GaugeMetricFamily("sandboxd_sandbox_memory_total_bytes", "Memory a running sandbox has",
                                      labels=labels)
        disk = GaugeMetricFamily("sandboxd_sandbox_disk_used_bytes", "Bytes used on a running sandbox's own disk",
                                 labels=labels)
        failed = GaugeMetricFamily("sandboxd_sandbox_sample_failures", "Running sandboxes whose envd did not "
                                   "answer this scrape's metrics request")
        samples = self._sample_all(running)
        for row, m in samples:
            if m is None:
                continue
            values = [row.sandbox_id, row.alias or row.template_id]
            cpu.add_metric(values, float(m["cpu_used_pct"]))
            cpus.add_metric(values, float(m["cpu_count"]))
            mem.add_metric(values, float(m["mem_used"]))
            mem_total.add_metric(values, float(m["mem_total"]))
            disk.add_metric(values, float(m["disk_used"]))
        failed.add_metric([], sum(1 for _, m in samples if m is None))
        yield from (cpu, cpus, mem, mem_total, disk, failed)

    def _sample_all(self, running: list[SandboxRow]) -> list[tuple[SandboxRow, dict[str, Any] | None]]:
        """One envd sample per running sandbox, in parallel, within SCRAPE_BUDGET_S in all: a
        scrape must answer within Prometheus' timeout however many envds are slow."""
        def sample(row: SandboxRow) -> dict[str, Any] | None:
            upstream = self.orch.upstream(row.sandbox_id)
            if upstream is None:
                return None
            try:
                return fetch_metrics(upstream.address, row.envd_access_token)
            except EnvdNotReady:
                return None

        if not running:
            return []
        pool = ThreadPoolExecutor(max_workers=min(SAMPLE_WORKERS, len(running)), thread_name_prefix="scrape")
        futures = [pool.submit(sample, row) for row in running]
        wait(futures, timeout=SCRAPE_BUDGET_S)
        pool.shutdown(wait=False, cancel_futures=True)  # the stragglers end on envd_client's own timeout
        return [(row, f.result() if f.done() and not f.cancelled() else None) for row, f in zip(running, futures, strict=True)]

    def _templates(self, aliases: int) -> Iterator[Metric]:
        with self.orch.db.session() as s:
            by_status = dict(s.execute(select(TemplateBuildRow.status, func.count())
                                       .group_by(TemplateBuildRow.status)).all())
        builds = GaugeMetricFamily("sandboxd_template_builds", "Template build requests by status", labels=["status"])
        for status in BUILD_STATUSES:
            builds.add_metric([status], by_status.get(status, 0))
        yield builds
        yield GaugeMetricFamily("sandboxd_templates", "Template names (aliases) on this node", value=aliases)

    def _nbd(self) -> Iterator[Metric]:
        providers = [b.provider for b in self.orch.backends.made() if hasattr(b, "provider")]
        if not providers:
            return
        totals: collections.Counter[str] = collections.Counter()
        for provider in providers:
            totals.update(provider.metrics())
        for key, value in sorted(totals.items()):
            if key in NBD_GAUGES:
                yield GaugeMetricFamily(f"sandboxd_nbd_{key}", f"NBD copy-on-write exports: {key.replace('_', ' ')}",
                                        value=value)
            else:
                yield CounterMetricFamily(f"sandboxd_nbd_{key}", f"NBD copy-on-write exports: {key.replace('_', ' ')} "
                                          "since the server started", value=value)

    def _pool(self) -> Iterator[Metric]:
        pool = self.orch.pool
        yield GaugeMetricFamily("sandboxd_warm_pool_size", "Booted sandboxes the warm pool keeps per template "
                                "build in demand (0: no pool)", value=pool.size)
        yield GaugeMetricFamily("sandboxd_warm_pool_ready", "Booted sandboxes waiting in the warm pool",
                                value=pool.ready_count())

    def _node(self, rows: list[SandboxRow]) -> Iterator[Metric]:
        settings = self.orch.settings
        mem = _meminfo()
        st = os.statvfs(settings.data_dir)
        yield GaugeMetricFamily("sandboxd_node_max_sandboxes", "Sandboxes this node may hold (network slots)",
                                value=min(settings.max_sandboxes, self.orch.slots.max_slots))
        yield GaugeMetricFamily("sandboxd_node_cpus", "CPUs of the host", value=os.cpu_count() or 0)
        yield GaugeMetricFamily("sandboxd_node_memory_total_bytes", "Memory of the host", value=mem.get("MemTotal", 0))
        yield GaugeMetricFamily("sandboxd_node_memory_available_bytes", "Memory the host has available",
                                value=mem.get("MemAvailable", 0))
        yield GaugeMetricFamily("sandboxd_node_disk_free_bytes", "Free bytes on the data dir's filesystem",
                                value=st.f_bavail * st.f_frsize)
        yield GaugeMetricFamily("sandboxd_node_disk_total_bytes", "Size of the data dir's filesystem",
                                value=st.f_blocks * st.f_frsize)
        yield GaugeMetricFamily("sandboxd_node_sandbox_memory_committed_bytes", "Memory promised to the "
                                "sandboxes on this node", value=sum(r.memory_mb for r in rows) * 1024 * 1024)
