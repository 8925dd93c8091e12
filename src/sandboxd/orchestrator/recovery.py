"""Recovery after a (re)start: the database and the host agree again.

Each recorded sandbox is kept if it can be (a running one whose runtime, slot and rootfs are still
there; a paused one whose memory, or at least disk, is), with its egress rules applied again; every
other one is ended by its teardown (rebuilt from its record). Then runtime containers, network
slots and sandbox dirs that no record owns are removed. See docs/architecture.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sandboxd.orchestrator.backends import Backend
from sandboxd.orchestrator.egress import EgressPolicy
from sandboxd.orchestrator.lifecycle import BOOT_STEPS, SandboxState
from sandboxd.orchestrator.network import NetworkError
from sandboxd.store.db import SandboxRow

if TYPE_CHECKING:
    from sandboxd.orchestrator.sandboxes import Orchestrator

log = logging.getLogger("sandboxd.orchestrator")


@dataclass(frozen=True)
class RecoveryReport:
    reattached: list[str]
    removed: list[str]
    stale_containers: list[str]
    stale_slots: list[int]
    stale_dirs: list[str]


def egress_of(row: SandboxRow) -> EgressPolicy:
    """The egress rules a sandbox was created with (or last updated to)."""
    return EgressPolicy.from_json(row.egress, row.allow_internet_access)


def recover_node(orch: Orchestrator) -> RecoveryReport:
    """Reattach sandboxes that still run, clean up everything else."""
    orch.slots.setup_host()
    rows = orch.db.list_sandboxes()
    for name in {r.runtime for r in rows} | {orch.backends.default}:
        orch.backends.get(name)  # every runtime with sandboxes must be there to judge them
    states = {b.name: b.runtime.states() for b in orch.backends.made()}
    slots_present = set(orch.slots.existing())
    reattached: list[str] = []
    removed: list[str] = []
    for row in rows:
        backend = orch.backends.get(row.runtime)
        if row.state == SandboxState.PAUSED:
            kept = (_keep_paused(orch, backend, row, states[backend.name], slots_present)
                    and _reapply_egress(orch, row))
        else:
            kept = (row.state == SandboxState.RUNNING and states[backend.name].get(row.sandbox_id) == "running"
                    and row.slot_index in slots_present
                    and backend.reattach_rootfs(row.build_id, orch.sandbox_dir(row.sandbox_id))
                    and _reapply_egress(orch, row))
            if kept:
                orch.route(row)
        if kept:
            reattached.append(row.sandbox_id)
        else:
            orch.take_teardown(row.sandbox_id, row.slot_index, row.runtime).run()
            removed.append(row.sandbox_id)
    running = {name: set(st) for name, st in states.items()}
    keep = set(reattached)
    stale_containers = []
    for backend in orch.backends.made():
        for sandbox_id in sorted(running.get(backend.name, set()) - keep):
            backend.runtime.stop(sandbox_id)
            stale_containers.append(sandbox_id)
    keep_slots = {r.slot_index for r in orch.db.list_sandboxes()}
    stale_slots = orch.slots.cleanup_stale(keep_slots)
    stale_dirs = []
    for d in orch.settings.sandboxes_dir.iterdir():
        if d.name not in keep:
            orch.rebuilt_teardown(d.name, None, None).run()
            stale_dirs.append(d.name)
    report = RecoveryReport(reattached, removed, stale_containers, stale_slots, stale_dirs)
    log.info("recovery: %s", report)
    return report


def _keep_paused(orch: Orchestrator, backend: Backend, row: SandboxRow, states: dict[str, str],
                 slots_present: set[int]) -> bool:
    """Keep a paused sandbox whose memory (if it kept any) or at least disk is still there.
    One that lost its memory (gVisor's is in RAM: the host restarted) stays paused with its
    disk alone and boots on resume; its slot is made again if the host lost it too."""
    sdir = orch.sandbox_dir(row.sandbox_id)
    memory = bool(row.paused_memory) and backend.has_memory(row.sandbox_id, sdir, states)
    if not (memory or backend.has_disk(sdir)):
        return False
    if row.slot_index not in slots_present:
        try:
            orch.slots.recreate(row.slot_index, egress_of(row), orch.egress_ca(row.sandbox_id))
        except NetworkError as exc:
            log.warning("paused sandbox %s: its network slot cannot be made again: %s", row.sandbox_id, exc)
            return False
    if memory:
        return True
    if row.paused_memory:
        log.warning("paused sandbox %s lost its memory (was the host restarted?): it keeps its disk and "
                    "boots on resume", row.sandbox_id)
        backend.drop_memory(row.sandbox_id, sdir)
        orch.db.update_sandbox(row.sandbox_id, paused_memory=False)
    orch.teardown_of(row).run(*BOOT_STEPS)
    return True


def _reapply_egress(orch: Orchestrator, row: SandboxRow) -> bool:
    """A reattached sandbox's egress rules again (this server's egress proxy is new, and the
    slot may hold rules an earlier version of sandboxd wrote); False, and the sandbox is not
    kept, if they cannot be: it would run with rules other than its own."""
    try:
        orch.slots.set_egress(orch.slots.slot(row.slot_index), egress_of(row), orch.egress_ca(row.sandbox_id))
    except NetworkError as exc:
        log.warning("sandbox %s: its egress rules cannot be applied again (%s): removing it", row.sandbox_id, exc)
        return False
    return True
