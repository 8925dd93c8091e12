"""Run things inside a rootfs without changing it: the build-time "does envd start" check.

Why: seed 000 shipped a rootfs whose envd never started, and nobody noticed until sandboxes hung.
Every template build therefore starts envd *exactly* as a sandbox will (same argv, same env) and
requires ``GET /health`` to answer before the build is published.

How: private mount, network, PID and UTS namespaces (``unshare``), an overlay with the rootfs as
its read-only lower layer (writes go to a scratch dir and vanish, like in a sandbox), loopback up.
The check itself runs in a gVisor container over that overlay (``contained``, as every build's
and doctor's check does): the rootfs is a template someone built, and code in it (an
``/etc/ld.so.preload`` the loader honours, say) must never run on the host. runsc's
``--network=host`` is the namespace's own loopback, where this process polls ``/health``.
:func:`run_in_rootfs` without ``contained`` chroots instead (tests of trusted rootfses, which
need setuid binaries gVisor does not run). All mounts and processes die with the namespaces, so
nothing leaks even when the check is killed; the check's port cannot collide with the host's.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandboxd.envd.contract import BUNDLE_PATH_IN_SANDBOX, ENVD_PORT, envd_argv, envd_env, python_argv
from sandboxd.runtimes.gvisor import choose_platform
from sandboxd.templates.stepns import cgroup_dirs

LogFn = Callable[[str], None]
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


@dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: str
    stderr: str


def _namespaced(inner: dict[str, Any], timeout: float, contained: bool) -> RunResult:
    """Run :func:`_inner_main` with ``inner`` in fresh mount/net/PID/UTS namespaces; return its result."""
    with tempfile.TemporaryDirectory(prefix="sandboxd-check-") as scratch:
        inner = {**inner, "scratch": scratch}
        if contained:
            inner["runsc"] = ["runsc", "--root", f"{scratch}/runsc", f"--platform={choose_platform()}",
                              "--network=host", "--overlay2=none"]
            inner["container"] = f"sandboxd-check-{secrets.token_hex(6)}"
        cmd = ["unshare", "--mount", "--net", "--uts", "--pid", "--fork", "--mount-proc", "--propagation",
               "private", "--", sys.executable, "-m", "sandboxd.templates.check", json.dumps(inner)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return RunResult(124, out, err + f"\n[timed out after {timeout}s]")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            if contained:  # killed or not: its cgroups go (runsc's state goes with the scratch dir)
                for cgroup in cgroup_dirs(inner["container"]):
                    with contextlib.suppress(OSError):
                        cgroup.rmdir()
        return RunResult(proc.returncode, out, err)


def run_in_rootfs(rootfs: Path, argv: Sequence[str], env: dict[str, str] | None = None,
                  timeout: float = 60, contained: bool = False) -> RunResult:
    """Run ``argv`` in an overlay over ``rootfs`` (chrooted, or in gVisor if ``contained``); the
    rootfs itself is never written."""
    env = env if env is not None else envd_env()
    return _namespaced({"mode": "run", "rootfs": str(rootfs), "argv": list(argv), "env": env}, timeout, contained)


def envd_health(rootfs: Path, timeout: float = 30, contained: bool = False) -> RunResult:
    """Start envd in ``rootfs`` with the sandbox's argv/env; returncode 0 iff /health answered 2xx.
    stdout carries envd's own output (for the build log)."""
    inner = {"mode": "health", "rootfs": str(rootfs), "argv": envd_argv(), "env": envd_env(),
             "port": ENVD_PORT, "wait": max(timeout - 5, 5)}
    return _namespaced(inner, timeout, contained)


ENVD_CHECKS = ("health", "python")


def _bundled_python_starts(rootfs: Path, log: LogFn, timeout: float) -> None:
    probe = run_in_rootfs(rootfs, python_argv("-c", "import sys, ssl, json, asyncio; print(sys.prefix)"),
                          timeout=timeout, contained=True)
    if probe.returncode != 0 or probe.stdout.strip() != BUNDLE_PATH_IN_SANDBOX:
        raise RuntimeError(f"bundled python does not start in the rootfs (rc={probe.returncode}): "
                           f"{probe.stdout.strip()} {probe.stderr.strip()[-2000:]}")
    log("envd check: bundled python starts in the rootfs")


def check_envd_starts(rootfs: Path, log: LogFn, timeout: float = 30, level: str = "health") -> None:
    """Build-time gate: raise (so the build is not published) unless envd answers /health.

    ``level="python"`` only checks that the bundled interpreter starts (for tests while envd is
    incomplete); the level is a build input, so such a build never gets a production build id.
    The interpreter is probed on its own only when envd did not answer (to say why): every
    container start costs seconds, and a build passing the gate needs one."""
    if level not in ENVD_CHECKS:
        raise ValueError(f"unknown envd check level {level!r}")
    if level == "python":
        _bundled_python_starts(rootfs, log, timeout)
        return
    res = envd_health(rootfs, timeout=timeout, contained=True)
    for line in (res.stdout + res.stderr).splitlines()[-40:]:
        log(f"envd check| {line}")
    if res.returncode != 0:
        _bundled_python_starts(rootfs, log, timeout)
        raise RuntimeError(f"envd did not answer GET /health in the rootfs (rc={res.returncode})")
    log("envd check: GET /health ok")


# ---------------------------------------------------------------------------------------------
# Inside the namespaces (python -m sandboxd.templates.check '<json>').


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def _prepare(rootfs: str, scratch: str, contained: bool) -> str:
    upper, work, merged = (os.path.join(scratch, n) for n in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        os.mkdir(d)
    _sh("mount", "-t", "overlay", "overlay", "-o",
        f"lowerdir={rootfs},upperdir={upper},workdir={work}", merged)
    if contained:  # runsc makes /proc, /dev and the hostname itself, inside the container
        _sh("ip", "link", "set", "lo", "up")
        return merged
    for d in ("proc", "dev", "tmp"):
        os.makedirs(os.path.join(merged, d), exist_ok=True)
    _sh("mount", "-t", "proc", "proc", os.path.join(merged, "proc"))
    for dev in _DEVICES:
        target = os.path.join(merged, "dev", dev)
        if not os.path.lexists(target):
            open(target, "w").close()
        _sh("mount", "--bind", f"/dev/{dev}", target)
    _sh("ip", "link", "set", "lo", "up")
    hostname = Path(merged, "etc", "hostname")
    if hostname.is_file() and hostname.read_text().strip():
        socket.sethostname(hostname.read_text().strip())  # own UTS namespace: as in a sandbox
    return merged


def _poll_health(port: int, proc: subprocess.Popen[bytes], wait: float) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return 200 <= r.status < 300
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    return False


def _contained(merged: str, spec: dict[str, Any]) -> list[str]:
    """argv of ``runsc run`` for ``spec["argv"]`` in a container over ``merged``: a sandbox's OCI
    config (the statx shim aside: nothing here lists files), with the namespace's own network
    and bounded tasks and memory (whatever the rootfs's code does, it does in there)."""
    from sandboxd.runtimes.base import RuntimeSpec
    from sandboxd.runtimes.gvisor import oci_config

    cid = spec["container"]
    rspec = RuntimeSpec(sandbox_id=cid, rootfs=Path(merged), sandbox_dir=Path(spec["scratch"]), netns_path="",
                        argv=spec["argv"], env=spec["env"])
    config = oci_config(rspec, None, None)
    config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"] if ns["type"] != "network"]
    config["linux"]["cgroupsPath"] = "/" + cid
    bundle = os.path.join(spec["scratch"], "bundle")
    os.mkdir(bundle)
    Path(bundle, "config.json").write_text(json.dumps(config))
    return [*spec["runsc"], "run", "--bundle", bundle, cid]


def _inner_main(spec: dict[str, Any]) -> int:
    contained = "runsc" in spec
    merged = _prepare(spec["rootfs"], spec["scratch"], contained)
    argv = _contained(merged, spec) if contained else ["chroot", merged, *spec["argv"]]
    env = None if contained else spec["env"]  # runsc hands the container its env itself
    if spec["mode"] == "run":
        return subprocess.run(argv, env=env).returncode
    proc = subprocess.Popen(argv, env=env, stdout=sys.stdout, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    ok = _poll_health(spec["port"], proc, spec["wait"])
    print(f"[check] /health {'ok' if ok else 'FAILED'} after {time.monotonic() - t0:.2f}s"
          f" (envd exit code {proc.poll()})", flush=True)
    if proc.poll() is None and contained:
        proc.kill()  # runsc run does not pass SIGTERM on; the PID namespace takes the container along
        proc.wait()
    elif proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(_inner_main(json.loads(sys.argv[1])))
