"""What a sandbox leaves on the host: namespaces, mounts, loop devices, runtime containers, processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from sandboxd.config import Settings
from sandboxd.orchestrator.disk import loop_devices_of


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def mounts_under(path: Path) -> list[str]:
    real = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return [m for m in (line.split()[4] for line in f) if m == real or m.startswith(real + "/")]


def runsc_containers(settings: Settings) -> set[str]:
    out = subprocess.run(["runsc", "--root", str(settings.runsc_root), "list", "-quiet"],
                         capture_output=True, text=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def processes_mentioning(text: str) -> list[str]:
    """Command lines (read whole from /proc: ``ps`` truncates them) that contain ``text``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name} {cmdline}")
    return found


def traces(settings: Settings, sandbox_id: str, slot_index: int | None) -> dict[str, object]:
    """Everything of one sandbox still on the host; all empty means fully cleaned up."""
    sdir = settings.sandboxes_dir / sandbox_id
    ns = {n for n in netns_names() if slot_index is not None and n.startswith(f"{settings.net_prefix}-{slot_index}")
          and n in (f"{settings.net_prefix}-{slot_index}", f"{settings.net_prefix}-{slot_index}-g")}
    return {
        "dir": sdir.exists(),
        "mounts": mounts_under(sdir) if sdir.exists() else [],
        "loop devices": loop_devices_of(sdir),
        "netns": sorted(ns),
        "container": sandbox_id in runsc_containers(settings),
        "processes": processes_mentioning(sandbox_id),
    }


CLEAN = {"dir": False, "mounts": [], "loop devices": [], "netns": [], "container": False, "processes": []}


def runsc_status(settings: Settings, sandbox_id: str) -> str | None:
    """runsc's status of the sandbox's container (``running``, ``paused``...), None if it has none."""
    out = subprocess.run(["runsc", "--root", str(settings.runsc_root), "list", "-format=json"],
                         capture_output=True, text=True).stdout
    return {c["id"]: c["status"] for c in json.loads(out or "[]") or []}.get(sandbox_id)


def sandbox_cgroup(settings: Settings, sandbox_id: str, controller: str) -> Path:
    """The host cgroup (v1) directory of a running gVisor sandbox for ``controller``."""
    state = json.loads(subprocess.run(["runsc", "--root", str(settings.runsc_root), "state", sandbox_id],
                                      capture_output=True, text=True, check=True).stdout)
    for line in Path(f"/proc/{state['pid']}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup", controllers, path.lstrip("/"))
    raise LookupError(f"no {controller} cgroup for {sandbox_id}")
