"""Sandbox routes of E2B's REST API: create, list, get, kill, timeout, connect.

Routes are plain ``def`` functions: FastAPI runs them in its thread pool, where the orchestrator's
blocking work (mounts, runsc, waiting for envd) belongs.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response
from fastapi.responses import JSONResponse

from sandboxd.api import listing
from sandboxd.api.auth import api_key_of, require_api_key
from sandboxd.api.errors import ApiError
from sandboxd.api.models import (
    ConnectBody,
    NetworkUpdate,
    NewSandbox,
    PauseBody,
    TimeoutBody,
    VolumeMount,
    detail_json,
    iso,
    listed_json,
    sandbox_json,
    unsupported_options,
)
from sandboxd.api.quotas import Need, Quotas
from sandboxd.config import Settings
from sandboxd.orchestrator.egress import EgressPolicy, PolicyError
from sandboxd.orchestrator.samples import MetricSamples
from sandboxd.orchestrator.sandboxes import CreateRequest, Orchestrator
from sandboxd.orchestrator.volumes import VolumeError, check_mount_path
from sandboxd.store.db import ApiKey, SandboxRow, hash_key

router = APIRouter(dependencies=[Depends(require_api_key)])
#: what the SDK allows in an ``Idempotency-Key`` (e2b.retry.resolve_idempotency_key)
_IDEMPOTENCY_KEY = re.compile(r"[a-z0-9-]{1,255}")
VISIBLE_STATES = listing.LISTED_STATES


def _orchestrator(request: Request) -> Orchestrator:
    return request.app.state.orchestrator


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _visible(orch: Orchestrator, sandbox_id: str) -> SandboxRow:
    row = orch.db.get_sandbox(sandbox_id)
    if row is None or row.state not in VISIBLE_STATES:
        raise ApiError(404, f"sandbox '{sandbox_id}' not found")
    return row


@router.post("/v2/sandboxes", status_code=201)
def create_sandbox(body: NewSandbox, request: Request) -> JSONResponse:
    return create(body, request)


def create(body: NewSandbox, request: Request, secure: bool = True,
           default_timeout_s: int | None = None) -> JSONResponse:
    """Create (v2; v1 adds its ``secure`` flag and default timeout): 201 with the Sandbox.

    With an ``Idempotency-Key`` a retried create (same API key, same key) answers the sandbox the
    first one made, also while that one is still starting (the retry waits for it), through any API
    replica of a cluster (the key's lock is the database's)."""
    settings = _settings(request)
    req = _create_request(body, request, secure, default_timeout_s or settings.default_timeout_s)
    orch = _orchestrator(request)
    if req.idempotency_key is None:
        return JSONResponse(sandbox_json(_create(request, req), settings.domain), status_code=201)
    with orch.db.lock(f"idempotency:{req.idempotency_key}"):  # every replica's creates of the key
        row = orch.db.find_sandbox_by_idempotency_key(req.idempotency_key)
        if row is None or row.state not in VISIBLE_STATES:
            row = _create(request, req)
    return JSONResponse(sandbox_json(row, settings.domain), status_code=201)


def _create(request: Request, req: CreateRequest) -> SandboxRow:
    """Within the API key's quotas. A failed start was already retried by the orchestrator: the
    SDK is told not to retry it again."""
    orch = _orchestrator(request)
    res = orch.resources_for(req.template)
    with _quotas(request).reserve(_caller(request), Need(res.cpu_count, res.memory_mb)):
        return orch.create(req)


def _create_request(body: NewSandbox, request: Request, secure: bool, default_timeout_s: int) -> CreateRequest:
    """Every option of the body, checked: a 400 naming a bad one, a 501 naming one sandboxd
    cannot honour yet, never an option dropped."""
    settings = _settings(request)
    timeout = body.timeout if body.timeout is not None else default_timeout_s
    if timeout > settings.max_timeout_s:
        raise ApiError(400, f"timeout {timeout}s exceeds the maximum of {settings.max_timeout_s}s")
    if (unsupported := unsupported_options(body)) is not None:
        raise ApiError(501, f"sandboxd does not support {unsupported}")
    if body.autoResume and body.autoResume.enabled and not (body.autoPause and body.autoPauseMemory is not False):
        raise ApiError(400, "autoResume: only a sandbox paused with its memory at its timeout "
                            "(autoPause: true, autoPauseMemory not false) can be resumed by traffic")
    net = body.network
    allow_internet = body.allow_internet_access is not False
    egress = None
    if net is not None and (net.allowOut is not None or net.denyOut is not None or net.dnsServers is not None
                            or net.rules is not None):
        egress = _policy(request, allow_internet, net.allowOut, net.denyOut, net.dnsServers, "network", net.rules)
    https_ports = tuple(net.httpsPorts or ()) if net else ()
    for i, port in enumerate(https_ports):
        if not 0 < port < 65536:
            raise ApiError(400, f"network.httpsPorts[{i}]: {port} is not a TCP port")
    if net and net.maskRequestHost is not None and not _MASK_HOST.fullmatch(net.maskRequestHost):
        raise ApiError(400, "network.maskRequestHost: a host name, optionally with ':port', where '${PORT}' "
                            "stands for the sandbox port")
    mounts = _volume_mounts(request, body.volumeMounts or [])
    snapshots = request.app.state.snapshots
    seed = snapshots.seed_for(body.templateID)  # a snapshot's id or name: start from its files
    env_vars = {**(snapshots.env_of(body.templateID) if seed else {}), **(body.envVars or {})}
    return CreateRequest(template=body.templateID, timeout_s=timeout, metadata=body.metadata or {},
                         env_vars=env_vars, allow_internet_access=allow_internet, egress=egress, seed=seed,
                         volume_mounts=mounts,
                         auto_pause=bool(body.autoPause), auto_pause_memory=body.autoPauseMemory is not False,
                         auto_resume=bool(body.autoResume and body.autoResume.enabled), secure=secure,
                         allow_public_traffic=not (net and net.allowPublicTraffic is False),
                         mask_request_host=net.maskRequestHost if net else None, https_ports=https_ports,
                         idempotency_key=_idempotency_key(request), owner=_owner(request))


def _volume_mounts(request: Request, asked: list[VolumeMount]) -> tuple[dict[str, str], ...]:
    """``volumeMounts`` with names resolved: 404 an unknown volume, 400 a bad or repeated path."""
    out: list[dict[str, str]] = []
    for i, m in enumerate(asked):
        row = request.app.state.volumes.find(m.name)
        if row is None:
            raise ApiError(404, f"volumeMounts[{i}].name: volume '{m.name}' not found")
        try:
            path = check_mount_path(m.path, f"volumeMounts[{i}].path")
        except VolumeError as exc:
            raise ApiError(exc.status, exc.message) from exc
        if any(o["path"] == path for o in out):
            raise ApiError(400, f"volumeMounts[{i}].path: {path} is mounted twice")
        out.append({"volumeID": row.volume_id, "path": path})
    return tuple(out)


_MASK_HOST = re.compile(r"[A-Za-z0-9.${}_-]{1,253}(:[0-9${}A-Z]{1,12})?")


def _policy(request: Request, allow_internet: bool, allow_out: list[str] | None, deny_out: list[str] | None,
            dns_servers: list[str] | None, prefix: str, rules: Any) -> EgressPolicy:
    """The body's egress rules, checked; a transform's ``${e2b.secrets.<name>}`` must name a secret."""
    secrets = request.app.state.secrets
    try:
        return EgressPolicy.parse(allow_internet, allow_out, deny_out, dns_servers, prefix, rules,
                                  lambda name: secrets.find(name) is not None)
    except PolicyError as exc:
        raise ApiError(exc.status, str(exc)) from exc


def _quotas(request: Request) -> Quotas:
    return request.app.state.quotas


def _caller(request: Request) -> ApiKey | None:
    key = api_key_of(request)
    return _orchestrator(request).db.get_api_key(key) if key else None


def _owner(request: Request) -> str | None:
    key = api_key_of(request)
    return hash_key(key) if key else None


def resume_within_quota(request: Request, row: SandboxRow, timeout_s: int | None, memory: bool) -> SandboxRow | None:
    """Resume a paused sandbox, its CPUs and memory counted against the caller's quotas."""
    with _quotas(request).reserve(_caller(request), Need(row.cpu_count, row.memory_mb)):
        return _orchestrator(request).resume(row.sandbox_id, timeout_s, memory=memory)


def _idempotency_key(request: Request) -> str | None:
    """``<API key hash>:<Idempotency-Key>``: keys of different API keys never meet."""
    raw = request.headers.get("idempotency-key")
    if raw is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(raw):
        raise ApiError(400, "Idempotency-Key: 1-255 lowercase letters, digits and hyphens")
    owner = hashlib.sha256((api_key_of(request) or "").encode()).hexdigest()[:16]
    return f"{owner}:{raw}"


@router.put("/sandboxes/{sandbox_id}/network", status_code=204)
def update_network(sandbox_id: str, body: NetworkUpdate, request: Request) -> Response:
    """Replace a sandbox's egress rules at once (E2B: omitted fields are cleared, so ``{}`` opens
    it to every public address again)."""
    if (unsupported := unsupported_options(body)) is not None:
        raise ApiError(501, f"sandboxd does not support {unsupported}")
    policy = _policy(request, body.allow_internet_access is not False, body.allowOut, body.denyOut, body.dnsServers,
                     "", body.rules)
    row = _orchestrator(request).update_network(sandbox_id, policy)
    if row is None:
        raise ApiError(404, f"sandbox '{sandbox_id}' not found")
    return Response(status_code=204)


@router.get("/v2/sandboxes")
def list_sandboxes(
    request: Request,
    metadata: str | None = None,
    state: str | None = None,
    startedAfter: datetime | None = None,  # noqa: N803 - E2B's parameter names
    template: str | None = None,
    order: str | None = None,
    limit: int | None = None,
    nextToken: str | None = None,  # noqa: N803
) -> JSONResponse:
    """E2B's v2 list (see :mod:`sandboxd.api.listing`): newest first, paged by ``x-next-token``."""
    orch = _orchestrator(request)
    query = listing.parse_query(orch.db, metadata=metadata, state=state, started_after=startedAfter,
                                template=template, order=order, limit=limit, next_token=nextToken)
    if query is None:  # no such template: nothing to list
        return JSONResponse([], headers={"x-total-running": "0"} if state is None or "running" in state else {})
    found = listing.page(orch.db.list_sandboxes(), query)
    headers = {"x-total-running": str(found.total_running)} if "running" in query.states else {}
    if found.next_token:
        headers["x-next-token"] = found.next_token
    return JSONResponse([listed_json(r) for r in found.rows], headers=headers)


@router.get("/sandboxes")
def list_sandboxes_v1(request: Request, metadata: str | None = None) -> list[dict[str, Any]]:
    """The v1 list: running sandboxes only, newest first, no pagination (SDK 1.x, the CLI)."""
    wanted = listing.parse_metadata(metadata)
    rows = [r for r in _orchestrator(request).db.list_sandboxes()
            if r.state == "running" and all((r.metadata_ or {}).get(k) == v for k, v in wanted.items())]
    rows.sort(key=lambda r: (-listing.micros(r.started_at), r.sandbox_id))
    return [listed_json(r) for r in rows]


@router.get("/sandboxes/{sandbox_id}")
def get_sandbox(sandbox_id: str, request: Request) -> dict[str, Any]:
    return detail_json(_visible(_orchestrator(request), sandbox_id), _settings(request).domain)


@router.delete("/sandboxes/{sandbox_id}", status_code=204)
def kill_sandbox(sandbox_id: str, request: Request) -> Response:
    if not _orchestrator(request).kill(sandbox_id):
        raise ApiError(404, f"sandbox '{sandbox_id}' not found")
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/timeout", status_code=204)
def set_timeout(sandbox_id: str, body: TimeoutBody, request: Request) -> Response:
    """404 for a paused sandbox too, as on E2B: only a running sandbox has a timeout (SDK 2.0's
    ``connect`` relies on it: it sets the timeout and resumes the sandbox when that fails)."""
    settings = _settings(request)
    if body.timeout > settings.max_timeout_s:
        raise ApiError(400, f"timeout {body.timeout}s exceeds the maximum of {settings.max_timeout_s}s")
    orch = _orchestrator(request)
    if _visible(orch, sandbox_id).state != "running":
        raise ApiError(404, f"sandbox '{sandbox_id}' is paused: resume it (connect) first")
    if not orch.set_timeout(sandbox_id, body.timeout):
        raise ApiError(404, f"sandbox '{sandbox_id}' not found")
    return Response(status_code=204)


@router.post("/v2/sandboxes/{sandbox_id}/connect")
@router.post("/sandboxes/{sandbox_id}/connect")  # v1, sent by SDKs 2.1-2.45 (same body, without memory)
def connect_sandbox(sandbox_id: str, body: ConnectBody, request: Request) -> JSONResponse:
    """200 for a running sandbox; a paused one is resumed first (201)."""
    orch = _orchestrator(request)
    status = 200
    row = orch.connect(sandbox_id, body.timeout)
    if row is None and (paused := orch.db.get_sandbox(sandbox_id)) is not None and paused.state == "paused":
        row = resume_within_quota(request, paused, body.timeout, body.memory)
        status = 201
    if row is None:
        raise ApiError(404, f"sandbox '{sandbox_id}' not found")
    return JSONResponse(sandbox_json(row, _settings(request).domain), status_code=status)


@router.get("/sandboxes/{sandbox_id}/metrics")
def sandbox_metrics(sandbox_id: str, request: Request, start: int | None = None, end: int | None = None) -> list[dict[str, Any]]:
    """The sampled series over the sandbox's life (start: its start, end: now by default), oldest
    first, as E2B keeps it; a paused sandbox keeps its history. A running sandbox not sampled yet
    is sampled now, so a call right after create sees one sample."""
    orch = _orchestrator(request)
    row = _visible(orch, sandbox_id)
    samples = _samples(request)
    first = listing.micros(row.started_at) // 1_000_000 if start is None else start
    last = int(datetime.now(UTC).timestamp()) + 1 if end is None else end
    if first > last:
        raise ApiError(400, f"Invalid time range for metrics: start ({first}) is after end ({last})")
    if not samples.series(sandbox_id) and (upstream := orch.upstream(sandbox_id)) is not None:
        samples.sample_one(row, upstream.address)
    return [metric_json(s) for s in samples.series(sandbox_id, first, last) or []]


def _samples(request: Request) -> MetricSamples:
    return request.app.state.metric_samples


def latest_metric(request: Request, row: SandboxRow) -> dict[str, Any] | None:
    """E2B's SandboxMetric: the sandbox's newest sample (taken now if it has none yet)."""
    samples = _samples(request)
    sample = samples.latest(row.sandbox_id)
    if sample is None and (upstream := _orchestrator(request).upstream(row.sandbox_id)) is not None:
        sample = samples.sample_one(row, upstream.address)
    return metric_json(sample) if sample is not None else None


def metric_json(m: dict[str, Any]) -> dict[str, Any]:
    """envd's ``/metrics`` keys as E2B's SandboxMetric."""
    ts = int(m["ts"])
    return {
        "timestamp": iso(datetime.fromtimestamp(ts, UTC)), "timestampUnix": ts,
        "cpuCount": m["cpu_count"], "cpuUsedPct": m["cpu_used_pct"],
        "memUsed": m["mem_used"], "memTotal": m["mem_total"], "memCache": m.get("mem_cache", 0),
        "diskUsed": m["disk_used"], "diskTotal": m["disk_total"],  # the sandbox's own disk
    }


@router.post("/sandboxes/{sandbox_id}/pause", status_code=204)
def pause_sandbox(sandbox_id: str, request: Request, body: Annotated[PauseBody | None, Body()] = None) -> Response:
    """204 paused; 409 already paused (the SDK returns False); 503 when envd does not answer and
    the pause needs it (``requireHealthyGuest``, or ``memory: false``, which syncs the disk)."""
    body = body or PauseBody()
    paused = _orchestrator(request).pause(sandbox_id, memory=body.memory, strict=body.requireHealthyGuest)
    if paused is None:
        raise ApiError(404, f"sandbox '{sandbox_id}' not found")
    if paused is False:
        raise ApiError(409, f"sandbox '{sandbox_id}' is already paused")
    return Response(status_code=204)
