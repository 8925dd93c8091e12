"""The gVisor rootfs provider: an overlay per sandbox over the template's read-only tree.

The runtime only ever gets ``merged`` (guarantee 2): writes land in the sandbox's ``upper``; the
template below is never written, so any number of sandboxes share it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


class RootfsError(RuntimeError):
    pass


@dataclass(frozen=True)
class OverlayRootfs:
    lower: Path
    upper: Path
    work: Path
    merged: Path


def _mountinfo_targets() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].encode().decode("unicode_escape") for line in f]


def is_mounted(path: Path) -> bool:
    return str(Path(path).resolve()) in _mountinfo_targets()


def mount_overlay(lower: Path, sandbox_dir: Path) -> OverlayRootfs:
    """Mount ``sandbox_dir/rootfs`` = overlay(lower read-only, sandbox_dir/upper)."""
    if not lower.is_dir():
        raise RootfsError(f"template rootfs {lower} does not exist")
    ov = OverlayRootfs(lower=lower, upper=sandbox_dir / "upper", work=sandbox_dir / "work",
                       merged=sandbox_dir / "rootfs")
    for d in (ov.upper, ov.work, ov.merged):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={lower},upperdir={ov.upper},workdir={ov.work}"
    proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(ov.merged)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RootfsError(f"overlay mount failed: {proc.stderr.strip()}")
    return ov


def unmount_overlay(sandbox_dir: Path) -> None:
    """Unmount everything under ``sandbox_dir`` (deepest first); idempotent. Falls back to a lazy
    unmount so a busy mount never blocks cleanup forever."""
    root = str(Path(sandbox_dir).resolve())
    targets = [t for t in _mountinfo_targets() if t == root or t.startswith(root + "/")]
    for target in sorted(set(targets), key=len, reverse=True):
        if subprocess.run(["umount", target], capture_output=True).returncode != 0:
            proc = subprocess.run(["umount", "-l", target], capture_output=True, text=True)
            if proc.returncode != 0 and is_mounted(Path(target)):
                raise RootfsError(f"cannot unmount {target}: {proc.stderr.strip()}")
