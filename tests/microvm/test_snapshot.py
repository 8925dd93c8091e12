"""Snapshots: QEMU migration to a file and ``-incoming`` restore, for pause/resume and for
starting sandboxes from a booted template's snapshot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from vm_helpers import Vm, run, wait_health

from sandboxd.nbd.provider import NbdRootfsProvider
from sandboxd.runtimes.microvm import MicroVMRuntime
from sandboxd.templates.store import Build, file_sha256


@pytest.mark.slow
@pytest.mark.microvm
def test_pause_and_resume_keep_memory_and_disk(
        vms: Callable[..., Vm], runtime: MicroVMRuntime, provider: NbdRootfsProvider, tiny_build: Build) -> None:
    vm = vms(tiny_build)
    boot = vm.start_seconds + wait_health(vm)
    # a file in the page cache only (no sync) and one on tmpfs: both live only in guest memory
    assert run(vm, "echo unsynced > /root/mem && echo tmpfs > /dev/shm/mem && echo ok")[1] == "ok\n"
    snap = runtime.pause(vm.id, vm.spec.sandbox_dir / "snapshot")
    assert vm.id not in runtime.running()
    assert provider.export_state(vm.spec.sandbox_dir).state == "allocated"  # type: ignore[union-attr]

    resumed = vms(tiny_build, sandbox_dir=vm.spec.sandbox_dir, slot=vm.slot, export=vm.export,
                  snapshot=snap.path)
    ready = resumed.start_seconds + wait_health(resumed, timeout=20)
    print(f"cold boot→envd {boot:.2f} s; snapshot {snap.seconds * 1000:.0f} ms ({snap.bytes / 2**20:.0f} MiB); "
          f"restore→envd {ready:.2f} s")
    _status, out = run(resumed, "cat /root/mem /dev/shm/mem")
    assert out == "unsynced\ntmpfs\n", out
    assert ready < boot


@pytest.mark.slow
@pytest.mark.microvm
def test_sandboxes_start_from_a_booted_template_snapshot(
        vms: Callable[..., Vm], runtime: MicroVMRuntime, provider: NbdRootfsProvider, tiny_build: Build,
        tmp_path: Path) -> None:
    # the template VM: booted once, envd up, then frozen (memory + its disk state)
    template_vm = vms(tiny_build, sandbox_dir=tmp_path / "template-vm")
    wait_health(template_vm, timeout=300)  # a cold boot under TCG on a loaded host: well over a minute
    snap = runtime.snapshot(template_vm.id, tmp_path / "template-snapshot")
    provider.save_state(template_vm.spec.sandbox_dir, tmp_path / "template-snapshot" / "cow")
    runtime.stop(template_vm.id)
    provider.release(template_vm.spec.sandbox_dir)

    started = []
    for i in range(2):
        sdir = tmp_path / f"from-snapshot-{i}"
        provider.seed(tiny_build.build_id, tmp_path / "template-snapshot" / "cow", sdir)
        export = provider.prepare(tiny_build.build_id, sdir)
        vm = vms(tiny_build, sandbox_dir=sdir, export=export, snapshot=snap.path)
        ready = vm.start_seconds + wait_health(vm, timeout=120)
        print(f"sandbox {i} from template snapshot: envd answers {ready:.2f} s after spawn")
        started.append(vm)
    for vm in started:
        assert run(vm, f"echo {vm.id} > /root/mine && sync")[0] == "exit status 0"
    for vm in started:
        assert run(vm, "cat /root/mine")[1] == f"{vm.id}\n"
    image = provider.image(tiny_build.build_id)
    assert file_sha256(image.path) == image.sha256
