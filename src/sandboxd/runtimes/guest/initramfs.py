"""The guest initramfs: busybox-static, a few kernel modules and one short ``/init`` script.

Why an initramfs at all (and not ``root=/dev/vda init=...``): the cloud kernel builds virtio as
modules, the guest's network must be up before envd starts, and envd must start with exactly the
argv and environment of the :class:`~sandboxd.runtimes.base.RuntimeSpec` — no wrapper that adds
flags or loses output (seed 000). The script therefore stays small and prints every step to the
serial console (the sandbox's ``console.log``), and any failure ends init, so the kernel panics
and (``panic=-1`` + QEMU's ``-no-reboot``) the VM exits at once instead of hanging.

The archive is an uncompressed newc cpio written here (fixed owners and times, sorted), so the
same inputs give the same bytes and no host ``cpio`` is needed; uncompressed because
decompressing under TCG costs more than copying.
"""

from __future__ import annotations

import base64
import io
import shlex
import subprocess
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
#: busybox applets /init uses (checked against the host's busybox when the archive is built).
APPLETS: tuple[str, ...] = ("sh", "mount", "insmod", "switch_root", "ip", "hostname", "base64", "usleep",
                            "cat", "mkdir", "env", "date", "sleep")
GUEST_ADDRESS = "169.254.0.21"
GATEWAY_ADDRESS = "169.254.0.22"
PROBE_MARKER = "SANDBOXD-GUEST-PROBE-OK"
#: x86 COMMAND_LINE_SIZE is 2048; leave room for the console and timing options.
MAX_SPEC_CHARS = 1600

INIT_SCRIPT = f"""#!/bin/sh
# sandboxd guest init: modules, root disk, network, then the sandbox's own PID 1 (switch_root).
# Every step prints to the serial console; any failure exits, so the kernel panics and the VM ends.
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
say() {{ echo "sandboxd-init: $*"; }}
fail() {{ say "FATAL: $*"; exit 1; }}
mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
spec=""
for word in $(cat /proc/cmdline); do
  case "$word" in
    sandboxd.probe) say "{PROBE_MARKER}"; exit 0 ;;
    sandboxd.spec=*) spec="${{word#sandboxd.spec=}}" ;;
  esac
done
[ -n "$spec" ] || fail "no sandboxd.spec= on the kernel command line"
for m in $(cat /modules.order); do insmod "/lib/modules/$m" || fail "insmod $m"; done
n=0
while [ ! -b /dev/vda ]; do
  n=$((n + 1)); [ $n -gt 1000 ] && fail "no root disk /dev/vda after 10 s"; usleep 10000
done
mkdir -p /newroot
mount -t ext4 -o noatime /dev/vda /newroot || fail "mount root disk /dev/vda (ext4)"
say "root disk mounted"
ip link set lo up && ip link set eth0 up && ip addr add {GUEST_ADDRESS}/30 dev eth0 \\
  && ip route add default via {GATEWAY_ADDRESS} || fail "network (eth0 {GUEST_ADDRESS}/30)"
for d in dev proc sys; do mkdir -p "/newroot/$d"; mount --move "/$d" "/newroot/$d" || fail "move /$d"; done
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /newroot/dev/pts || fail "mount devpts"
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm || fail "mount /dev/shm"
[ -d /newroot/run ] && mount -t tmpfs -o mode=0755 tmpfs /newroot/run
eval "$(echo "$spec" | base64 -d)" || fail "bad sandboxd.spec"
say "exec $*"
exec "$@"
"""


class InitramfsError(RuntimeError):
    pass


def encode_spec(argv: list[str], env: dict[str, str], hostname: str) -> str:
    """The ``sandboxd.spec=`` value: base64 of a shell fragment that sets the hostname and leaves
    ``env -i K=V... switch_root /newroot argv...`` in ``$@``. ``env -i``: the sandbox's PID 1
    gets exactly ``env`` (not the kernel's ``HOME``/``TERM`` for init); every word is quoted by
    shlex, so no argv or value can inject shell."""
    if not argv:
        raise ValueError("empty argv")
    words = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), "switch_root", "/newroot", *argv]
    text = f"hostname {shlex.quote(hostname)}\nset -- {' '.join(shlex.quote(w) for w in words)}\n"
    spec = base64.b64encode(text.encode()).decode()
    if len(spec) > MAX_SPEC_CHARS:
        raise ValueError(f"argv+env too long for the kernel command line ({len(spec)} > {MAX_SPEC_CHARS})")
    return spec


# ---------------------------------------------------------------------------------------------
# newc cpio.


def _cpio_entry(out: io.BytesIO, ino: int, name: str, mode: int, data: bytes = b"",
                rdev: tuple[int, int] = (0, 0)) -> None:
    name_bytes = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_bytes), 0]
    out.write(b"070701" + b"".join(f"{f:08x}".encode() for f in fields))
    out.write(name_bytes)
    out.write(b"\0" * (-out.tell() % 4))
    out.write(data)
    out.write(b"\0" * (-out.tell() % 4))


def cpio_newc(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """An uncompressed newc archive of (name, mode, data, rdev) entries, in the given order."""
    out = io.BytesIO()
    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        _cpio_entry(out, ino, name, mode, data, rdev)
    _cpio_entry(out, 0, "TRAILER!!!", 0)
    out.write(b"\0" * (-out.tell() % 512))
    return out.getvalue()


def _check_applets() -> None:
    have = set(subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split())
    if missing := [a for a in APPLETS if a not in have]:
        raise InitramfsError(f"{BUSYBOX} lacks applets {missing}")


def build_initramfs(modules: dict[str, bytes]) -> bytes:
    """The archive: /init, busybox + applet links, /dev/console, modules in load order."""
    if not BUSYBOX.is_file():
        raise InitramfsError(f"{BUSYBOX} missing: apt-get install busybox-static")
    _check_applets()
    d, f, x, lnk, chr_ = 0o040755, 0o100644, 0o100755, 0o120777, 0o020600
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (name, d, b"", (0, 0)) for name in ("bin", "dev", "lib", "lib/modules", "proc", "sys", "newroot")]
    entries.append(("dev/console", chr_, b"", (5, 1)))
    entries.append(("bin/busybox", x, BUSYBOX.read_bytes(), (0, 0)))
    entries += [(f"bin/{a}", lnk, b"busybox", (0, 0)) for a in APPLETS]
    entries += [(f"lib/modules/{name}", f, data, (0, 0)) for name, data in modules.items()]
    entries.append(("modules.order", f, "".join(f"{name}\n" for name in modules).encode(), (0, 0)))
    entries.append(("init", x, INIT_SCRIPT.encode(), (0, 0)))
    return cpio_newc(entries)
