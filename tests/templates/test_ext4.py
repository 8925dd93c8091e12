"""``rootfs.ext4`` of a build: derived, cached by build id, verified before every hand-out, and
made without touching the build."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from sandboxd.templates import ext4
from sandboxd.templates.base import make_tiny_rootfs
from sandboxd.templates.store import Build, BuildInputs, TemplateStore, file_sha256


def _tiny_like(store: TemplateStore) -> Build:
    """A small build of busybox files (no envd bundle: quick, and enough for a filesystem test)."""
    inputs = BuildInputs(name="ext4-test", recipe="busybox tree for ext4 tests")
    return store.build(inputs, lambda rootfs, _log: make_tiny_rootfs(rootfs), lambda _m: None)


def test_image_is_cached_verified_and_rebuilt_when_corrupt(tmp_path: Path, tmp_store: TemplateStore) -> None:
    build = _tiny_like(tmp_store)
    image = ext4.ext4_image(tmp_path, tmp_store, build.build_id)
    assert image.path == tmp_path / "cache" / build.build_id / "rootfs.ext4"
    assert oct(image.path.stat().st_mode & 0o777) == "0o444"
    meta = json.loads((image.path.parent / "rootfs.ext4.json").read_text())
    assert meta["sha256"] == image.sha256 == file_sha256(image.path) and meta["build_id"] == build.build_id

    # a real ext4 whose files are the build's (debugfs reads it without mounting)
    cat = subprocess.run(["debugfs", "-R", "cat /etc/passwd", str(image.path)], capture_output=True, text=True)
    assert cat.stdout == (build.rootfs / "etc" / "passwd").read_text()
    fsck = subprocess.run(["e2fsck", "-fn", str(image.path)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    again = ext4.ext4_image(tmp_path, tmp_store, build.build_id)
    assert again == image and again.path.stat().st_ino == image.path.stat().st_ino  # a cache hit

    # one flipped byte (new inode times too): never served, rebuilt to the same bytes
    image.path.chmod(0o644)
    with open(image.path, "r+b") as f:
        f.seek(2 * 1024 * 1024)
        f.write(b"\xff")
    rebuilt = ext4.ext4_image(tmp_path, tmp_store, build.build_id)
    assert rebuilt.sha256 == image.sha256 and file_sha256(rebuilt.path) == image.sha256
    assert tmp_store.verify(build.build_id)  # the build itself was never written


def test_another_recipe_is_a_rebuild_not_a_hit(tmp_path: Path, tmp_store: TemplateStore) -> None:
    build = _tiny_like(tmp_store)
    image = ext4.ext4_image(tmp_path, tmp_store, build.build_id, free_mb=64)
    inode = image.path.stat().st_ino
    bigger = ext4.ext4_image(tmp_path, tmp_store, build.build_id, free_mb=128)
    assert bigger.size > image.size and bigger.path.stat().st_ino != inode
    meta = json.loads((bigger.path.parent / "rootfs.ext4.json").read_text())
    assert meta["recipe"] == ext4.recipe_hash(128)


def test_a_corrupt_build_is_never_imaged(tmp_path: Path, tmp_store: TemplateStore) -> None:
    build = _tiny_like(tmp_store)
    passwd = build.rootfs / "etc" / "passwd"
    os.chmod(build.rootfs / "etc", 0o755)
    passwd.write_text("tampered\n")
    try:
        ext4.ext4_image(tmp_path, tmp_store, build.build_id)
    except ext4.Ext4Error as exc:
        assert "does not verify" in str(exc)
    else:
        raise AssertionError("a tampered build was imaged")
    assert not (tmp_path / "cache" / build.build_id / "rootfs.ext4").exists()
