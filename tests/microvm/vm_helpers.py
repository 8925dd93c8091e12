"""Helpers for microVM tests: a started VM's handles, running commands through the guest's envd
(Connect JSON over HTTP, as the SDK does), and the check every started VM must pass."""

from __future__ import annotations

import base64
import contextlib
import json
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from sandboxd.envd.contract import ENVD_PORT
from sandboxd.orchestrator.network import NetworkSlot
from sandboxd.runtimes.base import RuntimeSpec
from sandboxd.runtimes.microvm import MicroVMRuntime


@dataclass
class Vm:
    spec: RuntimeSpec
    slot: NetworkSlot
    export: Path
    start_seconds: float = 0.0

    @property
    def id(self) -> str:
        return self.spec.sandbox_id

    @property
    def url(self) -> str:
        return f"http://{self.slot.host_address}:{ENVD_PORT}"


def wait_health(vm: Vm, timeout: float = 60.0) -> float:
    """Seconds until envd's ``GET /health`` answers (polled every 20 ms)."""
    started = time.monotonic()
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() - started < timeout:
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{vm.url}/health").is_success:
                    return time.monotonic() - started
            time.sleep(0.02)
    console = (vm.spec.sandbox_dir / "console.log").read_text(errors="replace")[-3000:]
    route = subprocess.run(["ip", "-4", "route", "get", vm.slot.host_address], capture_output=True, text=True)
    raise TimeoutError(f"envd in {vm.id} did not answer within {timeout} s; the host's route to it: "
                       f"{(route.stdout or route.stderr).strip()}; console:\n{console}")


def run(vm: Vm, cmd: str, timeout: float = 60.0) -> tuple[str, str]:
    """(end status, stdout) of ``sh -c cmd`` run as root by the guest's envd."""
    body = json.dumps({"process": {"cmd": "/bin/sh", "args": ["-c", cmd]}, "stdin": False}).encode()
    headers = {"content-type": "application/connect+json", "connect-protocol-version": "1",
               "authorization": "Basic " + base64.b64encode(b"root:").decode()}
    r = httpx.post(f"{vm.url}/process.Process/Start", content=struct.pack(">BI", 0, len(body)) + body,
                   headers=headers, timeout=timeout)
    r.raise_for_status()
    out, status, i, data = b"", "", 0, r.content
    while i < len(data):
        flags, length = struct.unpack_from(">BI", data, i)
        frame = json.loads(data[i + 5:i + 5 + length])
        i += 5 + length
        event = frame.get("event", {}) if flags == 0 else {}
        if "stdout" in event.get("data", {}):
            out += base64.b64decode(event["data"]["stdout"])
        if "end" in event:
            status = event["end"].get("status", "")
    return status, out.decode(errors="replace")


def assert_vm_uses_only_its_export(runtime: MicroVMRuntime, vm: Vm, forbidden: list[Path]) -> None:
    """Seed 004, checked on every started VM: the running QEMU's command line has exactly one
    disk, it is this VM's NBD export, no template path appears anywhere, and QEMU's own block
    graph (QMP) says the same."""
    argv = runtime.command_line(vm.id)
    assert argv, f"no QEMU process for {vm.id}"
    blockdevs = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    assert not any(a in ("-drive", "-hda", "-cdrom", "-snapshot") for a in argv)
    assert len(blockdevs) == 1
    assert blockdevs[0]["file"]["driver"] == "nbd"
    assert blockdevs[0]["file"]["server"] == {"type": "unix", "path": str(vm.export)}
    for root in forbidden:
        assert not any(str(root) in a for a in argv), f"{root} appears in QEMU's command line"
    with runtime.qmp(vm.id) as qmp:
        nodes = qmp.execute("query-named-block-nodes")
    nbd_nodes = [n for n in nodes if n["drv"] == "nbd"]
    assert len(nbd_nodes) == 1 and str(vm.export) in nbd_nodes[0]["file"]
    assert not any(n["drv"] == "file" for n in nodes)  # no image file opened by QEMU at all
