"""Real gVisor sandboxes for runtime tests: real template builds, overlays, network slots, runsc.

The template builds come from the shared test data dir (default /var/lib/sandboxd-test, env
SANDBOXD_TEST_DATA_DIR), cached by build id (content hash), so a stale build is impossible and a
changed envd simply builds anew (~40 s for ``base``). runsc state lives in a per-session tmp dir.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gvisor_helpers import Sandbox, assert_no_traces

from sandboxd.envd.contract import envd_argv, envd_env
from sandboxd.orchestrator.network import NetworkSlot, SlotPool
from sandboxd.orchestrator.rootfs import mount_overlay, unmount_overlay
from sandboxd.runtimes.base import RuntimeSpec
from sandboxd.runtimes.gvisor import GVisorRuntime
from sandboxd.templates.base import build_base, build_tiny
from sandboxd.templates.store import Build, TemplateStore


@pytest.fixture(scope="session")
def template_store() -> TemplateStore:
    data_dir = Path(os.environ.get("SANDBOXD_TEST_DATA_DIR", "/var/lib/sandboxd-test"))
    return TemplateStore(data_dir / "templates")


@pytest.fixture(scope="session")
def tiny_build(template_store: TemplateStore) -> Build:
    return build_tiny(template_store, print)


@pytest.fixture(scope="session")
def base_build(template_store: TemplateStore) -> Build:
    return build_base(template_store, print)


@pytest.fixture(scope="session")
def runtime(tmp_path_factory: pytest.TempPathFactory, template_store: TemplateStore) -> Iterator[GVisorRuntime]:
    rt = GVisorRuntime(tmp_path_factory.mktemp("gvisor") / "runsc", template_root=template_store.root)
    yield rt
    assert rt.running() == set(), "a test left a runsc container behind"


@pytest.fixture
def sandboxes(runtime: GVisorRuntime, slot_pool: SlotPool, tmp_path: Path) -> Iterator[Callable[..., Sandbox]]:
    """``start(build, argv=None, slot=None, **spec)``: a running sandbox (envd as PID 1 unless
    ``argv``) on its own overlay and slot; everything is torn down after the test."""
    made: list[Sandbox] = []
    owned_slots: list[NetworkSlot] = []

    def start(build: Build, argv: list[str] | None = None, slot: NetworkSlot | None = None,
              **spec_fields: object) -> Sandbox:
        sandbox_id = f"t{secrets.token_hex(6)}"
        sdir = tmp_path / sandbox_id
        ov = mount_overlay(build.rootfs, sdir)
        if slot is None:
            slot = slot_pool.acquire()
            owned_slots.append(slot)
        spec = RuntimeSpec(sandbox_id=sandbox_id, rootfs=ov.merged, sandbox_dir=sdir,
                           netns_path=slot.guest_netns_path, argv=argv or envd_argv(), env=envd_env(),
                           **spec_fields)  # type: ignore[arg-type]
        sbx = Sandbox(spec, slot, ov)
        made.append(sbx)
        t0 = time.perf_counter()
        runtime.start(spec)
        sbx.start_seconds = time.perf_counter() - t0
        return sbx

    yield start
    for sbx in made:
        runtime.stop(sbx.spec.sandbox_id)
        unmount_overlay(sbx.spec.sandbox_dir)
    for slot in owned_slots:
        slot_pool.release(slot)
    for sbx in made:
        assert_no_traces(runtime, sbx.spec.sandbox_id)
