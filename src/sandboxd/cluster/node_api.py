"""A node's internal API: what the cluster's API replicas ask of this node's orchestrator.

Served by ``sandboxd node`` behind the cluster secret (auth.py), on the same listener as the
node's sandbox proxy (sandbox traffic the API forwards carries ``E2b-Sandbox-Id``/``-Port`` and is
proxied exactly as ``serve`` proxies it). Each route is one orchestrator (or template service)
method; records are not returned: the orchestrator wrote them to the shared database, where the
API reads them. Template builds placed on this node run here (``serve``'s TemplateService):
their COPY uploads, their start.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from sandboxd.api.errors import ApiError
from sandboxd.api.templates import TemplateService, spool_upload
from sandboxd.api.volumes import router as volumes_router
from sandboxd.cluster.membership import NodeAgent, capacity_of, usage_of
from sandboxd.cluster.wire import error_json, request_of
from sandboxd.orchestrator.egress import EgressPolicy
from sandboxd.orchestrator.samples import MetricSamples
from sandboxd.orchestrator.sandboxes import Orchestrator, SandboxError
from sandboxd.orchestrator.snapshots import SnapshotService
from sandboxd.orchestrator.volumes import VolumeError, Volumes
from sandboxd.store.db import SandboxRow
from sandboxd.store.templates_db import TemplateBuildRow
from sandboxd.templates.files import FilesError
from sandboxd.templates.spec import SpecError

PREFIX = "/internal/v1"
router = APIRouter(prefix=PREFIX)


class PauseBody(BaseModel):
    memory: bool = True
    strict: bool = False


class TimeoutBody(BaseModel):
    timeout: int | None = None
    memory: bool = True


class SnapshotBody(BaseModel):
    name: str | None = None
    memory: bool | None = None


class ForkBody(BaseModel):
    count: int
    timeout: int


class VolumeBody(BaseModel):
    name: str


class NetworkBody(BaseModel):
    egress: dict[str, Any] | None = None
    allow_internet_access: bool = True


def _orch(request: Request) -> Orchestrator:
    return request.app.state.orchestrator


def _templates(request: Request) -> TemplateService:
    return request.app.state.templates


def _snapshots(request: Request) -> SnapshotService:
    return request.app.state.snapshots


def _found(ok: object) -> JSONResponse:
    if ok is None or ok is False:
        return JSONResponse({"code": 404, "message": "sandbox not found on this node"}, status_code=404)
    return JSONResponse({"ok": True})


@router.get("/health")
def health(request: Request) -> dict[str, Any]:
    agent: NodeAgent = request.app.state.agent
    return {"status": "ok", "nodeId": agent.node_id}


@router.post("/sandboxes", status_code=201)
def create(body: dict[str, Any], request: Request) -> dict[str, str]:
    """Start a sandbox here. A node with no room left (its view is newer than the heartbeat the
    API placed by) refuses with 503, and the API tries another node."""
    orch = _orch(request)
    req = request_of(body)
    if (snapshot := body.get("snapshot")) is not None:
        seed = _snapshots(request).seed_for(str(snapshot))
        if seed is None:
            raise SandboxError(404, f"snapshot '{snapshot}' not found")
        req = replace(req, seed=seed)
    need = req.seed.resources if req.seed is not None else orch.resources_for(req.template)
    free = usage_of(capacity_of(orch.settings), orch.db.list_sandboxes(), [])
    if need.cpu_count > free.free_vcpus or need.memory_mb > free.free_memory_mb:
        raise SandboxError(503, f"node {orch.db.node_id} is full ({free.free_vcpus} vCPUs, "
                                f"{free.free_memory_mb} MiB free)", error_code="node_full")
    if req.seed is not None and not req.seed.captured.is_dir():
        # held by another node: a verified copy of it (fetched now if this node has none; never
        # a partial one: cluster/snapshot_copies.py)
        req = replace(req, seed=request.app.state.snapshot_copies.seed_for(str(snapshot)))
    return {"sandboxID": orch.create(req).sandbox_id}


@router.delete("/sandboxes/{sandbox_id}")
def kill(sandbox_id: str, request: Request) -> JSONResponse:
    return _found(_orch(request).kill(sandbox_id))


@router.post("/sandboxes/{sandbox_id}/pause")
def pause(sandbox_id: str, body: PauseBody, request: Request) -> dict[str, bool | None]:
    return {"paused": _orch(request).pause(sandbox_id, memory=body.memory, strict=body.strict)}


@router.post("/sandboxes/{sandbox_id}/resume")
def resume(sandbox_id: str, body: TimeoutBody, request: Request) -> JSONResponse:
    """Resumed here, where its disk (and memory) are, draining or not (a drain stops new
    sandboxes; this one is the node's). One paused with its disk alone holds nothing while
    paused: if the node has filled up since, 503 naming the node (try again later)."""
    orch = _orch(request)
    row = orch.db.get_sandbox(sandbox_id)
    if row is not None and row.state == "paused" and not (row.paused_memory and body.memory):
        others = [r for r in orch.db.list_sandboxes() if r.sandbox_id != sandbox_id]
        free = usage_of(capacity_of(orch.settings), others, [])
        if row.cpu_count > free.free_vcpus or row.memory_mb > free.free_memory_mb:
            raise SandboxError(503, f"sandbox '{sandbox_id}' is paused on node {orch.db.node_id}, which is full "
                                    f"({free.free_vcpus} vCPUs, {free.free_memory_mb} MiB free; it needs "
                                    f"{row.cpu_count} and {row.memory_mb}): its files are on that node, so it "
                                    "resumes there; try again later", headers={"Retry-After": "5"})
    return _found(orch.resume(sandbox_id, body.timeout, memory=body.memory))


@router.post("/sandboxes/{sandbox_id}/connect")
def connect(sandbox_id: str, body: TimeoutBody, request: Request) -> JSONResponse:
    return _found(_orch(request).connect(sandbox_id, body.timeout))


@router.post("/sandboxes/{sandbox_id}/timeout")
def set_timeout(sandbox_id: str, body: TimeoutBody, request: Request) -> JSONResponse:
    return _found(_orch(request).set_timeout(sandbox_id, body.timeout or 0))


@router.put("/sandboxes/{sandbox_id}/network")
def update_network(sandbox_id: str, body: NetworkBody, request: Request) -> JSONResponse:
    policy = EgressPolicy.from_json(body.egress, body.allow_internet_access)
    return _found(_orch(request).update_network(sandbox_id, policy))


@router.post("/sandboxes/{sandbox_id}/snapshots")
def snapshot(sandbox_id: str, body: SnapshotBody, request: Request) -> dict[str, str]:
    """Capture the sandbox into this node's data dir; the record (with this node's id) is in the
    shared database, where the API reads it."""
    return {"snapshotID": _snapshots(request).take(sandbox_id, body.name, body.memory).snapshot_id}


@router.post("/sandboxes/{sandbox_id}/fork")
def fork(sandbox_id: str, body: ForkBody, request: Request) -> dict[str, list[dict[str, Any]]]:
    """The forks start here, beside the capture they are seeded from (one capture for all)."""
    results = _snapshots(request).fork(sandbox_id, body.count, body.timeout)
    return {"results": [{"sandboxID": r.sandbox_id} if isinstance(r, SandboxRow) else {"error": error_json(r)}
                        for r in results]}


@router.delete("/snapshots/{snapshot_id}")
def delete_snapshot(snapshot_id: str, request: Request) -> JSONResponse:
    return _found(_snapshots(request).delete(snapshot_id))


@router.get("/snapshots/{snapshot_id}")
def snapshot_capture(snapshot_id: str, request: Request) -> Response:
    """A snapshot this node took, its capture dir as a sparse tar (another node fetches it and
    checks it against the checksum recorded at capture: cluster/snapshot_copies.py)."""
    from sandboxd.cluster.snapshot_copies import tar_stream, valid_id

    captured = _snapshots(request).captured(snapshot_id) if valid_id(snapshot_id) else None
    if captured is None or not captured.is_dir():
        return JSONResponse({"code": 404, "message": f"snapshot {snapshot_id} is not on this node"}, status_code=404)
    return StreamingResponse(tar_stream(captured), media_type="application/x-tar")


@router.delete("/snapshot-copies/{snapshot_id}")
def drop_snapshot_copies(snapshot_id: str, request: Request) -> dict[str, int]:
    """The snapshot was deleted: this node's copies of it go too."""
    return {"removed": request.app.state.snapshot_copies.prune(snapshot_id)}


@router.post("/volumes", status_code=201)
def create_volume(body: VolumeBody, request: Request) -> dict[str, str]:
    """A volume whose files are in this node's data dir (its record names this node)."""
    try:
        return {"volumeID": request.app.state.volumes.create(body.name).volume_id}
    except VolumeError as exc:
        raise SandboxError(exc.status, exc.message) from exc


@router.delete("/volumes/{volume_id}")
def destroy_volume(volume_id: str, request: Request) -> JSONResponse:
    """Refused (409) while a sandbox mounts it: those all run here (they were placed here)."""
    users = [r.sandbox_id for r in _orch(request).db.list_sandboxes()
             if any(m.get("volumeID") == volume_id for m in (r.volume_mounts or []))]
    try:
        return _found(request.app.state.volumes.destroy(volume_id, users))
    except VolumeError as exc:
        raise SandboxError(exc.status, exc.message) from exc


@router.get("/sandboxes/{sandbox_id}/logs")
def logs(sandbox_id: str, request: Request) -> JSONResponse:
    """The sandbox's log entries as stored here (also after it was killed, while kept)."""
    entries = _orch(request).logs.entries(sandbox_id)
    if entries is None:
        return JSONResponse({"code": 404, "message": "no logs of this sandbox on this node"}, status_code=404)
    return JSONResponse({"lines": [e.to_line() for e in entries]})


@router.get("/sandboxes/{sandbox_id}/metrics")
def metrics(sandbox_id: str, request: Request, start: int | None = None, end: int | None = None,
            latest: bool = False) -> dict[str, Any]:
    """The sandbox's sampled series (``latest``: its newest sample); a running sandbox not
    sampled yet is sampled now, as ``serve``'s route does."""
    orch, samples = _orch(request), request.app.state.samples
    row = orch.db.get_sandbox(sandbox_id)
    if row is not None and not samples.series(sandbox_id) and (upstream := orch.upstream(sandbox_id)) is not None:
        samples.sample_one(row, upstream.address)
    if latest:
        return {"latest": samples.latest(sandbox_id)}
    return {"series": samples.series(sandbox_id, start, end)}


@router.get("/files/{files_hash}")
def files_present(files_hash: str, request: Request) -> dict[str, bool]:
    """Whether this node's files cache holds a COPY context (the builds placed here use it)."""
    try:
        return {"present": _templates(request).files_present("", files_hash)}
    except FilesError as exc:
        raise ApiError(400, str(exc)) from exc


@router.put("/files/{files_hash}")
async def put_files(files_hash: str, request: Request) -> dict[str, int]:
    """A COPY context's tar, uploaded through an API replica (which checked the upload URL)."""
    t = _templates(request)
    return {"stored": await spool_upload(request, lambda f: t.put_files("", files_hash, f))}


@router.post("/template-builds/{build_id}", status_code=202)
def start_template_build(build_id: str, body: dict[str, Any], request: Request) -> dict[str, bool]:
    """Run a build placed on this node (its record names this node); its logs and outcome go to
    the shared database, where the API reads them. 409: already started."""
    t = _templates(request)
    row = t.builds.get(build_id)
    if row is None:
        raise ApiError(404, f"build '{build_id}' not found")
    if row.status != "waiting" or not _start(t, row, body):
        raise ApiError(409, f"build '{build_id}' was already started ({row.status})")
    return {"started": True}


def _start(t: TemplateService, row: TemplateBuildRow, body: dict[str, Any]) -> bool:
    try:
        return t.start(row, body)
    except SpecError as exc:
        raise ApiError(400, str(exc)) from exc


@router.get("/builds/{build_id}")
def build(build_id: str, request: Request) -> Response:
    """A build this node holds, as a tar (another node fetches it: cluster/builds.py)."""
    from sandboxd.cluster.builds import tar_stream

    store = _orch(request).templates
    try:
        held = store.exists(build_id)
    except ValueError:
        held = False
    if not held:
        return JSONResponse({"code": 404, "message": f"build {build_id} is not on this node"}, status_code=404)
    return StreamingResponse(tar_stream(store, build_id), media_type="application/x-tar")


def node_api(orch: Orchestrator, agent: NodeAgent, samples: MetricSamples, templates: TemplateService,
             lifespan: Any = None) -> FastAPI:
    """The internal API app."""
    app = FastAPI(title="sandboxd node", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.orchestrator = orch
    app.state.templates = templates
    app.state.snapshots = SnapshotService(orch)
    app.state.volumes = Volumes(orch.db, orch.settings.data_dir)
    app.state.agent = agent
    app.state.samples = samples

    @app.exception_handler(SandboxError)
    async def _sandbox_error(_: Request, exc: SandboxError) -> JSONResponse:
        return JSONResponse(error_json(exc), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ApiError)  # the volume content API's errors, in E2B's shape
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"code": exc.status, "message": exc.message}, status_code=exc.status,
                            headers=exc.headers)

    app.include_router(router)
    app.include_router(volumes_router)  # its content API (/volumecontent/...): the API replica forwards it here
    return app
