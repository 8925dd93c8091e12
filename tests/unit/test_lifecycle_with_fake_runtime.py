"""The orchestrator's lifecycle with a FAKE runtime, rootfs provider, network and envd.

Why fakes here: to fail each create step on purpose and see that the sandbox's one teardown leaves
nothing, which real runtimes cannot be made to do step by step. Everything the fakes stand for is
also covered against real sandboxes: tests/e2e/test_api.py (a failed start leaves nothing),
test_lifecycle.py (kill), test_pause.py (pause/resume), test_recovery.py (restart).
The database, template store, logs and the Orchestrator itself are real.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sandboxd.config import Settings
from sandboxd.orchestrator import sandboxes as orchestration
from sandboxd.orchestrator.backends import Backends
from sandboxd.orchestrator.envd_client import EnvdNotReady
from sandboxd.orchestrator.lifecycle import SandboxState
from sandboxd.orchestrator.network import NetworkError, NetworkSlot
from sandboxd.orchestrator.rootfs import RootfsError
from sandboxd.orchestrator.sandboxes import CreateRequest, Orchestrator, SandboxError
from sandboxd.runtimes.base import RuntimeSpec, RuntimeStartError
from sandboxd.store.db import Database
from sandboxd.templates.store import BuildInputs, TemplateStore

Failures = dict[str, Exception]


class FakeRuntime:
    name = "fake"

    def __init__(self, fail: Failures) -> None:
        self.fail = fail
        self.running: set[str] = set()
        self.frozen: set[str] = set()

    def start(self, spec: RuntimeSpec) -> None:
        assert spec.rootfs.name == "rootfs" and spec.rootfs.parent == spec.sandbox_dir  # the provider's path
        self.running.add(spec.sandbox_id)  # started, then maybe failing halfway
        if "runtime" in self.fail:
            raise self.fail["runtime"]

    def stop(self, sandbox_id: str) -> None:
        self.running.discard(sandbox_id)
        self.frozen.discard(sandbox_id)

    def states(self) -> dict[str, str]:
        return {s: "paused" if s in self.frozen else "running" for s in self.running}


class FakeBackend:
    """Rootfs = a directory in the sandbox dir; pause with memory = frozen in place."""

    name = "fake"
    captures_memory = False  # (creates then boot; a booted image is the microVM backend's)

    def __init__(self, fail: Failures) -> None:
        self.fail = fail
        self.runtime = FakeRuntime(fail)
        self.rootfs: set[Path] = set()

    def prepare_rootfs(self, build_id: str, sandbox_dir: Path, disk_mb: int) -> Path:
        if "rootfs" in self.fail:
            raise self.fail["rootfs"]
        (sandbox_dir / "rootfs").mkdir(exist_ok=True)
        self.rootfs.add(sandbox_dir)
        return sandbox_dir / "rootfs"

    def release_rootfs(self, sandbox_dir: Path) -> None:
        self.rootfs.discard(sandbox_dir)

    def reattach_rootfs(self, build_id: str, sandbox_dir: Path) -> bool:
        return sandbox_dir in self.rootfs

    def pause_with_memory(self, sandbox_id: str, sandbox_dir: Path) -> None:
        self.runtime.frozen.add(sandbox_id)

    def resume_with_memory(self, sandbox_id: str, spec_for: Callable[[Path], RuntimeSpec], build_id: str,
                           sandbox_dir: Path) -> None:
        self.runtime.frozen.discard(sandbox_id)

    def drop_memory(self, sandbox_id: str, sandbox_dir: Path) -> None:
        self.runtime.stop(sandbox_id)
        self.release_rootfs(sandbox_dir)

    def has_memory(self, sandbox_id: str, sandbox_dir: Path, states: dict[str, str]) -> bool:
        return states.get(sandbox_id) == "paused"

    def has_disk(self, sandbox_dir: Path) -> bool:
        return sandbox_dir.is_dir()


class FakeSlots:
    def __init__(self, fail: Failures) -> None:
        self.fail = fail
        self.taken: set[int] = set()

    def slot(self, index: int) -> NetworkSlot:
        return NetworkSlot(index, f"f-{index}", f"f-{index}-g", f"127.77.0.{index}", "127.77.1.1", f"f-{index}-h")

    def acquire(self, policy: object = None, ca: object = None) -> NetworkSlot:
        if "network" in self.fail:
            raise self.fail["network"]
        index = min(set(range(1, 200)) - self.taken)
        self.taken.add(index)
        return self.slot(index)

    def release(self, slot: NetworkSlot) -> None:
        self.taken.discard(slot.index)

    def restore_guest_address(self, slot: NetworkSlot) -> None:
        pass


class Node:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fail: Failures = {}
        settings = Settings.from_env({}, data_dir=tmp_path, start_attempts=2, warm_pool_size=0)
        self.db = Database(settings.db_url)
        store = TemplateStore(settings.templates_dir)
        build = store.build(BuildInputs(name="fake", recipe="fake", packages=(), mirror="", envd_bundle_hash="none",
                                        extra=()), lambda rootfs, log: (rootfs / "etc").mkdir(), print)
        self.db.set_template("fake-template", build.build_id, runtime="fake")
        self.backend = FakeBackend(self.fail)
        self.slots = FakeSlots(self.fail)
        self.orch = Orchestrator(settings, self.db, store, Backends({"fake": lambda: self.backend}, "fake"),
                                 self.slots)  # type: ignore[arg-type]
        monkeypatch.setattr(orchestration, "wait_healthy", self._envd_health)
        monkeypatch.setattr(orchestration, "init_envd", lambda *a, **k: None)
        monkeypatch.setattr(orchestration, "envd_answers", lambda address: "envd" not in self.fail)
        monkeypatch.setattr(orchestration, "sync_guest", lambda *a, **k: None)

    def _envd_health(self, address: str, timeout_s: float) -> float:
        if "envd" in self.fail:
            raise self.fail["envd"]
        return 0.0

    def create(self) -> str:
        return self.orch.create(CreateRequest(template="fake-template", timeout_s=60)).sandbox_id

    def leftovers(self) -> list[object]:
        return [*self.db.list_sandboxes(), *self.orch.settings.sandboxes_dir.iterdir(), *self.slots.taken,
                *self.backend.rootfs, *self.backend.runtime.running]


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Node:
    return Node(tmp_path, monkeypatch)


@pytest.mark.parametrize(("step", "error"), [
    ("network", NetworkError("no slot")),
    ("rootfs", RootfsError("overlay refused")),
    ("runtime", RuntimeStartError("runsc exited")),
    ("envd", EnvdNotReady("envd did not answer /health")),
])
def test_a_failure_at_each_create_step_leaves_nothing(node: Node, step: str, error: Exception) -> None:
    node.fail[step] = error
    with pytest.raises(SandboxError) as info:
        node.create()
    assert f"sandbox failed to start ({step})" in info.value.message
    assert info.value.final  # retried here already: the API says Should-Retry: false
    assert node.leftovers() == []


class CountingRuntime(FakeRuntime):
    starts = 0

    def start(self, spec: RuntimeSpec) -> None:
        type(self).starts += 1
        super().start(spec)


def test_a_bug_in_a_step_is_neither_retried_nor_called_a_failed_start(node: Node) -> None:
    """Only the start-error family (and the host refusing a resource) means "failed to start"."""
    node.backend.runtime = CountingRuntime(node.fail)
    node.fail["runtime"] = KeyError("a bug in our code")
    with pytest.raises(KeyError):
        node.create()
    assert CountingRuntime.starts == 1  # not retried
    assert node.leftovers() == []  # and still undone


def test_kill_runs_the_teardown_create_built(node: Node) -> None:
    sandbox_id = node.create()
    assert node.db.get_sandbox(sandbox_id).state == SandboxState.RUNNING
    assert node.orch.upstream(sandbox_id) is not None
    assert node.orch.kill(sandbox_id, wait=True)
    assert node.leftovers() == [] and node.orch.upstream(sandbox_id) is None
    assert not node.orch.kill(sandbox_id)


def test_a_resume_whose_envd_fails_stays_paused_with_its_disk_and_boots_later(node: Node) -> None:
    sandbox_id = node.create()
    assert node.orch.pause(sandbox_id, memory=True)
    node.fail["envd"] = EnvdNotReady("envd did not answer /health")
    with pytest.raises(SandboxError, match="stays paused"):
        node.orch.resume(sandbox_id, None)
    row = node.db.get_sandbox(sandbox_id)
    assert row.state == SandboxState.PAUSED and not row.paused_memory
    assert sandbox_id not in node.backend.runtime.running and not node.backend.rootfs  # its boot undone
    del node.fail["envd"]
    assert node.orch.resume(sandbox_id, None).state == SandboxState.RUNNING  # booted over its disk
    assert node.orch.kill(sandbox_id, wait=True) and node.leftovers() == []


def test_recovery_rebuilds_the_teardown_of_what_cannot_be_kept(node: Node) -> None:
    kept, lost = node.create(), node.create()
    node.backend.runtime.stop(lost)  # its runtime died with the host
    (node.orch.settings.sandboxes_dir / "stray").mkdir()  # a dir no record owns
    node.orch.slots.setup_host = lambda: None  # type: ignore[attr-defined]
    node.orch.slots.existing = lambda: sorted(node.slots.taken)  # type: ignore[attr-defined]
    node.orch.slots.cleanup_stale = lambda keep: []  # type: ignore[attr-defined]
    node.orch.slots.set_egress = lambda slot, policy, ca=None: None  # type: ignore[attr-defined]
    restarted = Orchestrator(node.orch.settings, node.db, node.orch.templates, node.orch.backends, node.orch.slots)
    report = restarted.recover()
    assert report.reattached == [kept] and report.removed == [lost] and report.stale_dirs == ["stray"]
    assert [r.sandbox_id for r in node.db.list_sandboxes()] == [kept]
    assert restarted.kill(kept, wait=True) and node.leftovers() == []
