"""One sandboxd node: the API, the proxy and the orchestrator on one listener.

``build_app(settings)`` wires the components; the ASGI lifespan recovers sandboxes left by a
previous run and reaps the ones whose timeout passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from sandboxd.api.errors import install_error_handlers
from sandboxd.api.logs import router as logs_router
from sandboxd.api.quotas import Quotas
from sandboxd.api.sandboxes import router as sandboxes_router
from sandboxd.api.sandboxes_v1 import router as sandboxes_v1_router
from sandboxd.api.secrets import router as secrets_router
from sandboxd.api.snapshots import router as snapshots_router
from sandboxd.api.templates import TemplateService
from sandboxd.api.templates import router as templates_router
from sandboxd.api.templates_list import router as templates_list_router
from sandboxd.api.unsupported import router as unsupported_router
from sandboxd.api.volumes import router as volumes_router
from sandboxd.cluster.membership import NodeAgent, Sweeper, agent_for, node_id_of
from sandboxd.config import Settings
from sandboxd.console.routes import mount_console
from sandboxd.observability.endpoint import router as metrics_router
from sandboxd.orchestrator.backends import Backends
from sandboxd.orchestrator.network import SlotPool
from sandboxd.orchestrator.samples import MetricSamples
from sandboxd.orchestrator.sandboxes import Orchestrator
from sandboxd.orchestrator.snapshots import SnapshotService
from sandboxd.orchestrator.volumes import Volumes
from sandboxd.proxy.asgi import SandboxProxy
from sandboxd.store.db import Database
from sandboxd.store.secrets_db import Secrets
from sandboxd.templates.store import TemplateStore

log = logging.getLogger("sandboxd")
REAP_INTERVAL_S = 1.0
SWEEP_INTERVAL_S = 1.0


def make_backends(settings: Settings, templates: TemplateStore) -> Backends:
    """gVisor always; the microVM stack too, made on first use (it prepares a guest kernel)."""
    from sandboxd.nbd.provider import NbdRootfsProvider
    from sandboxd.orchestrator.backends import GVisorBackend, MicroVMBackend
    from sandboxd.runtimes.guest import prepare_guest
    from sandboxd.runtimes.gvisor import GVisorRuntime
    from sandboxd.runtimes.microvm import MicroVMRuntime

    def gvisor() -> GVisorBackend:
        runtime = GVisorRuntime(settings.runsc_root, platform=settings.gvisor_platform,
                                template_root=settings.templates_dir)
        return GVisorBackend(runtime, templates)

    def microvm() -> MicroVMBackend:
        provider = NbdRootfsProvider(settings.data_dir, templates, log=log.info)
        runtime = MicroVMRuntime(settings.data_dir / "microvm", prepare_guest(settings.data_dir, log.info),
                                 forbidden_roots=provider.forbidden_roots)
        return MicroVMBackend(runtime, provider)

    return Backends({"gvisor": gvisor, "microvm": microvm}, settings.runtime)


def make_orchestrator(settings: Settings, db: Database | None = None) -> Orchestrator:
    """This node's orchestrator; its database sees the node's own sandboxes (``node_id_of``)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    templates = TemplateStore(settings.templates_dir)
    db = (db or Database(settings.db_url)).scoped(node_id_of(settings))
    return Orchestrator(settings, db, templates, make_backends(settings, templates),
                        SlotPool(settings.net_prefix, settings.net_cidr, settings.max_sandboxes))


async def _reap_forever(orch: Orchestrator) -> None:
    while True:
        await asyncio.sleep(REAP_INTERVAL_S)
        try:
            await asyncio.to_thread(orch.reap_expired)
        except Exception:  # noqa: BLE001 - the reaper must survive one bad sandbox
            log.exception("reaper failed")


async def _sample_forever(orch: Orchestrator, samples: MetricSamples, interval_s: float) -> None:
    """Sample every running sandbox's metrics each ``interval_s`` (GET /sandboxes/{id}/metrics)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            running = [r for r in orch.db.list_sandboxes() if r.state == "running"]
            await asyncio.to_thread(samples.sample_all, running,
                                    lambda sandbox_id: (u.address if (u := orch.upstream(sandbox_id)) else None))
        except Exception:  # noqa: BLE001 - the sampler must survive one bad sandbox
            log.exception("metrics sampler failed")


@contextlib.asynccontextmanager
async def node_running(settings: Settings, orch: Orchestrator, samples: MetricSamples,
                       agent: NodeAgent) -> AsyncIterator[None]:
    """A node's life, in ``serve`` and ``sandboxd node`` alike: recover what the last run left,
    register, then the warm pool, the reaper, the sampler, heartbeats and the membership sweep
    until shutdown, which drains the teardowns."""
    await asyncio.to_thread(orch.recover)
    await asyncio.to_thread(agent.register)
    orch.start_pool()
    sweeper = Sweeper(agent.nodes, settings.node_timeout_s)
    tasks = [asyncio.create_task(_reap_forever(orch)),
             asyncio.create_task(_sample_forever(orch, samples, settings.metrics_interval_s)),
             asyncio.create_task(agent.run(settings.heartbeat_interval_s)),
             asyncio.create_task(sweeper.run(SWEEP_INTERVAL_S))]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(orch.pool.close)
        await asyncio.to_thread(orch.drain)
        if not orch.db.list_sandboxes():  # running sandboxes keep their egress until a restart
            orch.slots.teardown_host()


def build_app(settings: Settings, orch: Orchestrator | None = None) -> SandboxProxy:
    """The ASGI app to serve: the proxy in front of the FastAPI control plane."""
    orch = orch or make_orchestrator(settings)
    samples = MetricSamples(settings.data_dir / "metrics")
    # the one node of this single-machine cluster (cluster/membership.py): registered, heartbeating,
    # and sweeping as any cluster member does
    agent = agent_for(orch, f"http://{settings.host}:{settings.port}")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(orch.db.adopt_unowned)  # records made before nodes were: all this node's
        async with node_running(settings, orch, samples, agent):
            yield

    api = FastAPI(title="sandboxd", version="0.1.0", lifespan=lifespan)
    api.state.settings = settings
    api.state.db = orch.db
    api.state.orchestrator = orch
    api.state.quotas = Quotas(orch.db)
    api.state.metric_samples = samples
    api.state.snapshots = SnapshotService(orch)
    api.state.volumes = Volumes(orch.db, settings.data_dir)
    api.state.secrets = Secrets(orch.db, settings.secrets_key_file or settings.data_dir / "secrets.key")
    orch.slots.egress_proxy.configure(api.state.secrets.value, settings.egress_upstream_ca)
    api.state.templates = TemplateService(settings, orch.db, node_id=agent.node_id, on_built=lambda _: agent.beat())
    install_error_handlers(api)
    api.include_router(sandboxes_v1_router)  # first: /sandboxes/metrics before /sandboxes/{id}
    api.include_router(sandboxes_router)
    api.include_router(volumes_router)
    api.include_router(secrets_router)
    api.include_router(logs_router)
    api.include_router(templates_router)
    api.include_router(snapshots_router)  # after: DELETE /templates/tags is not DELETE /templates/{id}
    api.include_router(templates_list_router)  # after: /templates/aliases/{alias} is not a template id
    api.include_router(metrics_router)

    @api.get("/health")
    def health() -> dict[str, str | int]:
        """Up; and how many sandboxes the warm pool holds ready (benchmarks wait for it)."""
        return {"status": "ok", "warmPoolReady": orch.pool.ready_count(), "nodeId": agent.node_id}

    mount_console(api)
    api.include_router(unsupported_router)  # last: any route implemented later takes precedence

    return SandboxProxy(api, orch.upstream, orch.find_signed, orch.find_by_token, orch.wake)
