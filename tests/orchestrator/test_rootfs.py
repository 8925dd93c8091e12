"""The overlay rootfs provider on real overlayfs mounts (guarantee 1: the lower tree never changes)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.orchestrator.disk import IMAGE_NAME, loop_devices_of
from sandboxd.orchestrator.rootfs import RootfsError, is_mounted, mount_overlay, unmount_overlay
from sandboxd.templates.store import tree_checksum


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    root = tmp_path / "template" / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("template\n")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_text("#!/bin/sh\n")
    (root / "tmp").mkdir()
    return root


@pytest.fixture
def sandbox_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "sandboxes" / "s1"
    yield d
    unmount_overlay(d)
    assert not _mounts_under(d)


def _mounts_under(path: Path) -> list[str]:
    real = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return [m for m in (line.split()[4] for line in f) if m == real or m.startswith(real + "/")]


def test_writes_land_in_upper_and_lower_is_unchanged(lower: Path, sandbox_dir: Path) -> None:
    before = tree_checksum(lower)
    ov = mount_overlay(lower, sandbox_dir)
    assert ov.merged == sandbox_dir.resolve() / "rootfs" and ov.upper == sandbox_dir.resolve() / "upper"
    assert is_mounted(ov.merged)
    assert (ov.merged / "etc" / "hostname").read_text() == "template\n"

    (ov.merged / "etc" / "hostname").write_text("sandbox\n")
    (ov.merged / "new-file").write_text("written by the sandbox\n")
    (ov.merged / "bin" / "tool").unlink()

    assert (ov.upper / "etc" / "hostname").read_text() == "sandbox\n"
    assert (ov.upper / "new-file").exists()
    assert (ov.upper / "bin" / "tool").is_char_device()  # overlayfs whiteout
    assert tree_checksum(lower) == before
    assert (lower / "bin" / "tool").exists()


def test_two_overlays_on_one_lower_see_only_their_own_writes(lower: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    try:
        ova, ovb = mount_overlay(lower, a), mount_overlay(lower, b)
        (ova.merged / "etc" / "hostname").write_text("a\n")
        assert (ovb.merged / "etc" / "hostname").read_text() == "template\n"
    finally:
        unmount_overlay(a)
        unmount_overlay(b)


def test_unmount_is_idempotent_and_takes_nested_mounts_first(lower: Path, sandbox_dir: Path) -> None:
    ov = mount_overlay(lower, sandbox_dir)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(ov.merged / "tmp")], check=True)
    (ov.merged / "tmp" / "scratch").write_text("x")
    unmount_overlay(sandbox_dir)
    assert not is_mounted(ov.merged) and not _mounts_under(sandbox_dir)
    assert not (ov.upper / "tmp" / "scratch").exists()  # it lived in the tmpfs
    unmount_overlay(sandbox_dir)  # again: nothing to do
    unmount_overlay(sandbox_dir / "never-mounted")


def test_unmount_removes_a_mount_stacked_twice(lower: Path, sandbox_dir: Path) -> None:
    ov = mount_overlay(lower, sandbox_dir)
    subprocess.run(["mount", "--bind", str(lower), str(ov.merged)], check=True)  # stacked on merged
    unmount_overlay(sandbox_dir)
    assert not _mounts_under(sandbox_dir)


def test_busy_mount_is_detached_lazily(lower: Path, sandbox_dir: Path) -> None:
    ov = mount_overlay(lower, sandbox_dir)
    with open(ov.merged / "etc" / "hostname"):  # an open file keeps the mount busy
        unmount_overlay(sandbox_dir)
        assert not is_mounted(ov.merged)


def test_mount_errors(lower: Path, sandbox_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RootfsError, match="does not exist"):
        mount_overlay(tmp_path / "missing", sandbox_dir)
    with pytest.raises(RootfsError, match="overlay options"):
        mount_overlay(lower, tmp_path / "a,b")
    mount_overlay(lower, sandbox_dir)
    with pytest.raises(RootfsError, match="already mounted"):
        mount_overlay(lower, sandbox_dir)
    assert len(_mounts_under(sandbox_dir)) == 1


def test_is_mounted_reads_escaped_mount_points(lower: Path, tmp_path: Path) -> None:
    target = tmp_path / "with space"
    target.mkdir()
    subprocess.run(["mount", "--bind", str(lower), str(target)], check=True)
    try:
        assert is_mounted(target)
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert not is_mounted(target)


def test_with_a_disk_the_writes_are_bounded_and_outlive_the_mount(lower: Path, sandbox_dir: Path) -> None:
    ov = mount_overlay(lower, sandbox_dir, disk_mb=32)
    assert ov.upper == sandbox_dir.resolve() / "disk" / "upper" and is_mounted(sandbox_dir / "disk")
    st = os.statvfs(ov.merged)
    assert 28 * 2**20 < st.f_blocks * st.f_frsize <= 32 * 2**20  # what df shows in the sandbox
    with pytest.raises(OSError) as full, open(ov.merged / "filler", "wb") as f:
        for _ in range(64):
            f.write(b"\0" * 2**20)
            f.flush()
            os.fsync(f.fileno())
    assert full.value.errno == errno.ENOSPC
    (ov.merged / "filler").unlink()
    (ov.merged / "kept").write_text("on the disk")
    image = sandbox_dir / IMAGE_NAME
    assert image.stat().st_blocks * 512 <= 33 * 2**20  # sparse: what was written, at most
    unmount_overlay(sandbox_dir)
    assert loop_devices_of(sandbox_dir) == [] and not _mounts_under(sandbox_dir)
    again = mount_overlay(lower, sandbox_dir, disk_mb=32)  # the same disk, not a new one
    assert (again.merged / "kept").read_text() == "on the disk"


def test_a_disk_too_small_is_refused_and_leaves_nothing(lower: Path, sandbox_dir: Path) -> None:
    with pytest.raises(RootfsError, match="too small"):
        mount_overlay(lower, sandbox_dir, disk_mb=4)
    assert not _mounts_under(sandbox_dir) and not (sandbox_dir / IMAGE_NAME).exists()
