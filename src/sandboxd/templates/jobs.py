"""Template builds requested over the API, run in background threads.

Each build's log entries and outcome go to the database as they happen, so the status endpoint
(which the SDK polls every 0.2 s) only reads rows, and a build's record survives the process. A
build that was running when the process died is reported as failed, never as still building.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from sandboxd.observability import events
from sandboxd.store.templates_db import ACTIVE, TemplateBuildRow, TemplateBuilds
from sandboxd.templates.builder import StepFailed, TemplateBuilder
from sandboxd.templates.spec import BuildSpec

log = logging.getLogger("sandboxd.templates")
INTERRUPTED = "the build was interrupted (the server stopped while it ran); build again"


class BuildJobs:
    """At most ``parallel`` builds at once (they are disk- and CPU-heavy); more wait their turn."""

    def __init__(self, builder: TemplateBuilder, builds: TemplateBuilds, runtime: str | None,
                 parallel: int = 2, on_built: Callable[[str], object] | None = None) -> None:
        self.builder = builder
        self.builds = builds
        self.runtime = runtime
        #: told a build's content id once it is in the store, before the build is marked ready
        #: (a node records its checksum then: another node may fetch it at once)
        self.on_built = on_built
        self._slots = threading.BoundedSemaphore(parallel)
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._started = datetime.now(UTC)

    def start(self, build_id: str, spec: BuildSpec) -> bool:
        """Run the build in the background; False if it was already started."""
        with self._lock:
            if build_id in self._active:
                return False
            self._active.add(build_id)
        threading.Thread(target=self._run, args=(build_id, spec), name=f"build-{build_id[:8]}", daemon=True).start()
        return True

    def running(self, build_id: str) -> bool:
        with self._lock:
            return build_id in self._active

    def settle(self, row: TemplateBuildRow) -> TemplateBuildRow:
        """A record that says building but has no thread behind it was orphaned by a restart."""
        if row.status in ACTIVE and not self.running(row.build_id) and _aware(row.created_at) < self._started:
            self.builds.fail(row.build_id, INTERRUPTED)
            return self.builds.get(row.build_id) or row
        return row

    def interrupt_orphans(self, node_id: str) -> int:
        """At start: the builds this node was running when it stopped cannot be running now."""
        orphans = [r for r in self.builds.active(node_id) if not self.running(r.build_id)]
        for row in orphans:
            self.builds.fail(row.build_id, INTERRUPTED)
        return len(orphans)

    def _run(self, build_id: str, spec: BuildSpec) -> None:
        try:
            with self._slots:
                self.builds.set_status(build_id, "building")
                result = self.builder.build(spec, lambda lvl, msg, step: self.builds.add_log(build_id, lvl, msg, step))
            if self.on_built is not None:
                self.on_built(result.build.build_id)
            self.builds.publish(build_id, result.build.build_id, self.runtime)
            events.TEMPLATE_BUILDS.labels("ready").inc()
        except StepFailed as exc:
            self._fail(build_id, str(exc), exc.step)
        except Exception as exc:  # a build must end as error, whatever happened
            log.exception("template build %s failed", build_id)
            self._fail(build_id, f"{type(exc).__name__}: {exc}", None)
        finally:
            with self._lock:
                self._active.discard(build_id)

    def _fail(self, build_id: str, message: str, step: str | None) -> None:
        events.TEMPLATE_BUILDS.labels("error").inc()
        self.builds.fail(build_id, message, step)


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
