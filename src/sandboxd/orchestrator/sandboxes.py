"""Sandbox lifecycle on one node: create, kill, timeouts, and recovery after a restart.

``create`` reads top to bottom: resolve build → rootfs → network → runtime → envd init + health →
record. Every step registers its undo on the sandbox's :class:`Teardown` (lifecycle.py) as soon as it
succeeded, so a failure at any point removes exactly what was made (no leaked namespaces, mounts or
processes) and the client gets the console output; kill, recovery and a failed resume run that same
teardown (all of it, or the boot's part). docs/architecture.md walks through it.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TypeVar

from sandboxd.config import Settings
from sandboxd.envd import ENVD_VERSION
from sandboxd.envd.auth import file_signature
from sandboxd.envd.contract import envd_argv, envd_env
from sandboxd.errors import StartError
from sandboxd.observability import events
from sandboxd.orchestrator.backends import Backend, Backends
from sandboxd.orchestrator.boot_images import BootImages, ImageKey
from sandboxd.orchestrator.egress import NO_EGRESS, OPEN_EGRESS, EgressPolicy
from sandboxd.orchestrator.egress_ca import GUEST_BUNDLE, GUEST_CA, TRUST_ENV, TRUSTED_MARK, SandboxCA
from sandboxd.orchestrator.envd_client import (
    EnvdNotReady,
    envd_answers,
    init_envd,
    run_process,
    start_logged,
    sync_guest,
    trust_ca,
    wait_healthy,
)
from sandboxd.orchestrator.lifecycle import BOOT_STEPS, SandboxState, Teardown
from sandboxd.orchestrator.logs import LogStore
from sandboxd.orchestrator.network import NetworkError, NetworkSlot, SlotPool
from sandboxd.orchestrator.pool import PoolKey, WarmPool, WarmSandbox
from sandboxd.orchestrator.recovery import RecoveryReport, recover_node
from sandboxd.orchestrator.rootfs import unmount_overlay
from sandboxd.orchestrator.volumes import data_dir_of as volume_data_dir
from sandboxd.proxy.asgi import Upstream
from sandboxd.runtimes.base import RuntimeSpec, console_tail
from sandboxd.store.db import Database, SandboxRow, new_id, utcnow
from sandboxd.store.templates_db import ACTIVE, BuildResources, TemplateBuilds, split_name
from sandboxd.templates.runtime import RuntimeConfig
from sandboxd.templates.store import TemplateStore, remove_tree

log = logging.getLogger("sandboxd.orchestrator")
T = TypeVar("T")
#: The SDK's Dockerfile converter makes ``sleep 20`` the ready command of any CMD; E2B pays it once,
#: at build time, before its snapshot. Without a snapshot it would delay every create, so a ready
#: command that only sleeps is treated as "ready once started".
_PLAIN_SLEEP = re.compile(r"sleep\s+\d+(\.\d+)?")


#: Seconds a create of a template still being built is told to wait before it tries again.
NOT_READY_RETRY_S = 10

#: E2B's ``error_code`` for a resume that would restore an envd that did not answer at pause
GUEST_UNRESPONSIVE = "sandbox_snapshot_guest_agent_unresponsive"


class SandboxError(Exception):
    """A create/kill failure with the HTTP status the API should answer."""

    def __init__(self, status: int, message: str, error_code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        #: a retry cannot help (a create was already retried here): the API says ``Should-Retry: false``
        self.final = False
        #: extra response headers (``Retry-After`` for a template still being built)
        self.headers = headers


@dataclass(frozen=True)
class Resources:
    """What one sandbox gets: CPUs (a quota), memory, its own disk."""

    cpu_count: int
    memory_mb: int
    disk_mb: int


@dataclass(frozen=True)
class Seed:
    """Start from a captured sandbox (a snapshot, a fork's parent) instead of a template alone:
    what its backend captured (``Backend.capture``) is copied as the new sandbox's own disk, over
    the build it was taken on; with ``memory``, its memory is restored instead of a boot, and the
    envd in it holds ``envd_token`` (the captured sandbox's) until its ``/init`` gives a new one."""

    captured: Path
    template_id: str
    alias: str
    build_id: str
    runtime: str
    resources: Resources
    memory: bool = False
    envd_token: str = ""
    #: a template's booted image (orchestrator/boot_images.py): captured before any /init, so
    #: the template's start command has not run yet and runs after the restore
    booted: bool = False


@dataclass(frozen=True)
class CreateRequest:
    template: str
    timeout_s: int
    metadata: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    allow_internet_access: bool = True
    egress: EgressPolicy | None = None  # None: open, or none at all without internet access
    auto_pause: bool = False
    auto_pause_memory: bool = True
    auto_resume: bool = False
    secure: bool = True  # E2B's v1 ``secure: false``: envd without an access token
    allow_public_traffic: bool = True  # False: the proxy demands the traffic access token
    mask_request_host: str | None = None
    https_ports: tuple[int, ...] = ()
    idempotency_key: str | None = None
    seed: Seed | None = None
    owner: str | None = None  # the hash of the API key that asked (its quotas count the sandbox)
    #: volumes to bind: ({"volumeID", "path"}, ...), names already resolved (api/sandboxes.py)
    volume_mounts: tuple[dict[str, str], ...] = ()

    @property
    def egress_policy(self) -> EgressPolicy:
        if self.egress is not None:
            return self.egress
        return OPEN_EGRESS if self.allow_internet_access else NO_EGRESS


class Orchestrator:
    """Owns every sandbox on this node; the API and the proxy only go through it."""

    def __init__(self, settings: Settings, db: Database, templates: TemplateStore,
                 backends: Backends, slots: SlotPool) -> None:
        self.settings = settings
        self.db = db
        self.templates = templates
        self.backends = backends
        self.slots = slots
        self._routes: dict[str, Upstream] = {}  # sandbox id → where it answers, read by the proxy per request
        self._placed: dict[str, tuple[int, str]] = {}  # sandbox id → (slot, runtime), for forget_missing
        self._boots = itertools.count(1)
        self._tokens: dict[str, str] = {}  # sandbox id → envd access token (signed file URLs)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._teardowns = ThreadPoolExecutor(max_workers=4, thread_name_prefix="teardown")
        self._sandbox_teardowns: dict[str, Teardown] = {}  # sandbox id → its undo steps (lifecycle.py)
        settings.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        self.logs = LogStore(settings.data_dir / "logs")
        self.boot_images = BootImages(settings.data_dir / "boot-images", self._make_boot_image) \
            if settings.microvm_boot_images else None
        self.pool = WarmPool(settings.warm_pool_size, self._boot_warm, self._discard_warm,
                             max_size=settings.warm_pool_max, parallel=settings.warm_pool_parallel)
        #: a cluster node fetches a build it lacks from another node (cluster/builds.py); None: alone
        self.fetch_build: Callable[[str], bool] | None = None

    # -- queries -------------------------------------------------------------------------------

    def upstream(self, sandbox_id: str) -> Upstream | None:
        """Where the proxy dials this sandbox, or None if it is not running here."""
        return self._routes.get(sandbox_id)

    def route(self, row: SandboxRow) -> None:
        """Make a sandbox reachable (again): a new boot number, so no pooled connection to an
        earlier run of it is reused."""
        self._placed[row.sandbox_id] = (row.slot_index, row.runtime)
        self._routes[row.sandbox_id] = Upstream(row.host_address, next(self._boots), row.traffic_access_token,
                                                row.mask_request_host, frozenset(row.https_ports or ()))
        if row.envd_access_token:
            self._tokens[row.sandbox_id] = row.envd_access_token

    def find_signed(self, path: str, operation: str, username: str, signature: str,
                    expiration: int | None) -> str | None:
        """The sandbox whose envd token produced this pre-signed ``/files`` URL signature.

        ``download_url()``/``upload_url()`` carry no sandbox id (with ``E2B_SANDBOX_URL`` they
        point at the shared proxy), so the signature itself identifies the sandbox. envd checks
        it again, expiration included."""
        for sandbox_id, token in list(self._tokens.items()):
            expected = file_signature(path, operation, username, token, expiration)
            if hmac.compare_digest(expected.encode(), signature.encode()):
                return sandbox_id
        return None

    def find_by_token(self, token: str) -> str | None:
        """The running sandbox whose envd access token this is (envd calls that name no sandbox)."""
        for sandbox_id, known in list(self._tokens.items()):
            if hmac.compare_digest(known.encode(), token.encode()):
                return sandbox_id
        return None

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.settings.sandboxes_dir / sandbox_id

    def egress_ca(self, sandbox_id: str) -> SandboxCA | None:
        """The sandbox's egress CA (for ``network.rules``), if it was ever given one."""
        return SandboxCA.load(self.sandbox_dir(sandbox_id))

    def _trust_egress_ca(self, sandbox_id: str, address: str, token: str, config: RuntimeConfig) -> None:
        """The sandbox's CA into its trust store and the trust variables into envd's environment
        (once per sandbox: the marker says it was done; a disk-only resume keeps the files and
        gets the variables from :meth:`_personalize`)."""
        sdir = self.sandbox_dir(sandbox_id)
        ca = SandboxCA.load(sdir)
        if ca is None or (sdir / TRUSTED_MARK).exists():
            return
        trust_ca(address, token, ca.pem, GUEST_BUNDLE, GUEST_CA)
        init_envd(address, token, TRUST_ENV, config.user, config.workdir)
        (sdir / TRUSTED_MARK).touch()

    # -- create --------------------------------------------------------------------------------

    def create(self, req: CreateRequest) -> SandboxRow:
        """Start a sandbox and return its record once envd answered; retry a failed start."""
        with events.observe_create(split_name(req.template)[0]):
            try:
                return self._create(req)
            except SandboxError as exc:
                exc.final = True  # a failed start was retried here already
                raise

    def _create(self, req: CreateRequest) -> SandboxRow:
        runtime: str | None
        if req.seed is not None:
            template_id, alias, build_id, runtime = (req.seed.template_id, req.seed.alias, req.seed.build_id,
                                                     req.seed.runtime)
            resources = req.seed.resources
        else:
            found = TemplateBuilds(self.db).lookup(req.template)  # one read: build and resources agree
            if found is None:
                raise self._missing_template(req.template)
            template = found.template
            template_id, alias, build_id, runtime = (template.template_id, template.alias, found.build_id,
                                                     template.runtime)
            resources = self._resources_of(found.resources)
        try:
            backend = self.backends.get(runtime)
        except KeyError as exc:
            raise SandboxError(500, f"template '{req.template}': {exc}") from exc
        if req.seed is not None and req.seed.memory and req.seed.envd_token and not req.secure:
            raise SandboxError(400, "secure: false: this snapshot keeps the memory of a sandbox whose envd has an "
                                    "access token, and a sandbox restored from it keeps needing one")
        if req.volume_mounts and backend.name != "gvisor":
            raise SandboxError(501, f"volumeMounts: {backend.name} sandboxes cannot mount volumes yet (gVisor ones can): "
                                    "the guest kernel has no 9p, and virtiofs (which it has) is not wired up; "
                                    "a VM with either could not be paused or snapshotted with its memory")
        if not self.templates.exists(build_id) and not (self.fetch_build and self.fetch_build(build_id)):
            raise SandboxError(500, f"template '{req.template}' points at build {build_id}, "
                                    "which is not in the template store; rebuild it")
        if req.seed is None and self._poolable(req):
            key = PoolKey(build_id, backend.name, resources.cpu_count, resources.memory_mb, resources.disk_mb)
            self.pool.want(key)
            # none ready but one booting for the pool: that boot is further along than ours would be
            if (warm := self.pool.claim(key, wait_s=self.settings.envd_ready_timeout_s)) is not None:
                try:
                    return self._claim(req, template_id, alias, backend, warm)
                except SandboxError as exc:
                    log.warning("claiming pooled sandbox %s failed (starting one): %s", warm.sandbox_id, exc.message)
        if req.seed is None and backend.captures_memory and self.boot_images is not None:
            image_key = ImageKey(build_id, resources.cpu_count, resources.memory_mb)
            if (image := self.boot_images.find(image_key)) is not None:
                req = replace(req, seed=Seed(image, template_id, alias, build_id, backend.name, resources,
                                             memory=True, booted=True))
            else:
                self.boot_images.want(image_key)  # this create boots cold; later ones restore
        last: SandboxError | None = None
        for attempt in range(1, self.settings.start_attempts + 1):
            try:
                return self._create_once(req, template_id, alias, build_id, backend, resources)
            except SandboxError as exc:
                last = exc
                log.warning("sandbox start attempt %d failed: %s", attempt, exc.message)
                if exc.status < 500:
                    break
        assert last is not None
        raise last

    def resources_for(self, template: str) -> Resources:
        """What a sandbox of ``template`` would get (quotas are checked against it)."""
        return self._resources(template)

    def _missing_template(self, ref: str) -> SandboxError:
        """A 404, unless the template is being built (503, how far it got, retry later: the SDK
        retries a 503 with Retry-After) or its only build failed (500 with the reason)."""
        builds = TemplateBuilds(self.db)
        name = split_name(ref)[0]
        row = builds.latest(name)
        if row is not None and row.status in ACTIVE:
            created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
            elapsed = (datetime.now(UTC) - created).total_seconds()
            step = builds.last_header(row.build_id)
            return SandboxError(503, f"template '{ref}' is still being built ({f'at {step}' if step else 'starting'}, "
                                     f"{elapsed:.0f}s so far); try again when it is ready (build {row.build_id})",
                                headers={"Retry-After": str(NOT_READY_RETRY_S), "Should-Retry": "true"})
        if row is not None and row.status == "error" and self.db.find_template(name) is None:
            return SandboxError(500, f"template '{ref}' failed to build (build {row.build_id}): "
                                     f"{(row.reason or 'no reason recorded')[:800]}")
        return SandboxError(404, f"template '{ref}' not found")

    def _resources(self, template: str) -> Resources:
        return self._resources_of(TemplateBuilds(self.db).resources(template))

    def _resources_of(self, asked: BuildResources) -> Resources:
        return resources_of(self.settings, asked)

    def _create_once(self, req: CreateRequest, template_id: str, alias: str, build_id: str,
                     backend: Backend, res: Resources) -> SandboxRow:
        sandbox_id = new_id()
        token = secrets.token_hex(24) if req.secure else ""
        sdir = self.sandbox_dir(sandbox_id)
        started = time.monotonic()
        teardown = Teardown(sandbox_id)
        try:
            sdir.mkdir(parents=True)
            self._undo_dir(teardown)
            seed = req.seed
            if seed is not None:
                self._step("snapshot", lambda: backend.seed(build_id, seed.captured, sdir))
            policy = req.egress_policy
            ca = SandboxCA.ensure(sdir, sandbox_id) if policy.rules else None
            slot = self._step("network", lambda: self.slots.acquire(policy, ca))
            self._undo_network(teardown, slot.index)
            record = self._add_record(sandbox_id, req, template_id, alias, build_id, backend, res, slot, token)
            self._undo_record(teardown)
            if seed is not None and seed.memory:
                self._restore(backend, record, slot, teardown, seed.envd_token, personalize=seed.booted)
            else:
                self._boot(backend, record, slot, teardown)
            row = self.db.update_sandbox(sandbox_id, state=SandboxState.RUNNING)
            assert row is not None
        except BaseException:
            teardown.run()
            raise
        how = "restored from its template's booted image" if seed is not None and seed.booted else "ready"
        return self._went_live(row, alias, teardown, f"{how} in {time.monotonic() - started:.2f}s")

    def _add_record(self, sandbox_id: str, req: CreateRequest, template_id: str, alias: str, build_id: str,
                    backend: Backend, res: Resources, slot: NetworkSlot, token: str) -> SandboxRow:
        """The sandbox's record (state ``starting``) as the request asked for it."""
        now = utcnow()
        self.db.add_sandbox(
            sandbox_id=sandbox_id, template_id=template_id, alias=alias, build_id=build_id,
            runtime=backend.name, state=SandboxState.STARTING, slot_index=slot.index,
            host_address=slot.host_address, envd_access_token=token, envd_version=ENVD_VERSION,
            metadata_=req.metadata, env_vars=req.env_vars, cpu_count=res.cpu_count,
            memory_mb=res.memory_mb, disk_size_mb=res.disk_mb,
            allow_internet_access=not req.egress_policy.denies_all, auto_pause=req.auto_pause,
            auto_pause_memory=req.auto_pause_memory, started_at=now, end_at=now + timedelta(seconds=req.timeout_s),
            egress=req.egress.to_json() if req.egress is not None else None,
            traffic_access_token=None if req.allow_public_traffic else secrets.token_hex(24),
            mask_request_host=req.mask_request_host, https_ports=list(req.https_ports) or None,
            auto_resume=req.auto_resume, idempotency_key=req.idempotency_key, owner=req.owner,
            volume_mounts=list(req.volume_mounts) or None)
        row = self.db.get_sandbox(sandbox_id)
        assert row is not None
        return row

    # -- the warm pool -------------------------------------------------------------------------

    @staticmethod
    def _poolable(req: CreateRequest) -> bool:
        """Pooled sandboxes are booted with what a create can only choose at boot at its
        default: a slot with open egress and no volumes bound. Everything else is applied when
        claimed."""
        return req.egress_policy == OPEN_EGRESS and not req.volume_mounts

    def start_pool(self) -> None:
        """Keep a pool of the default template from the start (if a pool is configured)."""
        if not self.pool.enabled:
            return
        template = self.db.find_template(self.settings.default_template)
        build_id = TemplateBuilds(self.db).resolve(self.settings.default_template)
        if template is not None and build_id is not None:
            res = self._resources(self.settings.default_template)
            self.pool.want(PoolKey(build_id, self.backends.get(template.runtime).name, res.cpu_count,
                                   res.memory_mb, res.disk_mb))
        self.pool.start()

    def _boot_warm(self, key: PoolKey) -> WarmSandbox:
        """Boot a sandbox for the pool: no record, no token, no env vars, no route."""
        backend = self.backends.get(key.runtime)
        sandbox_id = new_id()
        teardown = Teardown(sandbox_id)
        try:
            self.sandbox_dir(sandbox_id).mkdir(parents=True)
            self._undo_dir(teardown)
            slot = self._step("network", lambda: self.slots.acquire(OPEN_EGRESS))
            self._undo_network(teardown, slot.index)
            row = SandboxRow(sandbox_id=sandbox_id, build_id=key.build_id, envd_access_token="", env_vars={},
                             cpu_count=key.cpu_count, memory_mb=key.memory_mb, disk_size_mb=key.disk_mb)
            self._boot(backend, row, slot, teardown, personalize=False)
        except BaseException:
            teardown.run()
            raise
        self._sandbox_teardowns[sandbox_id] = teardown
        log.debug("warm pool: sandbox %s booted", sandbox_id)
        return WarmSandbox(sandbox_id, key, slot)

    def _make_boot_image(self, key: ImageKey, dest: Path) -> None:
        """A template's booted image (boot_images.py): a sandbox booted as the pool boots one,
        captured with its memory into ``dest``, then removed."""
        backend = self.backends.get("microvm")
        # (a microVM's disk is its template's image: the disk size plays no part in its boot)
        warm = self._boot_warm(PoolKey(key.build_id, backend.name, key.cpu_count, key.memory_mb,
                                       self.settings.disk_size_mb))
        try:
            backend.capture(warm.sandbox_id, self.sandbox_dir(warm.sandbox_id), dest, memory=True)
        finally:
            self._discard_warm(warm)

    def _discard_warm(self, warm: WarmSandbox) -> None:
        self.take_teardown(warm.sandbox_id, warm.slot.index, warm.key.runtime).run()

    def _claim(self, req: CreateRequest, template_id: str, alias: str, backend: Backend,
               warm: WarmSandbox) -> SandboxRow:
        """Make a pooled sandbox the requester's: its record, envd's /init (token, env vars),
        the template's start and ready commands, its route. On failure it is removed."""
        started = time.monotonic()
        sandbox_id, slot, key = warm.sandbox_id, warm.slot, warm.key
        token = secrets.token_hex(24) if req.secure else ""
        teardown = self.take_teardown(sandbox_id, slot.index, key.runtime)
        try:
            res = Resources(key.cpu_count, key.memory_mb, key.disk_mb)
            self._add_record(sandbox_id, req, template_id, alias, key.build_id, backend, res, slot, token)
            self._undo_record(teardown)
            config = RuntimeConfig.of(self.templates.get(key.build_id))
            sdir = self.sandbox_dir(sandbox_id)
            self._step("envd", lambda: self._personalize(sandbox_id, slot, token, config, req.env_vars), sdir)
            row = self.db.update_sandbox(sandbox_id, state=SandboxState.RUNNING)
            assert row is not None
        except BaseException:
            teardown.run()
            raise
        return self._went_live(row, alias, teardown, f"claimed from the warm pool in {time.monotonic() - started:.3f}s")

    def _went_live(self, row: SandboxRow, alias: str, teardown: Teardown, how: str) -> SandboxRow:
        """A created sandbox (started or claimed) is kept with its teardown, routed, and logged."""
        self._sandbox_teardowns[row.sandbox_id] = teardown
        self.route(row)
        log.info("sandbox %s (%s) %s", row.sandbox_id, alias, how)
        self.logs.event(row.sandbox_id, f"Sandbox created from template {alias} and started", template=alias)
        return row

    def _boot(self, backend: Backend, row: SandboxRow, slot: NetworkSlot, teardown: Teardown,
              personalize: bool = True) -> None:
        """rootfs → runtime → envd answers → (``personalize``) envd init, start and ready commands:
        a sandbox booting over its disk (a new one, one resumed without memory, or one for the
        warm pool, personalized when claimed). Its undo goes on the sandbox's teardown; on failure
        the boot's own steps are undone (the disk and its files stay: the caller owns the dir)."""
        sdir = self.sandbox_dir(row.sandbox_id)
        try:
            rootfs = self._step("rootfs", lambda: backend.prepare_rootfs(row.build_id, sdir, row.disk_size_mb), sdir)
            spec = self._spec(row, slot, rootfs)
            self._undo_boot(teardown, backend)  # before the start: a start may fail halfway
            self._step("runtime", lambda: backend.runtime.start(spec), sdir)
            took = self._step("envd", lambda: wait_healthy(slot.host_address, self.settings.envd_ready_timeout_s),
                              sdir)
            log.debug("envd answered /health after %.2fs", took)
            if personalize:
                config = RuntimeConfig.of(self.templates.get(row.build_id))
                self._step("envd", lambda: self._personalize(row.sandbox_id, slot, row.envd_access_token, config,
                                                             row.env_vars), sdir)
        except BaseException:
            self._undo_boot(teardown, backend)  # also a rootfs that failed halfway
            teardown.run(*BOOT_STEPS)
            raise

    def _restore(self, backend: Backend, row: SandboxRow, slot: NetworkSlot, teardown: Teardown,
                 envd_token: str, personalize: bool = False) -> None:
        """A new sandbox from captured memory (seeded as if paused with it): its processes go on
        where the captured sandbox's were, over its own copy of the disk, in its own slot; envd
        answers and its ``/init`` (authorized by the token the memory holds) gives it this
        sandbox's token, env vars and new entropy. The template's start command is not run again:
        it runs — except in a template's booted image (``personalize``), which is personalized
        as a claimed warm sandbox is."""
        sdir = self.sandbox_dir(row.sandbox_id)
        try:
            self._undo_boot(teardown, backend)
            self._step("restore", lambda: backend.resume_with_memory(
                row.sandbox_id, lambda rootfs: self._spec(row, slot, rootfs), row.build_id, sdir), sdir)
            backend.drop_memory(row.sandbox_id, sdir)  # restored: the copy of the memory is not needed
            self._step("envd", lambda: wait_healthy(slot.host_address, self.settings.envd_ready_timeout_s), sdir)
            config = RuntimeConfig.of(self.templates.get(row.build_id))
            if personalize:
                self._step("envd", lambda: self._personalize(row.sandbox_id, slot, row.envd_access_token, config,
                                                             row.env_vars, restored=True), sdir)
                return
            self._step("envd", lambda: init_envd(slot.host_address, row.envd_access_token,
                                                 {**config.env, **row.env_vars}, config.user, config.workdir,
                                                 current_token=envd_token, restored=True), sdir)
            self._step("envd", lambda: self._trust_egress_ca(row.sandbox_id, slot.host_address,
                                                             row.envd_access_token, config), sdir)
        except BaseException:
            self._undo_boot(teardown, backend)
            teardown.run(*BOOT_STEPS)
            raise

    def _spec(self, row: SandboxRow, slot: NetworkSlot, rootfs: Path) -> RuntimeSpec:
        return RuntimeSpec(sandbox_id=row.sandbox_id, rootfs=rootfs, sandbox_dir=self.sandbox_dir(row.sandbox_id),
                           netns_path=slot.guest_netns_path, argv=envd_argv(), env=envd_env(),
                           cpu_count=row.cpu_count, memory_mb=row.memory_mb,
                           max_processes=self.settings.max_processes,
                           binds=tuple((volume_data_dir(self.settings.data_dir, m["volumeID"]), m["path"])
                                       for m in row.volume_mounts or ()))

    def _personalize(self, sandbox_id: str, slot: NetworkSlot, token: str, config: RuntimeConfig,
                     env_vars: dict[str, str], restored: bool = False) -> None:
        """envd gets its configuration (the request's env vars over the template's; ``restored``:
        new entropy too), then the template's start command runs and its ready command passes."""
        trusts = (self.sandbox_dir(sandbox_id) / TRUSTED_MARK).exists()
        env = {**config.env, **(TRUST_ENV if trusts else {}), **env_vars}
        init_envd(slot.host_address, token, env, config.user, config.workdir, restored=restored)
        self._trust_egress_ca(sandbox_id, slot.host_address, token, config)
        if config.start_cmd:
            start_logged(slot.host_address, token, config.user, config.start_cmd, env, config.workdir,
                         self.logs.output_sink(sandbox_id),
                         lambda how: self.logs.event(sandbox_id, f"Start command {how}", logger="start_cmd"))
        if config.ready_cmd and not _PLAIN_SLEEP.fullmatch(config.ready_cmd.strip()):
            self._wait_ready(slot.host_address, token, config, env)

    def _wait_ready(self, address: str, token: str, config: RuntimeConfig, env: dict[str, str]) -> None:
        """Run the template's ready command every 0.5 s until it exits 0 (or fail the start)."""
        assert config.ready_cmd is not None
        deadline = time.monotonic() + self.settings.envd_ready_timeout_s
        code, output = None, ""
        while time.monotonic() < deadline:
            code, output = run_process(address, token, config.user, config.ready_cmd, env, config.workdir,
                                       wait=True, timeout_s=max(1.0, deadline - time.monotonic()))
            if code == 0:
                return
            time.sleep(0.5)
        raise EnvdNotReady(f"ready command {config.ready_cmd!r} did not succeed "
                           f"(last exit code {code}): {output[-1000:]}")

    def _step(self, name: str, fn: Callable[[], T], sdir: Path | None = None) -> T:
        """Run one create step; turn its failure into a SandboxError with the console's tail.
        Only start failures (:mod:`sandboxd.errors`) and the host refusing a resource (``OSError``)
        are caught: anything else is a bug, reported as one and never retried.
        Its duration goes to the debug log (where a create's time goes)."""
        started = time.monotonic()
        try:
            result = fn()
            log.debug("step %s took %.0f ms", name, (time.monotonic() - started) * 1000)
            return result
        except (StartError, OSError) as exc:
            console = console_tail(sdir) if sdir is not None else ""
            message = f"sandbox failed to start ({name}): {exc}"
            if console and console not in message:
                message += f"\n--- console ---\n{console}"
            raise SandboxError(500, message) from exc

    # -- kill / timeouts -----------------------------------------------------------------------

    def _lock(self, sandbox_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(sandbox_id, threading.Lock())

    def hold(self, sandbox_id: str) -> threading.Lock:
        """The lock that serialises one sandbox's kill, pause, resume and snapshots."""
        return self._lock(sandbox_id)

    def kill(self, sandbox_id: str, wait: bool = False, reason: str = "api") -> bool:
        """Make the sandbox unreachable and forget it at once; False if it does not exist.

        Tearing it down takes ~1.5 s (a ptrace'd gVisor sandbox is slow to die), so that runs in
        the background unless ``wait``. Its slot stays reserved until then, and a crash midway
        is finished by :meth:`recover` (the sandbox dir is there, its record is not)."""
        with self._lock(sandbox_id):
            row = self.db.get_sandbox(sandbox_id)
            if row is None:
                return False
            self._routes.pop(sandbox_id, None)
            self._tokens.pop(sandbox_id, None)
            self._placed.pop(sandbox_id, None)
            teardown = self.take_teardown(sandbox_id, row.slot_index, row.runtime)
            teardown.run("record")
        with self._locks_guard:
            self._locks.pop(sandbox_id, None)
        future = self._teardowns.submit(teardown.run)
        log.info("sandbox %s killed", sandbox_id)
        events.KILLS.labels(reason).inc()
        self.logs.event(sandbox_id, "Sandbox killed")
        if wait:
            future.result()
        return True

    def drain(self) -> None:
        """Wait for background teardowns (server shutdown, tests)."""
        self._teardowns.shutdown(wait=True)
        self._teardowns = ThreadPoolExecutor(max_workers=4, thread_name_prefix="teardown")

    # -- teardown: each step's undo, written once -----------------------------------------------

    def _undo_dir(self, teardown: Teardown) -> None:
        teardown.add("dir", partial(remove_tree, self.sandbox_dir(teardown.sandbox_id)))

    def _undo_network(self, teardown: Teardown, slot_index: int) -> None:
        teardown.add("network", lambda: self.slots.release(self.slots.slot(slot_index)))

    def _undo_record(self, teardown: Teardown) -> None:
        teardown.add("record", partial(self.db.delete_sandbox, teardown.sandbox_id))

    def _undo_boot(self, teardown: Teardown, backend: Backend, prefix: str = "") -> None:
        """The boot's own undo (:data:`BOOT_STEPS`): the runtime stops, then the rootfs goes."""
        teardown.add(f"{prefix}rootfs", partial(backend.release_rootfs, self.sandbox_dir(teardown.sandbox_id)))
        teardown.add(f"{prefix}runtime", partial(backend.runtime.stop, teardown.sandbox_id))

    def teardown_of(self, row: SandboxRow) -> Teardown:
        """The teardown the sandbox's create built (kept while it lives); after a restart, the
        same steps rebuilt from its record (every undo is idempotent)."""
        teardown = self._sandbox_teardowns.get(row.sandbox_id)
        if teardown is None:
            teardown = self.rebuilt_teardown(row.sandbox_id, row.slot_index, row.runtime)
            self._sandbox_teardowns[row.sandbox_id] = teardown
        return teardown

    def take_teardown(self, sandbox_id: str, slot_index: int | None, runtime: str | None) -> Teardown:
        """The sandbox's teardown, to end its life: no longer kept here."""
        teardown = self._sandbox_teardowns.pop(sandbox_id, None)
        return teardown if teardown is not None else self.rebuilt_teardown(sandbox_id, slot_index, runtime)

    def rebuilt_teardown(self, sandbox_id: str, slot_index: int | None, runtime: str | None) -> Teardown:
        """Create's steps in create's order, from what a record (or a stray dir) tells. With no
        runtime known (a dir no record owns) every backend in use undoes its part, and overlay
        mounts are undone even if the gVisor backend was not made in this run."""
        teardown = Teardown(sandbox_id)
        self._undo_dir(teardown)
        if runtime is None:
            teardown.add("overlay mounts", partial(unmount_overlay, self.sandbox_dir(sandbox_id)))
        if slot_index is not None:
            self._undo_network(teardown, slot_index)
        self._undo_record(teardown)
        if runtime is not None:
            self._undo_boot(teardown, self.backends.get(runtime))
        else:
            for backend in self.backends.made():
                self._undo_boot(teardown, backend, prefix=f"{backend.name} ")
        return teardown

    def pause(self, sandbox_id: str, memory: bool = True, strict: bool = False) -> bool | None:
        """Pause the sandbox; False if already paused, None if there is none.

        ``memory``: keep processes and memory (gVisor freezes in place, a microVM snapshots to
        disk), resumed where they were. Else keep the filesystem alone: the guest's writes are
        synced to its disk, the runtime stops and frees its memory, and resuming boots it again.
        Either way the network slot stays reserved: it comes back at the same address. envd must
        answer for a disk-only pause (it syncs) and, when ``strict``, for any pause."""
        with self._lock(sandbox_id):
            row = self.db.get_sandbox(sandbox_id)
            if row is None or row.state not in (SandboxState.RUNNING, SandboxState.PAUSED):
                return None
            if row.state == SandboxState.PAUSED:
                return False
            backend = self.backends.get(row.runtime)
            responsive = envd_answers(row.host_address)
            if not responsive and (strict or not memory):
                raise SandboxError(503, f"sandbox '{sandbox_id}' is not responding (its envd does not answer); "
                                        "it was not paused and runs on")
            self._routes.pop(sandbox_id, None)
            self._tokens.pop(sandbox_id, None)
            sdir = self.sandbox_dir(sandbox_id)
            try:
                if memory:
                    backend.pause_with_memory(sandbox_id, sdir)
                else:
                    sync_guest(row.host_address, row.envd_access_token)
                    backend.runtime.stop(sandbox_id)
                    backend.release_rootfs(sdir)
            except Exception as exc:
                if memory or backend.runtime.states().get(sandbox_id) == "running":
                    self.route(row)
                    raise SandboxError(500, f"pause failed (the sandbox runs on): {exc}") from exc
                log.warning("pause of %s: the runtime stopped but its rootfs was not released: %s", sandbox_id, exc)
            self.db.update_sandbox(sandbox_id, state=SandboxState.PAUSED, paused_memory=memory,
                                   envd_unresponsive_at_pause=not responsive)
        log.info("sandbox %s paused (%s)%s", sandbox_id, "memory and disk" if memory else "disk only",
                 "" if responsive else ": its envd did not answer, so it resumes only by booting again")
        events.PAUSES.labels("memory" if memory else "filesystem").inc()
        self.logs.event(sandbox_id, f"Sandbox paused ({'memory and filesystem' if memory else 'filesystem only'})")
        return True

    def resume(self, sandbox_id: str, timeout_s: int | None, memory: bool = True) -> SandboxRow | None:
        """Bring a paused sandbox back: where it was if it kept its memory (and ``memory``), else
        booted again over its files (the memory, if any, is dropped). A failed resume leaves it
        paused, its files untouched."""
        with self._lock(sandbox_id):
            row = self.db.get_sandbox(sandbox_id)
            if row is None or row.state != SandboxState.PAUSED:
                return None
            backend = self.backends.get(row.runtime)
            sdir = self.sandbox_dir(sandbox_id)
            slot = self.slots.slot(row.slot_index)
            if row.paused_memory and memory:
                if row.envd_unresponsive_at_pause:
                    raise SandboxError(409, f"sandbox '{sandbox_id}' was paused while its envd did not answer: "
                                            "restoring its memory would bring that back", GUEST_UNRESPONSIVE)
                self._resume_with_memory(backend, row, slot)
            else:
                if row.paused_memory:
                    self._step("resume", lambda: backend.drop_memory(sandbox_id, sdir), sdir)
                    row = self.db.update_sandbox(sandbox_id, paused_memory=False)
                    assert row is not None
                self._step("network", lambda: self.slots.restore_guest_address(slot), sdir)
                self._boot(backend, row, slot, self.teardown_of(row))
            end = utcnow() + timedelta(seconds=timeout_s if timeout_s is not None else self.settings.default_timeout_s)
            row = self.db.update_sandbox(sandbox_id, state=SandboxState.RUNNING, paused_memory=None,
                                         envd_unresponsive_at_pause=False, end_at=end)
            assert row is not None
            self.route(row)
        log.info("sandbox %s resumed", sandbox_id)
        events.RESUMES.inc()
        self.logs.event(sandbox_id, "Sandbox resumed")
        return row

    def _resume_with_memory(self, backend: Backend, row: SandboxRow, slot: NetworkSlot) -> None:
        """Restore processes and memory, then envd must answer. If it does not, the sandbox does
        not go back to a half-resumed limbo: its memory is dropped and it stays paused with its
        disk, so the next connect boots it."""
        sdir = self.sandbox_dir(row.sandbox_id)
        self._step("resume", lambda: backend.resume_with_memory(
            row.sandbox_id, lambda rootfs: self._spec(row, slot, rootfs), row.build_id, sdir), sdir)
        config = RuntimeConfig.of(self.templates.get(row.build_id))
        try:
            self._step("envd", lambda: wait_healthy(slot.host_address, self.settings.envd_ready_timeout_s), sdir)
            self._step("envd", lambda: init_envd(slot.host_address, row.envd_access_token,
                                                 {**config.env, **row.env_vars}, config.user, config.workdir), sdir)
        except SandboxError as exc:
            self.teardown_of(row).run(*BOOT_STEPS)
            backend.drop_memory(row.sandbox_id, sdir)
            self.db.update_sandbox(row.sandbox_id, paused_memory=False)
            raise SandboxError(exc.status, f"{exc.message}\nThe sandbox stays paused with its files (its memory "
                                           "was dropped): connect again to boot it.") from exc

    def wake(self, sandbox_id: str) -> Upstream | None:
        """Traffic for a sandbox that does not run here: a paused one created with ``autoResume``
        is resumed (for the server's default timeout) and then served; None for any other."""
        row = self.db.get_sandbox(sandbox_id)
        if row is None or row.state != SandboxState.PAUSED or not row.auto_resume:
            return self.upstream(sandbox_id)
        try:
            if self.resume(sandbox_id, None) is not None:
                log.info("sandbox %s resumed by traffic (autoResume)", sandbox_id)
        except SandboxError as exc:
            log.warning("autoResume of %s failed: %s", sandbox_id, exc.message)
        return self.upstream(sandbox_id)  # also when a concurrent request resumed it first

    def update_network(self, sandbox_id: str, policy: EgressPolicy) -> SandboxRow | None:
        """Replace a running or paused sandbox's egress rules at once (its slot's rules, and the
        names its egress proxy lets through); None if there is no such sandbox."""
        with self._lock(sandbox_id):
            row = self.db.get_sandbox(sandbox_id)
            if row is None or row.state not in (SandboxState.RUNNING, SandboxState.PAUSED):
                return None
            sdir = self.sandbox_dir(sandbox_id)
            if policy.rules and not (sdir / TRUSTED_MARK).exists():
                if row.state != SandboxState.RUNNING:
                    raise SandboxError(409, "network.rules: this paused sandbox does not trust an egress CA yet; "
                                            "resume it (connect) and update its network then")
                SandboxCA.ensure(sdir, sandbox_id)
                config = RuntimeConfig.of(self.templates.get(row.build_id))
                try:
                    self._trust_egress_ca(sandbox_id, row.host_address, row.envd_access_token, config)
                except EnvdNotReady as exc:
                    raise SandboxError(502, f"network.rules: the sandbox could not be made to trust its egress "
                                            f"CA: {exc}") from exc
            try:
                self.slots.set_egress(self.slots.slot(row.slot_index), policy, self.egress_ca(sandbox_id))
            except NetworkError as exc:
                raise SandboxError(500, f"the network rules could not be changed: {exc}") from exc
            row = self.db.update_sandbox(sandbox_id, egress=policy.to_json(),
                                         allow_internet_access=not policy.denies_all)
        self.logs.event(sandbox_id, "Sandbox network rules updated")
        return row

    def set_timeout(self, sandbox_id: str, timeout_s: int) -> bool:
        """The sandbox now ends ``timeout_s`` from now (shorter or longer than before)."""
        end = utcnow() + timedelta(seconds=timeout_s)
        return self.db.update_sandbox(sandbox_id, end_at=end) is not None

    def connect(self, sandbox_id: str, timeout_s: int | None) -> SandboxRow | None:
        """A running sandbox's record; ``timeout_s`` only ever extends its life."""
        row = self.db.get_sandbox(sandbox_id)
        if row is None or row.state != SandboxState.RUNNING:
            return None
        if timeout_s is not None:
            end = utcnow() + timedelta(seconds=timeout_s)
            if end > _aware(row.end_at):
                row = self.db.update_sandbox(sandbox_id, end_at=end)
        return row

    def reap_expired(self, now: datetime | None = None) -> list[str]:
        """End every running sandbox whose time is up: pause it if it asked for that (autoPause,
        with its memory or its disk alone), else kill it (also when that pause fails)."""
        now = now or utcnow()
        expired = [r for r in self.db.list_sandboxes() if r.state == SandboxState.RUNNING and _aware(r.end_at) <= now]
        for row in expired:
            self.logs.event(row.sandbox_id, "Sandbox timed out")
            if row.auto_pause:
                log.info("sandbox %s timed out: pausing (autoPause)", row.sandbox_id)
                try:
                    self.pause(row.sandbox_id, memory=row.auto_pause_memory)
                    continue
                except SandboxError as exc:
                    log.warning("autoPause of %s failed (%s): killing it", row.sandbox_id, exc.message)
            log.info("sandbox %s timed out", row.sandbox_id)
            self.kill(row.sandbox_id, reason="timeout")
        return [r.sandbox_id for r in expired]

    def forget_missing(self) -> list[str]:
        """Tear down every sandbox this node still runs whose record is gone: the cluster declared
        the node gone while it was cut off and reported its sandboxes gone, so a node coming back
        agrees with the database (docs/architecture.md, "Nodes"). Only sandboxes that were handed
        out (routed once: running or paused since) are judged; pooled ones have no record yet."""
        gone: list[str] = []
        for sandbox_id in sorted(self._placed):
            if self.db.get_sandbox(sandbox_id) is not None:
                continue
            with self._lock(sandbox_id):
                self._routes.pop(sandbox_id, None)
                self._tokens.pop(sandbox_id, None)
                slot, runtime = self._placed.pop(sandbox_id, (None, None))
                teardown = self.take_teardown(sandbox_id, slot, runtime)
            self._teardowns.submit(teardown.run)
            gone.append(sandbox_id)
        if gone:
            log.warning("this node was declared gone: tore down %d sandboxes whose records were deleted", len(gone))
        return gone

    def recover(self) -> RecoveryReport:
        """After a (re)start: reattach what still runs, clean up the rest (recovery.py)."""
        return recover_node(self)


def resources_of(settings: Settings, asked: BuildResources) -> Resources:
    """The template build's CPU count and memory size, else the server's defaults; its disk is
    the server's size, grown (never shrunk) to the build's ``minFreeDiskMb``. (A cluster's API
    places sandboxes by it: cluster/remote.py.)"""
    return Resources(cpu_count=asked.cpu_count or settings.cpu_count,
                     memory_mb=asked.memory_mb or settings.memory_mb,
                     disk_mb=max(settings.disk_size_mb, asked.min_free_disk_mb or 0))


def _aware(dt: datetime) -> datetime:
    """SQLite hands back naive datetimes; they were stored as UTC."""
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
