"""A backend = a runtime plus the rootfs provider it must be given (guarantee 2).

- ``gvisor``: an overlay directory over the template's tree, mounted on the host.
- ``microvm``: an NBD export of a copy-on-write device over the template's ``rootfs.ext4``.

The orchestrator picks one per sandbox (the template's runtime, else the server's default) and
never mixes them up: each backend hands its own runtime only its own provider's path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from sandboxd.config import Settings
from sandboxd.orchestrator.rootfs import is_mounted, mount_overlay, unmount_overlay
from sandboxd.runtimes.base import Runtime, RuntimeSpec
from sandboxd.templates.store import TemplateStore

log = logging.getLogger("sandboxd.orchestrator")
SNAPSHOT_DIR = "snapshot"


class Backend(Protocol):
    name: str
    runtime: Runtime

    def prepare_rootfs(self, build_id: str, sandbox_dir: Path) -> Path:
        """Make the sandbox's copy-on-write rootfs; return the path its runtime gets."""

    def release_rootfs(self, sandbox_dir: Path) -> None:
        """Undo :meth:`prepare_rootfs`; idempotent."""

    def reattach_rootfs(self, build_id: str, sandbox_dir: Path) -> bool:
        """After a server restart: is the sandbox's rootfs still there (made so again if needed)?"""


class GVisorBackend:
    name = "gvisor"

    def __init__(self, runtime: Runtime, templates: TemplateStore) -> None:
        self.runtime = runtime
        self.templates = templates

    def prepare_rootfs(self, build_id: str, sandbox_dir: Path) -> Path:
        return mount_overlay(self.templates.get(build_id).rootfs, sandbox_dir).merged

    def release_rootfs(self, sandbox_dir: Path) -> None:
        unmount_overlay(sandbox_dir)

    def reattach_rootfs(self, build_id: str, sandbox_dir: Path) -> bool:
        return is_mounted(sandbox_dir / "rootfs")


class MicroVMBackend:
    name = "microvm"

    def __init__(self, settings: Settings, templates: TemplateStore) -> None:
        from sandboxd.nbd.provider import NbdRootfsProvider
        from sandboxd.runtimes.guest import prepare_guest
        from sandboxd.runtimes.microvm import MicroVMRuntime

        self.provider = NbdRootfsProvider(settings.data_dir, templates, log=log.info)
        self.runtime = MicroVMRuntime(settings.data_dir / "microvm", prepare_guest(settings.data_dir, log.info),
                                      forbidden_roots=self.provider.forbidden_roots)

    def prepare_rootfs(self, build_id: str, sandbox_dir: Path) -> Path:
        return self.provider.prepare(build_id, sandbox_dir)

    def release_rootfs(self, sandbox_dir: Path) -> None:
        self.provider.release(sandbox_dir)

    def pause(self, sandbox_id: str, sandbox_dir: Path) -> None:
        """Memory and devices to ``snapshot/``, QEMU stopped, the disk flushed and unexported
        (its copy-on-write state stays in the sandbox dir)."""
        self.runtime.pause(sandbox_id, sandbox_dir / SNAPSHOT_DIR)
        self.provider.release(sandbox_dir)

    def resume(self, spec_for: Callable[[Path], RuntimeSpec], build_id: str, sandbox_dir: Path) -> None:
        """Export the same disk again and restore the VM from its snapshot."""
        export = self.provider.prepare(build_id, sandbox_dir)
        self.runtime.restore(spec_for(export), sandbox_dir / SNAPSHOT_DIR)

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
