"""Guarantee 6: egress only where the sandbox's rules allow it, and never to the host or private
ranges, whatever the rules say.

The "internet" is a namespace of the test's own (sandboxd.testing.fake_internet) holding TEST-NET
addresses (198.51.100.0/24, 203.0.113.0/24) behind a veth of the host. Nothing outside this
machine is ever contacted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import Sandbox

from sandboxd.testing.fake_internet import FakeInternet, fake_internet, host_listener
from sandboxd.tls import ensure_server_cert

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


_PROBE = r"""
import socket, ssl, sys, urllib.request
for spec in sys.argv[1:]:
    kind, rest = spec.split(":", 1)
    try:
        if kind == "url":
            print(urllib.request.urlopen(rest, timeout=5).read().decode().strip())
            continue
        ip, port, name = rest.split(":")
        sock = socket.create_connection((ip, int(port)), timeout=5)
        if kind == "https":
            ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
            sock = ctx.wrap_socket(sock, server_hostname=name)
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        print(data.split(b"\r\n\r\n", 1)[1].decode().strip() if b" 200 " in data.split(b"\r\n")[0] else "failed empty")
    except Exception as e:
        print("failed", type(e).__name__)
"""


@pytest.fixture
def named_internet(tmp_path: Path) -> Iterator[FakeInternet]:
    tls = ensure_server_cert(tmp_path, "wild.test")
    with fake_internet(names={"allowed.test": "0", "a.wild.test": "1", "denied.test": "0"},
                       tls=(tls.cert, tls.key)) as net:
        yield net


def _probe(sbx: Sandbox, *specs: str) -> list[str]:
    sbx.files.write("/tmp/probe.py", _PROBE)
    return sbx.commands.run("python3 /tmp/probe.py " + " ".join(specs), timeout=60).stdout.split("\n")[:len(specs)]


def test_domains_by_sni_and_host(sdk_env: Server, named_internet: FakeInternet) -> None:
    """Names are matched on the connection itself (TLS SNI, HTTP Host), not on DNS: a sandbox
    that resolves a name itself, or names an allowed host to another address, gets only what
    the name allows; update_network changes names at once."""
    net = named_internet
    first, second = net.hosts
    assert net.dns is not None
    sbx = Sandbox.create(timeout=120, network={"deny_out": ["0.0.0.0/0"], "allow_out": ["allowed.test", "*.wild.test"],
                                               "dns_servers": [net.dns]})
    try:
        sbx.commands.run(f"echo nameserver {net.dns} > /etc/resolv.conf", user="root")
        results = _probe(sbx, "url:http://allowed.test:8080/", f"http:{first}:8080:denied.test",
                         f"https:{second}:8443:a.wild.test", f"https:{second}:8443:wild.test",
                         f"https:{first}:8443:evil.test", f"url:http://{first}:8080/",
                         "url:http://denied.test:8080/")
        assert results[0] == f"{first} allowed.test:8080 -"
        assert results[1].startswith("failed")
        assert results[2] == f"{second} a.wild.test a.wild.test"
        assert [r.startswith("failed") for r in results[3:]] == [True] * 4, results
        sbx.update_network({"deny_out": ["0.0.0.0/0"], "allow_out": ["denied.test"], "dns_servers": [net.dns]})
        results = _probe(sbx, "url:http://allowed.test:8080/", "url:http://denied.test:8080/")
        assert results[0].startswith("failed") and results[1] == f"{first} denied.test:8080 -", results
        sbx.update_network({"deny_out": ["0.0.0.0/0"], "allow_out": ["denied.test"], "dns_servers": []})
        assert _probe(sbx, "url:http://denied.test:8080/")[0].startswith("failed")  # no DNS server now
    finally:
        sbx.kill()
