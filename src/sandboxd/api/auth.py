"""``X-API-Key`` authentication (``Authorization: Bearer`` accepted too, as the JS SDK/CLI use it)."""

from __future__ import annotations

from fastapi import Request

from sandboxd.api.errors import ApiError
from sandboxd.store.db import Database


def api_key_of(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if not key:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            key = auth[7:].strip()
    return key or None


def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless the request carries a key the database knows."""
    db: Database = request.app.state.db
    key = api_key_of(request)
    if not key:
        raise ApiError(401, "missing API key: send it in the X-API-Key header")
    if not db.api_key_valid(key):
        raise ApiError(401, "invalid API key")
