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
  ``SlotPool.restore_guest_address`` first;
- the root is the gofer's view of the host overlay (``--overlay2=none``): writes reach the
  sandbox's own disk on the host, where its size limit holds and its files outlive the runsc
  sandbox. gVisor's in-sandbox overlay would keep them in an unlinked file that dies with it,
  and this release kills the sandbox when that file cannot grow;
- ``runsc checkpoint`` of a sandbox has been seen to fail with envd waiting on its socket
  ("endpoint still has waiters upon save"), and when it does succeed (measured: 0.5 s, 6.5 MB,
  ``runsc restore`` 0.7 s, processes, ``/dev/shm`` and envd's listening socket all back) the
  restored sandbox answers no packet from its slot; so pausing with memory is ``runsc pause``
  (tasks stopped in place, memory kept in RAM), which takes ~30 ms each way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandboxd.envd.contract import SUDO, python_argv
from sandboxd.errors import RootfsGuardError
from sandboxd.runtimes.base import CONSOLE_LOG, RuntimeSpec, RuntimeStartError, console_tail

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

    def __init__(self, state_dir: Path, platform: str = "auto", template_root: Path | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._platform = platform
        self.template_root = Path(template_root).resolve() if template_root else None
        raise_pid_max()
        self._shim: Path | bool | None = False  # False: not resolved yet
        self.sudo_wrapper = write_sudo_wrapper(self.state_dir.parent / "lib")

    # -- runsc ---------------------------------------------------------------------------------

    @property
    def platform(self) -> str:
        """The platform runsc runs with: the configured one, or (``auto``) the probed one,
        resolved on first use (so making a runtime stays cheap)."""
        if self._platform == "auto":
            self._platform = choose_platform()
        return self._platform

    @property
    def shim(self) -> Path | None:
        """The statx shim to preload, if this runsc needs it (probed with the platform, on
        first use)."""
        if self._shim is False:
            self._shim = statx_shim_for(self.state_dir.parent / "lib", self.platform)
        return self._shim if isinstance(self._shim, Path) else None

    def _flags(self) -> list[str]:
        return ["runsc", "--root", str(self.state_dir), f"--platform={self.platform}", "--network=sandbox",
                "--overlay2=none"]

    def _runsc(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self._flags(), *args], capture_output=True, text=True, check=check)

    # -- Runtime -------------------------------------------------------------------------------

    def start(self, spec: RuntimeSpec) -> None:
        self._guard(spec.rootfs)
        tmp = spec.rootfs / "tmp"
        if not os.path.lexists(tmp):
            tmp.mkdir()
            tmp.chmod(0o1777)
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
        try:
            self._set_host_memory_limit(spec.sandbox_id, host_memory_limit_mb(spec.memory_mb))
        except OSError as exc:
            self.stop(spec.sandbox_id)
            raise RuntimeStartError(f"cannot set the host memory limit of the sandbox: {exc}") from exc

    def _set_host_memory_limit(self, sandbox_id: str, limit_mb: int) -> None:
        """Raise the host cgroup's limit above the guest's memory size (which runsc took from the
        same OCI limit at create, and keeps): the sentry and gofer need memory of their own, and
        the guest's OOM guard (envd) must act before the host's OOM killer ends the sandbox."""
        state = json.loads(self._runsc("state", sandbox_id).stdout or "{}")
        path = memory_cgroup_limit_file(int(state.get("pid", 0)))
        path.write_text(str(limit_mb * 1024 * 1024))

    def freeze(self, sandbox_id: str) -> None:
        """Stop every task of the sandbox where it is (memory, files, sockets kept); ~30 ms."""
        res = self._runsc("pause", sandbox_id)
        if res.returncode != 0:
            raise RuntimeError(f"runsc pause failed: {(res.stderr or res.stdout).strip()[-500:]}")

    def thaw(self, sandbox_id: str) -> None:
        """Let a frozen sandbox's tasks run on."""
        res = self._runsc("resume", sandbox_id)
        if res.returncode != 0:
            raise RuntimeError(f"runsc resume failed: {(res.stderr or res.stdout).strip()[-500:]}")

    def stop(self, sandbox_id: str) -> None:
        """Kill the sandbox's host processes, then let runsc delete its state; verified.

        runsc alone is not enough under load: concurrent runsc calls on one root contend for its
        lock, and a failed ``delete`` must never let teardown go on to unmount a rootfs under a
        sandbox that still runs. A frozen sandbox is thawed first: this runsc's ``delete``
        panics on a paused container ("invalid state transition: paused => stopped")."""
        if self._status(sandbox_id) == "paused":
            self._runsc("resume", sandbox_id)
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

    def _status(self, sandbox_id: str) -> str | None:
        """runsc's status of one container, read from its state file (no runsc process: this is
        on every stop's path, and concurrent runsc calls contend for the root's lock)."""
        for path in self.state_dir.glob(f"*:{sandbox_id}.state"):  # "<sandbox>_sandbox:<id>.state"
            with contextlib.suppress(OSError, ValueError):
                return json.loads(path.read_text()).get("status")
        return None

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
        """Containers runsc knows, in any state (so recovery can delete stale ones too)."""
        return set(self.states())

    def states(self) -> dict[str, str]:
        """Container id → runsc status (``running``, ``paused``, ``created``, ``stopped``). Raises
        if runsc cannot tell: recovery must never mistake "could not list" for "none are
        running" and tear live sandboxes down."""
        res = self._runsc("list", "-format=json")
        if res.returncode != 0:
            raise RuntimeError(f"runsc list failed: {res.stderr.strip()[-500:]}")
        return {c["id"]: c["status"] for c in json.loads(res.stdout or "[]") or []}

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
            raise RootfsGuardError(f"refusing to run a sandbox directly on template storage: {real}")
        if not os.path.ismount(real):
            raise RootfsGuardError(f"sandbox rootfs {real} is not a mount point (expected its overlay)")

    def oci_config(self, spec: RuntimeSpec) -> dict[str, Any]:
        return oci_config(spec, self.shim, self.sudo_wrapper)


def oci_config(spec: RuntimeSpec, shim: Path | None, sudo_wrapper: Path | None) -> dict[str, Any]:
    """The OCI config of a gVisor container over ``spec.rootfs``: a sandbox's (with the sudo
    wrapper) and a template build's RUN step's (without: there is no envd to ask)."""
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        # sized like Linux's (half the memory): it lives in the sandbox's memory
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "nodev", "mode=1777", f"size={spec.memory_mb // 2}m"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]
    tmp = spec.rootfs / "tmp"
    if tmp.is_dir() and not tmp.is_symlink():  # a symlink would be followed on the host
        # /tmp on the sandbox's disk, as in a VM: left alone, runsc mounts an unbounded tmpfs
        # there (in memory, lost on a disk-only pause, outside the disk limit)
        mounts.append({"destination": "/tmp", "type": "bind", "source": str(tmp), "options": ["rbind", "rw"]})
    if shim is not None:
        mounts += [
            {"destination": SHIM_IN_SANDBOX, "type": "bind", "source": str(shim), "options": ["rbind", "ro"]},
            {"destination": "/etc/ld.so.preload", "type": "bind", "source": str(shim.with_suffix(".preload")),
             "options": ["rbind", "ro"]},
        ]
    if sudo_wrapper is not None:
        mounts.append({"destination": SUDO_WRAPPER_IN_SANDBOX, "type": "bind", "source": str(sudo_wrapper),
                       "options": ["rbind", "ro"]})
    mounts += [{"destination": inside, "type": "bind", "source": str(host), "options": ["rbind", "rw"]}
               for host, inside in spec.binds]  # volumes: writes go straight to the host directory
    caps = list(_CAPS)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": spec.argv,
            "env": [f"{k}={v}" for k, v in spec.env.items()],
            "cwd": "/",
            "capabilities": dict.fromkeys(("bounding", "effective", "permitted", "inheritable"), caps),
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576},
                        # every process inherits it; root is exempt (CAP_SYS_RESOURCE)
                        {"type": "RLIMIT_NPROC", "hard": spec.max_processes, "soft": spec.max_processes}],
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


#: Host tasks a guest process costs under ptrace: its stub process and threads (measured: ~5 for
#: a forked python, ~9 for a fork+exec of ``sleep``; guest threads cost next to nothing). Sizes
#: the host's pids limit of a sandbox, with room to spare so the guest's own limit acts first.
HOST_TASKS_PER_PROCESS = 12
HOST_TASKS_BASE = 512  # envd, tini and gVisor's own (~70 idle)


def resources(spec: RuntimeSpec) -> dict[str, Any]:
    """Memory, CPU and task limits of the sandbox's host cgroup (runsc puts its sandbox and gofer
    processes in a cgroup named after the sandbox id and removes it on delete).

    - memory: runsc tells the guest this size (``MemTotal``) at create; :meth:`GVisorRuntime.start`
      then raises the host limit to :func:`host_memory_limit_mb` (see there);
    - cpu: a CFS quota of ``cpu_count`` CPUs. The guest still sees the host's CPU count
      (``--cpu-num-from-quota`` would round it up to at least 2);
    - pids: a backstop against a fork bomb run as root, whom the guest's RLIMIT_NPROC does not
      bind; reaching it ends the sandbox (gVisor cannot make its stub processes), never the host.
    """
    period = 100_000
    return {"memory": {"limit": spec.memory_mb * 1024 * 1024},
            "cpu": {"quota": spec.cpu_count * period, "period": period},
            "pids": {"limit": spec.max_processes * HOST_TASKS_PER_PROCESS + HOST_TASKS_BASE}}


def host_memory_limit_mb(memory_mb: int) -> int:
    """The host's limit for a sandbox whose guest has ``memory_mb``: gVisor's own memory (sentry,
    page tables, gofer: ~40 MiB idle) on top, plus room for the guest to overshoot its size in
    the moment before its OOM guard kills the biggest process. Only a sandbox that outruns its
    guard (or a root fork bomb) meets this limit, and the host's OOM killer ends it."""
    return memory_mb + max(192, memory_mb // 4)


#: Platforms ``auto`` tries, fastest first (kvm is left out: it hangs under nested virtualization).
AUTO_PLATFORMS = ("systrap", "ptrace")
_chosen: dict[str, str] = {}
_probed: dict[str, PlatformProbe] = {}
_choose_lock = threading.Lock()

#: What the probe runs in a sandbox: coreutils' ``stat`` (statx with AT_NO_AUTOMOUNT, which
#: Debian's 2022 runsc refuses), then a marker that says the sandbox itself ran.
_PROBE_SCRIPT = "/usr/bin/stat -c %n / >/dev/null 2>&1; echo sandboxd-probe statx=$?"


@dataclass(frozen=True)
class PlatformProbe:
    """One ``runsc do`` on a platform: why the platform fails (None: it runs), and whether
    that runsc refuses ``statx(AT_NO_AUTOMOUNT)`` (then every exec needs the statx shim)."""

    failure: str | None
    statx_refused: bool = False


def probe_platform(platform: str, timeout_s: float = 20.0) -> PlatformProbe:
    """The platform's probe, run once per process (~0.6 s) for both questions: one runsc start
    instead of one per question."""
    with _choose_lock:
        if platform not in _probed:
            _probed[platform] = _run_probe(platform, timeout_s)
        return _probed[platform]


def choose_platform(candidates: tuple[str, ...] = AUTO_PLATFORMS, timeout_s: float = 20.0) -> str:
    """The first platform in ``candidates`` on which a probe sandbox runs, chosen once per
    process and logged. A runsc too old for systrap ("unknown platform") falls through to ptrace."""
    key = ",".join(candidates)
    if key in _chosen:
        return _chosen[key]
    failures: list[str] = []
    for platform in candidates:
        why = probe_platform(platform, timeout_s).failure
        if why is None:
            with _choose_lock:
                if key not in _chosen:
                    log.info("gVisor platform: %s (probed; %s)", platform,
                             "; ".join(failures) if failures else "the fastest candidate")
                    _chosen[key] = platform
                return _chosen[key]
        failures.append(f"{platform} failed: {why}")
    raise RuntimeError("no gVisor platform works here: " + "; ".join(failures))


def platform_failure(platform: str, timeout_s: float = 20.0) -> str | None:
    """Why a sandbox does not run on ``platform`` here, or None if it runs."""
    return probe_platform(platform, timeout_s).failure


def _run_probe(platform: str, timeout_s: float) -> PlatformProbe:
    with tempfile.TemporaryDirectory(prefix="sandboxd-probe-") as root:
        try:
            proc = subprocess.Popen(["runsc", "--root", root, f"--platform={platform}", "--network=none",
                                     "do", "/bin/sh", "-c", _PROBE_SCRIPT], cwd="/", stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except FileNotFoundError:
            return PlatformProbe("runsc not found")
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return PlatformProbe(f"no answer within {timeout_s:.0f}s")
    marker = re.search(rb"sandboxd-probe statx=(\d+)", out)
    if proc.returncode != 0 or marker is None:
        lines = err.decode(errors="replace").strip().splitlines()
        return PlatformProbe(f"exit code {proc.returncode}: {lines[-1] if lines else ''}"[:300])
    return PlatformProbe(None, statx_refused=marker.group(1) != b"0")


#: What systemd sets on 64-bit hosts; Linux's own default is 32768.
PID_MAX = 4_194_304


def raise_pid_max(path: Path = Path("/proc/sys/kernel/pid_max")) -> None:
    """ptrace gVisor spends 5-9 host tasks on every guest process: at Linux's default pid_max a
    few sandboxes at their process limit would leave the host unable to fork. Raise it (never
    lower it) to what systemd sets."""
    try:
        current = int(path.read_text())
        if current < PID_MAX:
            path.write_text(str(PID_MAX))
            log.info("raised kernel.pid_max from %d to %d (gVisor's host tasks)", current, PID_MAX)
    except (OSError, ValueError) as exc:
        log.warning("cannot raise kernel.pid_max: %s", exc)


def memory_cgroup_limit_file(pid: int) -> Path:
    """The memory limit file of ``pid``'s cgroup: v1 (``memory.limit_in_bytes``) or v2 (``memory.max``)."""
    if pid <= 0:
        raise OSError("the sandbox has no process")
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory", path.lstrip("/"), "memory.limit_in_bytes")
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return Path("/sys/fs/cgroup", path.lstrip("/"), "memory.max")
    raise OSError(f"no memory cgroup for pid {pid}")


_statx_logged: set[str] = set()


def statx_shim_for(lib_dir: Path, platform: str) -> Path | None:
    """The statx shim if this runsc refuses ``statx(AT_NO_AUTOMOUNT)`` (Debian's 2022 runsc),
    else None: the 2024 runsc answers it, and a preloaded library costs every exec in a sandbox
    1-1.5 ms and hides a template's own /etc/ld.so.preload. Known from the platform's probe."""
    probe = probe_platform(platform)
    if probe.failure is not None:
        raise RuntimeError(f"gVisor platform {platform} does not run here: {probe.failure}")
    if platform not in _statx_logged:
        _statx_logged.add(platform)
        log.info("statx shim: %s", "preloaded (runsc refuses statx with AT_NO_AUTOMOUNT)" if probe.statx_refused
                 else "not needed (runsc answers statx as Linux does)")
    return build_statx_shim(lib_dir) if probe.statx_refused else None


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
