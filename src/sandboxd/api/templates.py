"""Template build routes of E2B's REST API, as ``Template.build`` drives them (protocol note 2.4).

``POST /v3/templates`` hands out a template id and a build (request) id; for each COPY step the SDK
asks ``GET /templates/{id}/files/{hash}`` whether the files are cached and, if not, ``PUT``s a tar
to the URL we return (signed, since that request carries no API key); ``POST
/v2/templates/{id}/builds/{buildID}`` starts the build in the background; the SDK then polls
``.../status`` for log entries until the build is ``ready`` or ``error``. Tags name builds.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import tempfile
import uuid
from collections.abc import Callable
from typing import IO, Annotated, Any, Protocol

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from sandboxd.api.auth import require_api_key
from sandboxd.api.errors import ApiError
from sandboxd.api.models import iso
from sandboxd.config import Settings
from sandboxd.store.db import Database
from sandboxd.store.templates_db import (
    DEFAULT_TAG,
    BuildResources,
    LogEntry,
    TemplateBuildRow,
    TemplateBuilds,
    TemplateTagRow,
    split_name,
)
from sandboxd.templates.builder import builder_for
from sandboxd.templates.files import FilesCache, FilesError
from sandboxd.templates.jobs import BuildJobs
from sandboxd.templates.spec import BuildSpec, SpecError
from sandboxd.templates.store import TemplateStore

router = APIRouter()
AUTH = [Depends(require_api_key)]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HASH = re.compile(r"^[0-9a-f]{64}$")


class NewTemplate(BaseModel):
    """``POST /v3/templates`` (``TemplateBuildRequestV3``)."""

    model_config = ConfigDict(extra="ignore")
    name: str | None = None
    alias: str | None = None
    tags: list[str] | None = None
    cpuCount: int | None = Field(default=None, ge=1)
    memoryMB: int | None = Field(default=None, ge=128)
    minFreeDiskMb: int | None = Field(default=None, ge=0)  # the sandbox's disk grows to this, never shrinks


class AssignTags(BaseModel):
    target: str
    tags: list[str] = Field(min_length=1)


class DeleteTags(BaseModel):
    name: str
    tags: list[str] = Field(min_length=1)


# -- wiring ------------------------------------------------------------------------------------


class TemplateBuildsHere(Protocol):
    """What the template routes ask of whoever runs builds: :class:`TemplateService` (``serve`` and a
    cluster node: builds run in this process) or ``cluster.templates.ClusterTemplates`` (an API
    replica: each build on the node chosen when it was requested). Records and tags are rows of
    ``builds`` (the shared database) either way."""

    builds: TemplateBuilds
    upload_key: bytes

    def new_build(self, alias: str, tags: list[str], resources: BuildResources) -> TemplateBuildRow: ...

    def files_present(self, template_id: str, files_hash: str) -> bool: ...

    def put_files(self, template_id: str, files_hash: str, stream: IO[bytes]) -> int: ...

    def start(self, row: TemplateBuildRow, body: dict[str, Any]) -> bool: ...

    def settle(self, row: TemplateBuildRow) -> TemplateBuildRow: ...


class TemplateService:
    """Builds run in this process: the build records, the builder's file cache and build jobs, and
    the key that signs upload URLs. Made once by ``server.build_app`` (and by a cluster node, whose
    builds the API replicas hand it: ``node_id`` is recorded with each build, ``fetch_build``
    brings a FROM template built elsewhere, ``on_built`` records a new build's checksum)."""

    def __init__(self, settings: Settings, db: Database, node_id: str | None = None,
                 fetch_build: Callable[[str], bool] | None = None,
                 on_built: Callable[[str], object] | None = None) -> None:
        self.builds = TemplateBuilds(db)
        self.node_id = node_id
        store = TemplateStore(settings.templates_dir)

        def find_template(ref: str) -> str | None:
            build_id = self.builds.resolve(ref)
            if build_id is not None and fetch_build is not None and not store.exists(build_id):
                fetch_build(build_id)  # FROM a template built on another node: fetched and verified
            return build_id

        builder = builder_for(settings.data_dir, find_template=find_template, settings=settings)
        self.files: FilesCache = builder.files
        self.jobs = BuildJobs(builder, self.builds, settings.runtime, on_built=on_built)
        self.upload_key = secrets.token_bytes(32)  # upload URLs live for one Template.build call
        if node_id is not None:
            self.jobs.interrupt_orphans(node_id)  # this process just started: none of them runs

    def new_build(self, alias: str, tags: list[str], resources: BuildResources) -> TemplateBuildRow:
        return self.builds.new_build(alias, tags, resources, node_id=self.node_id)

    def files_present(self, template_id: str, files_hash: str) -> bool:
        return self.files.present(files_hash)

    def put_files(self, template_id: str, files_hash: str, stream: IO[bytes]) -> int:
        return self.files.put(files_hash, stream)

    def start(self, row: TemplateBuildRow, body: dict[str, Any]) -> bool:
        """Run the build in the background; False if it was already started (SpecError: a bad body)."""
        return self.jobs.start(row.build_id, BuildSpec.from_json(body))

    def settle(self, row: TemplateBuildRow) -> TemplateBuildRow:
        return self.jobs.settle(row)


def _t(request: Request) -> TemplateBuildsHere:
    service: TemplateBuildsHere = request.app.state.templates
    return service


def _build_row(t: TemplateBuildsHere, template_id: str, build_id: str) -> TemplateBuildRow:
    row = t.builds.get(build_id)
    if row is None or template_id not in (row.template_id, row.alias):
        raise ApiError(404, f"build '{build_id}' of template '{template_id}' not found")
    return t.settle(row)


def _valid_name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise ApiError(400, f"invalid {kind} {value!r}: use letters, digits, '.', '_' and '-'")
    return value


async def spool_upload(request: Request, store: Callable[[IO[bytes]], int]) -> int:
    """A request body (a COPY context's tar) spooled to a temporary file, then ``store(file)`` in
    a worker thread; a malformed tar is a 400."""
    with tempfile.SpooledTemporaryFile(max_size=16 << 20) as buf:
        async for chunk in request.stream():
            buf.write(chunk)
        buf.seek(0)
        try:
            return await run_in_threadpool(store, buf)
        except FilesError as exc:
            raise ApiError(400, str(exc)) from exc


# -- templates and builds ----------------------------------------------------------------------


@router.get("/templates/aliases/{alias}", dependencies=AUTH)
def get_alias(alias: str, request: Request) -> dict[str, Any]:
    row = _t(request).builds.template(alias)
    if row is None or row.alias != alias:
        raise ApiError(404, f"template '{alias}' not found")
    return {"templateID": row.template_id, "public": False}


@router.post("/v3/templates", status_code=202, dependencies=AUTH)
def request_build(body: NewTemplate, request: Request) -> JSONResponse:
    full = body.name or body.alias
    if not full:
        raise ApiError(400, "name is required")
    alias, tag = split_name(full)
    _valid_name("template name", alias)
    tags = list(dict.fromkeys([tag or DEFAULT_TAG, *(body.tags or [])]))
    for t in tags:
        _valid_name("tag", t)
    settings: Settings = request.app.state.settings
    if body.cpuCount is not None and body.cpuCount > settings.max_cpu_count:
        raise ApiError(400, f"cpuCount {body.cpuCount} exceeds this server's maximum of {settings.max_cpu_count}")
    if body.memoryMB is not None and body.memoryMB > settings.max_memory_mb:
        raise ApiError(400, f"memoryMB {body.memoryMB} exceeds this server's maximum of {settings.max_memory_mb}")
    if body.minFreeDiskMb is not None and body.minFreeDiskMb > settings.max_disk_size_mb:
        raise ApiError(400, f"minFreeDiskMb {body.minFreeDiskMb} exceeds this server's maximum of "
                            f"{settings.max_disk_size_mb}")
    resources = BuildResources(body.cpuCount, body.memoryMB, body.minFreeDiskMb or None)
    row = _t(request).new_build(alias, tags, resources)
    return JSONResponse({"templateID": row.template_id, "buildID": row.build_id, "public": False,
                         "names": [alias], "tags": tags, "aliases": [alias]}, status_code=202)


@router.post("/v2/templates/{template_id}/builds/{build_id}", status_code=202, dependencies=AUTH)
def start_build(template_id: str, build_id: str, request: Request,
                body: Annotated[dict[str, Any], Body()]) -> Response:
    t = _t(request)
    row = _build_row(t, template_id, build_id)
    if row.status != "waiting":
        raise ApiError(409, f"build '{build_id}' was already started ({row.status})")
    try:
        started = t.start(row, body)
    except SpecError as exc:
        raise ApiError(400, str(exc)) from exc
    if not started:
        raise ApiError(409, f"build '{build_id}' was already started ({row.status})")
    return Response(status_code=202)


@router.get("/templates/{template_id}/builds/{build_id}/status", dependencies=AUTH)
def build_status(template_id: str, build_id: str, request: Request,
                 logsOffset: Annotated[int, Query(ge=0)] = 0,  # noqa: N803 - E2B's names
                 limit: Annotated[int, Query(ge=1, le=100)] = 100) -> dict[str, Any]:
    t = _t(request)
    row = _build_row(t, template_id, build_id)
    return status_json(row, t.builds.logs(build_id, logsOffset, limit))


def status_json(row: TemplateBuildRow, entries: list[LogEntry]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "templateID": row.template_id,
        "buildID": row.build_id,
        "status": row.status,
        "logs": [e.message for e in entries],
        "logEntries": [{"timestamp": iso(e.timestamp), "level": e.level, "message": e.message,
                        **({"step": e.step} if e.step else {})} for e in entries],
    }
    if row.status == "error":
        body["reason"] = {"message": row.reason or "build failed",
                          **({"step": row.reason_step} if row.reason_step else {})}
    return body


# -- COPY files --------------------------------------------------------------------------------


def _upload_token(t: TemplateBuildsHere, template_id: str, files_hash: str) -> str:
    return hmac.new(t.upload_key, f"{template_id}/{files_hash}".encode(), hashlib.sha256).hexdigest()


@router.get("/templates/{template_id}/files/{files_hash}", status_code=201, dependencies=AUTH)
def files_link(template_id: str, files_hash: str, request: Request) -> JSONResponse:
    if not _HASH.match(files_hash):
        raise ApiError(400, "files hash must be a hex sha256")
    t = _t(request)
    if t.files_present(template_id, files_hash):
        return JSONResponse({"present": True}, status_code=201)
    token = _upload_token(t, template_id, files_hash)
    url = f"{str(request.base_url).rstrip('/')}/templates/{template_id}/files/{files_hash}/upload?token={token}"
    return JSONResponse({"present": False, "url": url}, status_code=201)


@router.put("/templates/{template_id}/files/{files_hash}/upload")
async def upload_files(template_id: str, files_hash: str, token: str, request: Request) -> dict[str, Any]:
    """The SDK's ``PUT <url>``: no API key, so the URL's token is the authorisation."""
    t = _t(request)
    if not _HASH.match(files_hash) or not hmac.compare_digest(token, _upload_token(t, template_id, files_hash)):
        raise ApiError(403, "invalid or expired upload URL")
    return {"stored": await spool_upload(request, lambda f: t.put_files(template_id, files_hash, f))}


# -- tags --------------------------------------------------------------------------------------


def _tag_json(build_id: str, tags: list[str]) -> dict[str, Any]:
    return {"buildID": build_id, "tags": tags}


@router.post("/templates/tags", status_code=201, dependencies=AUTH)
def assign_tags(body: AssignTags, request: Request) -> JSONResponse:
    t = _t(request)
    name, tag = split_name(body.target)
    template = t.builds.template(name)
    if template is None:
        raise ApiError(404, f"template '{name}' not found")
    source = t.builds.tag(template.template_id, tag or DEFAULT_TAG)
    if source is None and (tag or DEFAULT_TAG) == DEFAULT_TAG:  # e.g. `base`, made without a request
        source = TemplateTagRow(template_id=template.template_id, tag=DEFAULT_TAG,
                                build_id=uuid_of(template.build_id), store_build_id=template.build_id)
    if source is None:
        raise ApiError(404, f"tag '{tag or DEFAULT_TAG}' of template '{name}' not found")
    for new in body.tags:
        _valid_name("tag", new)
    t.builds.assign_tags(template.template_id, source, body.tags, template.alias, template.runtime)
    return JSONResponse(_tag_json(source.build_id, body.tags), status_code=201)


@router.delete("/templates/tags", status_code=204, dependencies=AUTH)
def delete_tags(body: DeleteTags, request: Request) -> Response:
    t = _t(request)
    template = t.builds.template(split_name(body.name)[0])
    if template is None:
        raise ApiError(404, f"template '{body.name}' not found")
    t.builds.delete_tags(template.template_id, body.tags)
    return Response(status_code=204)


@router.get("/templates/{template_id}/tags", dependencies=AUTH)
def list_tags(template_id: str, request: Request) -> list[dict[str, Any]]:
    t = _t(request)
    template = t.builds.template(template_id)
    if template is None:
        raise ApiError(404, f"template '{template_id}' not found")
    return [{"tag": r.tag, "buildID": r.build_id, "createdAt": iso(r.created_at)}
            for r in t.builds.tags(template.template_id)]


def uuid_of(store_build_id: str) -> str:
    """A content build id (128 bits of hex) written as the UUID E2B's API uses for build ids."""
    return str(uuid.UUID(hex=store_build_id))
