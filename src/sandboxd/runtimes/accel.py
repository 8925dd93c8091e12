"""KVM or TCG: decided by booting the real guest kernel, not by the presence of ``/dev/kvm``.

Why a boot probe: on nested or unusual hosts ``/dev/kvm`` opens fine and QEMU then aborts
("failed to set MSR") or the guest hangs silently. So KVM is used only when a VM with KVM prints
the initramfs's probe marker within a few seconds; otherwise TCG (emulation) is used.
The answer is cached per host boot, QEMU build and guest kernel (``accel.json``).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from sandboxd.runtimes.guest import GuestArtifacts
from sandboxd.runtimes.guest.initramfs import PROBE_MARKER

PROBE_TIMEOUT_S = 8.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _qemu_version(qemu: str) -> str:
    proc = subprocess.run([qemu, "--version"], capture_output=True, text=True)
    return proc.stdout.splitlines()[0] if proc.stdout else "unknown"


def probe_kvm(guest: GuestArtifacts, qemu: str = "qemu-system-x86_64", timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Boot the guest with KVM to its initramfs probe; True iff the marker appears in time."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    argv = [qemu, "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "256", "-smp", "1", "-nodefaults",
            "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", str(guest.kernel),
            "-initrd", str(guest.initrd), "-append", "console=ttyS0 quiet panic=-1 sandboxd.probe"]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False
    return PROBE_MARKER.encode() in proc.stdout


def detect_accel(guest: GuestArtifacts, cache_file: Path, qemu: str = "qemu-system-x86_64") -> str:
    """"kvm" if the probe boots, else "tcg"; cached in ``cache_file`` for this boot/QEMU/kernel."""
    key = {"boot_id": _boot_id(), "qemu": _qemu_version(qemu), "guest": guest.key}
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key and cached.get("accel") in ("kvm", "tcg"):
            return cached["accel"]
    except (OSError, ValueError):
        pass
    accel = "kvm" if probe_kvm(guest, qemu) else "tcg"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "accel": accel}))
    os.replace(tmp, cache_file)
    return accel
