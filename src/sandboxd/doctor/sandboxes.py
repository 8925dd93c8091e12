"""Checks of what runs and what was left behind: every running microVM was given its sandbox's
copy-on-write export (never a template file: seed 004), and no namespaces, mounts, loop devices,
runsc containers or sandbox dirs remain of sandboxes the database no longer has.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

from sandboxd.config import Settings
from sandboxd.doctor.report import Finding
from sandboxd.orchestrator.disk import loop_devices_of
from sandboxd.store.db import SandboxRow

VM_NAME = re.compile(r"^guest=sandboxd-(\S+)$")


def qemu_processes() -> Iterator[tuple[int, str, list[str]]]:
    """(pid, sandbox id, argv) of every sandboxd QEMU on the host, argv as the kernel has it."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        if not argv or "qemu-system" not in os.path.basename(argv[0]):
            continue
        for flag, value in itertools.pairwise(argv):
            if flag == "-name" and (m := VM_NAME.match(value.split(",")[0])):
                yield int(entry.name), m.group(1), argv


def vm_disks(argv: list[str]) -> list[tuple[str, str]]:
    """(kind, path) of every disk on a QEMU command line: ``nbd`` for an NBD unix socket,
    ``file`` for an image file given directly (``-blockdev`` with a file driver, or ``-drive``)."""
    disks = []
    for flag, value in itertools.pairwise(argv):
        if flag == "-blockdev":
            try:
                node = json.loads(value)
            except ValueError:
                node = {"file": {"driver": "file", "filename": value}}
            inner = node.get("file") if isinstance(node.get("file"), dict) else node
            if inner.get("driver") == "nbd":
                disks.append(("nbd", str(inner.get("server", {}).get("path", ""))))
            else:
                disks.append(("file", str(inner.get("filename", value))))
        elif flag in ("-drive", "-hda", "-hdb", "-cdrom"):
            m = re.search(r"(?:^|,)file=([^,]+)", value)
            disks.append(("file", m.group(1) if m else value))
    return disks


def _bad_disk(kind: str, path: str, forbidden: list[Path]) -> str | None:
    real = Path(path).resolve()
    if any(real == root or root in real.parents for root in forbidden):
        return f"{path} is template storage"
    if kind != "nbd":
        return f"{path} is an image file, not the sandbox's copy-on-write export"
    try:
        if not stat.S_ISSOCK(os.stat(real).st_mode):
            return f"{path} is not a socket"
    except OSError:
        return f"{path} does not exist"
    return None


def _of_data_dir(argv: list[str], data_dir: Path) -> bool:
    """A VM is this data dir's if its command line names a path in it (console, QMP socket, disk)."""
    root = str(data_dir.resolve()) + "/"
    return any(root in arg for arg in argv)


def check_vm_disks(settings: Settings) -> Finding:
    """Every running VM of this data dir's server (other servers' VMs are theirs to check)."""
    forbidden = [settings.templates_dir.resolve(), (settings.data_dir / "cache").resolve()]
    vms = problems = 0
    details = []
    for pid, sandbox_id, argv in qemu_processes():
        if not _of_data_dir(argv, settings.data_dir):
            continue
        vms += 1
        disks = vm_disks(argv)
        why = [w for kind, path in disks if (w := _bad_disk(kind, path, forbidden))] or \
              ([] if disks else ["it has no disk"])
        if why:
            problems += 1
            details.append(f"VM of {sandbox_id} (pid {pid}): " + "; ".join(why))
    if problems:
        return Finding.fail("VM disks", " / ".join(details),
                            "kill those VMs (kill PID) and their sandboxes; a VM writing a template corrupts "
                            "every sandbox made from it: then `sandboxd cache verify`")
    return Finding.ok("VM disks", f"{vms} running microVMs, each on its own copy-on-write export")


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _mounts_under(path: Path) -> list[str]:
    real = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return [m for m in (line.split()[4] for line in f) if m.startswith(real + "/")]


def _runsc_containers(settings: Settings) -> list[str]:
    if not settings.runsc_root.is_dir():
        return []
    out = subprocess.run(["runsc", "--root", str(settings.runsc_root), "list", "-quiet"],
                         capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def check_leftovers(settings: Settings, sandboxes: list[SandboxRow], pooled: int | None = None) -> Finding:
    """Host state of this data dir's server that no sandbox in its database owns.

    ``pooled``: how many warm-pool sandboxes the running server holds (None: no server answers).
    Pooled sandboxes have no record until a create claims them, so while the server runs up to
    that many (plus one booting) unrecorded sandboxes, each with its slot, are its pool's."""
    ids = {row.sandbox_id for row in sandboxes}
    slots = {str(row.slot_index) for row in sandboxes}
    pattern = re.compile(rf"^{re.escape(settings.net_prefix)}-(\d+)(-g)?$")
    stray_ns = [ns for ns in _netns() if (m := pattern.match(ns)) and m.group(1) not in slots]
    sdir = settings.sandboxes_dir
    stray = [p for p in sorted(sdir.iterdir()) if p.name not in ids] if sdir.is_dir() else []
    containers = [c for c in _runsc_containers(settings) if c not in ids]
    stray_slots = {pattern.match(ns).group(1) for ns in stray_ns}  # type: ignore[union-attr]
    if pooled is not None and max(len(stray), len(stray_slots), len(containers)) <= pooled + 1:
        return Finding.ok("leftovers", f"{len(sandboxes)} sandboxes in the database; {len(stray)} without a record "
                                       f"are the running server's warm pool ({pooled} ready)")
    fixes = [f"ip netns del {ns}" for ns in stray_ns]
    for d in stray:
        fixes += [f"umount -l {m}" for m in sorted(_mounts_under(d), reverse=True)]
        fixes += [f"losetup -d {dev}" for dev in loop_devices_of(d)]
    fixes += [f"runsc --root {settings.runsc_root} delete -force {c}" for c in containers]
    fixes += [f"rm -rf {d}" for d in stray]
    if fixes:
        why = ("more than the running server's warm pool holds" if pooled is not None
               else "no server answers; starting it also removes them (its recovery)")
        return Finding.fail("leftovers", f"{len(fixes)} leftovers of sandboxes the database does not have ({why})",
                            "; ".join(fixes))
    return Finding.ok("leftovers", f"no namespaces, mounts, loop devices or containers beyond the "
                                   f"{len(sandboxes)} sandboxes in the database")
