"""The gVisor runtime: ``runsc`` with an OCI bundle whose root is the sandbox's overlay.

How runsc is run on this kind of host (measured, see architecture.md):
- every invocation gets the same global flags (``--root``, ``--platform``, ``--network``);
- with ``--network=sandbox`` runsc refuses to run "in the root network namespace" when it can see
  the host's ``/proc/sys/net``; ``ip netns exec`` breaks it differently (it remounts /sys). So
  create/start run in a private mount namespace with a tmpfs over ``/proc/sys/net``, and the OCI
  spec names the slot's guest network namespace by path;
- the console (runsc's and the sandbox's stdout/stderr) goes to ``console.log`` opened with
  O_APPEND, so writers sharing it never overwrite each other;
- runsc reads the guest's address and routes from the guest namespace's eth0 at start (and
  restore) and then strips them from it, so a slot reused for another start needs
  ``SlotPool.restore_guest_address`` first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from sandboxd.envd.sudo_broker import SUDO
from sandboxd.runtimes.base import CONSOLE_LOG, RuntimeSpec, RuntimeStartError, console_tail
from sandboxd.templates.envd_bundle import python_argv

log = logging.getLogger("sandboxd.runtimes.gvisor")

SHIM_SOURCE = Path(__file__).with_name("statx_shim.c")
SHIM_IN_SANDBOX = "/opt/sandboxd-rt/statx.so"
#: First on every PATH envd sets; see sandboxd.envd.sudo_broker for why sudo needs envd here.
SUDO_WRAPPER_IN_SANDBOX = "/usr/local/bin/sudo"
_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
         "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_NET_ADMIN",
         "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_ADMIN", "CAP_MKNOD", "CAP_AUDIT_WRITE", "CAP_SETFCAP"]


class GVisorRuntime:
    """Sandboxes as runsc containers; ``state_dir`` is runsc's ``--root``."""

    name = "gvisor"

    def __init__(self, state_dir: Path, platform: str = "ptrace", template_root: Path | None = None,
                 filestore_dir: Path | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.platform = platform
        self.filestore_dir = Path(filestore_dir) if filestore_dir else None
        if self.filestore_dir:
            self.filestore_dir.mkdir(parents=True, exist_ok=True)
        self.template_root = Path(template_root).resolve() if template_root else None
        self.shim = build_statx_shim(self.state_dir.parent / "lib")
        self.sudo_wrapper = write_sudo_wrapper(self.state_dir.parent / "lib")

    # -- runsc ---------------------------------------------------------------------------------

    def _flags(self) -> list[str]:
        flags = ["runsc", "--root", str(self.state_dir), f"--platform={self.platform}", "--network=sandbox"]
        if self.filestore_dir:
            # gVisor's own overlay over the (host-overlay) root, its upper layer in an unlinked
            # file in this dir: the gofer cannot store xattrs, this can (file metadata needs them)
            flags.append(f"--overlay2=root:{self.filestore_dir}")
        return flags

    def _runsc(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self._flags(), *args], capture_output=True, text=True, check=check)

    # -- Runtime -------------------------------------------------------------------------------

    def start(self, spec: RuntimeSpec) -> None:
        self._guard(spec.rootfs)
        bundle = spec.sandbox_dir / "bundle"
        bundle.mkdir(parents=True, exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(self.oci_config(spec), indent=1))
        flags = " ".join(shlex.quote(f) for f in self._flags())
        script = ("mount --make-rprivate / && mount -t tmpfs none /proc/sys/net && "
                  f"{flags} create --bundle {shlex.quote(str(bundle))} {shlex.quote(spec.sandbox_id)} && "
                  f"{flags} start {shlex.quote(spec.sandbox_id)}")
        fd = os.open(spec.sandbox_dir / CONSOLE_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            # own session: a Ctrl-C or kill of the server's process group must not reach sandboxes
            proc = subprocess.run(["unshare", "-m", "sh", "-c", script], stdin=subprocess.DEVNULL,
                                  stdout=fd, stderr=fd, timeout=60, start_new_session=True)
        except subprocess.TimeoutExpired:
            proc = None
        finally:
            os.close(fd)
        if proc is None or proc.returncode != 0:
            self.stop(spec.sandbox_id)
            why = "timed out" if proc is None else f"exit code {proc.returncode}"
            console = console_tail(spec.sandbox_dir)
            raise RuntimeStartError(f"runsc create/start failed ({why}); console:\n{console}", console)

    def stop(self, sandbox_id: str) -> None:
        """Kill the sandbox's host processes, then let runsc delete its state; verified.

        runsc alone is not enough under load: concurrent runsc calls on one root contend for its
        lock, and a failed ``delete`` must never let teardown go on to unmount a rootfs under a
        sandbox that still runs."""
        for pid in self._host_pids(sandbox_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        res = None
        for attempt in range(5):
            if not any(self.state_dir.glob(f"*:{sandbox_id}.state")):  # "<sandbox>_sandbox:<id>.state"
                break
            res = self._runsc("delete", "--force", sandbox_id)
            if res.returncode == 0:
                break
            time.sleep(0.2 * (attempt + 1))
        deadline = time.monotonic() + 10
        while (left := self._host_pids(sandbox_id)) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        if left:
            raise RuntimeError(f"sandbox {sandbox_id} processes {left} survive SIGKILL")
        if res is not None and res.returncode != 0:
            log.warning("runsc delete %s failed (processes are gone): %s", sandbox_id,
                        (res.stderr or res.stdout).strip()[-500:])

    @staticmethod
    def _host_pids(sandbox_id: str) -> list[int]:
        """runsc's sandbox and gofer processes of this sandbox (ids are unique random names)."""
        needle = sandbox_id.encode()
        pids = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if cmdline.startswith(b"runsc") and needle in cmdline:
                pids.append(int(entry.name))
        return pids

    def running(self) -> set[str]:
        """Containers runsc knows. Raises if runsc cannot tell: recovery must never mistake
        "could not list" for "none are running" and tear live sandboxes down."""
        res = self._runsc("list", "-quiet")
        if res.returncode != 0:
            raise RuntimeError(f"runsc list failed: {res.stderr.strip()[-500:]}")
        return {line.strip() for line in res.stdout.splitlines() if line.strip()}

    def disk_usage(self, sandbox_id: str) -> int | None:
        """Bytes the sandbox has written: the allocated size of its (unlinked) overlay filestore,
        found among the sandbox process's open files. None without a filestore."""
        if not self.filestore_dir:
            return None
        res = self._runsc("state", sandbox_id)
        try:
            pid = json.loads(res.stdout)["pid"]
            fd_dir = Path(f"/proc/{pid}/fd")
            prefix = str(self.filestore_dir.resolve()) + "/"
            for fd in fd_dir.iterdir():
                if os.readlink(fd).startswith(prefix):
                    return os.stat(fd).st_blocks * 512
        except (ValueError, KeyError, OSError):
            return None
        return 0

    def console_log(self, sandbox_dir: Path) -> str:
        return console_tail(sandbox_dir)

    def exec(self, sandbox_id: str, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a command in a sandbox as root, outside envd (diagnostics and tests)."""
        return self._runsc("exec", sandbox_id, *argv)

    # -- OCI -----------------------------------------------------------------------------------

    def _guard(self, rootfs: Path) -> None:
        """Guarantee 2: the runtime gets the provider's path (a mounted overlay), never a template."""
        real = Path(rootfs).resolve()
        if self.template_root and (real == self.template_root or self.template_root in real.parents):
            raise ValueError(f"refusing to run a sandbox directly on template storage: {real}")
        if not os.path.ismount(real):
            raise ValueError(f"sandbox rootfs {real} is not a mount point (expected its overlay)")

    def oci_config(self, spec: RuntimeSpec) -> dict:
        mounts = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "nodev", "mode=1777"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        ]
        if self.shim is not None:
            mounts += [
                {"destination": SHIM_IN_SANDBOX, "type": "bind", "source": str(self.shim), "options": ["rbind", "ro"]},
                {"destination": "/etc/ld.so.preload", "type": "bind", "source": str(self.shim.with_suffix(".preload")),
                 "options": ["rbind", "ro"]},
            ]
        mounts.append({"destination": SUDO_WRAPPER_IN_SANDBOX, "type": "bind", "source": str(self.sudo_wrapper),
                       "options": ["rbind", "ro"]})
        caps = list(_CAPS)
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": 0, "gid": 0},
                "args": spec.argv,
                "env": [f"{k}={v}" for k, v in spec.env.items()],
                "cwd": "/",
                "capabilities": {k: caps for k in ("bounding", "effective", "permitted", "inheritable")},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576}],
            },
            "root": {"path": str(spec.rootfs), "readonly": False},
            "hostname": spec.hostname,
            "mounts": mounts,
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                               {"type": "network", "path": spec.netns_path}],
                "resources": resources(spec),
            },
        }


def resources(spec: RuntimeSpec) -> dict:
    """Memory limit and CPU quota. runsc (cgroups v1 hybrid here) puts the sandbox and gofer in a
    cgroup named after the sandbox id, applies these to it, tells the guest the memory size
    (``--total-memory``) and removes the cgroup on delete. The guest still sees the host's CPU
    count (``--cpu-num-from-quota`` would round it up to at least 2)."""
    period = 100_000
    return {"memory": {"limit": spec.memory_mb * 1024 * 1024},
            "cpu": {"quota": spec.cpu_count * period, "period": period}}


def build_statx_shim(lib_dir: Path) -> Path | None:
    """Compile the statx shim once per source version; None (and a warning) without a compiler."""
    lib_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(SHIM_SOURCE.read_bytes()).hexdigest()[:12]
    so = lib_dir / f"statx-{digest}.so"
    preload = so.with_suffix(".preload")
    if not so.exists():
        tmp = so.with_suffix(".tmp")
        try:
            proc = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-nostdlib", "-o", str(tmp), str(SHIM_SOURCE)],
                                  capture_output=True, text=True)
            error = proc.stderr.strip() if proc.returncode != 0 else ""
        except FileNotFoundError:
            error = "gcc not found"
        if error:
            log.warning("statx shim not built (ls -l/stat will fail in sandboxes): %s", error)
            return None
        os.rename(tmp, so)
    if not preload.exists():
        preload.write_text(SHIM_IN_SANDBOX + "\n")
    return so


def write_sudo_wrapper(lib_dir: Path) -> Path:
    """The ``sudo`` gVisor sandboxes get first on PATH: root runs the real sudo directly, anyone
    else asks envd through the bundle's own python (present in every template)."""
    client = " ".join(shlex.quote(a) for a in python_argv("-m", "sandboxd.envd.sudo_client"))
    text = ("#!/bin/sh\n"
            "# gVisor sets no_new_privs on every process, so setuid sudo cannot work: ask envd.\n"
            f'[ "$(id -u)" = 0 ] && exec {SUDO} "$@"\n'
            f'exec {client} "$@"\n')
    lib_dir.mkdir(parents=True, exist_ok=True)
    path = lib_dir / f"sudo-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.rename(tmp, path)
    return path
