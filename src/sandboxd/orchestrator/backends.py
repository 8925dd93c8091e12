"""A backend = a runtime plus the rootfs provider it must be given (guarantee 2).

- ``gvisor``: an overlay directory over the template's tree, mounted on the host, its writes on
  the sandbox's own disk image.
- ``microvm``: an NBD export of a copy-on-write device over the template's ``rootfs.ext4``.

The orchestrator picks one per sandbox (the template's runtime, else the server's default) and
never mixes them up: each backend hands its own runtime only its own provider's path.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sandboxd.nbd.provider import COW_DIR
from sandboxd.orchestrator.disk import IMAGE_NAME as DISK_IMAGE
from sandboxd.orchestrator.disk import MOUNT_NAME as DISK_MOUNT
from sandboxd.orchestrator.disk import copy_image, frozen
from sandboxd.orchestrator.rootfs import is_mounted, mount_overlay, unmount_overlay
from sandboxd.runtimes.base import Runtime, RuntimeSpec
from sandboxd.runtimes.gvisor import GVisorRuntime
from sandboxd.templates.store import TemplateStore, remove_tree

if TYPE_CHECKING:  # the microVM stack is imported only where a server makes it
    from sandboxd.nbd.provider import NbdRootfsProvider
    from sandboxd.runtimes.microvm import MicroVMRuntime

log = logging.getLogger("sandboxd.orchestrator")
SNAPSHOT_DIR = "snapshot"
#: in a captured dir (a snapshot's, a fork's): the memory and device state, when kept
MEMORY_DIR = "memory"


class Backend(Protocol):
    """A runtime, the rootfs provider it must be given, and the two ways to pause: with memory
    (processes, memory and files kept; resumed where they were) or with the disk alone (the
    runtime stopped; resuming boots it again over the same files)."""

    name: str

    @property
    def runtime(self) -> Runtime:
        """The runtime this backend's sandboxes run in."""

    def prepare_rootfs(self, build_id: str, sandbox_dir: Path, disk_mb: int) -> Path:
        """Make (or, for a sandbox paused with its disk alone, make again) the sandbox's
        copy-on-write rootfs; return the path its runtime gets."""

    def release_rootfs(self, sandbox_dir: Path) -> None:
        """Undo :meth:`prepare_rootfs`; idempotent. The sandbox's written data stays in its dir."""

    def reattach_rootfs(self, build_id: str, sandbox_dir: Path) -> bool:
        """After a server restart: is the sandbox's rootfs still there (made so again if needed)?"""

    def pause_with_memory(self, sandbox_id: str, sandbox_dir: Path) -> None:
        """Stop the sandbox so that :meth:`resume_with_memory` brings back its processes."""

    def resume_with_memory(self, sandbox_id: str, spec_for: Callable[[Path], RuntimeSpec], build_id: str,
                           sandbox_dir: Path) -> None:
        """Undo :meth:`pause_with_memory` (``spec_for(rootfs)``: the runtime spec, if it needs one)."""

    def drop_memory(self, sandbox_id: str, sandbox_dir: Path) -> None:
        """Forget the memory of a sandbox paused with it: it stays paused with its disk alone."""

    def has_memory(self, sandbox_id: str, sandbox_dir: Path, states: dict[str, str]) -> bool:
        """Is the memory of a sandbox paused with it still there (``states``: the runtime's)?"""

    def has_disk(self, sandbox_dir: Path) -> bool:
        """Are the sandbox's written files still there (what a disk-only resume boots over)?"""

    @property
    def captures_memory(self) -> bool:
        """Can :meth:`capture` keep the sandbox's memory and processes?"""

    def capture(self, sandbox_id: str, sandbox_dir: Path, dest: Path, memory: bool) -> None:
        """Copy a running sandbox's disk (with ``memory``, its memory and processes too) into the
        new dir ``dest``, consistent; the sandbox stops for the copy alone and then runs on."""

    def seed(self, build_id: str, captured: Path, sandbox_dir: Path) -> None:
        """Give a new sandbox's dir its own copy of what :meth:`capture` wrote: its disk (and its
        memory, as a sandbox paused with it: :meth:`resume_with_memory` starts it)."""


class GVisorBackend:
    """Pause with memory = ``runsc pause`` in place (memory stays in RAM: a host reboot loses it,
    the files on the sandbox's disk survive that too)."""

    name = "gvisor"

    def __init__(self, runtime: GVisorRuntime, templates: TemplateStore) -> None:
        self.runtime = runtime
        self.templates = templates

    def prepare_rootfs(self, build_id: str, sandbox_dir: Path, disk_mb: int) -> Path:
        return mount_overlay(self.templates.get(build_id).rootfs, sandbox_dir, disk_mb).merged

    def release_rootfs(self, sandbox_dir: Path) -> None:
        unmount_overlay(sandbox_dir)

    def reattach_rootfs(self, build_id: str, sandbox_dir: Path) -> bool:
        return is_mounted(sandbox_dir / "rootfs")

    def pause_with_memory(self, sandbox_id: str, sandbox_dir: Path) -> None:
        self.runtime.freeze(sandbox_id)

    def resume_with_memory(self, sandbox_id: str, spec_for: Callable[[Path], RuntimeSpec], build_id: str,
                           sandbox_dir: Path) -> None:
        self.runtime.thaw(sandbox_id)

    def drop_memory(self, sandbox_id: str, sandbox_dir: Path) -> None:
        self.runtime.stop(sandbox_id)
        self.release_rootfs(sandbox_dir)

    def has_memory(self, sandbox_id: str, sandbox_dir: Path, states: dict[str, str]) -> bool:
        return states.get(sandbox_id) == "paused" and is_mounted(sandbox_dir / "rootfs")

    def has_disk(self, sandbox_dir: Path) -> bool:
        return (sandbox_dir / DISK_IMAGE).is_file()

    #: a sandbox restored by ``runsc restore`` gets its processes back but no traffic (gvisor.py)
    captures_memory = False

    def capture(self, sandbox_id: str, sandbox_dir: Path, dest: Path, memory: bool) -> None:
        """``runsc pause``, ``fsfreeze`` of the sandbox's mounted disk, a sparse copy of its image."""
        if memory:
            raise ValueError("gVisor sandboxes are captured without their memory")
        dest.mkdir(parents=True, exist_ok=True)
        self.runtime.freeze(sandbox_id)
        try:
            with frozen(sandbox_dir / DISK_MOUNT):
                copy_image(sandbox_dir / DISK_IMAGE, dest / DISK_IMAGE)
        finally:
            self.runtime.thaw(sandbox_id)

    def seed(self, build_id: str, captured: Path, sandbox_dir: Path) -> None:
        copy_image(captured / DISK_IMAGE, sandbox_dir / DISK_IMAGE)


class MicroVMBackend:
    """Pause with memory = a QEMU snapshot to ``snapshot/`` (memory and devices), QEMU ended and
    the disk unexported; its copy-on-write state stays in the sandbox dir either way."""

    name = "microvm"

    def __init__(self, runtime: MicroVMRuntime, provider: NbdRootfsProvider) -> None:
        self.runtime = runtime
        self.provider = provider

    def prepare_rootfs(self, build_id: str, sandbox_dir: Path, disk_mb: int) -> Path:
        """The disk is the template's image plus its free space (``disk_mb`` is not applied)."""
        return self.provider.prepare(build_id, sandbox_dir)

    def release_rootfs(self, sandbox_dir: Path) -> None:
        self.provider.release(sandbox_dir)

    def pause_with_memory(self, sandbox_id: str, sandbox_dir: Path) -> None:
        """Memory and devices to ``snapshot/``, QEMU stopped, the disk flushed and unexported."""
        self.runtime.pause(sandbox_id, sandbox_dir / SNAPSHOT_DIR)
        self.provider.release(sandbox_dir)

    def resume_with_memory(self, sandbox_id: str, spec_for: Callable[[Path], RuntimeSpec], build_id: str,
                           sandbox_dir: Path) -> None:
        """Export the same disk again and restore the VM from its snapshot."""
        export = self.provider.prepare(build_id, sandbox_dir)
        self.runtime.restore(spec_for(export), sandbox_dir / SNAPSHOT_DIR)

    def drop_memory(self, sandbox_id: str, sandbox_dir: Path) -> None:
        remove_tree(sandbox_dir / SNAPSHOT_DIR)

    def has_memory(self, sandbox_id: str, sandbox_dir: Path, states: dict[str, str]) -> bool:
        return (sandbox_dir / SNAPSHOT_DIR).is_dir()

    def has_disk(self, sandbox_dir: Path) -> bool:
        return (sandbox_dir / COW_DIR).is_dir()

    captures_memory = True

    def capture(self, sandbox_id: str, sandbox_dir: Path, dest: Path, memory: bool) -> None:
        """With ``memory``: QEMU stops, its memory and devices go to ``dest/memory`` (the disk
        flushed first), the copy-on-write state is copied to ``dest/cow``, and it goes on; else
        QEMU stops (drained, flushed) for the copy of the disk state alone."""
        dest.mkdir(parents=True, exist_ok=True)
        if memory:
            self.runtime.snapshot(sandbox_id, dest / MEMORY_DIR, resume=True,
                                  while_stopped=lambda: self.provider.save_state(sandbox_dir, dest / COW_DIR))
        else:
            with self.runtime.stopped(sandbox_id):
                self.provider.save_state(sandbox_dir, dest / COW_DIR)

    def seed(self, build_id: str, captured: Path, sandbox_dir: Path) -> None:
        """The disk state cloned (dirty blocks only); the memory hard-linked as a paused sandbox's
        ``snapshot/`` (never written through: a later snapshot writes a new file)."""
        self.provider.seed(build_id, captured / COW_DIR, sandbox_dir)
        if (captured / MEMORY_DIR).is_dir():
            (sandbox_dir / SNAPSHOT_DIR).mkdir()
            for f in (captured / MEMORY_DIR).iterdir():
                os.link(f, sandbox_dir / SNAPSHOT_DIR / f.name)

    def reattach_rootfs(self, build_id: str, sandbox_dir: Path) -> bool:
        """QEMU waits ~30 s for its NBD server to come back: export the same device again."""
        try:
            self.provider.prepare(build_id, sandbox_dir)
            return True
        except (OSError, ValueError) as exc:
            log.warning("cannot re-export the disk of %s: %s", sandbox_dir.name, exc)
            return False


class Backends:
    """The backends this server can use, each made on first use (booting the microVM stack
    prepares a guest kernel; a gVisor-only server should never pay for that)."""

    def __init__(self, factories: dict[str, Callable[[], Backend]], default: str) -> None:
        if default not in factories:
            raise ValueError(f"unknown runtime {default!r} (available: {', '.join(sorted(factories))})")
        self._factories = factories
        self.default = default
        self._made: dict[str, Backend] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, name: str | None) -> Backend:
        name = name or self.default
        if name not in self._factories:
            raise KeyError(f"unknown runtime {name!r} (available: {', '.join(self.names)})")
        with self._lock:
            if name not in self._made:
                self._made[name] = self._factories[name]()
            return self._made[name]

    def made(self) -> list[Backend]:
        with self._lock:
            return list(self._made.values())
