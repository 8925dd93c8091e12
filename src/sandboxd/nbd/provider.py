"""The NBD rootfs provider: per sandbox, a copy-on-write export over its build's ``rootfs.ext4``.

The seed's provider, in this project's terms: :meth:`NbdRootfsProvider.prepare` makes the
template's image (verified, cached by build id), binds a ready export of the pool to a COW device
whose state lives in ``<sandbox_dir>/cow/``, and returns the export's socket path — the one and
only thing a VMM gets as its disk. :meth:`release` flushes and frees the export; the COW files
stay until the sandbox dir is deleted (the orchestrator's job).

``prepare`` is idempotent per sandbox dir, and ``cow/export.json`` remembers which export a
sandbox had: after a server restart, preparing the same sandbox again reopens its COW state
under the same socket path, which its still-running QEMU reconnects to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sandboxd.errors import RootfsGuardError
from sandboxd.nbd.cow import BITMAP_NAME, CowDevice
from sandboxd.nbd.exports import ExportEvent, ExportState
from sandboxd.nbd.thread import NbdServerThread
from sandboxd.templates.ext4 import DEFAULT_FREE_MB, Ext4Image, ext4_image
from sandboxd.templates.store import LogFn, TemplateStore

COW_DIR = "cow"
RECORD = "export.json"


class NbdRootfsProvider:
    """Owns an NBD server (its own thread) whose exports live in ``run_dir``."""

    def __init__(self, data_dir: Path, store: TemplateStore, run_dir: Path | None = None, block_size: int = 4096,
                 pool_size: int = 4, free_mb: int = DEFAULT_FREE_MB, log: LogFn = lambda _: None) -> None:
        self.data_dir = Path(data_dir)
        self.store = store
        self.block_size = block_size
        self.free_mb = free_mb
        self.log = log
        self.nbd = NbdServerThread(run_dir or self.data_dir / "run" / "nbd", pool_size=pool_size).start()

    def close(self) -> None:
        """Stop the server (flushes every device). Running VMs wait for a new one (reconnect)."""
        self.nbd.close()

    def __enter__(self) -> NbdRootfsProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def forbidden_roots(self) -> list[Path]:
        """Where template bytes live; a runtime must never be handed a path below these."""
        return [self.store.root, self.data_dir / "cache"]

    def image(self, build_id: str) -> Ext4Image:
        return ext4_image(self.data_dir, self.store, build_id, self.log, free_mb=self.free_mb)

    def prepare(self, build_id: str, sandbox_dir: Path) -> Path:
        """The socket path of ``sandbox_dir``'s export over ``build_id``'s image (made if needed)."""
        return self.prepare_image(self.image(build_id), sandbox_dir)

    def prepare_image(self, image: Ext4Image, sandbox_dir: Path) -> Path:
        sandbox_dir = Path(sandbox_dir).resolve()
        owner = str(sandbox_dir)
        if (current := self.nbd.export_of(owner)) is not None:
            return current.socket_path
        cow = sandbox_dir / COW_DIR
        record = _read_record(cow)
        if record and record.get("base_sha256") != image.sha256:
            raise RootfsGuardError(f"{sandbox_dir} was made from another image ({record.get('build_id')}); "
                             f"its COW state cannot be reused over {image.build_id}")
        state = self.nbd.allocate(image.path, cow, image.sha256, owner, self.block_size,
                                  prefer=record.get("export") if record else None)
        _write_record(cow, {"export": state.name, "socket": str(state.socket_path), "build_id": image.build_id,
                            "base_sha256": image.sha256, "block_size": self.block_size})
        return state.socket_path

    def seed(self, build_id: str, state_dir: Path, sandbox_dir: Path) -> None:
        """Start a new sandbox's device with the COW state saved in ``state_dir`` (by
        :meth:`save_state`: a snapshot's, a fork parent's) instead of the bare image; its export
        is made by :meth:`prepare` as for any sandbox."""
        image = self.image(build_id)
        cow = Path(sandbox_dir).resolve() / COW_DIR
        if (cow / BITMAP_NAME).exists():
            raise RootfsGuardError(f"{sandbox_dir} already has disk state; it is not seeded over")
        with CowDevice(image.path, state_dir, base_id=image.sha256, block_size=self.block_size) as src:
            src.clone_state(cow)

    def save_state(self, sandbox_dir: Path, dest_dir: Path) -> None:
        """Copy a running sandbox's disk state (its dirty blocks) to ``dest_dir``; consistent
        when its VM is stopped (every write it was told of is in the device)."""
        self.nbd.clone_state(str(Path(sandbox_dir).resolve()), dest_dir)

    def release(self, sandbox_dir: Path) -> None:
        """Disconnect, flush and free the sandbox's export; idempotent."""
        self.nbd.release(str(Path(sandbox_dir).resolve()))

    def export_state(self, sandbox_dir: Path) -> ExportState | None:
        return self.nbd.export_of(str(Path(sandbox_dir).resolve()))

    def state(self) -> list[ExportState]:
        return self.nbd.state()

    def metrics(self) -> dict[str, int]:
        return self.nbd.metrics()

    def events(self) -> list[ExportEvent]:
        return self.nbd.events()


def _read_record(cow: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cow / RECORD).read_text())
    except (OSError, ValueError):
        return None


def _write_record(cow: Path, record: dict[str, Any]) -> None:
    cow.mkdir(parents=True, exist_ok=True)
    tmp = cow / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, cow / RECORD)
