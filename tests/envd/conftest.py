"""Fixtures: a real envd subprocess on a loopback port, and a throwaway sandbox user.

envd is started exactly as in a sandbox (``python -m sandboxd.envd``), from this interpreter, and
driven over the network; nothing is faked.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

TEST_USER = "sbxtest"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Envd:
    """A running envd: its base URL and process (for logs on failure)."""

    url: str
    port: int
    proc: subprocess.Popen[bytes]

    def init(self, **body: object) -> None:
        r = httpx.post(f"{self.url}/init", json=body)
        assert r.status_code == 204, r.text


@contextlib.contextmanager
def run_envd(port: int, *extra: str) -> Iterator[Envd]:
    """Start envd on 127.0.0.1:port, wait for /health, stop it (and show its log) afterwards."""
    log = open(f"/tmp/envd-test-{port}.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    env["ENVD_LEAK"] = "envd's own environment must not reach children"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxd.envd", "--host", "127.0.0.1", "--port", str(port), *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"envd exited with {proc.returncode}: {open(log.name).read()}")
            try:
                if httpx.get(f"{url}/health", timeout=0.5).status_code == 204:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"envd did not become healthy: {open(log.name).read()}")
            time.sleep(0.05)
        yield Envd(url, port, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def envd() -> Iterator[Envd]:
    """A fresh envd (no token) per test module, default user root."""
    with run_envd(free_port()) as e:
        yield e


@pytest.fixture(scope="session")
def sandbox_user() -> Iterator[pwd.struct_passwd]:
    """A uid-1000-style user with a home directory, created for the run and removed after."""
    created = False
    try:
        info = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", TEST_USER], check=True)
        created = True
        info = pwd.getpwnam(TEST_USER)
    try:
        yield info
    finally:
        if created:
            subprocess.run(["userdel", "-r", TEST_USER], check=False, capture_output=True)
            shutil.rmtree(info.pw_dir, ignore_errors=True)
