"""The sandbox teardown list (orchestrator/lifecycle.py): order, each step once, failures contained.

The orchestrator paths that use it (create failure, kill, recovery, resume failure) run against real
sandboxes in tests/e2e (test_api.py, test_lifecycle.py, test_recovery.py, test_pause.py)."""

from __future__ import annotations

import pytest

from sandboxd.orchestrator.lifecycle import BOOT_STEPS, SandboxState, Teardown


def test_steps_run_last_registered_first_and_only_once() -> None:
    ran: list[str] = []
    t = Teardown("sbx")
    for name in ("dir", "network", "record", "rootfs", "runtime"):
        t.add(name, lambda name=name: ran.append(name))
    assert t.names == ["runtime", "rootfs", "record", "network", "dir"]
    assert t.run() == []
    assert ran == ["runtime", "rootfs", "record", "network", "dir"]
    assert t.run() == [] and ran == ["runtime", "rootfs", "record", "network", "dir"]


def test_a_failing_step_does_not_stop_the_others() -> None:
    ran: list[str] = []
    t = Teardown("sbx")
    t.add("dir", lambda: ran.append("dir"))
    t.add("runtime", lambda: (_ for _ in ()).throw(OSError("runsc is gone")))
    assert t.run() == ["runtime"]
    assert ran == ["dir"]


def test_boot_steps_alone_and_registering_again_replaces() -> None:
    ran: list[str] = []
    t = Teardown("sbx")
    t.add("dir", lambda: ran.append("dir"))
    t.add("rootfs", lambda: ran.append("old rootfs"))
    t.add("runtime", lambda: ran.append("runtime"))
    t.add("rootfs", lambda: ran.append("rootfs"))  # a boot again: the same step, a new closure
    t.run(*BOOT_STEPS)
    assert ran == ["runtime", "rootfs"]
    assert t.names == ["dir"]


@pytest.mark.parametrize("state", list(SandboxState))
def test_states_are_stored_as_their_text(state: SandboxState) -> None:
    assert state == state.value and isinstance(state, str)
