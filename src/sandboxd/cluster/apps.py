"""The two processes of a cluster, as ASGI apps: ``sandboxd node`` and ``sandboxd api``.

A node is ``serve``'s orchestrator and lifespan (server.node_running) with the internal API
(node_api.py) instead of the public one, behind the cluster secret. An API replica is the public
API's routes (the same modules ``serve`` mounts) over a :class:`ClusterOrchestrator`, in front of
the cluster proxy; it keeps no state of its own, so any number of replicas can serve behind a
load balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

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
from sandboxd.cluster.auth import RequireSecret, load_secret
from sandboxd.cluster.builds import BuildFetcher
from sandboxd.cluster.membership import Sweeper, agent_for
from sandboxd.cluster.node_api import node_api
from sandboxd.cluster.node_client import NodeClients
from sandboxd.cluster.proxy import ClusterProxy
from sandboxd.cluster.remote import ClusterOrchestrator, RemoteSamples
from sandboxd.cluster.snapshot_copies import SnapshotCopies
from sandboxd.cluster.snapshots import ClusterSnapshots
from sandboxd.cluster.templates import ClusterTemplates
from sandboxd.cluster.tls import cluster_tls
from sandboxd.cluster.volumes import ClusterVolumes
from sandboxd.config import Settings
from sandboxd.orchestrator.samples import MetricSamples
from sandboxd.proxy.asgi import ASGIApp, SandboxProxy
from sandboxd.store.db import Database
from sandboxd.store.nodes_db import Nodes
from sandboxd.store.secrets_db import Secrets

SWEEP_INTERVAL_S = 1.0


def build_node_app(settings: Settings) -> ASGIApp:
    """``sandboxd node``: this machine's orchestrator, its internal API and its sandbox proxy,
    every request needing the cluster secret."""
    from sandboxd.server import make_orchestrator, node_running

    secret = load_secret(settings)
    tls = cluster_tls(settings)
    orch = make_orchestrator(settings)
    samples = MetricSamples(settings.data_dir / "metrics")
    scheme = "https" if tls is not None else "http"
    agent = agent_for(orch, settings.node_address or f"{scheme}://{settings.host}:{settings.port}")
    orch.fetch_build = BuildFetcher(orch.templates, agent.nodes, agent.node_id, secret, tls)
    # the node's egress proxy fills network.rules' secrets: the API's key file must be the node's too
    secrets = Secrets(orch.db, settings.secrets_key_file or settings.data_dir / "secrets.key")
    orch.slots.egress_proxy.configure(secrets.value, settings.egress_upstream_ca)
    # template builds the API replicas place here: serve's service, recorded as this node's
    templates = TemplateService(settings, orch.db, node_id=agent.node_id, fetch_build=orch.fetch_build,
                                on_built=lambda _: agent.beat())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with node_running(settings, orch, samples, agent):
            yield

    app = node_api(orch, agent, samples, templates, lifespan)
    # other nodes' snapshots, fetched verified when this node must start a sandbox from one
    app.state.snapshot_copies = SnapshotCopies(app.state.snapshots, agent.nodes, agent.node_id, secret, tls)
    return RequireSecret(SandboxProxy(app, orch.upstream, orch.find_signed, orch.find_by_token, orch.wake), secret)


def build_api_app(settings: Settings) -> ASGIApp:
    """``sandboxd api``: E2B's REST API and the sandbox proxy over every node of the cluster."""
    secret = load_secret(settings)
    tls = cluster_tls(settings)
    db = Database(settings.db_url)
    clients = NodeClients(secret, tls)
    orch = ClusterOrchestrator(settings, db, clients)
    sweeper = Sweeper(Nodes(db), settings.node_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(sweeper.run(SWEEP_INTERVAL_S))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.to_thread(clients.close)

    api = FastAPI(title="sandboxd", version="0.1.0", lifespan=lifespan)
    api.state.settings = settings
    api.state.db = db
    api.state.orchestrator = orch
    api.state.quotas = Quotas(db)
    api.state.metric_samples = RemoteSamples(orch)  # sampled by each node, read from it
    api.state.snapshots = ClusterSnapshots(orch)  # each on its node; records in PostgreSQL
    api.state.volumes = ClusterVolumes(orch)  # each on its node; records in PostgreSQL
    api.state.secrets = Secrets(db, settings.secrets_key_file or settings.data_dir / "secrets.key")
    api.state.templates = ClusterTemplates(orch, secret)  # each build on its node; records in PostgreSQL
    install_error_handlers(api)
    api.include_router(sandboxes_v1_router)  # first: /sandboxes/metrics before /sandboxes/{id}
    api.include_router(sandboxes_router)
    api.include_router(secrets_router)
    api.include_router(logs_router)  # the node's log store, through RemoteLogs
    api.include_router(templates_router)  # serve's build and tag routes, over ClusterTemplates
    api.include_router(snapshots_router)  # after: DELETE /templates/tags is not DELETE /templates/{id}
    api.include_router(templates_list_router)  # after: /templates/aliases/{alias} is not a template id
    api.include_router(volumes_router)  # content calls never reach it: the cluster proxy sends them to the node

    @api.get("/health")
    def health() -> dict[str, Any]:
        """Up, and the nodes it can place on."""
        return {"status": "ok", "warmPoolReady": 0, "activeNodes": len(orch.nodes.active())}

    api.include_router(unsupported_router)
    return ClusterProxy(api, db, secret, tls)
