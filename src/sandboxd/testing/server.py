"""Run a real sandboxd server as a subprocess, for end-to-end tests and benchmarks.

It uses its own network prefix and subnet, so it can run beside a developer's server on one host.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from sandboxd.config import Settings
from sandboxd.store.db import Database

NET_PREFIX = "sbt"
NET_CIDR = "10.214.0.0/16"
SDK_ENV_KEYS = ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL", "E2B_DEBUG", "E2B_DOMAIN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    api_key: str
    settings: Settings
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": self.api_key}, timeout=120)


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "SANDBOXD_"))}
    env.update(SANDBOXD_DATA_DIR=str(settings.data_dir), SANDBOXD_PORT=str(settings.port),
               SANDBOXD_NET_PREFIX=settings.net_prefix, SANDBOXD_NET_CIDR=settings.net_cidr)
    return env


def spawn(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("sandboxd")
    with open(log_path, "ab") as logf:
        return subprocess.Popen([str(exe), "serve"], env=_env(settings), stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_listening(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 600) -> None:
    """The first run builds the base template (~40 s); later runs verify the cached build."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-5000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"server did not listen within {timeout}s:\n{log_path.read_text()[-5000:]}")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def isolated_settings(data_dir: Path, net_prefix: str = NET_PREFIX, net_cidr: str = NET_CIDR) -> Settings:
    return Settings.from_env({}, data_dir=data_dir, port=free_port(), net_prefix=net_prefix, net_cidr=net_cidr)


@contextlib.contextmanager
def running_server(data_dir: Path, log_path: Path, net_prefix: str = NET_PREFIX,
                   net_cidr: str = NET_CIDR) -> Iterator[Server]:
    """A started server with a fresh API key; stopped (SIGTERM) on exit. Two servers at once
    need different data dirs and network prefixes/subnets."""
    settings = isolated_settings(data_dir, net_prefix, net_cidr)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    key = Database(settings.db_url).create_api_key("tests")
    proc = spawn(settings, log_path)
    url = f"http://127.0.0.1:{settings.port}"
    try:
        wait_listening(url, proc, log_path)
        yield Server(url, key, settings, proc, log_path)
    finally:
        stop(proc)


@contextlib.contextmanager
def sdk_pointed_at(server: Server) -> Iterator[None]:
    """Set the SDK's environment exactly as the README tells users to, and restore it after."""
    saved = {k: os.environ.get(k) for k in SDK_ENV_KEYS}
    for k in SDK_ENV_KEYS:
        os.environ.pop(k, None)
    os.environ.update(E2B_API_KEY=server.api_key, E2B_API_URL=server.url, E2B_SANDBOX_URL=server.url)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
