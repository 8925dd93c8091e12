"""Run a real sandboxd server as a subprocess, for end-to-end tests and benchmarks.

Each server gets its own data dir (sharing the template store), network prefix and subnet, so
test runs, benchmarks and a developer's server can share one host without touching each other.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import httpx

from sandboxd.config import Settings
from sandboxd.store.db import Database
from sandboxd.templates.store import BuildError, remove_tree

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

    @property
    def ca_file(self) -> Path | None:
        """The CA a domain-mode server made (clients trust it through SSL_CERT_FILE etc.)."""
        return self.settings.data_dir / "tls" / "ca.pem" if self.settings.domain else None

    def api(self) -> httpx.Client:
        # by address, not by name (the host cannot resolve the test domain): the test's own
        # calls skip verifying the name; the SDKs under test verify it
        return httpx.Client(base_url=self.url, headers={"X-API-Key": self.api_key}, timeout=120,
                            verify=not self.settings.domain)


def _env(settings: Settings) -> dict[str, str]:
    """The server's environment: every setting that differs from the default, as the
    ``SANDBOXD_*`` variable a user would set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "SANDBOXD_"))}
    defaults = Settings()
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if value != getattr(defaults, f.name) or f.name in ("data_dir", "port"):
            env[f"SANDBOXD_{f.name.upper()}"] = str(value)
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
            if httpx.get(f"{url}/health", timeout=1, verify=False).status_code == 200:
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


def unique_network() -> tuple[str, str]:
    """A network prefix and /16 no other server on this host uses: test servers started by
    concurrent test runs must never clean up each other's slots."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    taken = {int(m) for m in re.findall(r"inet 10\.(\d+)\.", used)}
    free = [n for n in range(100, 200) if n not in taken]
    second = random.choice(free)
    return "t" + "".join(random.choices(string.ascii_lowercase + string.digits, k=4)), f"10.{second}.0.0/16"


#: Content-addressed, verified-on-use, atomically written: safe to share between servers.
SHARED_SUBDIRS = ("templates", "cache", "guest")


def run_dir(shared_data_dir: Path) -> Path:
    """A data dir of one server's own (database, sandboxes, runtime state) sharing the template
    store, derived caches (layers, rootfs.ext4 images) and the microVM guest kernel."""
    shared_data_dir.mkdir(parents=True, exist_ok=True)  # a fresh machine: benchmarks right after set-up
    d = Path(tempfile.mkdtemp(prefix="run-", dir=shared_data_dir))
    for shared in SHARED_SUBDIRS:
        (shared_data_dir / shared).mkdir(parents=True, exist_ok=True)
        (d / shared).symlink_to(shared_data_dir / shared)
    return d


@contextlib.contextmanager
def running_server(shared_data_dir: Path, log_path: Path, **overrides: Any) -> Iterator[Server]:
    """A started server with its own data dir, network prefix and a fresh API key (and any
    other settings in ``overrides``); stopped (SIGTERM, which drains teardowns) and its data
    dir removed on exit."""
    prefix, cidr = unique_network()
    data_dir = run_dir(shared_data_dir)
    # the warm pool is off unless the test asks for it (or SANDBOXD_TEST_WARM_POOL_SIZE turns it
    # on for the whole suite): on a small host its background boots would slow every other test;
    # built-in templates too (each is minutes of build on a cold cache)
    pool = int(os.environ.get("SANDBOXD_TEST_WARM_POOL_SIZE", "0"))
    settings = Settings.from_env({}, **{"data_dir": data_dir, "port": free_port(), "net_prefix": prefix,
                                        "net_cidr": cidr, "warm_pool_size": pool, "builtin_templates": "",
                                        # the egress tests' fake internet puts its test CA here
                                        "egress_upstream_ca": data_dir / "egress-upstream-ca.pem",
                                        **overrides})
    key = Database(settings.db_url).create_api_key("tests")
    proc = spawn(settings, log_path)
    url = f"{'https' if settings.domain else 'http'}://{settings.host}:{settings.port}"
    try:
        wait_listening(url, proc, log_path)
        yield Server(url, key, settings, proc, log_path)
    finally:
        stop(proc)
        for table in (f"sandboxd_{prefix}", f"sandboxd_{prefix[:5]}b"):  # its sandboxes' and its builds' slots
            subprocess.run(["nft", "delete", "table", "ip", table], capture_output=True)
        try:
            remove_tree(data_dir)
        except (BuildError, OSError) as exc:
            print(f"left {data_dir} in place: {exc}")


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
