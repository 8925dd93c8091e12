"""Sandbox routes of E2B's REST API: create, list, get, kill, timeout, connect.

Routes are plain ``def`` functions: FastAPI runs them in its thread pool, where the orchestrator's
blocking work (mounts, runsc, waiting for envd) belongs.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timezone
from typing import Annotated
from urllib.parse import parse_qsl, unquote

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from sandboxd.api.auth import require_api_key
from sandboxd.api.errors import ApiError
from sandboxd.api.models import (
    ConnectBody,
    NewSandbox,
    PauseBody,
    TimeoutBody,
    detail_json,
    iso,
    listed_json,
    sandbox_json,
)
from sandboxd.config import Settings
from sandboxd.orchestrator.envd_client import EnvdNotReady, fetch_metrics
from sandboxd.orchestrator.sandboxes import CreateRequest, Orchestrator, SandboxError
from sandboxd.store.db import SandboxRow

router = APIRouter(dependencies=[Depends(require_api_key)])
VISIBLE_STATES = ("running", "paused")  # "starting" sandboxes are not handed out yet
MAX_PAGE = 100


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
    """Create (v2; v1 adds its ``secure`` flag and default timeout): 201 with the Sandbox."""
    settings = _settings(request)
    timeout = body.timeout if body.timeout is not None else (default_timeout_s or settings.default_timeout_s)
    if timeout > settings.max_timeout_s:
        raise ApiError(400, f"timeout {timeout}s exceeds the maximum of {settings.max_timeout_s}s")
    req = CreateRequest(template=body.templateID, timeout_s=timeout, metadata=body.metadata or {},
                        env_vars=body.envVars or {},
                        allow_internet_access=body.allow_internet_access is not False,
                        auto_pause=bool(body.autoPause), auto_pause_memory=body.autoPauseMemory is not False,
                        secure=secure)
    try:
        row = _orchestrator(request).create(req)
    except SandboxError as exc:
        raise ApiError(exc.status, exc.message) from exc
    return JSONResponse(sandbox_json(row, settings.domain), status_code=201)


@router.get("/v2/sandboxes")
def list_sandboxes(
    request: Request,
    metadata: str | None = None,
    state: str | None = None,
    startedAfter: datetime | None = None,  # noqa: N803 - E2B's parameter names
    template: str | None = None,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "asc",
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
    nextToken: str | None = None,  # noqa: N803
) -> JSONResponse:
    rows = _filtered(_orchestrator(request), metadata, state, startedAfter, template)
    rows.sort(key=_page_key, reverse=order == "desc")
    if nextToken:
        after = _decode_token(nextToken)
        rows = [r for r in rows if (_page_key(r) > after if order == "asc" else _page_key(r) < after)]
    page = rows[:limit]
    headers = {"x-next-token": _encode_token(_page_key(page[-1]))} if len(rows) > limit else {}
    return JSONResponse([listed_json(r) for r in page], headers=headers)


@router.get("/sandboxes")
def list_sandboxes_v1(request: Request, metadata: str | None = None) -> list[dict]:
    """The v1 list: running sandboxes only, no pagination (SDK 1.x's ``Sandbox.list``, the CLI)."""
    return [listed_json(r) for r in _filtered(_orchestrator(request), metadata, "running", None, None)]


@router.get("/sandboxes/{sandbox_id}")
def get_sandbox(sandbox_id: str, request: Request) -> dict:
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
    if row is None:
        try:
            row = orch.resume(sandbox_id, body.timeout, memory=body.memory)
        except SandboxError as exc:
            raise ApiError(exc.status, exc.message, exc.error_code) from exc
        status = 201
    if row is None:
        raise ApiError(404, f"sandbox '{sandbox_id}' not found")
    return JSONResponse(sandbox_json(row, _settings(request).domain), status_code=status)


@router.get("/sandboxes/{sandbox_id}/metrics")
def sandbox_metrics(sandbox_id: str, request: Request, start: int | None = None, end: int | None = None) -> list[dict]:
    """One live sample from envd (no history is kept yet); empty if it falls outside [start, end]."""
    sample = metric_sample(_orchestrator(request), _visible(_orchestrator(request), sandbox_id))
    if sample is None:
        return []
    ts = sample["timestampUnix"]
    if (start is not None and ts < start) or (end is not None and ts > end):
        return []
    return [sample]


def metric_sample(orch: Orchestrator, row: SandboxRow) -> dict | None:
    """E2B's SandboxMetric, sampled from envd now; None if the sandbox is not running here."""
    upstream = orch.upstream(row.sandbox_id)
    if upstream is None:
        return None
    try:
        m = fetch_metrics(upstream.address, row.envd_access_token)
    except EnvdNotReady as exc:
        raise ApiError(502, str(exc)) from exc
    ts = int(m["ts"])
    return {
        "timestamp": iso(datetime.fromtimestamp(ts, timezone.utc)), "timestampUnix": ts,
        "cpuCount": m["cpu_count"], "cpuUsedPct": m["cpu_used_pct"],
        "memUsed": m["mem_used"], "memTotal": m["mem_total"], "memCache": m["mem_cache"],
        "diskUsed": m["disk_used"], "diskTotal": m["disk_total"],  # the sandbox's own disk
    }


@router.post("/sandboxes/{sandbox_id}/pause", status_code=204)
def pause_sandbox(sandbox_id: str, request: Request, body: Annotated[PauseBody | None, Body()] = None) -> Response:
    """204 paused; 409 already paused (the SDK returns False); 503 when envd does not answer and
    the pause needs it (``requireHealthyGuest``, or ``memory: false``, which syncs the disk)."""
    body = body or PauseBody()
    try:
        paused = _orchestrator(request).pause(sandbox_id, memory=body.memory, strict=body.requireHealthyGuest)
    except SandboxError as exc:
        raise ApiError(exc.status, exc.message) from exc
    if paused is None:
        raise ApiError(404, f"sandbox '{sandbox_id}' not found")
    if paused is False:
        raise ApiError(409, f"sandbox '{sandbox_id}' is already paused")
    return Response(status_code=204)


# -- filtering and pagination -------------------------------------------------------------------


def _filtered(orch: Orchestrator, metadata: str | None, state: str | None,
              started_after: datetime | None, template: str | None) -> list[SandboxRow]:
    wanted_states = set(state.split(",")) if state else set(VISIBLE_STATES)
    wanted_meta = _decode_metadata(metadata)
    out = []
    for r in orch.db.list_sandboxes():
        if r.state not in wanted_states or r.state not in VISIBLE_STATES:
            continue
        if template and template not in (r.template_id, r.alias):
            continue
        if started_after and iso(r.started_at) <= iso(started_after):
            continue
        if any((r.metadata_ or {}).get(k) != v for k, v in wanted_meta.items()):
            continue
        out.append(r)
    return out


def _decode_metadata(raw: str | None) -> dict[str, str]:
    """The SDK encodes each key and value, joins them as a query string, and that string is
    encoded once more on the wire: undo the inner encoding after splitting."""
    if not raw:
        return {}
    return {unquote(k): unquote(v) for k, v in parse_qsl(raw, keep_blank_values=True)}


def _page_key(row: SandboxRow) -> str:
    return f"{iso(row.started_at)}|{row.sandbox_id}"


def _encode_token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def _decode_token(token: str) -> str:
    try:
        key = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid nextToken") from exc
    if "|" not in key:
        raise ApiError(400, "invalid nextToken")
    return key
