"""Where a template build's RUN steps run: a gVisor sandbox of their own, never the host.

A Dockerfile is code from whoever holds a build key, so a RUN step must do no harm beyond failing
its own build. Each RUN step runs as a runsc container (the sandboxes' runtime, platform and OCI
config, ``runtimes/gvisor.py``) whose root is the overlay of the layers so far with a fresh upper
directory; ``--overlay2=none`` sends its writes through the gofer to that upper, so what the step
changed *is* its layer, whiteouts included, and layer keys, the cache and build ids are what they
were. What the step can reach:

- **files**: the image, and of the host only its CA bundle (read-only, bound over the image's
  own, so builds trust what the host trusts); its ``/etc/shadow`` is the image's.
- **network**: a network slot from a pool of its own (prefix ``<net_prefix[:5]>b``, the last /22
  of the server's subnet) with open egress: public addresses (package registries) through NAT,
  never the host by any of its addresses, other slots, or private, link-local, loopback ranges —
  the sandboxes' rules and code (``orchestrator/network.py``). Names resolve through the image's
  own resolv.conf, as in its sandboxes.
- **limits** (:class:`BuildLimits`, from the ``build_*`` settings): memory and CPUs of the
  container's host cgroup; host tasks (a fork bomb makes gVisor stop the container: the step fails
  at once, and says why); a writable layer that is an ext4 image of ``disk_mb`` (a disk filler
  gets ENOSPC in its own step, never the host's disk); and a timeout.

Parent side here (:meth:`StepSandbox.run`); the container is started inside the step's private
namespaces by ``stepns.op_run``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandboxd.config import Settings
from sandboxd.orchestrator.egress import OPEN_EGRESS
from sandboxd.orchestrator.network import NETNS_DIR, NetworkError, NetworkSlot, SlotPool
from sandboxd.runtimes.gvisor import HOST_TASKS_PER_PROCESS, choose_platform, raise_pid_max, statx_shim_for
from sandboxd.templates.stepns import StepResult, cgroup_dirs, run_step

#: Build slots a pool holds (concurrent RUN steps on one host, across processes).
MAX_BUILD_SLOTS = 64
SYSTRAP_TASKS_PER_PROCESS = 3
#: A build slot this much older than the step timeout belongs to no live step.
STALE_SLOT_MARGIN_S = 600
_ACQUIRE_ATTEMPTS = 5  # another process (the CLI beside a server) may take the same free slot first


@dataclass(frozen=True)
class BuildLimits:
    """What one RUN step may use."""

    memory_mb: int = 2048
    cpu_count: int = 2
    max_processes: int = 512
    disk_mb: int = 10240
    timeout_s: float = 3600.0

    @classmethod
    def of(cls, settings: Settings) -> BuildLimits:
        return cls(settings.build_memory_mb, settings.build_cpu_count, settings.build_max_processes,
                   settings.build_disk_mb, settings.build_step_timeout_s)


def build_pool(settings: Settings) -> SlotPool:
    """The build slots of a server's settings: their own prefix (the server's recovery and
    teardown never touch them, nor theirs a sandbox's) and the last /22 of the server's subnet,
    which its sandboxes' slots (allocated from the start) must not reach."""
    net = ipaddress.ip_network(settings.net_cidr)
    if net.prefixlen > 20:
        raise ValueError(f"net_cidr {settings.net_cidr} is too small for build slots beside sandboxes (at most /20)")
    block = ipaddress.ip_network(f"{net.broadcast_address - 1023}/22")
    if int(net.network_address) + 4 * settings.max_sandboxes > int(block.network_address):
        raise ValueError(f"net_cidr {settings.net_cidr} has no room for build slots after {settings.max_sandboxes} "
                         "sandboxes' slots: use a larger subnet or fewer max_sandboxes")
    return SlotPool(settings.net_prefix[:5] + "b", str(block), MAX_BUILD_SLOTS)


class StepSandbox:
    """Runs RUN steps in gVisor containers, each in a network slot of its own."""

    def __init__(self, slots: SlotPool, lib_dir: Path, platform: str = "auto",
                 limits: BuildLimits | None = None) -> None:
        self.slots = slots
        self.lib_dir = Path(lib_dir)
        self._platform = platform
        self.limits = limits or BuildLimits()
        self._lock = threading.Lock()
        self._ready = False
        self._shim: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> StepSandbox:
        return cls(build_pool(settings), settings.data_dir / "lib", settings.gvisor_platform,
                   BuildLimits.of(settings))

    def _prepare(self) -> None:
        """Once: the pool's host table (NAT out, the host and private ranges denied), the slots
        a crashed builder left, the platform probe, the statx shim the sandboxes get too (if this runsc needs it), and a
        pid_max gVisor can live with."""
        with self._lock:
            if self._ready:
                return
            self.slots.setup_host()
            self.remove_stale_slots()
            if self._platform == "auto":
                self._platform = choose_platform()
            raise_pid_max()
            self._shim = statx_shim_for(self.lib_dir, self._platform)
            self._ready = True

    def remove_stale_slots(self, now: float | None = None) -> list[int]:
        """Remove the pool's slots older than a step can live (its timeout, and a margin): a
        builder killed mid-step (the CLI's, a server's) leaves its slot behind. Younger ones may
        be another process's step at work, so they are left alone."""
        oldest = (now or time.time()) - self.limits.timeout_s - STALE_SLOT_MARGIN_S
        stale = [i for i in self.slots.existing() if slot_created(self.slots.slot(i)) < oldest]
        for i in stale:
            self.slots.release(self.slots.slot(i))
        return stale

    @contextlib.contextmanager
    def slot(self) -> Iterator[NetworkSlot]:
        """A fresh network slot with open public egress, removed when the step is done."""
        self._prepare()
        for attempt in range(_ACQUIRE_ATTEMPTS):
            try:
                slot = self.slots.acquire(OPEN_EGRESS)
                break
            except NetworkError:
                if attempt == _ACQUIRE_ATTEMPTS - 1:
                    raise
                time.sleep(0.1 * (attempt + 1))
        try:
            yield slot
        finally:
            self.slots.release(slot)

    def run(self, spec: dict[str, Any], on_line: Callable[[str], None]) -> StepResult:
        """Run one RUN op (``spec`` as :func:`sandboxd.templates.steps.step_op` makes it, plus the
        stack's lowers, the layer's upper and a scratch dir) in a container of its own."""
        cid = f"sandboxd-build-{secrets.token_hex(6)}"
        root = Path(spec["scratch"]) / "runsc"
        try:
            with self.slot() as slot:
                full = {**spec, "container": cid, "netns": slot.guest_netns_path,
                        "runsc": ["runsc", "--root", str(root), f"--platform={self._platform}",
                                  "--network=sandbox", "--overlay2=none"],
                        "shim": str(self._shim) if self._shim else None,
                        "limits": {"memory_mb": self.limits.memory_mb, "cpu_count": self.limits.cpu_count,
                                   "max_processes": self.limits.max_processes, "disk_mb": self.limits.disk_mb,
                                   "host_tasks": host_tasks(self.limits.max_processes, self._platform)}}
                return run_step(full, on_line, self.limits.timeout_s)
        finally:
            _remove_container(root, cid)


def slot_created(slot: NetworkSlot) -> float:
    """When the slot was made: its namespaces' time (nsfs keeps it); now if both are gone."""
    times = []
    for ns in (slot.netns, slot.guest_netns):
        with contextlib.suppress(FileNotFoundError):
            times.append(os.stat(NETNS_DIR / ns).st_mtime)
    return min(times, default=time.time())


def host_tasks(max_processes: int, platform: str) -> int:
    """The host tasks a step's container may have: a guest process costs ~2 under systrap
    (measured: 100 sleeping processes, 233 tasks) and up to 12 under ptrace. Tighter than a
    sandbox's (whose guest guard acts first), so a fork bomb meets it soon and the step ends."""
    per_process = SYSTRAP_TASKS_PER_PROCESS if platform == "systrap" else HOST_TASKS_PER_PROCESS
    return max_processes * per_process + 256


def _remove_container(root: Path, cid: str) -> None:
    """After a step ended however it ended (a timeout kills runsc too): runsc's state and the
    container's host cgroups go."""
    if root.is_dir() and any(root.iterdir()):
        subprocess.run(["runsc", "--root", str(root), "delete", "--force", cid], capture_output=True)
    for cgroup in cgroup_dirs(cid):
        with contextlib.suppress(OSError):
            cgroup.rmdir()
