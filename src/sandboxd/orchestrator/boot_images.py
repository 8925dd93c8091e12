"""microVM creates restore a booted template instead of booting it.

A cold microVM create boots a kernel and starts envd's CPython: seconds, and far more under TCG.
A template's *booted image* is a sandbox of that build booted once (as the warm pool boots one:
no record, token or env vars), captured with its memory right after its envd answered, then
removed. Creates then start from it as from a snapshot with memory: their own copy of its disk
state, its memory restored in their own slot, fresh entropy for the guest kernel, then envd's
``/init`` and the template's start command, as for a claimed warm sandbox.

One image per build and VM shape (vCPUs, memory: a memory snapshot restores only into the same
machine), made in the background on the first create that finds none (that create boots cold
meanwhile). Images live under ``boot-images/<build_id>/`` and are found by build id only, so a
rebuilt template (a new build id) never restores an image of the old one; an image is published
by a rename once complete, so a half-made one is never used; ``sandboxd cache gc`` removes the
images of builds that are gone (templates/cache.py).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sandboxd.templates.store import remove_tree

log = logging.getLogger("sandboxd.orchestrator.boot_images")

#: after a failed attempt, creates of that shape boot cold for this long before another try
RETRY_AFTER_S = 600.0


@dataclass(frozen=True)
class ImageKey:
    build_id: str
    cpu_count: int
    memory_mb: int


class BootImages:
    """Finds published images, and makes missing ones in the background, one at a time."""

    def __init__(self, root: Path, make: Callable[[ImageKey, Path], None]) -> None:
        self.root = root
        self._make = make
        self._lock = threading.Lock()
        self._making: set[ImageKey] = set()
        self._failed: dict[ImageKey, float] = {}  # key → when its last attempt failed
        self._one_at_a_time = threading.Lock()  # a boot and a capture each load a small host

    def path(self, key: ImageKey) -> Path:
        return self.root / key.build_id / f"{key.cpu_count}cpu-{key.memory_mb}mb"

    def find(self, key: ImageKey) -> Path | None:
        """The published image of ``key``, if there is one."""
        path = self.path(key)
        return path if path.is_dir() else None

    def want(self, key: ImageKey) -> None:
        """Make ``key``'s image in the background, unless it exists, is being made, or failed lately."""
        with self._lock:
            failed_at = self._failed.get(key)
            if key in self._making or (failed_at is not None and time.monotonic() - failed_at < RETRY_AFTER_S):
                return
            if self.find(key) is not None:
                return
            self._making.add(key)
        threading.Thread(target=self._make_one, args=(key,), name="boot-image", daemon=True).start()

    def wait(self, key: ImageKey, timeout_s: float) -> Path | None:
        """Until ``key``'s image is published (tests, benchmarks); None if it is not in time."""
        deadline = time.monotonic() + timeout_s
        while (found := self.find(key)) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        return found

    def _make_one(self, key: ImageKey) -> None:
        path = self.path(key)
        partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            with self._one_at_a_time:
                started = time.monotonic()
                partial.parent.mkdir(parents=True, exist_ok=True)
                self._make(key, partial)
                partial.rename(path)
            log.info("booted image of build %s (%d vCPU, %d MiB) made in %.1fs", key.build_id, key.cpu_count,
                     key.memory_mb, time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - creates boot cold instead; retried later
            log.warning("making the booted image of build %s failed (creates boot cold): %s", key.build_id, exc)
            with self._lock:
                self._failed[key] = time.monotonic()
        finally:
            remove_tree(partial)
            with self._lock:
                self._making.discard(key)
