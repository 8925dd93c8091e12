"""E2B's ``network.rules`` (per-host request transforms) and secrets in them, with the real SDK
(sync and async): the egress proxy terminates the sandbox's TLS for a host with a rule only (the
sandbox trusts its own CA), sets the rule's headers, fills ``Secret.fill`` placeholders with the
secret's value, and re-originates TLS to the upstream, whose certificate must verify (here: the
fake internet's test CA, the only one the test server is told to trust besides the system's).
The value reaches the upstream and is never readable in the sandbox.

The "internet" is a namespace of the test's own (sandboxd.testing.fake_internet), TEST-NET
addresses only; the upstream logs every request's headers on the host side.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import AsyncSandbox, AsyncSecret, Sandbox, Secret

from sandboxd.testing.fake_internet import FakeInternet, fake_internet
from sandboxd.testing.server import running_server, sdk_pointed_at, spawn, stop, wait_listening
from sandboxd.tls import ensure_server_cert

from .conftest import Server

pytestmark = pytest.mark.slow

#: GETs each URL with urllib (the system trust store, certificates verified), sending a header of
#: its own that a rule overrides; prints the status and body, or ``failed <error>``
_GET = r"""
import sys, urllib.request, urllib.error
for url in sys.argv[1:]:
    req = urllib.request.Request(url, headers={"Authorization": "Bearer from-the-sandbox"})
    try:
        r = urllib.request.urlopen(req, timeout=10)
        print(r.status, r.read().decode().strip())
    except urllib.error.HTTPError as e:
        print(e.code, e.read().decode().strip()[:200])
    except Exception as e:
        print("failed", type(e).__name__, str(e)[:200].replace("\n", " "))
"""


@pytest.fixture
def wild_internet(sdk_env: Server, tmp_path: Path) -> Iterator[FakeInternet]:
    """Hosts under wild.test (and evil.test, whose certificate is wild.test's: it never verifies),
    signed by a CA of the test's own that the server trusts for upstreams."""
    tls = ensure_server_cert(tmp_path, "wild.test")
    trusted = sdk_env.settings.egress_upstream_ca
    assert trusted is not None and tls.ca is not None
    shutil.copy(tls.ca, trusted)
    with fake_internet(names={"api.wild.test": "1", "other.wild.test": "1", "evil.test": "1"},
                       tls=(tls.cert, tls.key)) as net:
        yield net
    trusted.unlink(missing_ok=True)


def _network(net: FakeInternet, rules: dict[str, object], extra_allow: tuple[str, ...] = ()) -> dict[str, object]:
    assert net.dns is not None
    return {"deny_out": ["0.0.0.0/0"], "allow_out": ["*.wild.test", "evil.test", *extra_allow],
            "dns_servers": [net.dns], "rules": rules}


def _get(sbx: Sandbox, *urls: str) -> list[str]:
    sbx.files.write("/tmp/get.py", _GET)
    return sbx.commands.run("python3 /tmp/get.py " + " ".join(urls), timeout=90).stdout.splitlines()


def _seen(net: FakeInternet, sni: str) -> list[dict[str, str]]:
    """The headers of each request the upstream got with this TLS server name."""
    return [r["headers"] for r in net.requests() if r["sni"] == sni]


def _assert_not_in_sandbox(sbx: Sandbox, value: str) -> None:
    """The secret's value is nowhere a process in the sandbox can read: files, environments, or
    what envd answers."""
    found = sbx.commands.run(f"grep -rlF -e '{value}' /etc /home /tmp /root /opt /var /proc/*/environ 2>/dev/null; "
                             "env", user="root", timeout=60)
    assert value not in found.stdout
    assert value not in str(sbx.get_info())


def test_rules_set_headers_and_secrets_over_https(sdk_env: Server, wild_internet: FakeInternet) -> None:
    net = wild_internet
    name, value = f"upstream-key-{uuid.uuid4().hex[:6]}", f"sk-{uuid.uuid4().hex}"
    Secret.create(name, value)
    rules = {"api.wild.test": [{"transform": {"headers": {"Authorization": f"Bearer {Secret.fill(name)}"}}},
                               {"transform": {"headers": {"X-Team": "parity"}}}],
             "*.wild.test": [{"transform": {"headers": {"X-Wild": "yes"}}}],
             "evil.test": [{"transform": {"headers": {"Authorization": f"Bearer {Secret.fill(name)}"}}}]}
    sbx = Sandbox.create(timeout=180, network=_network(net, rules, ("10.0.0.0/8",)))
    try:
        sbx.commands.run(f"echo nameserver {net.dns} > /etc/resolv.conf", user="root")
        second = net.hosts[1]
        out = _get(sbx, "https://api.wild.test:8443/a", "https://other.wild.test:8443/b",
                   "http://api.wild.test:8080/plain", "https://evil.test:8443/c", "http://10.0.0.1:8080/")
        assert out[0] == f"200 {second} api.wild.test:8443 api.wild.test", out
        assert out[1] == f"200 {second} other.wild.test:8443 other.wild.test", out
        assert out[2] == f"200 {second} api.wild.test:8080 -", out
        assert out[3].startswith("502 sandboxd egress proxy: the certificate of evil.test did not verify"), out
        assert out[4].startswith("failed"), out  # private ranges stay closed whatever allow_out and rules say
        api = _seen(net, "api.wild.test")[0]
        assert api["authorization"] == f"Bearer {value}" and api["x-team"] == "parity"
        assert "x-wild" not in api  # the exact rule wins; rule sets are not merged
        other, = _seen(net, "other.wild.test")
        assert other["x-wild"] == "yes" and other["authorization"] == "Bearer from-the-sandbox"
        plain = [r["headers"] for r in net.requests() if r["path"] == "/plain"]
        assert plain[0]["authorization"] == "Bearer from-the-sandbox"  # plain HTTP is never transformed
        assert _seen(net, "evil.test") == []  # nothing was sent to an upstream that did not verify
        # curl and node trust the sandbox's CA too (the system bundle, NODE_EXTRA_CA_CERTS)
        curl = sbx.commands.run("curl -sS https://api.wild.test:8443/curl", timeout=60).stdout.strip()
        assert curl == f"{second} api.wild.test:8443 api.wild.test"
        node = sbx.commands.run("node -e \"fetch('https://api.wild.test:8443/node').then(r => r.text())"
                                ".then(t => console.log(t.trim()))\"", timeout=60).stdout.strip()
        assert node == f"{second} api.wild.test:8443 api.wild.test"
        assert [h["authorization"] for h in _seen(net, "api.wild.test")[1:]] == [f"Bearer {value}"] * 2
        env = sbx.commands.run("echo $SSL_CERT_FILE $NODE_EXTRA_CA_CERTS").stdout.split()
        assert env == ["/etc/ssl/certs/ca-certificates.crt", "/etc/sandboxd/egress-ca.pem"]
        info = sbx.get_info()
        assert info.network is not None and Secret.fill(name) in str(info.network["rules"])
        _assert_not_in_sandbox(sbx, value)

        # update_network applies at once, to the connection's next request too
        sbx.update_network(_network(net, {"api.wild.test": [{"transform": {"headers": {"X-Team": "two"}}}]}))
        assert _get(sbx, "https://api.wild.test:8443/d")[0].startswith("200 ")
        last = _seen(net, "api.wild.test")[-1]
        assert last["x-team"] == "two" and last["authorization"] == "Bearer from-the-sandbox"
        sbx.update_network(_network(net, {}))
        out = _get(sbx, "https://api.wild.test:8443/e")
        assert "CERTIFICATE_VERIFY_FAILED" in out[0], out  # passed through: the fake's own cert
    finally:
        sbx.kill()
        Secret.destroy(name)


def test_rules_with_the_async_sdk_and_rules_added_later(sdk_env: Server, wild_internet: FakeInternet) -> None:
    """AsyncSandbox/AsyncSecret; a sandbox created without rules trusts its CA from the update
    that first gives it some; a secret's new version is used by the next request; a deleted one
    stops the request (502), nothing is sent."""
    net = wild_internet

    async def main() -> None:
        name, value = f"async-key-{uuid.uuid4().hex[:6]}", f"sk-{uuid.uuid4().hex}"
        await AsyncSecret.create(name, value)
        sbx = await AsyncSandbox.create(timeout=180, network=_network(net, {}))
        try:
            await sbx.commands.run(f"echo nameserver {net.dns} > /etc/resolv.conf", user="root")
            await sbx.files.write("/tmp/get.py", _GET)
            url = "https://api.wild.test:8443/async"

            async def get() -> str:
                return (await sbx.commands.run(f"python3 /tmp/get.py {url}", timeout=90)).stdout.strip()

            assert "CERTIFICATE_VERIFY_FAILED" in await get()  # no rules: TLS untouched
            await sbx.update_network(_network(net, {"api.wild.test": [
                {"transform": {"headers": {"X-Api-Key": AsyncSecret.fill(name)}}}]}))
            assert (await get()).startswith("200 ")
            assert _seen(net, "api.wild.test")[-1]["x-api-key"] == value
            await AsyncSecret.update(name, value + "-v2")
            assert (await get()).startswith("200 ")
            assert _seen(net, "api.wild.test")[-1]["x-api-key"] == value + "-v2"
            got = len(net.requests())
            await AsyncSecret.destroy(name)
            assert (await get()).startswith("502 ")
            assert len(net.requests()) == got
            found = await sbx.commands.run(f"grep -rlF -e '{value}' /etc /home /tmp /root /proc/*/environ "
                                           "2>/dev/null; env", user="root", timeout=60)
            assert value not in found.stdout
        finally:
            await sbx.kill()
            await AsyncSecret.destroy(name)

    asyncio.run(main())


def test_rules_in_an_open_sandbox_across_pauses(sdk_env: Server, wild_internet: FakeInternet) -> None:
    """Without deny_out every address is allowed; a rule still applies (its host's HTTPS on port
    443 goes through the egress proxy), other hosts' TLS is passed through untouched; the trust
    and the rule hold after a pause with memory and after one that keeps the disk alone."""
    net = wild_internet
    sbx = Sandbox.create(timeout=180, network={"rules": {"api.wild.test": [
        {"transform": {"headers": {"X-Open": "1"}}}]}})
    try:
        def get(*urls: str) -> list[str]:
            sbx.commands.run(f"echo nameserver {net.dns} > /etc/resolv.conf", user="root")
            return _get(sbx, *urls)

        second = net.hosts[1]
        out = get("https://api.wild.test/open", "https://other.wild.test/open")
        assert out[0] == f"200 {second} api.wild.test api.wild.test", out
        assert "CERTIFICATE_VERIFY_FAILED" in out[1], out  # no rule: the fake's own certificate reaches it
        assert _seen(net, "api.wild.test")[-1]["x-open"] == "1"
        for mode in ("full", "filesystem"):
            sbx.pause(mode=mode)
            sbx = Sandbox.connect(sbx.sandbox_id)
            assert get(f"https://api.wild.test/{mode}")[0].startswith("200 "), mode
            last = [r for r in net.requests() if r["path"] == f"/{mode}"]
            assert last[-1]["headers"]["x-open"] == "1", mode
    finally:
        sbx.kill()


def test_rules_survive_a_server_killed_with_kill_9(data_dir: Path, tmp_path: Path) -> None:
    """The sandbox keeps trusting the CA it was given: a restarted server signs with the same one
    (kept in the sandbox's dir) and fills the secret again."""
    tls = ensure_server_cert(tmp_path / "tls", "wild.test")
    assert tls.ca is not None
    with running_server(data_dir, tmp_path / "server.log", warm_pool_size=0) as server:
        assert server.settings.egress_upstream_ca is not None
        shutil.copy(tls.ca, server.settings.egress_upstream_ca)
        with fake_internet(names={"api.wild.test": "1"}, tls=(tls.cert, tls.key)) as net, sdk_pointed_at(server):
            name, value = f"restart-key-{uuid.uuid4().hex[:6]}", f"sk-{uuid.uuid4().hex}"
            Secret.create(name, value)
            sbx = Sandbox.create(timeout=300, network=_network(net, {"api.wild.test": [
                {"transform": {"headers": {"X-Key": Secret.fill(name)}}}]}))
            sbx.commands.run(f"echo nameserver {net.dns} > /etc/resolv.conf", user="root")
            assert _get(sbx, "https://api.wild.test:8443/before")[0].startswith("200 ")
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
            restarted = spawn(server.settings, server.log_path)
            try:
                wait_listening(server.url, restarted, server.log_path)
                again = Sandbox.connect(sbx.sandbox_id)
                assert _get(again, "https://api.wild.test:8443/after")[0].startswith("200 ")
                assert [r["headers"]["x-key"] for r in net.requests()] == [value, value]
            finally:
                Sandbox.kill(sbx.sandbox_id)
                stop(restarted)


#: On one kept-alive connection: two GETs, a POST with a Content-Length body, a chunked POST;
#: prints each status and the SHA-256 of the bodies sent
_KEEPALIVE = r"""
import hashlib, http.client, os, sys
conn = http.client.HTTPSConnection(sys.argv[1], int(sys.argv[2]), timeout=30)
big, parts = os.urandom(1 << 20), [os.urandom(70000), b"x" * 5, os.urandom(3)]
for method, body, extra in (("GET", None, {}), ("GET", None, {}), ("POST", big, {}),
                            ("POST", iter(parts), {"Transfer-Encoding": "chunked"})):
    conn.request(method, f"/{method.lower()}", body=body, headers=extra, encode_chunked=bool(extra))
    r = conn.getresponse(); r.read()
    print(r.status)
print(hashlib.sha256(big).hexdigest(), hashlib.sha256(b"".join(parts)).hexdigest())
"""


def test_transforms_on_a_kept_alive_connection_with_bodies(sdk_env: Server, wild_internet: FakeInternet) -> None:
    """Every request of one connection gets the headers; bodies (by length, chunked, 1 MiB) reach
    the upstream byte for byte."""
    net = wild_internet
    sbx = Sandbox.create(timeout=120, network=_network(net, {"api.wild.test": [
        {"transform": {"headers": {"X-Each": "yes"}}}]}))
    try:
        sbx.commands.run(f"echo nameserver {net.dns} > /etc/resolv.conf", user="root")
        sbx.files.write("/tmp/keepalive.py", _KEEPALIVE)
        out = sbx.commands.run("python3 /tmp/keepalive.py api.wild.test 8443", timeout=90).stdout.split("\n")
        assert out[:4] == ["200"] * 4, out
        big_sha, chunked_sha = out[4].split()
        got = [r for r in net.requests() if r["sni"] == "api.wild.test"]
        assert [r["path"] for r in got] == ["/get", "/get", "/post", "/post"]
        assert len({r["peer"] for r in got}) == 1  # one connection upstream too
        assert all(r["headers"]["x-each"] == "yes" for r in got)
        assert (got[2]["body_len"], got[2]["body_sha256"]) == (1 << 20, big_sha)
        assert (got[3]["body_len"], got[3]["body_sha256"]) == (70008, chunked_sha)
    finally:
        sbx.kill()
