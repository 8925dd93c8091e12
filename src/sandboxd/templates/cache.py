"""``sandboxd cache verify`` and ``sandboxd cache gc``: check and prune the derived data.

Everything under ``cache/`` is derived (layers, uploaded COPY files) and safe to delete: a build
that needs it again rebuilds it. Published builds under ``templates/`` are only removed by ``gc
--builds``, and never while an alias, a tag or a sandbox points at them. A microVM booted image
(``boot-images/<build_id>/``) goes with its build: nothing can restore it once the build is gone.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from sandboxd.templates.files import FilesCache, FilesError
from sandboxd.templates.layers import LayerCache
from sandboxd.templates.store import TemplateStore, remove_tree

LogFn = Callable[[str], None]


@dataclass
class Caches:
    store: TemplateStore
    layers: LayerCache
    files: FilesCache
    boot_images: Path  # orchestrator/boot_images.py: <build_id>/<shape>/, partial ones dot-named

    @classmethod
    def of(cls, data_dir: Path) -> Caches:
        return cls(TemplateStore(data_dir / "templates"), LayerCache(data_dir / "cache" / "layers"),
                   FilesCache(data_dir / "cache" / "files"), data_dir / "boot-images")


@dataclass
class VerifyReport:
    ok: dict[str, int] = field(default_factory=lambda: {"builds": 0, "layers": 0, "files": 0})
    bad: dict[str, list[str]] = field(default_factory=lambda: {"builds": [], "layers": [], "files": []})

    @property
    def clean(self) -> bool:
        return not any(self.bad.values())


def verify(caches: Caches, log: LogFn) -> VerifyReport:
    """Check every build, layer and COPY tar against its checksum. Corrupt layers are moved
    aside and corrupt tars deleted (both are rebuilt or re-uploaded on demand); a corrupt build is
    reported, and the next build of the same inputs replaces it."""
    report = VerifyReport()
    copy_steps: dict[str, tuple[str, str]] = {}
    for build_id in caches.store.list():
        meta = caches.store.get(build_id).meta
        copy_steps.update({f["hash"]: (f["src"], f["dest"]) for f in meta.get("files", []) if isinstance(f, dict)})
        _count(report, "builds", build_id, caches.store.verify(build_id), log)
    for key in caches.layers.list():
        ok = caches.layers.verify(key)
        if not ok:
            caches.layers.quarantine(key, log)
        _count(report, "layers", key, ok, log)
    for files_hash in caches.files.list():
        _count(report, "files", files_hash, _files_ok(caches.files, files_hash, copy_steps.get(files_hash)), log)
    return report


def _files_ok(files: FilesCache, files_hash: str, step: tuple[str, str] | None) -> bool:
    if step is None:  # no build names its COPY step: all we can check is that it reads
        ok = files.readable(files_hash)
        if not ok:
            files.remove(files_hash)
        return ok
    try:
        files.verified(files_hash, *step)  # deletes it on mismatch
        return True
    except FilesError:
        return False


def _count(report: VerifyReport, kind: str, name: str, ok: bool, log: LogFn) -> None:
    if ok:
        report.ok[kind] += 1
    else:
        report.bad[kind].append(name)
        log(f"CORRUPT {kind[:-1]} {name}")


@dataclass
class GcReport:
    removed: dict[str, list[str]] = field(
        default_factory=lambda: {"builds": [], "boot-images": [], "layers": [], "files": [], "tmp": []})
    kept: dict[str, int] = field(default_factory=lambda: {"builds": 0, "layers": 0, "files": 0})


def gc(caches: Caches, referenced_builds: set[str], *, builds: bool = False, min_age_s: float = 3600,
       dry_run: bool = False, log: LogFn = lambda _: None) -> GcReport:
    """Remove what no kept build needs: layers and COPY tars not used by a kept build (and not
    used within ``min_age_s``, so a build in progress keeps its layers), leftovers of crashed
    builds, quarantined entries, booted images of builds that are gone; with ``builds``, also
    published builds nothing points at (and their booted images)."""
    report = GcReport()
    kept_builds = [b for b in caches.store.list() if not builds or b in referenced_builds]
    for build_id in caches.store.list():
        if build_id not in kept_builds:
            _remove(report, "builds", build_id, dry_run, log, partial(caches.store.remove, build_id))
    for image_dir in _children(caches.boot_images):
        if image_dir.name not in kept_builds:
            _remove(report, "boot-images", image_dir.name, dry_run, log, partial(_rm, image_dir))
    layers, files = _needed(caches.store, kept_builds)
    report.kept["builds"] = len(kept_builds)
    cutoff = time.time() - min_age_s
    for key in caches.layers.list():
        if key in layers or _mtime(caches.layers.path(key)) > cutoff:
            report.kept["layers"] += 1
        else:
            _remove(report, "layers", key, dry_run, log, partial(caches.layers.remove, key))
    for files_hash in caches.files.list():
        if files_hash in files or _mtime(caches.files.path(files_hash)) > cutoff:
            report.kept["files"] += 1
        else:
            _remove(report, "files", files_hash, dry_run, log, partial(caches.files.remove, files_hash))
    for leftover in _leftovers(caches, cutoff, kept_builds):
        _remove(report, "tmp", str(leftover), dry_run, log, partial(_rm, leftover))
    return report


def _needed(store: TemplateStore, build_ids: list[str]) -> tuple[set[str], set[str]]:
    layers: set[str] = set()
    files: set[str] = set()
    for build_id in build_ids:
        meta = store.get(build_id).meta
        layers.update(meta.get("layers", []))
        if key := (meta.get("from") or {}).get("key"):
            layers.add(key)
        files.update(f["hash"] for f in meta.get("files", []) if isinstance(f, dict))
    return layers, files


def _leftovers(caches: Caches, cutoff: float, kept_builds: list[str]) -> list[Path]:
    """Temporary dirs of crashed builds, quarantined entries and half-made booted images (a
    server killed while capturing one), once old enough."""
    dirs = [caches.layers.root / ".tmp", caches.layers.root / ".corrupt", caches.files.root / ".tmp",
            caches.store.root / ".tmp", caches.store.root / ".corrupt",
            *(d for d in _children(caches.boot_images) if d.name in kept_builds)]
    return [p for d in dirs if d.is_dir() for p in sorted(d.iterdir())
            if _mtime(p) <= cutoff and (d.parent != caches.boot_images or p.name.startswith("."))]


def _children(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0


def _rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for p in [path, *path.rglob("*")]:  # overlayfs work dirs are mode 000
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    p.chmod(0o755)
        remove_tree(path)
    else:
        path.unlink(missing_ok=True)


def _remove(report: GcReport, kind: str, name: str, dry_run: bool, log: LogFn, action: Callable[[], object]) -> None:
    report.removed[kind].append(name)
    log(f"{'would remove' if dry_run else 'removing'} {kind[:-1] if kind != 'tmp' else 'leftover'} {name}")
    if not dry_run:
        action()
