"""A sandbox's own disk: a sparse ext4 image, loop-mounted under its sandbox dir.

Why an image and not a directory on the data dir's filesystem: a size limit that holds. The
sandbox's overlay keeps its upper and work dirs on this disk, so everything the sandbox writes is
bounded by the image's size — a disk filler gets ``ENOSPC`` ("No space left on device") inside
its own sandbox, ``df /`` there shows the size it was given, and the host's disk and the other
sandboxes never notice. (gVisor's own in-sandbox overlay, tried first, kills the sandbox when
its backing file cannot grow.) The image also keeps the sandbox's files on the host across a
pause, a restart of the server and a stop of the runtime.

The image is sparse: a fresh 2 GiB disk costs about 1 MiB of host disk and ~10 ms to make.
No journal (the host kernel owns the mount; a server crash does not unmount it) and no blocks
reserved for root (the sandbox sees exactly the size it asked for).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from sandboxd.errors import StartError

IMAGE_NAME = "disk.img"
MOUNT_NAME = "disk"
_MKFS = ["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard"]


class DiskError(StartError):
    pass


def make_disk(image: Path, size_mb: int) -> None:
    """Create ``image``: an empty ext4 filesystem of ``size_mb`` MiB (sparse)."""
    if size_mb < 16:
        raise DiskError(f"disk size {size_mb} MiB is too small (at least 16 MiB)")
    tmp = image.with_name(image.name + ".tmp")
    with open(tmp, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    proc = subprocess.run([*_MKFS, str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise DiskError(f"mkfs.ext4 failed: {proc.stderr.strip()}")
    os.rename(tmp, image)


def mount_disk(sandbox_dir: Path, size_mb: int) -> Path:
    """Mount the sandbox's disk (made on first use, reused after a pause) and return the mount
    point. ``-o loop`` sets autoclear, so unmounting also frees the loop device."""
    image, target = sandbox_dir / IMAGE_NAME, sandbox_dir / MOUNT_NAME
    if not image.exists():
        make_disk(image, size_mb)
    target.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-t", "ext4", "-o", "loop,nosuid,nodev", str(image), str(target)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise DiskError(f"mounting the sandbox disk failed: {proc.stderr.strip()}")
    return target


def loop_devices_of(path: Path) -> list[str]:
    """Loop devices whose backing file is under ``path`` (a leak check: none after teardown)."""
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True).stdout
    root = str(Path(path).resolve())
    found = []
    for line in out.splitlines():
        name, _, back = line.strip().partition(" ")
        back = back.strip().removesuffix(" (deleted)")
        if back == root or back.startswith(root + "/"):
            found.append(name)
    return found


def copy_image(source: Path, dest: Path) -> None:
    """Copy a disk image as it is: sparse (only written blocks take space), a reflink where the
    filesystem has them. Written beside ``dest`` and renamed, so ``dest`` is never half a copy."""
    tmp = dest.with_name(dest.name + ".copy")
    proc = subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(source), str(tmp)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise OSError(f"copying disk image {source}: {proc.stderr.strip()}")
    os.replace(tmp, dest)


@contextlib.contextmanager
def frozen(mount_point: Path) -> Iterator[None]:
    """``fsfreeze`` a mounted disk: everything written so far is on the image, and writes wait
    until the block ends (so a copy of the image is a consistent filesystem)."""
    proc = subprocess.run(["fsfreeze", "--freeze", str(mount_point)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DiskError(f"freezing {mount_point} failed: {proc.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["fsfreeze", "--unfreeze", str(mount_point)], capture_output=True, text=True, check=True)
