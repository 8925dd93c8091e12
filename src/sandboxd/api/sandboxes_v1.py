"""E2B's earlier sandbox routes, which released SDKs still send: v1 create, resume, refreshes and
the metrics of many sandboxes at once.

Which releases send what (read from their generated clients): ``POST /sandboxes`` by Python
``e2b`` 1.x-2.45 and JS 2.0-2.45; ``POST /sandboxes/{id}/resume`` by Python 2.0.x and JS 2.0.x;
``POST /sandboxes/{id}/refreshes`` and ``GET /sandboxes/metrics`` by every generated client (the
CLI and other languages' SDKs). Each route stays thin: the orchestrator does the work.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from sandboxd.api.auth import require_api_key
from sandboxd.api.errors import ApiError
from sandboxd.api.models import NewSandboxV1, RefreshBody, ResumeBody, sandbox_json
from sandboxd.api.sandboxes import create, latest_metric, resume_within_quota
from sandboxd.orchestrator.sandboxes import Orchestrator

router = APIRouter(dependencies=[Depends(require_api_key)])
#: E2B's defaults of the v1 routes (OpenAPI ``timeout: 15``; a refresh keeps a sandbox 15 s at least)
V1_DEFAULT_TIMEOUT_S = 15
MIN_REFRESH_S = 15
MAX_METRICS_IDS = 100


def _orchestrator(request: Request) -> Orchestrator:
    return request.app.state.orchestrator


@router.post("/sandboxes", status_code=201)
def create_sandbox_v1(body: NewSandboxV1, request: Request) -> JSONResponse:
    """201 with the Sandbox; without ``secure: true`` envd takes no access token (the response
    has none), which is what SDK 1.x asks for unless told otherwise."""
    return create(body, request, secure=body.secure, default_timeout_s=V1_DEFAULT_TIMEOUT_S)


@router.post("/sandboxes/{sandbox_id}/resume", status_code=201)
def resume_sandbox(sandbox_id: str, request: Request,
                   body: Annotated[ResumeBody | None, Body()] = None) -> JSONResponse:
    """201 with the Sandbox once resumed; 409 if it runs (SDK 2.0 then treats it as connected)."""
    body = body or ResumeBody()
    orch = _orchestrator(request)
    row = orch.db.get_sandbox(sandbox_id)
    if row is None or row.state not in ("running", "paused"):
        raise ApiError(404, f"sandbox '{sandbox_id}' not found")
    if row.state == "running":
        raise ApiError(409, f"sandbox '{sandbox_id}' is already running")
    row = resume_within_quota(request, row, body.timeout or V1_DEFAULT_TIMEOUT_S, body.memory)
    if row is None:  # killed or resumed by someone else meanwhile
        raise ApiError(409, f"sandbox '{sandbox_id}' is not paused any more")
    if body.autoPause is not None and body.autoPause != row.auto_pause:
        row = orch.db.update_sandbox(sandbox_id, auto_pause=body.autoPause) or row
    return JSONResponse(sandbox_json(row, request.app.state.settings.domain), status_code=201)


@router.post("/sandboxes/{sandbox_id}/refreshes", status_code=204)
def refresh_sandbox(sandbox_id: str, request: Request,
                    body: Annotated[RefreshBody | None, Body()] = None) -> Response:
    """Keep a running sandbox alive ``duration`` (at least 15) seconds from now; never shortens
    its life (``timeout`` does that). 404 if it is not running."""
    duration = max((body.duration if body and body.duration is not None else 0), MIN_REFRESH_S)
    if _orchestrator(request).connect(sandbox_id, duration) is None:
        raise ApiError(404, f"sandbox '{sandbox_id}' is not running")
    return Response(status_code=204)


@router.get("/sandboxes/metrics")
def sandboxes_metrics(request: Request, sandbox_ids: Annotated[list[str], Query()]) -> dict[str, Any]:
    """``{"sandboxes": {id: SandboxMetric}}``: the newest sample of each running sandbox among
    ``sandbox_ids`` (comma-separated, or repeated as SDK 1.x's client sends them); others are left out."""
    ids = [i for raw in sandbox_ids for i in raw.split(",") if i]
    if not ids or len(ids) > MAX_METRICS_IDS:
        raise ApiError(400, f"sandbox_ids: give 1 to {MAX_METRICS_IDS} sandbox ids")
    orch = _orchestrator(request)
    out = {}
    for sandbox_id in dict.fromkeys(ids):
        row = orch.db.get_sandbox(sandbox_id)
        if row is not None and row.state == "running" and (sample := latest_metric(request, row)) is not None:
            out[sandbox_id] = sample
    return {"sandboxes": out}

