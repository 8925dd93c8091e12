"""Host checks: privileges, the runtimes (runsc, QEMU, KVM) and the kernel features sandboxes use.

Each check runs the real thing where that is cheap (a gVisor ``runsc do``, an ``unshare``, an
``nft list``) rather than looking for files: a present binary that cannot run is the usual failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from sandboxd.config import Settings
from sandboxd.doctor.report import Finding
from sandboxd.runtimes.guest import GuestArtifacts
from sandboxd.runtimes.gvisor import choose_platform

#: Host programs sandboxd runs, and the Debian package that has each (sandboxd.sh's APT_PACKAGES).
TOOLS: dict[str, str] = {
    "debootstrap": "debootstrap", "mkfs.ext4": "e2fsprogs", "tini": "tini", "busybox": "busybox-static",
    "ip": "iproute2", "nft": "nftables", "unshare": "util-linux", "losetup": "util-linux",
    "qemu-img": "qemu-utils", "lz4": "lz4", "skopeo": "skopeo", "umoci": "umoci",
}
PROBE_TIMEOUT_S = 60.0


def _run(argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(argv, 124, "", f"timed out after {exc.timeout}s")
    except OSError as exc:
        return subprocess.CompletedProcess(argv, 127, "", str(exc))


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    text = (proc.stderr or proc.stdout).strip()
    return text.splitlines()[-1] if text else ""


def check_root() -> Finding:
    if os.geteuid() == 0:
        return Finding.ok("root", "running as root")
    return Finding.fail("root", "sandboxd needs root (namespaces, mounts, nftables, runsc)",
                        "sudo sandboxd doctor")


def check_tools() -> Finding:
    missing = {tool: pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None}
    if not missing:
        return Finding.ok("host tools", f"{len(TOOLS)} programs found")
    return Finding.fail("host tools", "missing: " + ", ".join(sorted(missing)),
                        "apt-get install -y " + " ".join(sorted(set(missing.values()))))


def check_runsc(settings: Settings) -> Finding:
    """runsc is there, says its version, and starts a gVisor sandbox on the configured platform."""
    if shutil.which("runsc") is None:
        return Finding.fail("gVisor (runsc)", "runsc is not on PATH", "apt-get install -y runsc")
    version = _run(["runsc", "--version"]).stdout.splitlines()[:1]
    platform = settings.gvisor_platform
    if platform == "auto":  # what the server would probe: systrap, else ptrace
        try:
            platform = choose_platform()
        except RuntimeError as exc:
            return Finding.fail("gVisor (runsc)", f"{version[0] if version else 'runsc'}: {exc}",
                                "check `runsc --platform=ptrace do /bin/true`")
    with tempfile.TemporaryDirectory(prefix="sandboxd-doctor-runsc-") as root:
        probe = _run(["runsc", "--root", root, f"--platform={platform}", "--network=none", "do", "/bin/true"],
                     timeout=PROBE_TIMEOUT_S)
    label = f"{version[0] if version else 'runsc'}, platform {platform}"
    if probe.returncode == 0:
        return Finding.ok("gVisor (runsc)", f"{label}: a probe sandbox ran /bin/true")
    return Finding.fail("gVisor (runsc)", f"{label}: the probe sandbox failed (rc={probe.returncode}): {_tail(probe)}",
                        "SANDBOXD_GVISOR_PLATFORM=ptrace sandboxd serve   (ptrace works without KVM or "
                        "nested virtualisation); check `runsc --platform=ptrace do /bin/true`")


def check_qemu() -> Finding:
    if shutil.which("qemu-system-x86_64") is None:
        return Finding.fail("QEMU", "qemu-system-x86_64 missing: the microvm runtime cannot start",
                            "apt-get install -y qemu-system-x86 qemu-utils")
    version = _run(["qemu-system-x86_64", "--version"]).stdout.splitlines()[:1]
    machines = _run(["qemu-system-x86_64", "-machine", "help"]).stdout
    if "microvm" not in machines:
        return Finding.fail("QEMU", f"{version[0] if version else 'QEMU'} has no microvm machine",
                            "apt-get install -y qemu-system-x86   (Debian's build has it)")
    return Finding.ok("QEMU", f"{version[0] if version else 'QEMU'}, microvm machine available")


def _guest(settings: Settings) -> GuestArtifacts | None:
    """The microVM guest kernel + initramfs already prepared in the data dir, if any."""
    from sandboxd.runtimes.guest import GuestError, load_guest

    current = settings.data_dir / "guest" / "current"
    if not current.is_symlink():
        return None
    try:
        return load_guest(settings.data_dir / "guest", os.readlink(current))
    except (GuestError, OSError, ValueError):
        return None


def check_kvm(settings: Settings, probe: bool = True) -> Finding:
    """KVM is used only when a guest boots with it (runtimes.accel): with ``probe`` and a guest
    kernel prepared, boot it with KVM now; else report /dev/kvm and the runtime's cached verdict."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Finding.warn("KVM", "/dev/kvm is not usable: microVMs run under TCG emulation (seconds per boot)",
                            "modprobe kvm_intel (or kvm_amd); enable nested virtualisation for a VM host")
    guest = _guest(settings) if probe else None
    if guest is not None:
        from sandboxd.runtimes.accel import probe_kvm

        if probe_kvm(guest):
            return Finding.ok("KVM", "/dev/kvm usable: a guest kernel booted with KVM")
        return Finding.warn("KVM", "/dev/kvm opens but the guest kernel does not boot with KVM (nested "
                                   "virtualisation?): microVMs use TCG emulation",
                            "enable nested virtualisation on the hypervisor (kvm_intel nested=1), or accept TCG")
    cached = settings.data_dir / "microvm" / "accel.json"
    try:
        verdict = json.loads(cached.read_text()).get("accel", "")
    except (OSError, ValueError):
        verdict = ""
    if verdict == "tcg":
        return Finding.warn("KVM", "/dev/kvm opens but the boot probe failed: microVMs use TCG",
                            f"rm {cached}  (probe again at the next microVM start)")
    return Finding.ok("KVM", "/dev/kvm usable" + (" and the boot probe passed" if verdict == "kvm" else
                                                  " (not probed: no guest kernel prepared yet)"))


def check_namespaces() -> Finding:
    probe = _run(["unshare", "--mount", "--net", "--uts", "--ipc", "--pid", "--fork", "--", "/bin/true"])
    if probe.returncode == 0:
        return Finding.ok("namespaces", "mount, net, uts, ipc and pid namespaces can be made")
    return Finding.fail("namespaces", f"unshare failed: {_tail(probe)}",
                        "run on a kernel with namespaces (CONFIG_NAMESPACES); in a container: --privileged")


def check_nftables() -> Finding:
    probe = _run(["nft", "list", "tables"])
    if probe.returncode == 0:
        return Finding.ok("nftables", "nft can read the ruleset (sandbox egress rules)")
    return Finding.fail("nftables", f"nft list tables failed: {_tail(probe)}",
                        "apt-get install -y nftables; modprobe nf_tables")


def check_nbd_module() -> Finding:
    """Informational: the kernel's nbd module is not needed (QEMU is the NBD client, in userspace)."""
    loaded = Path("/sys/module/nbd").exists()
    return Finding.ok("nbd module", ("loaded" if loaded else "not loaded") +
                      "; not needed: sandboxd serves each VM's copy-on-write disk over a unix socket to "
                      "QEMU's own NBD client")


def check_host(settings: Settings) -> list[Finding]:
    return [check_root(), check_tools(), check_runsc(settings), check_qemu(), check_kvm(settings),
            check_namespaces(), check_nftables(), check_nbd_module()]
