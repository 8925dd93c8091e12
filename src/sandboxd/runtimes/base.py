"""The runtime interface: what the orchestrator needs from gVisor, a microVM, or anything else."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sandboxd.errors import StartError

CONSOLE_LOG = "console.log"
CONSOLE_TAIL_BYTES = 64 * 1024


class RuntimeStartError(StartError):
    """The sandbox did not start; ``console`` is the tail of what it printed."""

    def __init__(self, message: str, console: str = "") -> None:
        super().__init__(message)
        self.console = console


@dataclass(frozen=True)
class RuntimeSpec:
    sandbox_id: str
    rootfs: Path  # the rootfs provider's path (overlay); never a template's
    sandbox_dir: Path
    netns_path: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    hostname: str = "sandbox"
    cpu_count: int = 2
    memory_mb: int = 512
    #: processes per user inside the sandbox (RLIMIT_NPROC; root is exempt)
    max_processes: int = 1024
    #: host directories bound read-write into the sandbox: (host path, sandbox path) — volumes
    binds: tuple[tuple[Path, str], ...] = ()


class Runtime(Protocol):
    name: str

    def start(self, spec: RuntimeSpec) -> None:
        """Start PID 1 of the sandbox; return once it runs (not once envd answers)."""

    def stop(self, sandbox_id: str) -> None:
        """Kill and delete; idempotent; leaves no process or runtime state behind."""

    def running(self) -> set[str]:
        """Ids of the sandboxes this runtime has (for recovery after a restart)."""

    def states(self) -> dict[str, str]:
        """Id → state (``running``; ``paused`` for one frozen in place) of those sandboxes."""

    def console_log(self, sandbox_dir: Path) -> str:
        """The tail of the sandbox's console output."""


def console_tail(sandbox_dir: Path) -> str:
    path = sandbox_dir / CONSOLE_LOG
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - CONSOLE_TAIL_BYTES))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
