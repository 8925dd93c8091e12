"""Guarantee 6: internet egress only when allowed, and never to the host or private ranges.

The "internet" is a host of the test's own: a network namespace with a TEST-NET-2 address
(198.51.100.2) behind a veth, serving HTTP. Nothing outside this machine is ever contacted.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator

import pytest
from e2b import Sandbox

from .conftest import Server

pytestmark = pytest.mark.slow

FAKE_INTERNET = "198.51.100.2"


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def fake_internet_host() -> Iterator[str]:
    tag = secrets.token_hex(3)
    ns, veth = f"tinet{tag}", f"tin{tag}-h"
    _sh("ip", "netns", "add", ns)
    server = None
    try:
        _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _sh("ip", "addr", "add", "198.51.100.1/30", "dev", veth)
        _sh("ip", "link", "set", veth, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{FAKE_INTERNET}/30", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        server = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-m", "http.server", "8080",
                                   "--bind", FAKE_INTERNET], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        yield FAKE_INTERNET
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _fetch(sbx: Sandbox, url: str) -> str:
    code = (f"import urllib.request\ntry:\n print(urllib.request.urlopen('{url}', timeout=3).status)\n"
            f"except Exception as e:\n print('failed', type(e).__name__)")
    sbx.files.write("/tmp/fetch.py", code)
    return sbx.commands.run("python3 /tmp/fetch.py").stdout.strip()


def test_egress_only_when_allowed(sdk_env: Server, fake_internet_host: str) -> None:
    online = Sandbox.create(timeout=60)  # allow_internet_access defaults to true, as on E2B
    offline = Sandbox.create(timeout=60, allow_internet_access=False)
    try:
        assert _fetch(online, f"http://{fake_internet_host}:8080/") == "200"
        assert _fetch(offline, f"http://{fake_internet_host}:8080/").startswith("failed")
        # the host's own address on the fake internet link is a host service: allowed only as
        # "internet" would be — but private ranges never are
        assert _fetch(online, "http://10.0.0.1:8080/").startswith("failed")
        assert _fetch(online, "http://192.168.1.1:8080/").startswith("failed")
        assert offline.get_info().sandbox_id == offline.sandbox_id
    finally:
        online.kill()
        offline.kill()
