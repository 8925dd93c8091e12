"""Snapshots and forks: a running sandbox's filesystem, captured without stopping it for long.

A gVisor sandbox keeps everything it wrote on its own disk image (see disk.py), over its
template's read-only build. Capturing it = ``sync`` in the guest (file data gVisor still caches),
``runsc pause``, ``fsfreeze`` of the mounted image, a sparse copy of it, and both undone: the
sandbox is stopped for the copy alone and then runs on unchanged. A snapshot is that copy under
``<data dir>/snapshots/<id>/disk.img`` plus a record of the build and resources it needs; every
sandbox created from it gets its own copy, so it starts with the snapshot's files and its writes
stay its own, and deleting the snapshot takes nothing from them. A fork is a snapshot nobody sees:
taken once, ``count`` sandboxes created from it, then removed.

What is captured is the filesystem. Memory and processes are not: ``runsc checkpoint`` cannot
save a sandbox whose processes wait on a socket (envd always does), so sandboxes made from a
snapshot boot fresh over its files (E2B's ``memory: false`` snapshot). Asking for memory
explicitly is refused; so are microVM sandboxes, whose disks are not captured yet.
"""

from __future__ import annotations

import logging
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from sandboxd.orchestrator.disk import IMAGE_NAME as DISK_IMAGE
from sandboxd.orchestrator.disk import MOUNT_NAME as DISK_MOUNT
from sandboxd.orchestrator.disk import DiskError, copy_image, frozen
from sandboxd.orchestrator.egress import EgressPolicy
from sandboxd.orchestrator.envd_client import EnvdNotReady, sync_guest
from sandboxd.orchestrator.sandboxes import CreateRequest, Orchestrator, Resources, SandboxError, Seed
from sandboxd.store.db import SandboxRow, new_id
from sandboxd.store.snapshots_db import SnapshotRow, Snapshots
from sandboxd.store.templates_db import split_name
from sandboxd.templates.store import remove_tree

log = logging.getLogger("sandboxd.snapshots")

CAPTURABLE_RUNTIMES = ("gvisor",)
#: E2B's template alias rule: lowercase letters, digits, dashes and underscores
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,127}")
_FORK_PARALLEL = 2


class SnapshotService:
    """Takes, finds, deletes snapshots and forks sandboxes, over the orchestrator."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        self.records = Snapshots(orch.db)
        self.root = orch.settings.data_dir / "snapshots"
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".*"):  # a capture or fork cut short by a crash
            remove_tree(leftover)

    def disk_of(self, snapshot_id: str) -> Path:
        return self.root / snapshot_id / DISK_IMAGE

    # -- taking ------------------------------------------------------------------------------

    def take(self, sandbox_id: str, name: str | None, memory: bool | None) -> SnapshotRow:
        """Snapshot a running sandbox (it runs on); under ``name``, an existing snapshot of that
        name gets the new contents."""
        if memory:
            raise SandboxError(501, "memory: sandboxd snapshots keep the filesystem alone (gVisor cannot "
                                    "checkpoint envd's sockets); take it with mode='filesystem'")
        alias = self._check_name(name) if name else None
        existing = self.records.find(alias) if alias else None
        snapshot_id = existing.snapshot_id if existing else new_id()
        scratch = self.root / f".take-{secrets.token_hex(6)}"
        scratch.mkdir()
        try:
            row = self.capture(sandbox_id, scratch / DISK_IMAGE, "snapshotted")
            final = self.root / snapshot_id
            if final.exists():
                old = self.root / f".old-{secrets.token_hex(6)}"
                final.rename(old)
                remove_tree(old)
            scratch.rename(final)
        finally:
            if scratch.exists():
                remove_tree(scratch)
        snap = self.records.put(snapshot_id=snapshot_id, name=alias, sandbox_id=sandbox_id, template_id=row.template_id,
                                build_id=row.build_id, runtime=row.runtime, cpu_count=row.cpu_count,
                                memory_mb=row.memory_mb, disk_size_mb=row.disk_size_mb, env_vars=dict(row.env_vars))
        log.info("sandbox %s: snapshot %s taken%s", sandbox_id, snapshot_id, f" as {alias}" if alias else "")
        self.orch.logs.event(sandbox_id, f"Snapshot {alias or snapshot_id} taken")
        return snap

    def _check_name(self, name: str) -> str:
        alias, tag = split_name(name)
        if tag not in (None, "default"):
            raise SandboxError(400, f"Invalid name: {name!r}: snapshots have the one tag 'default'")
        if not _NAME.fullmatch(alias):
            raise SandboxError(400, f"Invalid name: {name!r}: use lowercase letters, digits, '-' and '_' "
                                    "(at most 128)")
        if self.orch.db.find_template(alias) is not None:
            raise SandboxError(409, f"Invalid name: {alias!r} is a template's name; snapshots need their own")
        return alias

    def capture(self, sandbox_id: str, dest: Path, verb: str) -> SandboxRow:
        """Copy a running sandbox's disk to ``dest``, consistent, the sandbox stopped only for the
        copy. 404 unknown, 409 paused (E2B: resume it first), 501 a runtime that cannot, 503 if
        its envd does not answer (its cached writes could not be flushed)."""
        with self.orch.hold(sandbox_id):
            row = self.orch.db.get_sandbox(sandbox_id)
            if row is None or row.state not in ("running", "paused"):
                raise SandboxError(404, f"sandbox '{sandbox_id}' not found")
            if row.state == "paused":
                raise SandboxError(409, f"Sandbox '{sandbox_id}' is paused and cannot be {verb}; resume it first")
            if row.runtime not in CAPTURABLE_RUNTIMES:
                raise SandboxError(501, f"sandbox '{sandbox_id}' runs on {row.runtime}: sandboxd can snapshot and "
                                        f"fork {', '.join(CAPTURABLE_RUNTIMES)} sandboxes only")
            try:
                sync_guest(row.host_address, row.envd_access_token, timeout_s=30)
            except EnvdNotReady as exc:
                raise SandboxError(503, f"sandbox '{sandbox_id}' is not responding, so its files cannot be "
                                        f"captured consistently: {exc}") from exc
            runtime = self.orch.backends.get(row.runtime).runtime
            sdir = self.orch.sandbox_dir(sandbox_id)
            try:
                runtime.freeze(sandbox_id)  # type: ignore[attr-defined]  # gVisor's: CAPTURABLE_RUNTIMES
            except RuntimeError as exc:
                raise SandboxError(500, f"sandbox '{sandbox_id}' could not be stopped for the copy: {exc}") from exc
            try:
                with frozen(sdir / DISK_MOUNT):
                    copy_image(sdir / DISK_IMAGE, dest)
            except (DiskError, OSError) as exc:
                raise SandboxError(500, f"capturing the files of sandbox '{sandbox_id}' failed (it runs on): "
                                        f"{exc}") from exc
            finally:
                runtime.thaw(sandbox_id)  # type: ignore[attr-defined]
        return row

    # -- using -------------------------------------------------------------------------------

    def find(self, ref: str) -> SnapshotRow | None:
        """By id or name, with or without the ``:default`` tag E2B's snapshot ids carry."""
        name, tag = split_name(ref)
        return self.records.find(name) if tag in (None, "default") else None

    def seed_for(self, ref: str) -> Seed | None:
        """What a sandbox created with ``templateID = ref`` starts from, if ``ref`` is a snapshot."""
        snap = self.find(ref)
        if snap is None:
            return None
        return Seed(disk_image=self.disk_of(snap.snapshot_id), template_id=snap.snapshot_id,
                    alias=snap.name or snap.snapshot_id, build_id=snap.build_id, runtime=snap.runtime,
                    resources=Resources(snap.cpu_count, snap.memory_mb, snap.disk_size_mb))

    def env_of(self, ref: str) -> dict[str, str]:
        """The env vars the snapshotted sandbox was created with (a sandbox from it gets them too)."""
        snap = self.find(ref)
        return dict(snap.env_vars or {}) if snap else {}

    def delete(self, ref: str) -> bool:
        """Forget a snapshot and its image; sandboxes made from it keep their own copies."""
        snap = self.find(ref)
        if snap is None or not self.records.delete(snap.snapshot_id):
            return False
        remove_tree(self.root / snap.snapshot_id)
        log.info("snapshot %s deleted", snap.snapshot_id)
        return True

    def fork(self, sandbox_id: str, count: int, timeout_s: int) -> list[SandboxRow | SandboxError]:
        """``count`` new sandboxes with the parent's files, its env vars, metadata and network; the
        parent runs on. Each fork succeeds or fails on its own."""
        scratch = self.root / f".fork-{secrets.token_hex(6)}"
        scratch.mkdir()
        try:
            parent = self.capture(sandbox_id, scratch / DISK_IMAGE, "forked")
            seed = Seed(disk_image=scratch / DISK_IMAGE, template_id=parent.template_id,
                        alias=parent.alias or parent.template_id, build_id=parent.build_id, runtime=parent.runtime,
                        resources=Resources(parent.cpu_count, parent.memory_mb, parent.disk_size_mb))
            req = CreateRequest(template=parent.alias or parent.template_id, timeout_s=timeout_s,
                                metadata=dict(parent.metadata_ or {}), env_vars=dict(parent.env_vars or {}),
                                allow_internet_access=parent.allow_internet_access,
                                egress=(EgressPolicy.from_json(parent.egress, parent.allow_internet_access)
                                        if parent.egress else None),
                                secure=bool(parent.envd_access_token), seed=seed,
                                # a private parent's forks are private too, with the same Host mask
                                allow_public_traffic=parent.traffic_access_token is None,
                                mask_request_host=parent.mask_request_host,
                                https_ports=tuple(parent.https_ports or ()), owner=parent.owner,
                                volume_mounts=tuple(parent.volume_mounts or ()))

            def one(_: int) -> SandboxRow | SandboxError:
                try:
                    return self.orch.create(replace(req))
                except SandboxError as exc:
                    return exc

            with ThreadPoolExecutor(max_workers=min(_FORK_PARALLEL, count), thread_name_prefix="fork") as pool:
                results = list(pool.map(one, range(count)))
        finally:
            remove_tree(scratch)
        made = [r.sandbox_id for r in results if isinstance(r, SandboxRow)]
        self.orch.logs.event(sandbox_id, f"Sandbox forked into {', '.join(made) or 'nothing'}")
        return results
