"""The microVM runtime: one QEMU process per sandbox, booting Debian's cloud kernel with our
initramfs, its root disk served by the sandbox's NBD export (copy-on-write over the template).

Seed 004's bug was a VMM configured with the template's own file, kept in a second, confusingly
named field. Here it cannot happen by construction:
- :class:`VmConfig` has exactly one field naming a disk, ``rootfs``, and it must be a unix
  socket — the export of :class:`~sandboxd.nbd.provider.NbdRootfsProvider`. A template image is
  a regular file, so it is refused before QEMU is ever started;
- the runtime also refuses any path inside the template store or the image cache;
- :func:`qemu_argv` is the only place a QEMU command line is made, and it puts ``rootfs`` into the
  only ``-blockdev``; tests read every started VM's command line and QMP block graph back.

Other choices, each for a measured reason (architecture.md):
- ``microvm`` machine by default (``pc`` selectable): no PCI or firmware to emulate; the
  uncompressed kernel boots through its PVH entry; ``tsc_early_khz`` skips TSC calibration, which
  under TCG hangs boots half the time;
- KVM only when a boot probe proves it works (:mod:`sandboxd.runtimes.accel`), TCG otherwise;
- serial console → ``<sandbox_dir>/console.log`` (append): the init script, the kernel's errors
  and envd's own output all land there, visible from outside the VM (seed 000);
- QEMU runs in the slot's guest network namespace with a tap bridged to ``eth0``
  (:mod:`sandboxd.runtimes.vmnet`); QMP on ``<sandbox_dir>/qmp.sock`` stops and snapshots it;
- snapshots are QEMU migration streams written to a file, restored with ``-incoming``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sandboxd.errors import RootfsGuardError
from sandboxd.proc import pid_alive
from sandboxd.runtimes import vmnet
from sandboxd.runtimes.accel import detect_accel
from sandboxd.runtimes.base import CONSOLE_LOG, RuntimeSpec, RuntimeStartError, console_tail
from sandboxd.runtimes.guest import GuestArtifacts
from sandboxd.runtimes.guest.initramfs import encode_spec
from sandboxd.runtimes.qmp import Qmp, QmpError

log = logging.getLogger("sandboxd.runtimes.microvm")

QEMU = "qemu-system-x86_64"
MACHINES = ("microvm", "pc")
QMP_SOCKET = "qmp.sock"
QEMU_LOG = "qemu.log"
MEMORY_FILE = "memory.bin"
VM_FILE = "vm.json"
START_TIMEOUT_S = 15.0
SNAPSHOT_TIMEOUT_S = 120.0


def check_rootfs(path: Path, forbidden_roots: Iterable[Path] = ()) -> None:
    """Guarantee 2 / seed 004: only an NBD export socket may become a VM's disk."""
    real = Path(path).resolve()
    for root in forbidden_roots:
        root = Path(root).resolve()
        if real == root or root in real.parents:
            raise RootfsGuardError(f"refusing to give a VM template storage as its disk: {real}")
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        raise RootfsGuardError(f"rootfs {path} does not exist: {exc}") from None
    if not stat.S_ISSOCK(mode):
        raise RootfsGuardError(f"rootfs {path} is not an NBD export socket (a template image file?); "
                               "VMs only get the rootfs provider's export")


@dataclass(frozen=True)
class VmConfig:
    """Everything one QEMU process is started with. ``rootfs`` is the *only* disk field."""

    name: str
    rootfs: Path  # the sandbox's NBD export (unix socket of the rootfs provider)
    kernel: Path
    initrd: Path
    cmdline: str
    console_log: Path
    qmp_socket: Path
    cpus: int = 1
    memory_mb: int = 512
    machine: str = "microvm"
    accel: str = "tcg"
    incoming: Path | None = None  # a memory snapshot to resume instead of booting

    def __post_init__(self) -> None:
        if self.machine not in MACHINES:
            raise ValueError(f"machine must be one of {MACHINES}")
        if self.accel not in ("kvm", "tcg"):
            raise ValueError("accel must be kvm or tcg")
        check_rootfs(self.rootfs)


def _device(machine: str, kind: str) -> str:
    """virtio over MMIO on microvm, over PCI on pc."""
    return f"virtio-{kind}-{'device' if machine == 'microvm' else 'pci'}"


def qemu_argv(cfg: VmConfig, qemu: str = QEMU) -> list[str]:
    """The QEMU command line of ``cfg`` (the only place one is made)."""
    root = {"driver": "raw", "node-name": "rootfs", "discard": "unmap",
            "file": {"driver": "nbd", "server": {"type": "unix", "path": str(cfg.rootfs)},
                     "reconnect-delay": 30}}
    machine = "microvm,x-option-roms=off,rtc=on" if cfg.machine == "microvm" else "pc"
    argv = [
        qemu, "-name", f"guest=sandboxd-{cfg.name}", "-M", machine, "-accel", cfg.accel,
        "-cpu", "host" if cfg.accel == "kvm" else "max", "-smp", str(cfg.cpus), "-m", str(cfg.memory_mb),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(cfg.kernel), "-initrd", str(cfg.initrd), "-append", cfg.cmdline,
        "-chardev", f"file,id=console,path={cfg.console_log},append=on", "-serial", "chardev:console",
        "-blockdev", json.dumps(root, separators=(",", ":")),
        "-device", f"{_device(cfg.machine, 'blk')},drive=rootfs",
        "-netdev", f"tap,id=net0,ifname={vmnet.TAP},script=no,downscript=no",
        "-device", f"{_device(cfg.machine, 'net')},netdev=net0,mac={vmnet.GUEST_MAC}",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", f"{_device(cfg.machine, 'rng')},rng=rng0",
        "-qmp", f"unix:{cfg.qmp_socket},server=on,wait=off",
    ]
    if cfg.incoming is not None:
        argv += ["-incoming", f"exec:cat {shlex.quote(str(cfg.incoming))}"]
    return argv


def host_tsc_khz() -> int:
    """The host's TSC rate (TCG guests see the host TSC), for ``tsc_early_khz``."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return 0


def kernel_cmdline(spec: RuntimeSpec, machine: str) -> str:
    parts = ["console=ttyS0", "panic=-1", "reboot=t", "quiet", "i8042.noaux", "i8042.nomux", "i8042.dumbkbd"]
    if machine == "microvm" and (khz := host_tsc_khz()):
        parts.append(f"tsc_early_khz={khz}")
    parts.append("sandboxd.spec=" + encode_spec(spec.argv, spec.env, spec.hostname))
    return " ".join(parts)


@dataclass(frozen=True)
class Snapshot:
    """A VM's memory and device state on disk; its disk state is the rootfs provider's business."""

    path: Path
    seconds: float
    bytes: int


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


class MicroVMRuntime:
    """Sandboxes as QEMU VMs. ``state_dir`` holds one ``<id>.json`` per VM (pid, paths), so a
    restarted server finds its VMs again; ``forbidden_roots`` (template store, image cache) can
    never be a VM's disk."""

    name = "microvm"

    def __init__(self, state_dir: Path, guest: GuestArtifacts, accel: str = "auto", machine: str = "microvm",
                 forbidden_roots: Iterable[Path] = (), qemu: str = QEMU) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.guest = guest
        self.machine = machine
        self.qemu = qemu
        self.forbidden_roots = [Path(r) for r in forbidden_roots]
        self.accel = detect_accel(guest, self.state_dir / "accel.json", qemu) if accel == "auto" else accel
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # -- Runtime -------------------------------------------------------------------------------

    def start(self, spec: RuntimeSpec) -> None:
        """Boot the VM; return once QEMU runs it (envd answers a few seconds later)."""
        cfg = self._config(spec, kernel_cmdline(spec, self.machine), self.machine, self.accel,
                           spec.cpu_count, spec.memory_mb, self.guest.kernel, self.guest.initrd)
        self._launch(spec, cfg)

    def stop(self, sandbox_id: str) -> None:
        """Kill QEMU, restore the slot's network, forget the VM; idempotent."""
        state = self._state(sandbox_id)
        pid = state.get("pid")
        if pid and self._is_ours(pid, sandbox_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if pid_alive(pid):
                raise RuntimeError(f"QEMU of {sandbox_id} (pid {pid}) survives SIGKILL")
        if (child := self._children.pop(sandbox_id, None)) is not None:
            child.wait()
        if state.get("netns_path"):
            vmnet.unplumb(state["netns_path"])
        if state.get("qmp_socket"):
            Path(state["qmp_socket"]).unlink(missing_ok=True)
        (self.state_dir / f"{sandbox_id}.json").unlink(missing_ok=True)

    def states(self) -> dict[str, str]:
        """A VM that runs is running; a paused one was snapshotted and its QEMU has ended."""
        return dict.fromkeys(self.running(), "running")

    def running(self) -> set[str]:
        ids = set()
        for f in self.state_dir.glob("*.json"):
            if f.name == "accel.json":
                continue
            pid = self._state(f.stem).get("pid")
            if pid and self._is_ours(pid, f.stem):
                ids.add(f.stem)
        return ids

    def console_log(self, sandbox_dir: Path) -> str:
        return console_tail(sandbox_dir)

    # -- snapshots -----------------------------------------------------------------------------

    def snapshot(self, sandbox_id: str, snapshot_dir: Path, resume: bool = False,
                 while_stopped: Callable[[], None] | None = None) -> Snapshot:
        """Pause the VM and write its state to ``snapshot_dir/memory.bin`` (+ ``vm.json``).

        The VM stays paused unless ``resume``; its disk writes are flushed to the export first
        (QEMU drains and flushes block devices when migration completes). ``while_stopped`` runs
        after that, before the VM goes on: a copy of its disk then matches the memory saved.
        A failed snapshot (or ``while_stopped``) leaves the VM running, as it was."""
        snapshot_dir = Path(snapshot_dir)
        snapshot_dir.mkdir(parents=True, exist_ok=True)
        target = snapshot_dir / MEMORY_FILE
        target.unlink(missing_ok=True)  # a new file: a restored copy may share the old one's inode
        started = time.monotonic()
        with self.qmp(sandbox_id) as qmp:
            qmp.execute("stop")
            done = False
            try:
                qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
                qmp.execute("migrate", uri=f"exec:cat > {shlex.quote(str(target))}")
                self._wait_migration(qmp)
                if while_stopped is not None:
                    while_stopped()
                done = True
            finally:
                if resume or not done:  # a failed snapshot leaves the VM running, as it was
                    qmp.execute("cont")
        seconds = time.monotonic() - started
        (snapshot_dir / VM_FILE).write_text(json.dumps(self._state(sandbox_id)["vm"], indent=1))
        return Snapshot(path=snapshot_dir, seconds=seconds, bytes=target.stat().st_size)

    @contextlib.contextmanager
    def stopped(self, sandbox_id: str) -> Iterator[None]:
        """The VM's CPUs stopped (QEMU drains and flushes its disk first), then going on again:
        a copy of its disk made meanwhile is consistent."""
        with self.qmp(sandbox_id) as qmp:
            qmp.execute("stop")
            try:
                yield
            finally:
                qmp.execute("cont")

    def pause(self, sandbox_id: str, snapshot_dir: Path) -> Snapshot:
        """Snapshot, then stop the VM (the sandbox's export stays allocated for :meth:`restore`)."""
        snap = self.snapshot(sandbox_id, snapshot_dir)
        self.stop(sandbox_id)
        return snap

    def restore(self, spec: RuntimeSpec, snapshot_dir: Path) -> float:
        """Start ``spec``'s VM from a snapshot instead of booting; returns the seconds until it
        runs. ``spec.rootfs`` must hold the disk state the snapshot was taken with (the paused
        sandbox's own export, or a clone of a template snapshot's)."""
        vm = json.loads((Path(snapshot_dir) / VM_FILE).read_text())
        cfg = self._config(spec, vm["cmdline"], vm["machine"], vm["accel"], vm["cpus"], vm["memory_mb"],
                           Path(vm["kernel"]), Path(vm["initrd"]), incoming=Path(snapshot_dir) / MEMORY_FILE)
        started = time.monotonic()
        self._launch(spec, cfg)
        deadline = time.monotonic() + START_TIMEOUT_S
        with self.qmp(spec.sandbox_id) as qmp:
            while (status := qmp.execute("query-status")["status"]) != "running":
                if status == "paused":  # snapshots are taken paused, and QEMU keeps that state
                    qmp.execute("cont")
                    continue
                if status != "inmigrate" or time.monotonic() > deadline:
                    self.stop(spec.sandbox_id)
                    raise RuntimeStartError(f"restore of {spec.sandbox_id} failed (VM {status})", self._why(spec))
                time.sleep(0.005)
        return time.monotonic() - started

    # -- inspection (tests, diagnostics) -------------------------------------------------------

    def qmp(self, sandbox_id: str) -> Qmp:
        return Qmp(Path(self._state(sandbox_id)["qmp_socket"]))

    def command_line(self, sandbox_id: str) -> list[str]:
        """The running QEMU's argv as the kernel reports it (not as we meant to start it)."""
        return _cmdline(self._state(sandbox_id).get("pid", 0))

    def pid(self, sandbox_id: str) -> int | None:
        return self._state(sandbox_id).get("pid")

    # -- internals -----------------------------------------------------------------------------

    def _config(self, spec: RuntimeSpec, cmdline: str, machine: str, accel: str, cpus: int, memory_mb: int,
                kernel: Path, initrd: Path, incoming: Path | None = None) -> VmConfig:
        check_rootfs(spec.rootfs, self.forbidden_roots)
        return VmConfig(name=spec.sandbox_id, rootfs=Path(spec.rootfs), kernel=kernel, initrd=initrd,
                        cmdline=cmdline, console_log=spec.sandbox_dir / CONSOLE_LOG,
                        qmp_socket=spec.sandbox_dir / QMP_SOCKET, cpus=cpus, memory_mb=memory_mb,
                        machine=machine, accel=accel, incoming=incoming)

    def _launch(self, spec: RuntimeSpec, cfg: VmConfig) -> None:
        """Spawn QEMU in the slot's namespace and wait until its QMP answers; on any failure
        undo everything (network, process, state) and raise with QEMU's and the console's output."""
        if (pid := self._state(spec.sandbox_id).get("pid")) and self._is_ours(pid, spec.sandbox_id):
            raise RuntimeStartError(f"{spec.sandbox_id} is already running")
        self.stop(spec.sandbox_id)  # what a crashed VM of this id left behind, if anything
        spec.sandbox_dir.mkdir(parents=True, exist_ok=True)
        cfg.qmp_socket.unlink(missing_ok=True)
        self._write_state(spec.sandbox_id, {"netns_path": spec.netns_path, "qmp_socket": str(cfg.qmp_socket)})
        try:
            vmnet.plumb(spec.netns_path)
            proc = self._spawn(spec, cfg)
            Qmp.connect(cfg.qmp_socket, time.monotonic() + START_TIMEOUT_S, lambda: proc.poll() is None).close()
        except (OSError, QmpError, vmnet.VmNetError) as exc:
            why = self._why(spec)
            self.stop(spec.sandbox_id)
            raise RuntimeStartError(f"QEMU for {spec.sandbox_id} did not start ({exc}):\n{why}", why) from None

    def _spawn(self, spec: RuntimeSpec, cfg: VmConfig) -> subprocess.Popen[bytes]:
        argv = ["nsenter", f"--net={spec.netns_path}", "--", *qemu_argv(cfg, self.qemu)]
        with open(spec.sandbox_dir / QEMU_LOG, "ab") as qlog:
            # own session: a Ctrl-C or kill of the server's process group must not reach VMs
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog,
                                    start_new_session=True)
        self._children[spec.sandbox_id] = proc
        vm = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()
              if k not in ("name", "rootfs", "console_log", "qmp_socket", "incoming")}
        self._write_state(spec.sandbox_id, {"pid": proc.pid, "sandbox_dir": str(spec.sandbox_dir),
                                            "netns_path": spec.netns_path, "qmp_socket": str(cfg.qmp_socket),
                                            "rootfs": str(cfg.rootfs), "vm": vm})
        return proc

    def _why(self, spec: RuntimeSpec) -> str:
        qlog = spec.sandbox_dir / QEMU_LOG
        text = qlog.read_text(errors="replace")[-4000:] if qlog.exists() else ""
        return f"{text}\n--- console ---\n{console_tail(spec.sandbox_dir)}"

    def _state(self, sandbox_id: str) -> dict[str, Any]:
        try:
            return json.loads((self.state_dir / f"{sandbox_id}.json").read_text())
        except (OSError, ValueError):
            return {}

    def _write_state(self, sandbox_id: str, state: dict[str, Any]) -> None:
        tmp = self.state_dir / f".{sandbox_id}.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_dir / f"{sandbox_id}.json")

    @staticmethod
    def _is_ours(pid: int, sandbox_id: str) -> bool:
        """The pid is alive and still the QEMU of this sandbox (pids get reused)."""
        return pid_alive(pid) and f"guest=sandboxd-{sandbox_id}" in _cmdline(pid)

    @staticmethod
    def _wait_migration(qmp: Qmp) -> None:
        deadline = time.monotonic() + SNAPSHOT_TIMEOUT_S
        while True:
            info = qmp.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"snapshot failed: {info.get('error-desc', status)}")
            time.sleep(0.005)
