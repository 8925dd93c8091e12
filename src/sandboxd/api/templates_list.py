"""``GET /templates`` and ``GET /templates/{id}``: the templates of this server as E2B's API lists
them (``Template`` and ``TemplateWithBuilds``), which ``e2b template list`` and the SDKs read.

A template is a name (alias) pointing at a verified build, or a name whose first build is still
running or failed (then it has no alias yet and its status is that build's). sandboxd has one
team per server: ``teamID`` is rejected rather than ignored. Templates are never public.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from sandboxd.api.auth import require_api_key
from sandboxd.api.errors import ApiError
from sandboxd.api.models import iso
from sandboxd.config import Settings
from sandboxd.envd import ENVD_VERSION
from sandboxd.store.db import SandboxRow, TemplateAlias
from sandboxd.store.templates_db import TemplateBuildRow, TemplateBuilds

router = APIRouter(dependencies=[Depends(require_api_key)])
MAX_BUILDS_PAGE = 100


def _reject_team(team_id: str | None) -> None:
    if team_id is not None:
        raise ApiError(400, "teamID: sandboxd has one team per server; leave teamID out")


def _resources(settings: Settings, alias: TemplateAlias | None, build: TemplateBuildRow | None) -> dict[str, int]:
    src = alias or build
    cpu = src.cpu_count if src and src.cpu_count else settings.cpu_count
    mem = src.memory_mb if src and src.memory_mb else settings.memory_mb
    disk = max(settings.disk_size_mb, (src.min_free_disk_mb or 0) if src else 0)
    return {"cpuCount": cpu, "memoryMB": mem, "diskSizeMB": disk}


def _uuid(store_build_id: str) -> str:
    from sandboxd.api.templates import uuid_of

    try:
        return uuid_of(store_build_id)
    except ValueError:
        return store_build_id


def template_json(settings: Settings, alias: TemplateAlias | None, builds: list[TemplateBuildRow],
                  sandboxes: list[SandboxRow]) -> dict[str, Any]:
    """E2B's ``Template`` of one template: its alias (if it has one) and build requests (newest first).
    ``spawnCount`` and ``lastSpawnedAt`` count the sandboxes on this server now (no history is kept)."""
    latest = builds[0] if builds else None
    if alias is not None:
        published = next((b for b in builds if b.store_build_id == alias.build_id and b.status == "ready"), None)
        build_id, status = (published.build_id if published else _uuid(alias.build_id)), "ready"
        template_id, name = alias.template_id, alias.alias
    else:
        assert latest is not None
        build_id, status, template_id, name = latest.build_id, latest.status, latest.template_id, latest.alias
    created = min([b.created_at for b in builds] + ([alias.updated_at] if alias else []))
    updated: datetime = alias.updated_at if alias else latest.created_at  # type: ignore[union-attr]
    mine = [r for r in sandboxes if r.template_id == template_id]
    return {
        "templateID": template_id, "buildID": build_id, **_resources(settings, alias, latest if alias is None else None),
        "public": False, "aliases": [name], "names": [name],
        "createdAt": iso(created), "updatedAt": iso(updated), "createdBy": None,
        "lastSpawnedAt": iso(max(r.started_at for r in mine)) if mine else None, "spawnCount": len(mine),
        "buildCount": max(len(builds), 1 if alias else 0), "envdVersion": ENVD_VERSION, "buildStatus": status,
    }


def _catalog(request: Request) -> list[tuple[TemplateAlias | None, list[TemplateBuildRow]]]:
    builds = TemplateBuilds(request.app.state.db)
    by_template: dict[str, list[TemplateBuildRow]] = {}
    for b in builds.builds_of():
        by_template.setdefault(b.template_id, []).append(b)
    named = builds.aliases()
    out: list[tuple[TemplateAlias | None, list[TemplateBuildRow]]] = [(a, by_template.pop(a.template_id, [])) for a in named]
    return out + [(None, rows) for rows in by_template.values()]


@router.get("/templates")
def list_templates(request: Request, teamID: str | None = None) -> list[dict[str, Any]]:  # noqa: N803
    _reject_team(teamID)
    settings, sandboxes = request.app.state.settings, request.app.state.db.list_sandboxes()
    return [template_json(settings, alias, rows, sandboxes) for alias, rows in _catalog(request)]


@router.get("/templates/{template_id}")
def get_template(template_id: str, request: Request, response: Response,
                 nextToken: str | None = None,  # noqa: N803 - E2B's names
                 limit: Annotated[int, Query(ge=1, le=MAX_BUILDS_PAGE)] = MAX_BUILDS_PAGE) -> dict[str, Any]:
    """``TemplateWithBuilds``: by template id or name; builds newest first, ``limit`` a page,
    ``nextToken`` (from the previous page's ``x-next-token`` header) the next one."""
    found = next(((a, rows) for a, rows in _catalog(request)
                  if template_id in ((a.template_id, a.alias) if a else (rows[0].template_id, rows[0].alias))), None)
    if found is None:
        raise ApiError(404, f"template '{template_id}' not found")
    try:
        offset = int(nextToken) if nextToken else 0
    except ValueError:
        raise ApiError(400, f"nextToken: {nextToken!r} is not a token this server handed out") from None
    alias, rows = found
    settings = request.app.state.settings
    body = template_json(settings, alias, rows, request.app.state.db.list_sandboxes())
    page = rows[offset:offset + limit]
    if offset + limit < len(rows):
        response.headers["x-next-token"] = str(offset + limit)
    body["builds"] = [{
        "buildID": b.build_id, "status": b.status, "createdAt": iso(b.created_at),
        "updatedAt": iso(b.finished_at or b.created_at), **({"finishedAt": iso(b.finished_at)} if b.finished_at else {}),
        **_resources(settings, None, b), "envdVersion": ENVD_VERSION,
    } for b in page]
    return body
