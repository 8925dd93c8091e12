"""The gVisor rootfs provider: an overlay per sandbox over the template's read-only tree.

The runtime only ever gets ``merged`` (guarantee 2): writes land in the sandbox's ``upper``; the
template below is never written, so any number of sandboxes share it. With a disk size, ``upper``
and ``work`` live on the sandbox's own disk (see disk.py), which bounds what it can write.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sandboxd.errors import StartError
from sandboxd.orchestrator.disk import DiskError, mount_disk

_MAX_UNMOUNT_PASSES = 8  # stacked mounts on one target need one pass each
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


class RootfsError(StartError):
    pass


@dataclass(frozen=True)
class OverlayRootfs:
    lower: Path  # the template's rootfs: read-only, never written
    upper: Path  # <sandbox_dir>/upper (or disk/upper): every write of the sandbox
    work: Path  # <sandbox_dir>/work (or disk/work): overlayfs scratch
    merged: Path  # <sandbox_dir>/rootfs: the only path the runtime gets


def _mountinfo_targets() -> list[str]:
    """Mount points in mount order; mountinfo writes space, tab, newline and backslash as \\ooo."""
    with open("/proc/self/mountinfo") as f:
        return [_OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), line.split()[4]) for line in f]


def is_mounted(path: Path) -> bool:
    return str(Path(path).resolve()) in _mountinfo_targets()


def _check_option_safe(path: Path) -> None:
    """overlayfs options are split on ',' and lowerdir on ':'; such paths would silently mean
    something else, so refuse them."""
    if re.search(r"[,:\\\s]", str(path)):
        raise RootfsError(f"path not usable in overlay options: {path!r}")


def mount_overlay(lower: Path, sandbox_dir: Path, disk_mb: int | None = None) -> OverlayRootfs:
    """Mount ``sandbox_dir/rootfs`` = overlay(lower read-only, upper). Without ``disk_mb`` the
    upper dir is ``sandbox_dir/upper``; with it, ``disk/upper`` on the sandbox's own disk of that
    size (made on first use, reused as it is by a later mount: a resumed sandbox keeps its files)."""
    lower, sandbox_dir = Path(lower).resolve(), Path(sandbox_dir).resolve()
    if not lower.is_dir():
        raise RootfsError(f"template rootfs {lower} does not exist")
    _check_option_safe(sandbox_dir)
    merged = sandbox_dir / "rootfs"
    if is_mounted(merged):
        raise RootfsError(f"{merged} is already mounted")
    sandbox_dir.mkdir(parents=True, exist_ok=True)
    base = sandbox_dir
    if disk_mb is not None:
        try:
            base = mount_disk(sandbox_dir, disk_mb)
        except DiskError as exc:
            raise RootfsError(str(exc)) from exc
    ov = OverlayRootfs(lower=lower, upper=base / "upper", work=base / "work", merged=merged)
    for p in (ov.lower, ov.upper, ov.work):
        _check_option_safe(p)
    for d in (ov.upper, ov.work, ov.merged):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={ov.lower},upperdir={ov.upper},workdir={ov.work}"
    proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(ov.merged)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        if disk_mb is not None:
            unmount_overlay(sandbox_dir)
        raise RootfsError(f"overlay mount failed: {proc.stderr.strip()}")
    return ov


def _mounts_under(root: str) -> list[str]:
    return [t for t in _mountinfo_targets() if t == root or t.startswith(root + "/")]


def unmount_overlay(sandbox_dir: Path) -> None:
    """Unmount everything under ``sandbox_dir`` (deepest first, so anything mounted inside
    ``merged`` goes before it); idempotent. Falls back to a lazy unmount so a busy mount never
    blocks cleanup forever."""
    root = str(Path(sandbox_dir).resolve())
    for _ in range(_MAX_UNMOUNT_PASSES):
        targets = _mounts_under(root)
        if not targets:
            return
        for target in sorted(set(targets), key=len, reverse=True):
            if subprocess.run(["umount", target], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", target], capture_output=True)
    if left := _mounts_under(root):
        raise RootfsError(f"cannot unmount {left}")
