"""E2B's sandbox logs routes, over the orchestrator's log store.

- ``GET /sandboxes/{id}/logs?start=<ms>&limit=`` (v1): ``{logs: [{timestamp, line}], logEntries:
  [{timestamp, message, level, fields}]}``, oldest first. The CLI's ``sandbox logs`` parses each
  ``line`` as JSON with ``level`` and ``logger`` keys and follows with ``start`` = last + 1 ms.
- ``GET /v2/sandboxes/{id}/logs?cursor=<ms>&limit=&direction=&level=&search=``: ``{logs:
  [SandboxLogEntry]}``; ``backward`` reads newest first from the cursor.

A killed sandbox's logs stay readable (the store keeps them for a while); an id that never
logged is a 404.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from sandboxd.api.auth import require_api_key
from sandboxd.api.errors import ApiError
from sandboxd.api.models import iso
from sandboxd.orchestrator.logs import LogEntry, select

router = APIRouter(dependencies=[Depends(require_api_key)])
MAX_LIMIT = 1000


def _entries(request: Request, sandbox_id: str) -> list[LogEntry]:
    entries = request.app.state.orchestrator.logs.entries(sandbox_id)
    if entries is None:
        raise ApiError(404, f"sandbox '{sandbox_id}' not found (or its logs expired)")
    return entries


def _timestamp(entry: LogEntry) -> str:
    return iso(datetime.fromtimestamp(entry.timestamp_ms / 1000, UTC))


def entry_json(entry: LogEntry) -> dict[str, Any]:
    """SandboxLogEntry: every key required, ``fields`` a string map."""
    return {"timestamp": _timestamp(entry), "message": entry.message, "level": entry.level,
            "fields": {k: str(v) for k, v in entry.fields.items()}}


@router.get("/sandboxes/{sandbox_id}/logs")
def sandbox_logs_v1(sandbox_id: str, request: Request, start: Annotated[int | None, Query(ge=0)] = None,
                    limit: Annotated[int, Query(ge=0, le=MAX_LIMIT)] = MAX_LIMIT) -> dict[str, Any]:
    page = select(_entries(request, sandbox_id), cursor_ms=start, limit=limit)
    return {
        "logs": [{"timestamp": _timestamp(e),
                  "line": json.dumps({"level": e.level, "message": e.message, "logger": "sandboxd", **e.fields})}
                 for e in page],
        "logEntries": [entry_json(e) for e in page],
    }


@router.get("/v2/sandboxes/{sandbox_id}/logs")
def sandbox_logs_v2(sandbox_id: str, request: Request, cursor: Annotated[int | None, Query(ge=0)] = None,
                    limit: Annotated[int, Query(ge=0, le=MAX_LIMIT)] = MAX_LIMIT,
                    direction: Literal["forward", "backward"] = "forward",
                    level: Literal["debug", "info", "warn", "error"] | None = None,
                    search: str | None = None) -> dict[str, Any]:
    page = select(_entries(request, sandbox_id), cursor_ms=cursor, limit=limit,
                  backward=direction == "backward", min_level=level, search=search)
    return {"logs": [entry_json(e) for e in page]}
