"""``GET /metrics`` on the e2e server: behind the API key (header or bearer, as Prometheus sends
it), parsed with prometheus_client's own parser, and moved by a real sandbox's life. The Grafana
dashboard in deploy/grafana only queries metrics the server really exposes."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sandboxd.nbd.exports import ExportMetrics
from sandboxd.observability.collector import NBD_GAUGES
from sandboxd.testing.server import Server

pytestmark = pytest.mark.slow
DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "sandboxd.json"


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """sample name + sorted labels -> value"""
    r = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {server.api_key}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_need_an_api_key(server: Server) -> None:
    before = scrape(server)
    r = httpx.get(f"{server.url}/metrics", timeout=30)
    assert r.status_code == 401 and r.json()["code"] == 401
    assert httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer e2b_wrong"}, timeout=30).status_code == 401
    assert httpx.get(f"{server.url}/metrics", headers={"X-API-Key": server.api_key}, timeout=30).status_code == 200
    after = scrape(server)
    assert value(after, "sandboxd_api_errors_total", status="401", error_code="") == \
        value(before, "sandboxd_api_errors_total", status="401", error_code="") + 2


def test_a_sandbox_life_moves_the_metrics(sdk_env: Server) -> None:
    from e2b import Sandbox
    from e2b.exceptions import NotFoundException, SandboxException

    before = scrape(sdk_env)
    sbx = Sandbox.create(timeout=120)
    try:
        sbx.commands.run("head -c 50000000 /dev/zero | tail -c 1 >/dev/null")
        mine = {"sandbox_id": sbx.sandbox_id, "template": "base"}
        for _ in range(5):  # a scrape gives envds 3 s in all: on a loaded host one may miss it
            during = scrape(sdk_env)
            if ("sandboxd_sandbox_memory_used_bytes", tuple(sorted(mine.items()))) in during:
                break
        assert value(during, "sandboxd_sandboxes", state="running", template="base") >= 1
        assert value(during, "sandboxd_sandbox_memory_used_bytes", **mine) > 0
        assert value(during, "sandboxd_sandbox_memory_total_bytes", **mine) >= value(
            during, "sandboxd_sandbox_memory_used_bytes", **mine)
        assert ("sandboxd_sandbox_cpu_used_percent", tuple(sorted(mine.items()))) in during
        assert value(during, "sandboxd_sandbox_cpu_count", **mine) >= 1
        assert value(during, "sandboxd_sandbox_creates_total", template="base", result="ok") == \
            value(before, "sandboxd_sandbox_creates_total", template="base", result="ok") + 1
        assert value(during, "sandboxd_sandbox_create_seconds_count", template="base") == \
            value(before, "sandboxd_sandbox_create_seconds_count", template="base") + 1
        assert value(during, "sandboxd_sandbox_create_seconds_sum", template="base") > \
            value(before, "sandboxd_sandbox_create_seconds_sum", template="base")
    finally:
        sbx.kill()
    with pytest.raises((NotFoundException, SandboxException)):
        Sandbox.create("no-such-template", timeout=30)
    after = scrape(sdk_env)
    assert value(after, "sandboxd_sandbox_kills_total", reason="api") >= value(
        before, "sandboxd_sandbox_kills_total", reason="api") + 1
    assert value(after, "sandboxd_sandbox_creates_total", template="no-such-template", result="client_error") == \
        value(before, "sandboxd_sandbox_creates_total", template="no-such-template", result="client_error") + 1
    assert not any(dict(labels).get("sandbox_id") == sbx.sandbox_id for _, labels in after)
    for status in ("waiting", "building", "ready", "error"):
        assert ("sandboxd_template_builds", (("status", status),)) in after
    assert value(after, "sandboxd_node_cpus") >= 1 and value(after, "sandboxd_node_disk_free_bytes") > 0
    assert value(after, "sandboxd_node_max_sandboxes") >= 1 and value(after, "sandboxd_templates") >= 1
    assert ("sandboxd_warm_pool_ready", ()) in after and ("sandboxd_warm_pool_size", ()) in after


def test_grafana_dashboard_queries_exposed_metrics(server: Server) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    exposed = {name for name, _ in scrape(server)}
    # counters and histograms appear in a scrape only once something happened; their families do
    r = httpx.get(f"{server.url}/metrics", headers={"X-API-Key": server.api_key}, timeout=30)
    exposed |= set(re.findall(r"^# TYPE (\S+) (?:counter|histogram|gauge)", r.text, re.M))
    # the NBD pool's metrics appear once the microVM runtime is in use (this server runs gVisor)
    exposed |= {f"sandboxd_nbd_{k}" for k in (*NBD_GAUGES, *asdict(ExportMetrics()), "protocol_errors")}
    exposed |= {f"{n}_total" for n in list(exposed)} | {f"{n}_{s}" for n in list(exposed) for s in ("bucket", "sum", "count")}
    for expr in exprs:
        for name in set(re.findall(r"\bsandboxd_[a-z_]+", expr)):
            assert name in exposed, f"dashboard queries {name}, which the server does not expose ({expr})"
