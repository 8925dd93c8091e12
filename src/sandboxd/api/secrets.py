"""E2B's secret routes: create, update (a new version), get, list (paged), destroy. No route
returns a value (store/secrets_db.py seals them); every answer is E2B's ``Secret`` metadata."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field

from sandboxd.api.auth import require_api_key
from sandboxd.api.errors import ApiError
from sandboxd.api.listing import MAX_PAGE
from sandboxd.api.models import _Strict, iso
from sandboxd.store.secrets_db import SecretError, SecretRow, Secrets

router = APIRouter(dependencies=[Depends(require_api_key)])


class NewSecret(_Strict):
    name: str = Field(min_length=1)
    value: str
    metadata: dict[str, str] | None = None


class SecretUpdate(_Strict):
    value: str
    metadata: dict[str, str] | None = None


def _secrets(request: Request) -> Secrets:
    return request.app.state.secrets


def secret_json(row: SecretRow) -> dict[str, Any]:
    return {"secretID": row.secret_id, "name": row.name, "currentVersion": row.current_version,
            "metadata": row.metadata_ or {}, "createdAt": iso(row.created_at), "updatedAt": iso(row.updated_at)}


def _checked(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except SecretError as exc:
        raise ApiError(exc.status, exc.message) from exc


@router.post("/secrets", status_code=201)
def create_secret(body: NewSecret, request: Request) -> JSONResponse:
    row = _checked(_secrets(request).create, body.name, body.value, body.metadata or {})
    return JSONResponse(secret_json(row), status_code=201)


@router.get("/secrets")
def list_secrets(request: Request, limit: int | None = None, nextToken: str | None = None) -> JSONResponse:  # noqa: N803
    """Oldest first, paged by ``x-next-token`` (the last secret's id)."""
    rows = _secrets(request).all()
    if nextToken:
        try:
            after = base64.urlsafe_b64decode(nextToken + "=" * (-len(nextToken) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ApiError(400, "nextToken: invalid next token") from exc
        ids = [r.secret_id for r in rows]
        if after not in ids:
            raise ApiError(400, "nextToken: invalid next token (its secret is gone)")
        rows = rows[ids.index(after) + 1:]
    size = min(max(limit if limit is not None else MAX_PAGE, 1), MAX_PAGE)
    page = rows[:size]
    headers = {"x-next-token": base64.urlsafe_b64encode(page[-1].secret_id.encode()).decode()} if len(rows) > size else {}
    return JSONResponse([secret_json(r) for r in page], headers=headers)


@router.get("/secrets/{secret}")
def get_secret(secret: str, request: Request) -> dict[str, Any]:
    row = _secrets(request).find(secret)
    if row is None:
        raise ApiError(404, f"secret '{secret}' not found")
    return secret_json(row)


@router.post("/secrets/{secret}")
def update_secret(secret: str, body: SecretUpdate, request: Request) -> dict[str, Any]:
    row = _checked(_secrets(request).update, secret, body.value, body.metadata)
    if row is None:
        raise ApiError(404, f"secret '{secret}' not found")
    return secret_json(row)


@router.delete("/secrets/{secret}", status_code=204)
def destroy_secret(secret: str, request: Request) -> Response:
    if not _secrets(request).destroy(secret):
        raise ApiError(404, f"secret '{secret}' not found")
    return Response(status_code=204)
