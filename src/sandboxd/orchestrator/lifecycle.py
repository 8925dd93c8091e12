"""A sandbox's states, and the one list of undo steps that ends its life.

Every step of create registers its undo on the sandbox's :class:`Teardown` as soon as it succeeded
(like e2b-dev/infra's per-sandbox cleanup). A failed create runs that list; kill runs the same
list; recovery rebuilds it from the sandbox's record (every undo is idempotent) and runs it; a
failed resume or a disk-only pause undoes only the boot (runtime and rootfs). So what undoes a
resource is written once, next to the step that made it. See docs/architecture.md, "A sandbox's life".
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

log = logging.getLogger("sandboxd.orchestrator")


class SandboxState(enum.StrEnum):
    """What the record of a sandbox says (stored as this text). A killed sandbox has no record."""

    STARTING = "starting"  # created: booting, not yet handed to a client
    RUNNING = "running"
    PAUSED = "paused"  # runtime frozen or stopped; its disk (and maybe memory) and slot kept


#: the boot's own steps: what a disk-only pause, a failed resume and a kept paused sandbox undo
BOOT_STEPS = ("runtime", "rootfs")


class Teardown:
    """Named undo steps, run last-registered first; each runs once, and every one runs even if
    an earlier one failed (a half-dead sandbox is still cleaned up). Registering a name again
    replaces that step in place (a resumed sandbox boots again: same steps, new closures)."""

    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self._steps: dict[str, Callable[[], object]] = {}

    def add(self, name: str, undo: Callable[[], object]) -> None:
        self._steps[name] = undo

    @property
    def names(self) -> list[str]:
        """The steps still to run, in the order they will run."""
        return list(reversed(self._steps))

    def run(self, *only: str) -> list[str]:
        """Run the steps (``only`` those named, if given) and forget them; the names that failed."""
        failed = []
        for name in self.names:
            if only and name not in only:
                continue
            undo = self._steps.pop(name)
            try:
                undo()
            except Exception:  # noqa: BLE001 - keep going: the remaining steps must still run
                log.exception("teardown of %s: %s step failed", self.sandbox_id, name)
                failed.append(name)
        return failed
