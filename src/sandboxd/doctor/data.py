"""Data dir checks: writable, enough free disk for what the sparse images promise, the base
template built from the current recipe, every build in use intact, and envd starting in it.

Why these: seed 000 is a rootfs whose envd never started and, once fixed, old copies served from
caches; here build ids are content hashes, so "stale" means the ``base`` alias still points at a
build of an older recipe or envd (the server rebuilds it at start; a doctor run says so before).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sandboxd.config import Settings
from sandboxd.doctor.report import Finding
from sandboxd.store.db import Database, SandboxRow
from sandboxd.store.templates_db import TemplateBuilds
from sandboxd.templates import ext4
from sandboxd.templates.cache import Caches
from sandboxd.templates.check import check_envd_starts
from sandboxd.templates.store import TemplateStore

MIN_FREE_MB = 1024
MB = 1024 * 1024


def check_writable(settings: Settings) -> Finding:
    d = settings.data_dir
    if not d.is_dir():
        return Finding.fail("data dir", f"{d} does not exist", f"mkdir -p {d}   (or sandboxd serve --data-dir DIR)")
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Finding.fail("data dir", f"{d} is not writable: {exc.strerror}",
                            f"mount -o remount,rw $(df --output=target {d} | tail -1); chown root {d}")
    return Finding.ok("data dir", f"{d} writable")


def _allocated(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def check_free_space(settings: Settings, sandboxes: list[SandboxRow]) -> Finding:
    """Each sandbox's disk image is sparse: it may still grow to its full size. Free space must
    cover what the images can still claim, or a sandbox gets EIO instead of its own ENOSPC."""
    st = os.statvfs(settings.data_dir)
    free = st.f_bavail * st.f_frsize
    promised = sum(max(0, row.disk_size_mb * MB - _allocated(settings.sandboxes_dir / row.sandbox_id / "disk.img"))
                   for row in sandboxes)
    detail = f"{free // MB} MiB free; the {len(sandboxes)} sandboxes' sparse disks may still claim {promised // MB} MiB"
    fix = f"free space on {settings.data_dir}'s filesystem, kill unused sandboxes, or `sandboxd cache gc --builds`"
    if free < MIN_FREE_MB * MB:
        return Finding.fail("free disk", detail + f" (under {MIN_FREE_MB} MiB)", fix)
    if free < promised:
        return Finding.fail("free disk", detail + ": overcommitted", fix)
    return Finding.ok("free disk", detail)


def check_base_template(settings: Settings, db: Database, expected_build_id: str | None) -> Finding:
    """``base`` is built and points at the build the current recipe and envd bundle make."""
    alias = db.find_template(settings.default_template)
    fix = "sandboxd template build-base   (sandboxd serve does it at start)"
    if alias is None:
        return Finding.fail("base template", f"no `{settings.default_template}` template in the database", fix)
    store = TemplateStore(settings.templates_dir)
    if not store.exists(alias.build_id):
        return Finding.fail("base template", f"`{alias.alias}` points at build {alias.build_id}, which is "
                                             "not in the template store", fix)
    if expected_build_id and alias.build_id != expected_build_id:
        return Finding.fail("base template", f"stale: `{alias.alias}` points at {alias.build_id}, but the current "
                                             f"recipe and envd bundle make {expected_build_id}", fix)
    return Finding.ok("base template", f"`{alias.alias}` is build {alias.build_id}"
                                       + (" (current recipe and envd)" if expected_build_id else ""))


def builds_in_use(db: Database) -> set[str]:
    return TemplateBuilds(db).referenced_builds()


def check_checksums(settings: Settings, build_ids: set[str], everything: bool) -> list[Finding]:
    """Builds (and their microVM ext4 images) match the checksums recorded when they were made;
    with ``everything``, every build and cached layer too. Read-only: nothing is moved or deleted."""
    caches = Caches.of(settings.data_dir)
    ids = sorted(set(caches.store.list()) if everything else {b for b in build_ids if caches.store.exists(b)})
    bad = [b for b in ids if not caches.store.verify(b)]
    images = bad_images = 0
    for build_id in ids:
        d = ext4.cache_dir(settings.data_dir, build_id)
        meta = ext4.read_meta(d)
        if meta:
            images += 1
            if meta.get("build_id") != build_id or not ext4.verified_sha256(d / ext4.IMAGE_NAME, meta.get("sha256", "")):
                bad.append(f"{build_id} (rootfs.ext4)")
                bad_images += 1
    layers = caches.layers.list() if everything else []
    bad += [f"layer {key}" for key in layers if not caches.layers.verify(key)]
    what = f"{len(ids)} builds, {images} ext4 images" + (f", {len(layers)} layers" if everything else "")
    if bad:
        return [Finding.fail("checksums", f"{len(bad)} of {what} do not match their checksum: " + ", ".join(bad[:5]),
                             "sandboxd cache verify   (moves corrupt entries aside; the next use rebuilds them)")]
    return [Finding.ok("checksums", f"{what} match their checksums")]


def check_envd_gate(settings: Settings, db: Database, build_ids: set[str]) -> list[Finding]:
    """Start envd in each template in use exactly as a sandbox would (the build gate, again):
    a template that passed once can still be broken by a host change (seed 000)."""
    store = TemplateStore(settings.templates_dir)
    findings = []
    for build_id in sorted(b for b in build_ids if store.exists(b)):
        lines: list[str] = []
        try:
            check_envd_starts(store.get(build_id).rootfs, lines.append, timeout=60)
        except (RuntimeError, OSError) as exc:
            tail = " | ".join(line for line in lines[-3:])
            findings.append(Finding.fail("envd starts", f"build {build_id}: {exc} {tail}".strip(),
                                         "sandboxd template build-base   (base; other templates: build them "
                                         "again with `sandboxd template build` or Template.build)"))
            continue
        findings.append(Finding.ok("envd starts", f"build {build_id}: GET /health answered"))
    return findings
