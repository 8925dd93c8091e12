"""E2B's snapshot and fork routes (the work is in orchestrator/snapshots.py).

- ``POST /sandboxes/{id}/snapshots`` ``{name?, memory?}`` → 201 ``SnapshotInfo`` (the sandbox runs on);
- ``GET /snapshots?sandboxID&name&limit&nextToken`` → newest first, paged by ``x-next-token``;
- ``DELETE /templates/{id}`` → 204 for a snapshot (the SDK's ``delete_snapshot``), 404 unknown;
- ``POST /sandboxes/{id}/fork`` ``{timeout=15, count=1}`` → 201, one ``{sandbox}`` or ``{error}`` per fork;
- ``POST /v2/sandboxes`` with a snapshot's id or name as ``templateID`` starts from it (api/sandboxes.py).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field

from sandboxd.api.auth import require_api_key
from sandboxd.api.errors import ApiError
from sandboxd.api.listing import MAX_PAGE, micros
from sandboxd.api.models import _Strict, sandbox_json
from sandboxd.orchestrator.snapshots import SnapshotService
from sandboxd.store.db import SandboxRow
from sandboxd.store.snapshots_db import SnapshotRow

router = APIRouter(dependencies=[Depends(require_api_key)])
DEFAULT_TAG = "default"
MAX_FORKS = 100  # E2B's maxForkCount (the SDK allows 1-20)
FORK_DEFAULT_TIMEOUT_S = 15  # E2B's SandboxForkRequest default


class SnapshotBody(_Strict):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    memory: bool | None = None  # None: memory where the runtime keeps it (microVM); true on gVisor: 501


class ForkBody(_Strict):
    timeout: int = Field(default=FORK_DEFAULT_TIMEOUT_S, ge=1)
    count: int = Field(default=1)


def service(request: Request) -> SnapshotService:
    return request.app.state.snapshots


def snapshot_json(snap: SnapshotRow) -> dict[str, Any]:
    """``SnapshotInfo``: ``name:default`` when named, else ``<id>:default`` (E2B's shape, no team)."""
    names = [f"{snap.name}:{DEFAULT_TAG}"] if snap.name else []
    return {"snapshotID": names[0] if names else f"{snap.snapshot_id}:{DEFAULT_TAG}", "names": names}


@router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201)
def create_snapshot(sandbox_id: str, request: Request,
                    body: Annotated[SnapshotBody | None, Body()] = None) -> JSONResponse:
    body = body or SnapshotBody()
    snap = service(request).take(sandbox_id, body.name, body.memory)
    return JSONResponse(snapshot_json(snap), status_code=201)


@router.get("/snapshots")
def list_snapshots(request: Request, sandboxID: str | None = None, name: str | None = None,  # noqa: N803
                   limit: int | None = None, nextToken: str | None = None) -> JSONResponse:  # noqa: N803
    """Newest first; ``sandboxID``: those taken of that sandbox; ``name``: the one with that name or
    id (``:default`` or no tag)."""
    wanted = service(request).find(name) if name is not None else None
    snaps = [s for s in service(request).records.list()
             if (sandboxID is None or s.sandbox_id == sandboxID)
             and (name is None or (wanted is not None and s.snapshot_id == wanted.snapshot_id))]
    snaps.sort(key=lambda s: (-micros(s.created_at), s.snapshot_id))
    if nextToken:
        at, after_id = _decode(nextToken)
        snaps = [s for s in snaps if (-micros(s.created_at), s.snapshot_id) > (-at, after_id)]
    size = min(max(limit if limit is not None else MAX_PAGE, 1), MAX_PAGE)
    page = snaps[:size]
    headers = {"x-next-token": _encode(page[-1])} if len(snaps) > size else {}
    return JSONResponse([snapshot_json(s) for s in page], headers=headers)


def _encode(snap: SnapshotRow) -> str:
    return base64.urlsafe_b64encode(f"{micros(snap.created_at)}__{snap.snapshot_id}".encode()).decode()


def _decode(token: str) -> tuple[int, str]:
    try:
        at, _, snapshot_id = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode().partition("__")
        return int(at), snapshot_id
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "nextToken: invalid next token") from exc


@router.delete("/templates/{template_id}", status_code=204)
def delete_template(template_id: str, request: Request) -> Response:
    """Snapshots are deleted here, as on E2B (they are templates there); deleting a template that
    is not a snapshot is not implemented (501), an unknown one is a 404."""
    if service(request).delete(template_id):
        return Response(status_code=204)
    if request.app.state.db.find_template(template_id.partition(":")[0]) is not None:
        raise ApiError(501, f"sandboxd does not implement DELETE /templates/{{template_id}} for templates "
                            f"('{template_id}' is a template, not a snapshot) yet")
    raise ApiError(404, f"snapshot or template '{template_id}' not found")


@router.post("/sandboxes/{sandbox_id}/fork", status_code=201)
def fork_sandbox(sandbox_id: str, request: Request, body: Annotated[ForkBody | None, Body()] = None) -> JSONResponse:
    body = body or ForkBody()
    settings = request.app.state.settings
    if not 1 <= body.count <= MAX_FORKS:
        raise ApiError(400, f"count: give 1 to {MAX_FORKS} forks (got {body.count})")
    if body.count >= settings.max_sandboxes:
        raise ApiError(400, f"count: must be lower than the maximum number of sandboxes ({settings.max_sandboxes})")
    if body.timeout > settings.max_timeout_s:
        raise ApiError(400, f"timeout: {body.timeout}s exceeds the maximum of {settings.max_timeout_s}s")
    results = service(request).fork(sandbox_id, body.count, body.timeout)
    domain = settings.domain
    return JSONResponse([{"sandbox": sandbox_json(r, domain)} if isinstance(r, SandboxRow)
                         else {"error": {"code": r.status, "message": r.message}} for r in results],
                        status_code=201)
