"""What a sandbox leaves on the host: namespaces, mounts, runtime containers, processes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from sandboxd.config import Settings


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
        "netns": sorted(ns),
        "container": sandbox_id in runsc_containers(settings),
        "processes": processes_mentioning(sandbox_id),
    }


CLEAN = {"dir": False, "mounts": [], "netns": [], "container": False, "processes": []}
