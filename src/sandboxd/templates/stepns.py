"""Carry out one build step on a stack of layers, inside throw-away namespaces.

Why a separate process: every step mounts an overlay (the parent layers read-only below, the new
layer's directory as ``upperdir``), so whatever the step writes *is* the new layer, whiteouts and
all. The mounts live in a private mount namespace (``unshare``), the process in private PID, IPC,
UTS and network namespaces, so when the step ends, however it ends, its mounts and every process
it started are gone: nothing leaks into the host or into the next step.

RUN (:func:`op_run`) runs the build's own command, so never on the host: in a gVisor container
over the overlay, its upper on a size-capped disk, in a network slot of its own (what it can
reach and use: :mod:`sandboxd.templates.contained`). COPY/WORKDIR/USER/provision/flatten are a
few file operations by this module's own code, chrooted into the merged tree, so an absolute
symlink in an image can never make a write land on the host; no command of the image runs.

Parent side: :func:`run_step`. Inside: ``python -m sandboxd.templates.stepns '<json>'``.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sandboxd.envd.contract import DEFAULT_PATH
from sandboxd.errors import StartError
from sandboxd.orchestrator.disk import make_disk

#: The host's CA bundle is a RUN step's trust store (bound read-only over the image's own for the
#: step only, never part of a layer): builds reach PyPI, npm and mirrors wherever the host does,
#: including through a TLS-inspecting egress proxy whose CA only the host trusts.
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
_OVERLAY_OPTS = "redirect_dir=off,index=off,metacopy=off"  # uppers stay plain, portable layers
#: Where runsc mounts something in a RUN step's root: made there (in the upper) if missing, so
#: removed again after the step unless the step made it its own (see :func:`_drop_mount_points`).
_MOUNT_POINTS = ("/proc", "/dev", "/sys", "/tmp", "/opt/sandboxd-rt/statx.so", "/etc/ld.so.preload", CA_BUNDLE)


@dataclass(frozen=True)
class StepResult:
    returncode: int
    tail: list[str]


# ---------------------------------------------------------------------------------------------
# Parent side.


def run_step(spec: dict[str, Any], on_line: Callable[[str], None], timeout: float = 3600) -> StepResult:
    """Run one op (see ``_OPS``) in fresh mount/PID/IPC/UTS/network namespaces; stream its output
    lines to ``on_line``; return the exit code and the last 40 lines."""
    cmd = ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--ipc", "--uts", "--net",
           "--propagation", "private", "--", sys.executable, "-m", "sandboxd.templates.stepns", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the PID namespace takes everything it started along

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            tail = ([*tail, line])[-40:]
            on_line(line)
        rc = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            kill()
            proc.wait()
    if timed_out.is_set():
        tail.append(f"[step timed out after {timeout:.0f}s]")
        rc = 124
    return StepResult(rc, tail)


# ---------------------------------------------------------------------------------------------
# Inside the namespaces: mounts.


def _sh(*argv: str, cwd: str | None = None) -> None:
    subprocess.run(argv, check=True, cwd=cwd)


def _mount_stack(lowers: list[str], upper: str | None, work: str | None, scratch: str) -> str:
    """Mount the layer stack (``lowers`` top first) at ``scratch/merged``. Lower paths are passed
    as short symlinks (``scratch/l/0``...) so deep stacks fit in one page of mount options."""
    merged = os.path.join(scratch, "merged")
    links = os.path.join(scratch, "l")
    os.makedirs(merged, exist_ok=True)
    os.makedirs(links, exist_ok=True)
    for i, lower in enumerate(lowers):
        os.symlink(lower, os.path.join(links, str(i)))
    names = ":".join(str(i) for i in range(len(lowers)))
    if upper is not None:
        _sh("mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={names},upperdir={upper},workdir={work},{_OVERLAY_OPTS}", merged, cwd=links)
    elif len(lowers) == 1:
        _sh("mount", "--bind", "-o", "ro", lowers[0], merged)
    else:
        _sh("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={names},{_OVERLAY_OPTS}", merged, cwd=links)
    return merged


# ---------------------------------------------------------------------------------------------
# Inside the chroot: users.


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...] = ()


def _read_table(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except FileNotFoundError:
        return []


def _groups_of(name: str, gid: int) -> tuple[int, ...]:
    out = {gid}
    for row in _read_table("/etc/group"):
        if len(row) >= 4 and name in row[3].split(",") and row[2].isdigit():
            out.add(int(row[2]))
    return tuple(sorted(out))


def lookup_user(spec: str) -> Account:
    """``name``, ``uid``, ``name:group`` or ``uid:gid`` → account, from the rootfs's own
    /etc/passwd and /etc/group (never through NSS: that would load the image's libraries)."""
    user, _, group = spec.partition(":")
    account = None
    for row in _read_table("/etc/passwd"):
        if len(row) >= 6 and (row[0] == user or (user.isdigit() and row[2] == user)):
            account = Account(row[0], int(row[2]), int(row[3]), row[5] or "/")
            break
    if account is None:
        if not user.isdigit():
            raise LookupError(f"unknown user {user!r} (not in /etc/passwd)")
        account = Account(user, int(user), int(group) if group.isdigit() else int(user), "/")
    account = Account(account.name, account.uid, account.gid, account.home, _groups_of(account.name, account.gid))
    if group:
        gid = int(group) if group.isdigit() else _group_id(group)
        account = Account(account.name, account.uid, gid, account.home, (gid,))
    return account


def _group_id(name: str) -> int:
    for row in _read_table("/etc/group"):
        if len(row) >= 3 and row[0] == name:
            return int(row[2])
    raise LookupError(f"unknown group {name!r} (not in /etc/group)")


def _append(path: str, line: str) -> None:
    if not os.path.exists(path):
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def ensure_user(name: str, uid: int | None = None, sudo: bool = False) -> bool:
    """Create ``name`` (like ``useradd -m``) unless it exists; True if it was created."""
    if name == "root" or name.isdigit() or any(r[0] == name for r in _read_table("/etc/passwd")):
        return False
    used_uids = {int(r[2]) for r in _read_table("/etc/passwd") if len(r) > 2 and r[2].isdigit()}
    used_gids = {int(r[2]) for r in _read_table("/etc/group") if len(r) > 2 and r[2].isdigit()}
    if uid is None or uid in used_uids or uid in used_gids:
        uid = max([999, *(u for u in used_uids | used_gids if u < 60000)]) + 1
    shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
    home = f"/home/{name}"
    os.makedirs("/etc", exist_ok=True)
    if not os.path.exists("/etc/passwd"):
        open("/etc/passwd", "w").close()
    if not os.path.exists("/etc/group"):
        open("/etc/group", "w").close()
    _append("/etc/passwd", f"{name}:x:{uid}:{uid}::{home}:{shell}")
    _append("/etc/group", f"{name}:x:{uid}:")
    _append("/etc/shadow", f"{name}:!:19000:0:99999:7:::")
    _append("/etc/gshadow", f"{name}:!::")
    os.makedirs(home, mode=0o755, exist_ok=True)
    os.chown(home, uid, uid)
    if sudo and os.path.isdir("/etc/sudoers.d"):
        with open(f"/etc/sudoers.d/{name}", "w") as f:
            f.write(f"{name} ALL=(ALL:ALL) NOPASSWD: ALL\n")
        os.chmod(f"/etc/sudoers.d/{name}", 0o440)
    return True


def _makedirs_owned(path: str, uid: int, gid: int) -> None:
    """``mkdir -p`` where every directory it creates belongs to ``uid:gid``."""
    missing = []
    p = path
    while p not in ("/", "") and not os.path.lexists(p):
        missing.append(p)
        p = posixpath.dirname(p)
    for d in reversed(missing):
        os.mkdir(d, 0o755)
        os.chown(d, uid, gid)
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a directory")


# ---------------------------------------------------------------------------------------------
# Ops (inside the chroot unless noted).


def _enter(root: str) -> None:
    os.chroot(root)
    os.chdir("/")


def op_run(spec: dict[str, Any]) -> int:
    """RUN: the command in a gVisor container whose root is the stack with a fresh upper on a disk
    of ``disk_mb``; on success the upper becomes the layer (``spec["upper"]``)."""
    scratch, limits = spec["scratch"], spec["limits"]
    disk = os.path.join(scratch, "disk")
    image = os.path.join(scratch, "disk.img")
    make_disk(Path(image), limits["disk_mb"])
    os.mkdir(disk)
    _sh("mount", "-t", "ext4", "-o", "loop,nosuid,nodev", image, disk)
    upper, work = os.path.join(disk, "upper"), os.path.join(disk, "work")
    os.mkdir(upper, 0o755)
    os.chmod(upper, 0o755)  # the stack's `/`: never the umask's idea
    os.mkdir(work)
    merged = _mount_stack(spec["lowers"], upper, work, scratch)
    plan = _plan_run(merged, spec)
    if "error" in plan:
        print(plan["error"], flush=True)
        return plan.get("code", 1)
    bundle = os.path.join(scratch, "bundle")
    os.mkdir(bundle)
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(_oci_config(merged, spec, plan), f)
    # runsc refuses --network=sandbox where it sees a root /proc/sys/net (runtimes/gvisor.py)
    _sh("mount", "-t", "tmpfs", "none", "/proc/sys/net")
    cid = spec["container"]
    hits: dict[str, int] = {}
    done = threading.Event()

    def watch() -> None:  # the cgroups are gone once runsc ends: read them while it runs
        while not done.wait(0.1):
            hits.update(limit_hits(cid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    sys.stdout.flush()
    rc = subprocess.run([*spec["runsc"], "run", "--bundle", bundle, cid], stdin=subprocess.DEVNULL,
                        stdout=sys.stdout, stderr=subprocess.STDOUT).returncode
    done.set()
    watcher.join()
    if rc != 0:
        if hits.get("pids"):
            print(f"[build] the step was stopped: it ran more processes than a build step may "
                  f"(build_max_processes={limits['max_processes']}; a fork bomb?)", flush=True)
        elif hits.get("memory"):
            print(f"[build] the step was stopped: it used more memory than a build step may "
                  f"(build_memory_mb={limits['memory_mb']})", flush=True)
        elif disk_full(disk):
            print(f"[build] the step filled its build disk: a step may write at most {limits['disk_mb']} MiB "
                  f"(build_disk_mb)", flush=True)
        return rc
    _drop_mount_points(upper, plan["missing"])
    _sh("cp", "-a", "--", f"{upper}/.", spec["upper"])  # owners, modes, xattrs (opaque dirs), whiteouts, links
    return 0


def _plan_run(merged: str, spec: dict[str, Any]) -> dict[str, Any]:
    """What the container needs to know about the image, read inside it (a forked child
    chrooted into the merged tree: the image's symlinks can never point the reads at the host):
    the step's user, its cwd and shell, whether the image has a CA bundle, and which mount
    points runsc will have to make."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        try:
            _enter(merged)
            state = spec["state"]
            account = lookup_user(spec.get("user") or state["user"])
            cwd = state.get("workdir") or account.home
            shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
            missing = sorted({p for d in _MOUNT_POINTS for p in _ancestors(d) if not os.path.lexists(p)})
            out: dict[str, Any] = {
                "uid": account.uid, "gid": account.gid, "groups": list(account.groups), "name": account.name,
                "home": account.home, "cwd": cwd if os.path.isdir(cwd) else "/", "shell": shell,
                "ca": os.path.isfile(CA_BUNDLE) and not os.path.islink(CA_BUNDLE), "missing": missing}
            if not os.path.exists(shell):
                out = {"error": "RUN needs /bin/sh in the image, and there is none", "code": 127}
        except (OSError, LookupError, ValueError) as exc:
            out = {"error": f"run failed: {type(exc).__name__}: {exc}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    plan: dict[str, Any] = json.loads(data or b'{"error": "run failed: reading the image"}')
    return plan


def _ancestors(path: str) -> list[str]:
    """``/a/b/c`` → ``/a``, ``/a/b``, ``/a/b/c``."""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _oci_config(merged: str, spec: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """A sandbox's OCI config (``runtimes/gvisor.py``) for the step: its command as its user in
    its workdir, the host's CA bundle read-only, limits from the build settings."""
    from sandboxd.runtimes.base import RuntimeSpec
    from sandboxd.runtimes.gvisor import host_memory_limit_mb, oci_config

    limits, state = spec["limits"], spec["state"]
    env = {"PATH": DEFAULT_PATH, "HOME": plan["home"], "USER": plan["name"], "LOGNAME": plan["name"],
           **({"NODE_EXTRA_CA_CERTS": CA_BUNDLE} if plan["ca"] else {}),  # node has its own roots
           **state.get("env", {})}
    rspec = RuntimeSpec(sandbox_id=spec["container"], rootfs=Path(merged), sandbox_dir=Path(spec["scratch"]),
                        netns_path=spec["netns"], argv=[plan["shell"], "-c", spec["cmd"]], env=env,
                        cpu_count=limits["cpu_count"], memory_mb=limits["memory_mb"],
                        max_processes=limits["max_processes"])
    config = oci_config(rspec, Path(spec["shim"]) if spec.get("shim") else None, None)
    process = config["process"]
    process["user"] = {"uid": plan["uid"], "gid": plan["gid"], "additionalGids": plan["groups"]}
    process["cwd"] = plan["cwd"]
    if plan["uid"] != 0:  # a user's step has a user's capabilities, as under Docker
        process["capabilities"] = {"bounding": process["capabilities"]["bounding"]}
    if plan["ca"] and os.path.isfile(CA_BUNDLE):
        config["mounts"].append({"destination": CA_BUNDLE, "type": "bind", "source": CA_BUNDLE,
                                 "options": ["rbind", "ro"]})
    # the sandbox's own guard (envd) is not there to act first: the host cgroup is the limit
    config["linux"]["resources"]["memory"]["limit"] = host_memory_limit_mb(limits["memory_mb"]) * 1024 * 1024
    config["linux"]["resources"]["pids"]["limit"] = limits["host_tasks"]
    config["linux"]["cgroupsPath"] = "/" + spec["container"]
    return config


def _drop_mount_points(upper: str, missing: list[str]) -> None:
    """Remove what runsc made in the upper for its mounts (empty files and directories the image
    did not have), deepest first; anything the step put there itself stays. In a child chrooted
    into the upper: a step that swapped a parent for a symlink (``/etc -> /somewhere``) must not
    point these removals at the host."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            _enter(upper)
            for path in sorted(missing, key=lambda p: p.count("/"), reverse=True):
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
                    if stat.S_ISDIR(st.st_mode):
                        os.rmdir(path)  # only if empty
                    elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                        os.unlink(path)
        except OSError:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise OSError("could not tidy the step's mount points")


def cgroup_dirs(cid: str) -> list[Path]:
    """The host cgroup directories of container ``cid`` (its ``cgroupsPath`` is ``/cid``): one
    per v1 controller, or the one v2 directory."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        return [base / cid] if (base / cid).is_dir() else []
    return [p / cid for p in base.iterdir() if (p / cid).is_dir()] if base.is_dir() else []


def limit_hits(cid: str) -> dict[str, int]:
    """How often the container's host cgroups hit their pids and memory limits so far."""
    hits: dict[str, int] = {}
    for d in cgroup_dirs(cid):
        for name, key, field in (("pids.events", "pids", "max"), ("memory.events", "memory", "oom_kill"),
                                 ("memory.oom_control", "memory", "oom_kill")):
            with contextlib.suppress(OSError, ValueError, IndexError):
                rows = [line.split() for line in (d / name).read_text().splitlines()]
                value = next((int(row[1]) for row in rows if row and row[0] == field), 0)
                hits[key] = max(hits.get(key, 0), value)
    return hits


def disk_full(path: str) -> bool:
    """Whether the filesystem at ``path`` has (next to) no room left."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize < 1024 * 1024


def _copy_base(src: str) -> tuple[str, bool]:
    """The part of a COPY source before its first glob, and whether there was a glob."""
    base: list[str] = []
    for part in posixpath.normpath(src).split("/"):
        if any(c in part for c in "*?["):
            return "/".join(base) or ".", True
        if part not in ("", "."):
            base.append(part)
    return "/".join(base) or ".", False


def plan_copy(members: list[tarfile.TarInfo], src: str, dest: str,
              dest_is_dir: Callable[[str], bool]) -> tuple[list[tuple[tarfile.TarInfo, str]], bool]:
    """Where each uploaded entry goes, and whether ``dest`` is a directory to create. A single
    file goes *to* ``dest`` (or into it, if ``dest`` ends in ``/`` or is a directory); a
    directory or glob source has its *contents* placed under ``dest`` (Docker's and E2B's rule)."""
    base, globbed = _copy_base(src)
    under = [m for m in members if base == "." or m.name == base or m.name.startswith(base + "/")]
    if not under:
        raise FileNotFoundError(f"COPY {src}: no uploaded file matches")
    single = next((m for m in under if m.name == base), None)
    if not globbed and single is not None and not single.isdir():
        into = dest.endswith("/") or dest_is_dir(dest)
        return [(single, posixpath.join(dest, posixpath.basename(base)) if into else dest.rstrip("/") or "/")], False
    out = []
    for m in sorted(under, key=lambda m: m.name):
        if m.name in (base, "."):
            continue
        rel = m.name if base == "." else m.name[len(base) + 1:]
        out.append((m, posixpath.join(dest, rel)))
    return out, True


def _place(tar: tarfile.TarFile, m: tarfile.TarInfo, target: str, owner: Account, mode: int | None) -> None:
    """Write one entry at ``target`` owned by ``owner`` (mode override for files and dirs)."""
    parent = posixpath.dirname(target)
    _makedirs_owned(parent, owner.uid, owner.gid)
    if m.isdir():
        if not os.path.isdir(target):
            if os.path.lexists(target):
                os.unlink(target)
            os.mkdir(target)
        os.chown(target, owner.uid, owner.gid)
        os.chmod(target, mode if mode is not None else m.mode)
        return
    if os.path.isdir(target) and not os.path.islink(target):
        raise IsADirectoryError(f"cannot copy file {m.name} over directory {target}")
    if os.path.lexists(target):
        os.unlink(target)
    if m.issym():
        os.symlink(m.linkname, target)
        os.lchown(target, owner.uid, owner.gid)
        return
    src = tar.extractfile(m)  # hard links resolve to their target's data
    if src is None:
        raise ValueError(f"unsupported entry {m.name}")
    with open(target, "xb") as f:
        shutil.copyfileobj(src, f, 1 << 20)
    os.chown(target, owner.uid, owner.gid)
    os.chmod(target, mode if mode is not None else m.mode)
    os.utime(target, (m.mtime, m.mtime))


def op_copy(merged: str, spec: dict[str, Any]) -> int:
    tar = tarfile.open(fileobj=open(spec["tar"], "rb"), mode="r:*")  # noqa: SIM115 - opened before the chroot
    _enter(merged)
    state = spec["state"]
    current = lookup_user(state["user"])
    owner = lookup_user(spec["owner"]) if spec.get("owner") else current
    workdir = state.get("workdir") or current.home
    dest = spec["dest"] if spec["dest"].startswith("/") else posixpath.join(workdir, spec["dest"])
    mode = int(spec["mode"], 8) if spec.get("mode") else None
    placed, into_dir = plan_copy(tar.getmembers(), spec["src"], dest, os.path.isdir)
    if into_dir:
        _makedirs_owned(dest.rstrip("/") or "/", owner.uid, owner.gid)
    for m, target in placed:
        _place(tar, m, target, owner, mode)
    print(f"copied {len(placed)} entr{'y' if len(placed) == 1 else 'ies'} to {dest}", flush=True)
    return 0


def op_workdir(merged: str, spec: dict[str, Any]) -> int:
    _enter(merged)
    account = lookup_user(spec["state"]["user"])
    _makedirs_owned(spec["path"], account.uid, account.gid)
    return 0


def op_user(merged: str, spec: dict[str, Any]) -> int:
    _enter(merged)
    if ensure_user(spec["name"].partition(":")[0]):
        print(f"created user {spec['name']}", flush=True)
    lookup_user(spec["name"])
    return 0


def _write(path: str, text: str, mode: int = 0o644) -> None:
    if os.path.lexists(path):
        os.unlink(path)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def op_provision(merged: str, spec: dict[str, Any]) -> int:
    """Make an imported image a template: E2B's user, the usual mount points, network files."""
    _enter(merged)
    for d, mode in (("/tmp", 0o1777), ("/proc", 0o555), ("/dev", 0o755), ("/sys", 0o555), ("/run", 0o755),
                    ("/home", 0o755), ("/etc", 0o755), ("/root", 0o700), ("/opt", 0o755)):
        if not os.path.lexists(d):
            os.mkdir(d)
            os.chmod(d, mode)
    user = spec["user"]
    if ensure_user(user["name"], user["uid"], sudo=True):
        print(f"created user {user['name']}", flush=True)
    for name, text in spec["files"].items():
        _write(name, text)
    return 0


def op_flatten(merged: str, spec: dict[str, Any]) -> int:
    """Materialise the merged stack as ``dest`` (outside the chroot): the published rootfs.

    Regular files are hard links to the layer (or base build) file the stack shows, not copies:
    layers and builds are immutable and sandboxes only ever see them as a read-only overlay
    lower, so sharing their inodes is safe, and a template costs the disk space of what its steps
    changed rather than of the whole base. Everything else is recreated from the merged view.
    Sockets left by build-time daemons mean nothing in a template and are dropped."""
    linked = _copy_tree(merged, spec["dest"], [Path(p) for p in spec["lowers"]], "")
    print(f"flattened: {linked[0]} files linked from layers, {linked[1]} copied", flush=True)
    return 0


def _copy_tree(merged: str, dest: str, lowers: list[Path], rel: str) -> tuple[int, int]:
    """Recreate ``merged/rel`` at ``dest/rel``; (files linked, files copied)."""
    linked = copied = 0
    src_dir = os.path.join(merged, rel)
    with os.scandir(src_dir) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        r = f"{rel}/{e.name}" if rel else e.name
        st = e.stat(follow_symlinks=False)
        target = os.path.join(dest, r)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(target)
            sub = _copy_tree(merged, dest, lowers, r)
            linked, copied = linked + sub[0], copied + sub[1]
        elif stat.S_ISREG(st.st_mode):
            if _link_from_layers(r, st, lowers, target):
                linked += 1
            else:
                shutil.copyfile(e.path, target)
                _copy_meta(e.path, target, st)
                copied += 1
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(e.path), target)
            _copy_meta(e.path, target, st)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            os.mknod(target, st.st_mode, st.st_rdev)
            _copy_meta(e.path, target, st)
    _copy_meta(src_dir, os.path.join(dest, rel) if rel else dest, os.lstat(src_dir))  # sockets: skipped above
    return linked, copied


def _link_from_layers(rel: str, st: os.stat_result, lowers: list[Path], target: str) -> bool:
    """Hard-link the file the stack shows at ``rel``: the one in the topmost layer that has the
    path. False if that is not possible (another filesystem, too many links): copy it then."""
    for layer in lowers:
        src = layer / rel
        if not os.path.lexists(src):
            continue
        lst = os.lstat(src)
        if not stat.S_ISREG(lst.st_mode) or lst.st_size != st.st_size:
            return False
        try:
            os.link(src, target)
            return True
        except OSError:
            return False
    return False


def _copy_meta(src: str, target: str, st: os.stat_result) -> None:
    """Owner, mode (after chown, which clears setuid bits), xattrs other than overlayfs' own, times."""
    os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(target, stat.S_IMODE(st.st_mode))
    with contextlib.suppress(OSError):
        for name in os.listxattr(src, follow_symlinks=False):
            if not name.startswith("trusted.overlay."):
                os.setxattr(target, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


_OPS: dict[str, Callable[[str, dict[str, Any]], int]] = {
    "copy": op_copy, "workdir": op_workdir, "user": op_user,
    "provision": op_provision, "flatten": op_flatten,
}


def _inner_main(spec: dict[str, Any]) -> int:
    if spec["op"] == "run":  # mounts its own stack, over a disk of its own
        try:
            return op_run(spec)
        except (OSError, subprocess.CalledProcessError, StartError) as exc:
            print(f"run failed: {type(exc).__name__}: {exc}", flush=True)
            return 1
    if spec.get("root"):  # a single directory, written in place (image provisioning)
        merged = spec["root"]
    else:
        merged = _mount_stack(spec["lowers"], spec.get("upper"), spec.get("work"), spec["scratch"])
    try:
        return _OPS[spec["op"]](merged, spec)
    except (OSError, LookupError, ValueError, tarfile.TarError, subprocess.CalledProcessError) as exc:
        print(f"{spec['op']} failed: {type(exc).__name__}: {exc}", flush=True)
        return 1


def _stdout_line_buffered() -> IO[str]:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return sys.stdout


if __name__ == "__main__":
    _stdout_line_buffered()
    sys.exit(_inner_main(json.loads(sys.argv[1])))
