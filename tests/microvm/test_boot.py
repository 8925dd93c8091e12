"""A VM boots from its NBD export and envd answers; the VMM can only ever get the provider's path."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from vm_helpers import Vm, run, wait_health

from sandboxd.nbd.provider import NbdRootfsProvider
from sandboxd.orchestrator.network import SlotPool
from sandboxd.runtimes.base import RuntimeSpec, RuntimeStartError
from sandboxd.runtimes.guest import GuestArtifacts
from sandboxd.runtimes.microvm import MicroVMRuntime, RootfsGuardError, VmConfig, check_rootfs, qemu_argv
from sandboxd.templates.store import Build


def test_vm_config_has_exactly_one_disk_field() -> None:
    """Seed 004's bug lived in a second, confusingly named image field: there is none."""
    disky = [f.name for f in dataclasses.fields(VmConfig)
             if re.search(r"root|disk|drive|image|block|dev|path|file", f.name)]
    assert disky == ["rootfs"]


def test_guard_refuses_template_storage_and_plain_files(
        provider: NbdRootfsProvider, tiny_build: Build, guest: GuestArtifacts, tmp_path: Path) -> None:
    image = provider.image(tiny_build.build_id)
    common = dict(name="x", kernel=guest.kernel, initrd=guest.initrd, cmdline="", console_log=tmp_path / "c",
                  qmp_socket=tmp_path / "q")
    with pytest.raises(RootfsGuardError, match="not an NBD export socket"):
        VmConfig(rootfs=image.path, **common)  # type: ignore[arg-type]
    with pytest.raises(RootfsGuardError, match="template storage"):
        check_rootfs(image.path, provider.forbidden_roots)
    with pytest.raises(RootfsGuardError, match="template storage"):
        check_rootfs(tiny_build.rootfs / "bin" / "sh", provider.forbidden_roots)
    with pytest.raises(RootfsGuardError, match="does not exist"):
        VmConfig(rootfs=tmp_path / "nothing", **common)  # type: ignore[arg-type]

    export = provider.prepare(tiny_build.build_id, tmp_path / "sbx")
    try:
        cfg = VmConfig(rootfs=export, **common)  # type: ignore[arg-type]
        argv = qemu_argv(cfg)
        assert sum(a == "-blockdev" for a in argv) == 1 and str(export) in argv[argv.index("-blockdev") + 1]
        assert str(image.path) not in " ".join(argv)
        # the runtime refuses a spec naming the image before anything starts
        rt = MicroVMRuntime(tmp_path / "state", guest, accel="tcg", forbidden_roots=provider.forbidden_roots)
        spec = RuntimeSpec(sandbox_id="x", rootfs=image.path, sandbox_dir=tmp_path / "sbx", netns_path="/nonexistent",
                           argv=["/bin/true"])
        with pytest.raises(RootfsGuardError):
            rt.start(spec)
        assert rt.running() == set()
    finally:
        provider.release(tmp_path / "sbx")


@pytest.mark.slow
@pytest.mark.microvm
def test_vm_boots_from_its_export_and_envd_answers(
        vms: Callable[..., Vm], runtime: MicroVMRuntime, provider: NbdRootfsProvider, tiny_build: Build) -> None:
    vm = vms(tiny_build)
    took = wait_health(vm)
    print(f"microvm ({runtime.accel}) tiny: QEMU up in {vm.start_seconds:.2f} s, envd /health after {took:.2f} s more")
    assert vm.id in runtime.running()

    status, out = run(vm, "cat /proc/mounts; hostname; ip -4 addr show eth0")
    assert status == "exit status 0"
    assert re.search(r"^/dev/vda / ext4 rw", out, re.M), out
    assert "169.254.0.21/30" in out and "sandbox" in out

    state = provider.export_state(vm.spec.sandbox_dir)
    assert state is not None and state.state == "connected" and state.client_pid == runtime.pid(vm.id)
    console = runtime.console_log(vm.spec.sandbox_dir)
    assert "sandboxd-init: root disk mounted" in console and "envd" in console and "ready" in console

    runtime.stop(vm.id)
    assert vm.id not in runtime.running()
    runtime.stop(vm.id)  # idempotent


@pytest.mark.slow
@pytest.mark.microvm
def test_pc_machine_boots_too(guest: GuestArtifacts, provider: NbdRootfsProvider, vms: Callable[..., Vm],
                              tiny_build: Build, runtime: MicroVMRuntime, tmp_path: Path) -> None:
    """The ``pc`` machine (PCI virtio, no tsc hint needed) is selectable per runtime."""
    pc = MicroVMRuntime(tmp_path / "pc-state", guest, accel=runtime.accel, machine="pc",
                        forbidden_roots=provider.forbidden_roots)
    vm = vms(tiny_build, rt=pc)
    took = wait_health(vm)
    print(f"pc machine: envd /health {vm.start_seconds + took:.2f} s after spawn")
    argv = pc.command_line(vm.id)
    assert argv[argv.index("-M") + 1] == "pc" and "virtio-blk-pci,drive=rootfs" in argv


@pytest.mark.microvm
def test_failed_start_says_why_and_leaves_nothing(
        runtime: MicroVMRuntime, provider: NbdRootfsProvider, tiny_build: Build, slot_pool: SlotPool,
        tmp_path: Path) -> None:
    """QEMU cannot open its disk (the export was released): start raises with the NBD server's own
    message, and the runtime, the process table and the slot are as before."""
    sdir = tmp_path / "sbx"
    export = provider.prepare(tiny_build.build_id, sdir)
    provider.release(sdir)  # the socket still listens (a free pool slot), but serves nothing
    slot = slot_pool.acquire()
    spec = RuntimeSpec(sandbox_id="vfail", rootfs=export, sandbox_dir=sdir, netns_path=slot.guest_netns_path,
                       argv=["/bin/true"])
    with pytest.raises(RuntimeStartError, match="not allocated to a sandbox"):
        runtime.start(spec)
    assert runtime.running() == set() and runtime.pid("vfail") is None
    addr = subprocess.run(["ip", "-n", slot.guest_netns, "-4", "addr", "show", "eth0"], capture_output=True,
                          text=True).stdout
    assert "169.254.0.21/30" in addr  # the slot is back to its contract
    links = subprocess.run(["ip", "-n", slot.guest_netns, "link"], capture_output=True, text=True).stdout
    assert "tap0" not in links and "br0" not in links
