"""Guarantee 1 with VMs: N VMs from one template each see only their own writes, and the
template's image and build are byte-for-byte unchanged after they ran (seed 004's corruption)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from vm_helpers import Vm, run, wait_health

from sandboxd.nbd.provider import NbdRootfsProvider
from sandboxd.runtimes.microvm import MicroVMRuntime
from sandboxd.templates.store import Build, TemplateStore, file_sha256

N = 3


@pytest.mark.slow
@pytest.mark.microvm
def test_vms_from_one_template_see_only_their_own_writes(
        vms: Callable[..., Vm], runtime: MicroVMRuntime, provider: NbdRootfsProvider, tiny_build: Build,
        template_store: TemplateStore) -> None:
    image = provider.image(tiny_build.build_id)
    started = [vms(tiny_build) for _ in range(N)]  # started together: they boot concurrently
    with ThreadPoolExecutor(N) as pool:
        took = list(pool.map(wait_health, started))
    print(f"{N} concurrent boots: envd answered after {', '.join(f'{t:.1f}' for t in took)} s")

    for vm in started:  # the same path in every VM, different bytes; one shared file removed
        status, _ = run(vm, f"echo {vm.id} > /root/mine && rm /etc/hostname && sync")
        assert status == "exit status 0"
    for vm in started:
        status, out = run(vm, "cat /root/mine; ls /etc/hostname 2>&1")
        assert out.splitlines()[0] == vm.id and "No such file" in out, out
    states = [provider.export_state(vm.spec.sandbox_dir) for vm in started]
    assert len({s.socket_path for s in states if s}) == N
    assert all(s is not None and s.dirty_blocks > 0 and s.base == image.path for s in states)

    for vm in started:
        runtime.stop(vm.id)
        provider.release(vm.spec.sandbox_dir)
    assert file_sha256(image.path) == image.sha256
    assert template_store.verify(tiny_build.build_id)
    # a fresh VM from the template sees none of it
    fresh = vms(tiny_build)
    wait_health(fresh)
    _, out = run(fresh, "cat /root/mine 2>&1; cat /etc/hostname")
    assert "No such file" in out and "sandbox" in out
