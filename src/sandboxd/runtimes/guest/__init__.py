"""Guest kernel + initramfs for the microVM runtime, prepared once into ``<data_dir>/guest/``.

Layout::

    guest/<key>/{vmlinux, initrd.cpio, meta.json}   # immutable once published
    guest/current -> <key>                          # what the last successful prepare chose

``key`` hashes everything that decides the bytes: the kernel .deb's SHA256 (from the apt index),
this package's sources (module list, init script, cpio writer) and busybox's SHA256. So a new
kernel upload, a changed init script or another busybox is a new directory by construction, and
``meta.json`` holds the files' checksums, which :func:`load_guest` checks before handing them out
(seed 000: a fixed artifact must never be shadowed by a stale cached one).

Host packages it needs: ``busybox-static`` (initramfs), ``lz4`` (kernel payload; also gzip, xz,
zstd for other kernels), ``dpkg`` and ``apt`` (download + unpack, nothing is installed).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sandboxd.runtimes.guest import initramfs, kernel
from sandboxd.templates.store import LogFn

FORMAT = "sandboxd-guest-1"


class GuestError(RuntimeError):
    pass


@dataclass(frozen=True)
class GuestArtifacts:
    """What QEMU boots: the uncompressed kernel and the initramfs (both verified)."""

    key: str
    kernel: Path
    initrd: Path
    release: str


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def recipe_hash() -> str:
    """Hash of the code that makes the artifacts and of the busybox that goes into them."""
    h = hashlib.sha256(FORMAT.encode())
    for mod in (kernel, initramfs):
        h.update(Path(mod.__file__ or "").read_bytes())
    h.update(_sha256_file(initramfs.BUSYBOX).encode() if initramfs.BUSYBOX.exists() else b"no-busybox")
    return h.hexdigest()


def guest_key(pkg: kernel.KernelPackage) -> str:
    return hashlib.sha256(f"{pkg.sha256}\0{recipe_hash()}".encode()).hexdigest()[:32]


def load_guest(guest_dir: Path, key: str) -> GuestArtifacts:
    """The published artifacts of ``key`` after checking their checksums; raises if absent/bad."""
    d = Path(guest_dir) / key
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise GuestError(f"no guest artifacts {key} in {guest_dir}") from exc
    for name in ("vmlinux", "initrd.cpio"):
        if meta.get("format") != FORMAT or _sha256_file(d / name) != meta["sha256"].get(name):
            raise GuestError(f"guest artifact {d / name} does not match its checksum")
    return GuestArtifacts(key=key, kernel=d / "vmlinux", initrd=d / "initrd.cpio", release=meta["release"])


@contextlib.contextmanager
def _locked(guest_dir: Path) -> Iterator[None]:
    with open(guest_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _publish(guest_dir: Path, key: str, pkg: kernel.KernelPackage, log: LogFn) -> None:
    vmlinux, modules, release = kernel.fetch_kernel(pkg, log)
    log(f"building the initramfs ({len(modules)} modules for {release})")
    initrd = initramfs.build_initramfs(modules)
    tmp = guest_dir / f".tmp-{key}-{secrets.token_hex(4)}"
    tmp.mkdir()
    (tmp / "vmlinux").write_bytes(vmlinux)
    (tmp / "initrd.cpio").write_bytes(initrd)
    meta = {"format": FORMAT, "key": key, "release": release, "package": pkg.__dict__,
            "recipe": recipe_hash(),
            "sha256": {n: hashlib.sha256(b).hexdigest() for n, b in (("vmlinux", vmlinux), ("initrd.cpio", initrd))}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for p in tmp.iterdir():
        p.chmod(0o444)
    os.sync()
    if (guest_dir / key).exists():  # a broken earlier publish: never repaired in place
        shutil.rmtree(guest_dir / key)
    os.rename(tmp, guest_dir / key)


def _point_current(guest_dir: Path, key: str) -> None:
    link = guest_dir / f".current-{secrets.token_hex(4)}"
    link.symlink_to(key)
    os.rename(link, guest_dir / "current")


def prepare_guest(data_dir: Path, log: LogFn = print) -> GuestArtifacts:
    """Idempotent: the verified artifacts for the kernel apt offers now, built if missing.

    Without a usable apt index (offline, no ``apt-get update``) the last prepared artifacts
    (``current``) are used if they verify; otherwise this raises with the reason."""
    guest_dir = Path(data_dir) / "guest"
    guest_dir.mkdir(parents=True, exist_ok=True)
    with _locked(guest_dir):
        try:
            pkg = kernel.resolve_kernel_package()
        except kernel.KernelError as exc:
            return _offline_fallback(guest_dir, exc, log)
        key = guest_key(pkg)
        with contextlib.suppress(GuestError):
            found = load_guest(guest_dir, key)
            _point_current(guest_dir, key)
            return found
        _publish(guest_dir, key, pkg, log)
        _point_current(guest_dir, key)
        log(f"guest {key} ready: kernel {pkg.name} {pkg.version}")
        return load_guest(guest_dir, key)


def _offline_fallback(guest_dir: Path, why: Exception, log: LogFn) -> GuestArtifacts:
    """The ``current`` artifacts when apt cannot say which kernel is current, if they were made
    by this very recipe and verify."""
    current = guest_dir / "current"
    key = os.readlink(current) if current.is_symlink() else ""
    try:
        found = load_guest(guest_dir, key)
        if json.loads((guest_dir / key / "meta.json").read_text()).get("recipe") != recipe_hash():
            raise GuestError("prepared by another recipe")
    except GuestError as exc:
        raise GuestError(f"cannot prepare the guest kernel ({why}) and no usable prepared one ({exc})") from why
    log(f"apt index unusable ({why}); using prepared guest {key}")
    return found
