"""Snapshots and forks: a running sandbox captured without stopping it for long.

What is captured is each backend's business (``Backend.capture``): a gVisor sandbox's disk image
(``sync`` in the guest, ``runsc pause``, ``fsfreeze``, a sparse copy, all undone), a microVM's
copy-on-write disk state and, unless asked for the filesystem alone, its memory and devices
(QEMU stopped, its state migrated to a file, the disk state copied while it is stopped, then it
goes on). A snapshot is that capture under ``<data dir>/snapshots/<id>/`` plus a record of the
build and resources it needs; every sandbox created from it gets its own copy of the disk (and
its own slot and envd token), so it starts with the snapshot's files and its writes stay its
own, and deleting the snapshot takes nothing from them. A fork is a snapshot nobody sees: taken
once, ``count`` sandboxes created from it, then removed.

With memory (microVMs), a sandbox made from it goes on where the captured one was: its processes
run, its envd is told its new token by the old one's (kept in ``guest.json``, 0600). Without
(gVisor: a ``runsc checkpoint``/``restore`` of a sandbox brings its processes back but not its
network, see runtimes/gvisor.py; or ``mode="filesystem"``) it boots fresh over the files (E2B's ``memory: false``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from sandboxd.orchestrator.egress import EgressPolicy
from sandboxd.orchestrator.envd_client import EnvdNotReady, sync_guest
from sandboxd.orchestrator.sandboxes import CreateRequest, Orchestrator, Resources, SandboxError, Seed
from sandboxd.store.db import SandboxRow, new_id
from sandboxd.store.snapshots_db import SnapshotRow, Snapshots
from sandboxd.store.templates_db import split_name
from sandboxd.templates.store import remove_tree

log = logging.getLogger("sandboxd.snapshots")

#: in a capture that kept memory: the envd access token that memory holds
GUEST_FILE = "guest.json"
#: E2B's template alias rule: lowercase letters, digits, dashes and underscores
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,127}")
_FORK_PARALLEL = 2
#: the unit of ``capture_checksum``: all-zero blocks (and holes) are left out of the sum
_SUM_BLOCK = 1 << 16


def capture_checksum(root: Path) -> str:
    """sha256 of a capture dir's regular files: each one's path and size, then each of its
    64 KiB blocks that is not all zeros, with its offset. Holes and zero blocks count alike, so a
    sparse copy (tar --sparse, cp --sparse) of the same bytes has the same sum, and only the
    written parts of a sparse disk image are read."""
    h = hashlib.sha256(b"capture-v1\0")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.relative_to(root).as_posix()}\0{size}\n".encode())
        with open(path, "rb") as f:
            fd, done = f.fileno(), 0  # done: blocks before it are summed
            while done < size:
                try:
                    data = os.lseek(fd, done, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # only a hole is left
                        break
                    raise
                hole = os.lseek(fd, data, os.SEEK_HOLE)
                off = max(done, data - data % _SUM_BLOCK)
                f.seek(off)
                while off < hole:
                    block = f.read(min(_SUM_BLOCK, size - off))
                    if not block:
                        break
                    if block.count(0) != len(block):
                        h.update(f"{off}\0{len(block)}\0".encode() + block)
                    off += len(block)
                if off == done:  # the file shrank under us: the sum will not match anything
                    break
                done = off
    return h.hexdigest()


class SnapshotService:
    """Takes, finds, deletes snapshots and forks sandboxes, over the orchestrator."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        self.records = Snapshots(orch.db)
        self.root = orch.settings.data_dir / "snapshots"
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".*"):  # a capture or fork cut short by a crash
            remove_tree(leftover)

    def captured(self, snapshot_id: str) -> Path:
        return self.root / snapshot_id

    # -- taking ------------------------------------------------------------------------------

    def take(self, sandbox_id: str, name: str | None, memory: bool | None) -> SnapshotRow:
        """Snapshot a running sandbox (it runs on); under ``name``, an existing snapshot of that
        name gets the new contents. ``memory``: None = whatever its runtime can keep."""
        alias = self._check_name(name) if name else None
        existing = self.records.find(alias) if alias else None
        snapshot_id = existing.snapshot_id if existing else new_id()
        scratch = self.root / f".take-{secrets.token_hex(6)}"
        try:
            row = self.capture(sandbox_id, scratch, "snapshotted", memory)
            final = self.root / snapshot_id
            if final.exists():
                old = self.root / f".old-{secrets.token_hex(6)}"
                final.rename(old)
                remove_tree(old)
            # a capture of files alone can be fetched by other nodes (cluster/snapshot_copies.py),
            # which check their copy against this sum before any sandbox starts from it
            checksum = None if (scratch / GUEST_FILE).exists() else capture_checksum(scratch)
            scratch.rename(final)
        finally:
            if scratch.exists():
                remove_tree(scratch)
        snap = self.records.put(snapshot_id=snapshot_id, name=alias, sandbox_id=sandbox_id, template_id=row.template_id,
                                build_id=row.build_id, runtime=row.runtime, cpu_count=row.cpu_count,
                                memory_mb=row.memory_mb, disk_size_mb=row.disk_size_mb, env_vars=dict(row.env_vars),
                                node_id=self.orch.db.node_id, checksum=checksum)
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

    def capture(self, sandbox_id: str, dest: Path, verb: str, memory: bool | None) -> SandboxRow:
        """Capture a running sandbox into the new dir ``dest``, consistent, the sandbox stopped
        only for the copy; with memory if ``memory`` (None: if its runtime can). 404 unknown,
        409 paused (E2B: resume it first), 501 memory asked of a runtime that cannot keep it,
        503 if its envd does not answer (its cached writes could not be flushed)."""
        with self.orch.hold(sandbox_id):
            row = self.orch.db.get_sandbox(sandbox_id)
            if row is None or row.state not in ("running", "paused"):
                raise SandboxError(404, f"sandbox '{sandbox_id}' not found")
            if row.state == "paused":
                raise SandboxError(409, f"Sandbox '{sandbox_id}' is paused and cannot be {verb}; resume it first")
            backend = self.orch.backends.get(row.runtime)
            if memory and not backend.captures_memory:
                raise SandboxError(501, f"memory: sandboxd snapshots of {row.runtime} sandboxes keep the filesystem "
                                        "alone (a gVisor sandbox restored from a checkpoint is unreachable); take it with "
                                        "mode='filesystem'")
            keep_memory = backend.captures_memory if memory is None else memory
            try:
                sync_guest(row.host_address, row.envd_access_token, timeout_s=30)
            except EnvdNotReady as exc:
                raise SandboxError(503, f"sandbox '{sandbox_id}' is not responding, so its files cannot be "
                                        f"captured consistently: {exc}") from exc
            try:
                backend.capture(sandbox_id, self.orch.sandbox_dir(sandbox_id), dest, keep_memory)
            except Exception as exc:  # any layer's failure (QMP, NBD, fsfreeze, cp): the sandbox runs on
                log.warning("capturing sandbox %s failed", sandbox_id, exc_info=True)
                raise SandboxError(500, f"capturing sandbox '{sandbox_id}' failed (it runs on): {exc}") from exc
            if keep_memory:
                guest = dest / GUEST_FILE
                with open(os.open(guest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                    json.dump({"envd_access_token": row.envd_access_token}, f)
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
        return self._seed(self.captured(snap.snapshot_id), snap.snapshot_id, snap.name or snap.snapshot_id,
                          snap.build_id, snap.runtime, Resources(snap.cpu_count, snap.memory_mb, snap.disk_size_mb))

    @staticmethod
    def _seed(captured: Path, template_id: str, alias: str, build_id: str, runtime: str,
              resources: Resources) -> Seed:
        try:
            guest = json.loads((captured / GUEST_FILE).read_text())
        except FileNotFoundError:
            guest = None
        return Seed(captured=captured, template_id=template_id, alias=alias, build_id=build_id, runtime=runtime,
                    resources=resources, memory=guest is not None,
                    envd_token=guest["envd_access_token"] if guest else "")

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
        """``count`` new sandboxes with the parent's files (and its memory and processes, where
        its runtime keeps them), its env vars, metadata and network; the parent runs on. Each fork
        succeeds or fails on its own."""
        scratch = self.root / f".fork-{secrets.token_hex(6)}"
        try:
            parent = self.capture(sandbox_id, scratch, "forked", None)
            seed = self._seed(scratch, parent.template_id, parent.alias or parent.template_id, parent.build_id,
                              parent.runtime, Resources(parent.cpu_count, parent.memory_mb, parent.disk_size_mb))
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
