"""Crashes on either side of the NBD connection: a killed VM (the client) leaves its export
reusable, and a restarted server (the provider) gets its running VMs back."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from vm_helpers import Vm, run, wait_health

from sandboxd.nbd.provider import NbdRootfsProvider
from sandboxd.runtimes.microvm import MicroVMRuntime
from sandboxd.templates.store import Build, TemplateStore


@pytest.mark.slow
@pytest.mark.microvm
def test_killed_vm_leaves_its_export_reusable(
        vms: Callable[..., Vm], runtime: MicroVMRuntime, provider: NbdRootfsProvider, tiny_build: Build) -> None:
    vm = vms(tiny_build)
    wait_health(vm)
    assert run(vm, "echo survived > /root/state && sync")[0] == "exit status 0"
    pid = runtime.pid(vm.id)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (state := provider.export_state(vm.spec.sandbox_dir)) and state.state == "connected":
        assert time.monotonic() < deadline, "the server never noticed its client died"
        time.sleep(0.02)
    assert state is not None and state.state == "allocated" and state.dirty_blocks > 0
    assert vm.id not in runtime.running()
    runtime.stop(vm.id)  # cleans up after the dead VM (network back to the slot contract)

    again = vms(tiny_build, sandbox_dir=vm.spec.sandbox_dir, slot=vm.slot, export=vm.export)
    wait_health(again)
    status, out = run(again, "cat /root/state")
    assert (status, out) == ("exit status 0", "survived\n")
    kinds = [e.kind for e in provider.events() if e.owner == str(vm.spec.sandbox_dir.resolve())]
    assert kinds.count("connected") == 2 and "disconnected" in kinds


@pytest.mark.slow
@pytest.mark.microvm
def test_vm_survives_an_nbd_server_restart(
        vms: Callable[..., Vm], runtime: MicroVMRuntime, tiny_build: Build, data_dir: Path,
        template_store: TemplateStore, tmp_path: Path) -> None:
    """Guarantee 5 for the disk: the server (the sandboxd process) goes away under a running VM;
    a new one prepares the same sandbox again, gets the same socket path from ``cow/export.json``,
    and QEMU reconnects (``reconnect-delay``) with nothing lost."""
    run_dir, sdir = tmp_path / "nbd", tmp_path / "sbx"
    first = NbdRootfsProvider(data_dir, template_store, run_dir=run_dir)
    export = first.prepare(tiny_build.build_id, sdir)
    vm = vms(tiny_build, sandbox_dir=sdir, export=export)
    wait_health(vm)
    assert run(vm, "echo before > /root/before && sync")[0] == "exit status 0"
    first.close()  # every export flushed and closed; the VM's next disk request waits
    second = NbdRootfsProvider(data_dir, template_store, run_dir=run_dir)
    try:
        assert second.prepare(tiny_build.build_id, sdir) == export
        status, out = run(vm, "echo after > /root/after && sync && cat /root/before /root/after")
        assert (status, out) == ("exit status 0", "before\nafter\n")
        assert second.export_state(sdir).state == "connected"  # type: ignore[union-attr]
    finally:
        runtime.stop(vm.id)
        second.close()
