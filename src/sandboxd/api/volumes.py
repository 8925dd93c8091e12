"""E2B's volume routes: the control plane (``/volumes``, API key) and the volume content API
(``/volumecontent/{id}/{kind}``, the volume's own bearer token). The work is in
orchestrator/volumes.py.

The SDK sends content calls to ``E2B_VOLUME_API_URL``, else ``https://api.<domain>``: in domain
mode that is this server; with plain ``E2B_API_URL`` set ``E2B_VOLUME_API_URL`` to the same URL.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import tempfile
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field

from sandboxd.api.auth import require_api_key
from sandboxd.api.errors import ApiError
from sandboxd.api.models import _Strict
from sandboxd.orchestrator import volumes as vol
from sandboxd.orchestrator.volumes import VolumeError, VolumeRow, Volumes

router = APIRouter()
AUTH = [Depends(require_api_key)]
_CHUNK = 1 << 20


class NewVolume(_Strict):
    name: str = Field(min_length=1, max_length=200)


class PathUpdate(_Strict):
    uid: int | None = Field(default=None, ge=0)
    gid: int | None = Field(default=None, ge=0)
    mode: int | None = Field(default=None, ge=0, le=0o7777)


def _volumes(request: Request) -> Volumes:
    return request.app.state.volumes


def _with_token(row: VolumeRow) -> dict[str, Any]:
    """``VolumeAndToken`` (no ``domain``: the client's own API domain serves the content)."""
    return {"volumeID": row.volume_id, "name": row.name, "token": row.token}


def users_of(request: Request, volume_id: str) -> list[str]:
    """The sandboxes (running or paused) that mount ``volume_id``."""
    return [r.sandbox_id for r in request.app.state.orchestrator.db.list_sandboxes()
            if any(m.get("volumeID") == volume_id for m in (r.volume_mounts or []))]


@router.post("/volumes", status_code=201, dependencies=AUTH)
def create_volume(body: NewVolume, request: Request) -> JSONResponse:
    try:
        row = _volumes(request).create(body.name)
    except VolumeError as exc:
        raise ApiError(exc.status, exc.message) from exc
    return JSONResponse(_with_token(row), status_code=201)


@router.get("/volumes", dependencies=AUTH)
def list_volumes(request: Request) -> list[dict[str, str]]:
    return [{"volumeID": r.volume_id, "name": r.name} for r in _volumes(request).all()]


@router.get("/volumes/{volume_id}", dependencies=AUTH)
def get_volume(volume_id: str, request: Request) -> dict[str, Any]:
    row = _volumes(request).find(volume_id)
    if row is None:
        raise ApiError(404, f"volume '{volume_id}' not found")
    return _with_token(row)


@router.delete("/volumes/{volume_id}", status_code=204, dependencies=AUTH)
def destroy_volume(volume_id: str, request: Request) -> Response:
    try:
        gone = _volumes(request).destroy(volume_id, users_of(request, volume_id))
    except VolumeError as exc:
        raise ApiError(exc.status, exc.message) from exc
    if not gone:
        raise ApiError(404, f"volume '{volume_id}' not found")
    return Response(status_code=204)


# -- the volume content API --------------------------------------------------------------------


def _content(request: Request, volume_id: str, path: str) -> vol.Located:
    """The volume (its token checked) and ``path`` located in it."""
    auth = request.headers.get("authorization", "")
    token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
    row = _volumes(request).find(volume_id)
    if row is None or row.volume_id != volume_id:
        raise ApiError(404, f"volume '{volume_id}' not found")
    if not token or not hmac.compare_digest(token.encode(), row.token.encode()):
        raise ApiError(401, "invalid or missing volume token (Authorization: Bearer <token>)")
    try:
        return vol.locate(_volumes(request).root(row), path)
    except VolumeError as exc:
        raise ApiError(exc.status, exc.message) from exc


def _run(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except VolumeError as exc:
        raise ApiError(exc.status, exc.message) from exc


@router.get("/volumecontent/{volume_id}/path")
def stat_path(volume_id: str, path: str, request: Request) -> dict[str, Any]:
    return _run(vol.entry_stat, _content(request, volume_id, path))


@router.get("/volumecontent/{volume_id}/dir")
def list_dir(volume_id: str, path: str, request: Request, depth: int | None = None) -> list[dict[str, Any]]:
    return _run(vol.list_dir, _content(request, volume_id, path), depth)


@router.post("/volumecontent/{volume_id}/dir", status_code=201)
def make_dir(volume_id: str, path: str, request: Request, uid: int | None = None, gid: int | None = None,
             mode: int | None = None, force: bool = False) -> JSONResponse:
    entry = _run(vol.make_dir, _content(request, volume_id, path), uid, gid, mode, force)
    return JSONResponse(entry, status_code=201)


@router.put("/volumecontent/{volume_id}/file", status_code=201)
async def write_file(volume_id: str, path: str, request: Request, uid: int | None = None, gid: int | None = None,
                     mode: int | None = None, force: bool = False) -> JSONResponse:
    loc = _content(request, volume_id, path)
    with tempfile.SpooledTemporaryFile(max_size=8 << 20) as spool:  # a large upload waits on disk
        async for chunk in request.stream():
            spool.write(chunk)
        spool.seek(0)
        entry = await asyncio.to_thread(_run, vol.write_file, loc, iter(lambda: spool.read(_CHUNK), b""),
                                        uid, gid, mode, force)
    return JSONResponse(entry, status_code=201)


@router.get("/volumecontent/{volume_id}/file")
def read_file(volume_id: str, path: str, request: Request) -> StreamingResponse:
    fd = _run(vol.open_file, _content(request, volume_id, path))

    def body() -> Iterator[bytes]:
        try:
            while chunk := os.read(fd, _CHUNK):
                yield chunk
        finally:
            os.close(fd)

    return StreamingResponse(body(), media_type="application/octet-stream",
                             headers={"content-length": str(os.fstat(fd).st_size)})


@router.patch("/volumecontent/{volume_id}/path")
def update_path(volume_id: str, path: str, request: Request,
                body: Annotated[PathUpdate | None, Body()] = None) -> dict[str, Any]:
    body = body or PathUpdate()
    return _run(vol.update, _content(request, volume_id, path), body.uid, body.gid, body.mode)


@router.delete("/volumecontent/{volume_id}/path", status_code=204)
def remove_path(volume_id: str, path: str, request: Request) -> Response:
    _run(vol.remove, _content(request, volume_id, path))
    return Response(status_code=204)
