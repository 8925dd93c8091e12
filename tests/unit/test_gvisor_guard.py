"""Guarantee 2: the gVisor runtime only accepts the rootfs provider's path, never a template's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sandboxd.runtimes.base import RuntimeSpec
from sandboxd.runtimes.gvisor import GVisorRuntime, build_statx_shim


def _spec(rootfs: Path, tmp_path: Path) -> RuntimeSpec:
    return RuntimeSpec(sandbox_id="guard-test", rootfs=rootfs, sandbox_dir=tmp_path / "sbx",
                       netns_path="/nonexistent", argv=["/bin/true"])


def test_refuses_template_storage_and_unmounted_dirs(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    (templates / "b1" / "rootfs").mkdir(parents=True)
    runtime = GVisorRuntime(tmp_path / "runsc", template_root=templates)
    with pytest.raises(ValueError, match="template storage"):
        runtime.start(_spec(templates / "b1" / "rootfs", tmp_path))
    (tmp_path / "link").symlink_to(templates / "b1")
    with pytest.raises(ValueError, match="template storage"):
        runtime.start(_spec(tmp_path / "link" / "rootfs", tmp_path))
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ValueError, match="not a mount point"):
        runtime.start(_spec(plain, tmp_path))
    assert runtime.running() == set()


def test_statx_shim_is_built(tmp_path: Path) -> None:
    shim = build_statx_shim(tmp_path / "lib")  # preloaded only under a runsc that needs it
    assert shim is not None and shim.stat().st_size > 0
    symbols = subprocess.run(["nm", "-D", str(shim)], capture_output=True, text=True).stdout
    assert " T statx" in symbols


def test_tmp_is_bound_from_the_sandbox_root_only_when_it_is_a_real_directory(tmp_path: Path) -> None:
    """The bind's source is resolved on the host: a sandbox that made its /tmp a symlink (to
    ``/etc``, say) must never get the host's directory at the next boot."""
    runtime = GVisorRuntime(tmp_path / "runsc")
    rootfs = tmp_path / "rootfs"
    (rootfs / "tmp").mkdir(parents=True)
    tmp_mounts = [m for m in runtime.oci_config(_spec(rootfs, tmp_path))["mounts"] if m["destination"] == "/tmp"]
    assert tmp_mounts == [{"destination": "/tmp", "type": "bind", "source": str(rootfs / "tmp"),
                           "options": ["rbind", "rw"]}]
    (rootfs / "tmp").rmdir()
    (rootfs / "tmp").symlink_to("/etc")
    assert not [m for m in runtime.oci_config(_spec(rootfs, tmp_path))["mounts"] if m["destination"] == "/tmp"]
