"""Checks shared by the runtime tests and their fixtures."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from sandboxd.envd.contract import ENVD_PORT
from sandboxd.orchestrator.network import NetworkSlot
from sandboxd.orchestrator.rootfs import OverlayRootfs
from sandboxd.runtimes.base import RuntimeSpec
from sandboxd.runtimes.gvisor import GVisorRuntime


def processes_mentioning(text: str) -> list[str]:
    """Command lines (from /proc: ``ps`` cuts them at 80 columns when not on a terminal)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if text in cmdline and entry.name != str(os.getpid()):
                    found.append(f"{entry.name} {cmdline}")
    return found


def assert_no_traces(runtime: GVisorRuntime, sandbox_id: str) -> None:
    """Nothing of the sandbox is left in runsc's state, its container list or the process table."""
    assert sandbox_id not in runtime.running()
    assert [p.name for p in runtime.state_dir.iterdir() if sandbox_id in p.name] == []
    assert processes_mentioning(sandbox_id) == []


def wait_health(address: str, timeout: float = 30.0) -> float:
    """Seconds until envd's ``GET /health`` answers 2xx (polled every 20 ms)."""
    started = time.monotonic()
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() - started < timeout:
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"http://{address}:{ENVD_PORT}/health").is_success:
                    return time.monotonic() - started
            time.sleep(0.02)
    raise TimeoutError(f"envd at {address} did not answer /health within {timeout} s")


@dataclass
class Sandbox:
    """A started sandbox and the slot and overlay it runs on."""

    spec: RuntimeSpec
    slot: NetworkSlot
    rootfs: OverlayRootfs
    start_seconds: float = 0.0
