"""Export slots of the NBD server: the pool, their metrics, allocation events and state queries.

The seed's future-work list, made concrete: a pre-allocated pool of *ready* exports (each slot
listens on its own unix socket before anyone needs it, like ``/dev/nbd0..N``), metrics of device
use, events for allocation and release, and a query of each export's state. A slot's socket path
is the provider path a VMM gets; one slot serves one client at a time, because two writers on one
copy-on-write device would corrupt it exactly like seed 004's shared template.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sandboxd.nbd.cow import CowDevice

log = logging.getLogger("sandboxd.nbd")

EVENT_KINDS = ("allocated", "released", "connected", "disconnected", "rejected", "evicted", "error")


@dataclass
class ExportMetrics:
    """Counters of one export since its slot was created (they survive re-allocation)."""

    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flushes: int = 0
    trims: int = 0
    write_zeroes: int = 0
    errors: int = 0
    connections: int = 0
    allocations: int = 0


@dataclass(frozen=True)
class ExportEvent:
    time: float
    kind: str  # one of EVENT_KINDS
    export: str
    owner: str | None
    detail: str = ""


@dataclass(frozen=True)
class ExportState:
    """What :meth:`ExportPool.state` reports for one slot (a copy, safe to keep)."""

    name: str
    socket_path: Path
    state: str  # "free" | "allocated" | "connected"
    owner: str | None
    base: Path | None
    cow_dir: Path | None
    size: int
    block_size: int
    dirty_blocks: int
    client_pid: int | None
    metrics: ExportMetrics


@dataclass
class Export:
    """One slot: a listening socket, and while allocated a COW device and maybe one client."""

    name: str
    socket_path: Path
    device: CowDevice | None = None
    owner: str | None = None
    client_pid: int | None = None
    client_close: Callable[[], None] | None = None
    metrics: ExportMetrics = field(default_factory=ExportMetrics)

    @property
    def state(self) -> str:
        if self.device is None:
            return "free"
        return "connected" if self.client_close is not None else "allocated"

    def snapshot(self) -> ExportState:
        d = self.device
        return ExportState(
            name=self.name, socket_path=self.socket_path, state=self.state, owner=self.owner,
            base=d.base_path if d else None, cow_dir=d.state_dir if d else None, size=d.size if d else 0,
            block_size=d.block_size if d else 0, dirty_blocks=d.dirty_blocks if d else 0,
            client_pid=self.client_pid, metrics=ExportMetrics(**asdict(self.metrics)))


class EventLog:
    """Recent events (bounded) plus subscribers; a failing subscriber never breaks the server."""

    def __init__(self, keep: int = 1000) -> None:
        self.recent: collections.deque[ExportEvent] = collections.deque(maxlen=keep)
        self._subscribers: list[Callable[[ExportEvent], None]] = []

    def subscribe(self, fn: Callable[[ExportEvent], None]) -> Callable[[], None]:
        """Call ``fn`` for every event (in the server's thread); returns the unsubscribe."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn)

    def emit(self, kind: str, export: Export, detail: str = "") -> None:
        event = ExportEvent(time=time.time(), kind=kind, export=export.name, owner=export.owner, detail=detail)
        self.recent.append(event)
        log.log(logging.WARNING if kind in ("rejected", "evicted", "error") else logging.INFO,
                "nbd %s %s (%s) %s", kind, export.name, export.owner or "-", detail)
        for fn in list(self._subscribers):
            try:
                fn(event)
            except Exception:  # a subscriber's bug is its own
                log.exception("nbd event subscriber failed")


class ExportPool:
    """Slots ``nbd0``, ``nbd1``, ... with sockets ``<run_dir>/nbd<i>.sock``."""

    def __init__(self, run_dir: Path, max_exports: int = 1024) -> None:
        self.run_dir = Path(run_dir)
        self.max_exports = max_exports
        self.exports: dict[str, Export] = {}
        self.events = EventLog()
        self.protocol_errors = 0

    def add_slot(self) -> Export:
        """A new free slot (its listener is the server's business)."""
        if len(self.exports) >= self.max_exports:
            raise RuntimeError(f"all {self.max_exports} NBD exports are in use")
        i = len(self.exports)
        export = Export(name=f"nbd{i}", socket_path=self.run_dir / f"nbd{i}.sock")
        self.exports[export.name] = export
        return export

    def free_slot(self, prefer: str | None = None) -> Export | None:
        """``prefer`` if it is free (recovery keeps a sandbox's socket path), else the lowest free."""
        if prefer and (e := self.exports.get(prefer)) is not None and e.state == "free":
            return e
        return next((e for e in self.exports.values() if e.state == "free"), None)

    def bind(self, export: Export, device: CowDevice, owner: str) -> None:
        export.device, export.owner = device, owner
        export.metrics.allocations += 1
        self.events.emit("allocated", export, f"base={device.base_path} cow={device.state_dir}")

    def unbind(self, export: Export) -> None:
        """Disconnect the client, close the device, free the slot; idempotent."""
        if export.client_close is not None:
            export.client_close()
            export.client_close, export.client_pid = None, None
        if export.device is None:
            return
        device = export.device
        device.flush()
        device.close()
        self.events.emit("released", export, f"dirty_blocks={device.dirty_blocks}")
        export.device, export.owner = None, None

    def by_owner(self, owner: str) -> Export | None:
        return next((e for e in self.exports.values() if e.owner == owner), None)

    def state(self) -> list[ExportState]:
        return [e.snapshot() for e in self.exports.values()]

    def metrics(self) -> dict[str, int]:
        """Totals over all exports, plus how many are free, in use and connected."""
        states = [e.state for e in self.exports.values()]
        totals = {k: sum(getattr(e.metrics, k) for e in self.exports.values()) for k in asdict(ExportMetrics())}
        return {
            "exports": len(states),
            "exports_free": states.count("free"),
            "exports_in_use": len(states) - states.count("free"),
            "exports_connected": states.count("connected"),
            "dirty_blocks": sum(e.device.dirty_blocks for e in self.exports.values() if e.device),
            "protocol_errors": self.protocol_errors,
            **totals,
        }
