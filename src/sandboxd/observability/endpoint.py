"""``GET /metrics``: the Prometheus text format, behind the API key like every other route
(Prometheus sends it as ``authorization: {credentials: <key>}``, i.e. ``Authorization: Bearer``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sandboxd.api.auth import require_api_key
from sandboxd.observability import events
from sandboxd.observability.collector import NodeCollector

router = APIRouter(dependencies=[Depends(require_api_key)], include_in_schema=False)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    node = NodeCollector(request.app.state.orchestrator)
    body = generate_latest(events.REGISTRY) + generate_latest(node)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
