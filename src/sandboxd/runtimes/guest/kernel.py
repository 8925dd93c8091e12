"""The guest kernel: Debian's ``linux-image-cloud-amd64``, fetched with ``apt-get download``.

Why Debian's cloud kernel: it is signed, maintained, small (virtio, ext4, no desktop drivers) and
comes from the same mirror as everything else. Nothing is installed on the host: the .deb is
unpacked into a scratch dir, and only two things are kept:

- ``vmlinux``: the *uncompressed* ELF kernel cut out of the bzImage. QEMU boots it directly via
  its PVH entry point, which skips the real-mode setup and, above all, the decompressor (seconds
  under TCG, where every instruction is emulated);
- the few modules the initramfs loads (virtio transport, block, net, rng).
"""

from __future__ import annotations

import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sandboxd.templates.store import LogFn

META_PACKAGE = "linux-image-cloud-amd64"

#: Modules the initramfs loads (the cloud kernel builds them as modules); the load order comes
#: from their ``depends=`` strings (:func:`load_order`).
MODULES: tuple[str, ...] = (
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
    "drivers/char/hw_random/virtio-rng.ko",
)

# bzImage payload magics → the command that decompresses it to stdout.
_DECOMPRESSORS: tuple[tuple[bytes, list[str]], ...] = (
    (b"\x02\x21\x4c\x18", ["lz4", "-dc"]),
    (b"\x1f\x8b", ["gzip", "-dc"]),
    (b"\xfd7zXZ\x00", ["xz", "-dc"]),
    (b"\x28\xb5\x2f\xfd", ["zstd", "-dc"]),
)


class KernelError(RuntimeError):
    pass


@dataclass(frozen=True)
class KernelPackage:
    """The concrete kernel .deb apt would pick now, identified by the mirror's checksum."""

    name: str
    version: str
    sha256: str


def _apt_show(package: str) -> dict[str, str]:
    proc = subprocess.run(["apt-cache", "show", "--no-all-versions", package], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise KernelError(f"apt-cache show {package} failed (run apt-get update?): {proc.stderr.strip()}")
    return dict(re.findall(r"^([A-Za-z0-9-]+): (.*)$", proc.stdout.split("\n\n")[0], re.M))


def resolve_kernel_package() -> KernelPackage:
    """The image package the meta package depends on now (e.g. linux-image-6.1.0-56-cloud-amd64)."""
    meta = _apt_show(META_PACKAGE)
    m = re.search(r"(linux-image-[0-9][^\s,(]*-cloud-amd64)", meta.get("Depends", ""))
    if not m:
        raise KernelError(f"{META_PACKAGE} depends on no cloud kernel image: {meta.get('Depends')!r}")
    fields = _apt_show(m.group(1))
    return KernelPackage(name=m.group(1), version=fields["Version"], sha256=fields["SHA256"])


def download_and_unpack(pkg: KernelPackage, dest: Path, log: LogFn) -> Path:
    """``apt-get download`` the .deb into ``dest`` and unpack it there; returns the unpacked root."""
    log(f"downloading {pkg.name} {pkg.version}")
    # apt drops privileges to _apt for downloads: give it a dir it may write
    dest.chmod(0o777)
    proc = subprocess.run(["apt-get", "download", "-q", f"{pkg.name}={pkg.version}"], cwd=dest,
                          capture_output=True, text=True)
    debs = list(dest.glob(f"{pkg.name}_*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        raise KernelError(f"apt-get download {pkg.name} failed: {proc.stderr.strip()[-500:]}")
    root = dest / "root"
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True, capture_output=True)
    return root


def extract_vmlinux(bzimage: Path) -> bytes:
    """The uncompressed kernel ELF inside a bzImage (what ``scripts/extract-vmlinux`` does, but
    exact: the setup header says where the payload is, and its last 4 bytes say how long the
    output must be)."""
    data = bzimage.read_bytes()
    if data[0x202:0x206] != b"HdrS":
        raise KernelError(f"{bzimage} is not a bzImage")
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start:start + payload_length]
    expected = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    for magic, argv in _DECOMPRESSORS:
        if payload.startswith(magic):
            # decompressors exit non-zero on the 4-byte size trailer; the length check decides
            out = subprocess.run(argv, input=payload, capture_output=True).stdout
            break
    else:
        raise KernelError(f"unknown kernel compression (magic {payload[:6].hex()})")
    if len(out) != expected or not out.startswith(b"\x7fELF"):
        raise KernelError(f"kernel decompression gave {len(out)} bytes, expected an ELF of {expected}")
    return out


def module_dependencies(ko: Path) -> list[str]:
    """Names in a module's ``depends=`` modinfo string (read from the .ko, no kmod needed)."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko.read_bytes())
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def _mod_name(path: str) -> str:
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def load_order(modules_dir: Path, wanted: tuple[str, ...] = MODULES) -> list[str]:
    """``wanted`` sorted so every module comes after what it depends on; raises if a dependency
    is not among them (insmod would fail in the guest with "unknown symbol")."""
    by_name = {_mod_name(m): m for m in wanted}
    deps = {n: [d.replace("-", "_") for d in module_dependencies(modules_dir / m)] for n, m in by_name.items()}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if by_name[name] in order:
            return
        if name in visiting:
            raise KernelError(f"module dependency cycle at {name}")
        visiting.add(name)
        for dep in deps[name]:
            if dep not in by_name:
                raise KernelError(f"{by_name[name]} needs {dep}, which the initramfs does not load")
            visit(dep)
        order.append(by_name[name])

    for name in sorted(by_name):
        visit(name)
    return order


def kernel_files(root: Path) -> tuple[Path, Path, str]:
    """(bzImage, modules dir, kernel release) inside an unpacked kernel package."""
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise KernelError(f"expected one vmlinuz in the package, found {images}")
    release = images[0].name.removeprefix("vmlinuz-")
    modules = root / "lib" / "modules" / release / "kernel"
    missing = [m for m in MODULES if not (modules / m).is_file()]
    if missing:
        raise KernelError(f"kernel {release} lacks modules {missing}")
    return images[0], modules, release


def fetch_kernel(pkg: KernelPackage, log: LogFn) -> tuple[bytes, dict[str, bytes], str]:
    """(vmlinux, {module file name: bytes} in load order, kernel release) for ``pkg``."""
    with tempfile.TemporaryDirectory(prefix="sandboxd-kernel-") as tmp:
        root = download_and_unpack(pkg, Path(tmp), log)
        bzimage, modules, release = kernel_files(root)
        log(f"extracting the uncompressed kernel from {bzimage.name}")
        vmlinux = extract_vmlinux(bzimage)
        mods = {Path(m).name: (modules / m).read_bytes() for m in load_order(modules)}
    return vmlinux, mods, release
