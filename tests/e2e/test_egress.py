"""Guarantee 6: egress only where the sandbox's rules allow it, and never to the host or private
ranges, whatever the rules say.

The "internet" is a namespace of the test's own (sandboxd.testing.fake_internet) holding TEST-NET
addresses (198.51.100.0/24, 203.0.113.0/24) behind a veth of the host. Nothing outside this
machine is ever contacted.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2b import Sandbox

from sandboxd.testing.fake_internet import FakeInternet, fake_internet, host_listener

from .conftest import Server

pytestmark = pytest.mark.slow


@pytest.fixture
def internet() -> Iterator[FakeInternet]:
    with fake_internet() as net:
        yield net


def _fetch(sbx: Sandbox, *urls: str) -> list[str]:
    """One line per URL, fetched from inside the sandbox: the HTTP status or ``failed <error>``."""
    code = ("import sys, urllib.request\nfor url in sys.argv[1:]:\n try:\n"
            "  print(urllib.request.urlopen(url, timeout=3).status)\n"
            " except Exception as e:\n  print('failed', type(e).__name__)\n")
    sbx.files.write("/tmp/fetch.py", code)
    return sbx.commands.run("python3 /tmp/fetch.py " + " ".join(urls)).stdout.split("\n")[:len(urls)]


def _ok(results: list[str]) -> list[bool]:
    return [r == "200" for r in results]


def test_egress_only_when_allowed(sdk_env: Server, internet: FakeInternet) -> None:
    online = Sandbox.create(timeout=60)  # allow_internet_access defaults to true, as on E2B
    offline = Sandbox.create(timeout=60, allow_internet_access=False)
    try:
        with host_listener(internet.host_side) as port:
            urls = [f"http://{h}:8080/" for h in internet.hosts]
            assert _ok(_fetch(online, *urls)) == [True, True]
            assert _ok(_fetch(offline, *urls)) == [False, False]
            # never the host (not even by its "public" address), never private ranges
            assert _ok(_fetch(online, f"http://{internet.host_side}:{port}/", "http://10.0.0.1:8080/",
                              "http://192.168.1.1:8080/")) == [False, False, False]
        assert offline.get_info().sandbox_id == offline.sandbox_id
    finally:
        online.kill()
        offline.kill()


def test_deny_out_allow_out_and_update_network(sdk_env: Server, internet: FakeInternet) -> None:
    """E2B's precedence: allow_out beats deny_out; update_network replaces every rule at once."""
    first, second = internet.hosts
    urls = [f"http://{first}:8080/", f"http://{second}:8080/"]
    sbx = Sandbox.create(timeout=90, network={"deny_out": ["0.0.0.0/0"], "allow_out": [second]})
    try:
        assert _ok(_fetch(sbx, *urls)) == [False, True]
        info = sbx.get_info()
        assert info.allow_internet_access is False
        sbx.update_network({"deny_out": [f"{second}/32"]})
        assert _ok(_fetch(sbx, *urls)) == [True, False]
        sbx.update_network({})  # omitted fields are cleared: open again
        assert _ok(_fetch(sbx, *urls)) == [True, True]
        sbx.update_network({"allow_internet_access": False})
        assert _ok(_fetch(sbx, *urls)) == [False, False]
        # private ranges stay closed whatever allow_out says
        sbx.update_network({"allow_out": ["10.0.0.0/8", first], "deny_out": ["0.0.0.0/0"]})
        with host_listener(internet.host_side) as port:
            assert _ok(_fetch(sbx, *urls, f"http://{internet.host_side}:{port}/")) == [True, False, False]
    finally:
        sbx.kill()


def test_an_open_connection_stops_when_the_rules_deny_it(sdk_env: Server, internet: FakeInternet) -> None:
    """Rules are judged on every packet: a connection opened under the old rules is cut too."""
    first = internet.hosts[0]
    sbx = Sandbox.create(timeout=60)
    try:
        script = ("import http.client, sys, time\n"
                  f"c = http.client.HTTPConnection('{first}', 8080, timeout=3)\n"
                  "c.request('GET', '/'); print(c.getresponse().read() != b'', flush=True)\n"
                  "open('/tmp/ready', 'w').close()\n"
                  "while not __import__('os').path.exists('/tmp/go'): time.sleep(0.05)\n"
                  "try:\n c.request('GET', '/'); print(c.getresponse().status)\n"
                  "except Exception as e:\n print('failed', type(e).__name__)\n")
        sbx.files.write("/tmp/keepalive.py", script)
        handle = sbx.commands.run("python3 /tmp/keepalive.py", background=True)
        sbx.commands.run("for i in $(seq 200); do [ -e /tmp/ready ] && exit 0; sleep 0.05; done; exit 1", timeout=15)
        sbx.update_network({"deny_out": ["0.0.0.0/0"]})
        sbx.files.write("/tmp/go", "")
        result = handle.wait()
        lines = result.stdout.split()
        assert lines[0] == "True"
        assert lines[1] == "failed", result.stdout
    finally:
        sbx.kill()
