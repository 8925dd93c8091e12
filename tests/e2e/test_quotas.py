"""Quotas per API key through the real SDK: concurrent sandboxes, vCPUs, memory (429 naming the
limit, counted over running sandboxes only), and keys listed, limited and revoked with
``sandboxd keys``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from e2b import Sandbox
from e2b.exceptions import AuthenticationException, RateLimitException

from .conftest import Server

pytestmark = pytest.mark.slow


def _keys(server: Server, *args: str) -> str:
    exe = Path(sys.executable).with_name("sandboxd")
    proc = subprocess.run([str(exe), "keys", *args, "--data-dir", str(server.settings.data_dir)],
                          capture_output=True, text=True, check=True)
    return proc.stdout


def test_quotas_per_key(sdk_env: Server) -> None:
    key = _keys(sdk_env, "create", "--name", "quota-test", "--max-sandboxes", "1").strip()
    first = Sandbox.create(timeout=60, api_key=key)
    try:
        with pytest.raises(RateLimitException, match=r"concurrent sandboxes \(1\)"):
            Sandbox.create(timeout=60, api_key=key)
        other = Sandbox.create(timeout=60)  # another key's quota is its own
        other.kill()
        first.pause()  # paused sandboxes hold nothing: the key may start another
        second = Sandbox.create(timeout=60, api_key=key)
        with pytest.raises(RateLimitException, match=r"concurrent sandboxes \(1\)"):
            Sandbox.connect(first.sandbox_id, api_key=key)  # resuming counts too
        listing = _keys(sdk_env, "list")
        line = next(line for line in listing.splitlines() if "quota-test" in line)
        assert "1/1" in line, listing
        second.kill()

        _keys(sdk_env, "limit", "quota-test", "--max-sandboxes", "0", "--max-vcpus", "3")
        Sandbox.connect(first.sandbox_id, api_key=key)  # resumed: 2 vCPUs of 3
        with pytest.raises(RateLimitException, match=r"over its limit of 3"):
            Sandbox.create(timeout=60, api_key=key)
        _keys(sdk_env, "limit", "quota-test", "--max-vcpus", "0", "--max-memory-mb", "600")
        with pytest.raises(RateLimitException, match=r"over its limit of 600 MiB"):
            Sandbox.create(timeout=60, api_key=key)

        _keys(sdk_env, "revoke", "quota-test")
        with pytest.raises(AuthenticationException):
            Sandbox.create(timeout=60, api_key=key)
        assert "quota-test" not in _keys(sdk_env, "list")
    finally:
        Sandbox.kill(first.sandbox_id, api_key=sdk_env.api_key)  # its own key is revoked by now
