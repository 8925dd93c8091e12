"""Real microVMs: the guest kernel from Debian's mirror, real template builds and their
``rootfs.ext4``, our NBD server, QEMU (TCG here: KVM only when its boot probe succeeds), network
slots of their own prefix (``sbv…``) in a /16 that nothing on this host routes yet (the
shared ``net_cidr`` fixture: a fixed network would collide with a host's own addresses or with a
concurrent test run's VMs, and the host would then reach some other machine instead of the VM).

Expensive things are per session: the guest artifacts and template image are cached by content
in the shared test data dir, the NBD server and runtime live for the session.
"""

from __future__ import annotations

import random
import secrets
import string
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vm_helpers import Vm, assert_vm_uses_only_its_export

from sandboxd.envd.contract import envd_argv, envd_env
from sandboxd.nbd.provider import NbdRootfsProvider
from sandboxd.orchestrator.network import NetworkSlot, SlotPool
from sandboxd.runtimes.base import RuntimeSpec
from sandboxd.runtimes.guest import GuestArtifacts, prepare_guest
from sandboxd.runtimes.microvm import MicroVMRuntime
from sandboxd.templates.base import build_tiny
from sandboxd.templates.store import Build, TemplateStore


@pytest.fixture(scope="session")
def template_store(data_dir: Path) -> TemplateStore:
    return TemplateStore(data_dir / "templates")


@pytest.fixture(scope="session")
def tiny_build(template_store: TemplateStore) -> Build:
    return build_tiny(template_store, print)


@pytest.fixture(scope="session")
def guest(data_dir: Path) -> GuestArtifacts:
    return prepare_guest(data_dir, print)


@pytest.fixture(scope="session")
def provider(data_dir: Path, template_store: TemplateStore,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[NbdRootfsProvider]:
    prov = NbdRootfsProvider(data_dir, template_store, run_dir=tmp_path_factory.mktemp("nbd") / "run", log=print)
    yield prov
    prov.close()


@pytest.fixture(scope="session")
def runtime(guest: GuestArtifacts, provider: NbdRootfsProvider,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[MicroVMRuntime]:
    rt = MicroVMRuntime(tmp_path_factory.mktemp("vmstate"), guest, accel="auto",
                        forbidden_roots=provider.forbidden_roots)
    print(f"microvm accelerator: {rt.accel}")
    yield rt
    assert rt.running() == set(), "a test left a VM behind"


@pytest.fixture
def net_prefix() -> str:
    return "sbv" + "".join(random.choices(string.ascii_lowercase, k=3))


@pytest.fixture
def vms(runtime: MicroVMRuntime, provider: NbdRootfsProvider, slot_pool: SlotPool,
        tmp_path: Path) -> Iterator[Callable[..., Vm]]:
    """``start(build, sandbox_dir=None, slot=None, snapshot=None, export=None, rt=None, **spec)``: a
    running VM (envd as PID 1; restored from ``snapshot`` if given) on its own export and slot,
    checked to use nothing but its export; all torn down after the test."""
    made: list[tuple[Vm, MicroVMRuntime]] = []
    owned: list[NetworkSlot] = []
    dirs: set[Path] = set()

    def start(build: Build, sandbox_dir: Path | None = None, slot: NetworkSlot | None = None,
              snapshot: Path | None = None, export: Path | None = None, rt: MicroVMRuntime | None = None,
              **fields: object) -> Vm:
        rt = rt or runtime
        sid = f"v{secrets.token_hex(5)}"
        sdir = sandbox_dir or tmp_path / sid
        dirs.add(sdir)
        if slot is None:
            slot = slot_pool.acquire()
            owned.append(slot)
        export = export or provider.prepare(build.build_id, sdir)
        fields = {"cpu_count": 1, "memory_mb": 384, **fields}
        spec = RuntimeSpec(sandbox_id=sid, rootfs=export, sandbox_dir=sdir, netns_path=slot.guest_netns_path,
                           argv=envd_argv(), env=envd_env(), **fields)  # type: ignore[arg-type]
        vm = Vm(spec, slot, export)
        made.append((vm, rt))
        t0 = time.monotonic()
        if snapshot is not None:
            rt.restore(spec, snapshot)
        else:
            rt.start(spec)
        vm.start_seconds = time.monotonic() - t0
        assert_vm_uses_only_its_export(rt, vm, provider.forbidden_roots)
        return vm

    yield start
    for vm, rt in made:
        rt.stop(vm.id)
    for d in dirs:
        provider.release(d)
    for slot in owned:
        slot_pool.release(slot)
