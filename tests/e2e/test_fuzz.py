"""Bad input, measured: seeded random cases against the API, the proxy and envd of a real server
and a real sandbox. None may crash a server (a 500 counts as one), and none may touch another
sandbox: a bystander sandbox's file and process are checked after every run.

The case counts are printed (``-s``) and quoted in README's security section. A failure prints
the seed and case, so it replays exactly.
"""

from __future__ import annotations

import json
import random
import socket
import string
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from e2b import Sandbox

from .conftest import Server

pytestmark = pytest.mark.slow

SEED = 14
WEIRD_STRINGS = ["", " ", "..", "../../etc/passwd", "/", "//", "\x00", "é", "🦀", "a" * 5000, "%2e%2e/", "null",
                 "-1", "0", "99999999999999999999", "1e309", "true", "${PORT}", "<script>", "' OR 1=1 --",
                 "base", "0.0.0.0/0", "10.0.0.1", "::1", "*.example.com", "a.b", "\r\nX-Injected: 1"]


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice(WEIRD_STRINGS)
    if kind == 1:
        return rng.choice([0, -1, 1, 2**31, 2**63, -2**63, 10**30])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return rng.random() * rng.choice([1, -1, 1e300])
    if kind == 4:
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(40)))
    if kind == 5:
        return rng.choice(WEIRD_STRINGS) * rng.randrange(1, 3)
    if kind in (6, 7):
        return {_key(rng): _value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]


#: keys E2B's bodies have, so the fuzzer reaches the checks behind the first key
KEYS = ["templateID", "timeout", "metadata", "envVars", "allow_internet_access", "autoPause", "autoPauseMemory",
        "autoResume", "enabled", "network", "allowOut", "denyOut", "dnsServers", "allowPublicTraffic",
        "maskRequestHost", "httpsPorts", "egressProxy", "rules", "mcp", "iam", "tokens", "volumeMounts", "secure",
        "memory", "requireHealthyGuest", "duration", "name", "path"]


def _key(rng: random.Random) -> str:
    return rng.choice(KEYS) if rng.random() < 0.8 else rng.choice(WEIRD_STRINGS)[:40]


def _network(rng: random.Random) -> dict[str, Any]:
    return {rng.choice(KEYS[9:17]): rng.choice([[_value(rng) for _ in range(3)],
                                               [rng.choice(WEIRD_STRINGS)], _value(rng)]) for _ in range(3)}


def _create_body(rng: random.Random) -> Any:
    body = _value(rng) if rng.random() < 0.1 else {_key(rng): _value(rng) for _ in range(rng.randrange(5))}
    if not isinstance(body, dict):
        return body
    if rng.random() < 0.5:
        body["network"] = _network(rng)
    body["templateID"] = "fuzz-no-such-template"  # a body that passes every check is a 404, not a sandbox
    return body


@pytest.fixture(scope="module")
def bystander(sdk_env: Server) -> Iterator[Sandbox]:
    """A sandbox no case is aimed at: its file and process must be there, unchanged, after."""
    sbx = Sandbox.create(timeout=600)
    sbx.files.write("/home/user/bystander.txt", "untouched")
    handle = sbx.commands.run("sleep 600", background=True, timeout=0)
    try:
        yield sbx
        assert sbx.files.read("/home/user/bystander.txt") == "untouched"
        assert any(p.pid == handle.pid for p in sbx.commands.list())
    finally:
        sbx.kill()


def _alive(server: Server) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def _run(name: str, cases: list[Callable[[], httpx.Response | None]], ok: Callable[[httpx.Response], bool]) -> None:
    bad = []
    for i, case in enumerate(cases):
        r = case()
        if r is not None and not ok(r):
            bad.append((i, r.status_code, r.request.method, str(r.request.url)[:200], r.text[:300]))
    print(f"fuzz {name}: {len(cases)} cases, {len(bad)} bad")
    assert not bad, f"seed {SEED}, {name}: {bad[:5]}"


def _error_shape(r: httpx.Response) -> bool:
    if r.status_code >= 500 and r.status_code != 501:
        return False
    if r.status_code >= 400:
        body = r.json()
        return isinstance(body.get("code"), int) and isinstance(body.get("message"), str)
    return True


def test_fuzz_api(sdk_env: Server, bystander: Sandbox) -> None:
    rng = random.Random(SEED)
    sid = bystander.sandbox_id
    with sdk_env.api() as api:
        def post(path: str, body: Any) -> Callable[[], httpx.Response]:
            return lambda: api.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})

        cases: list[Callable[[], httpx.Response | None]] = []
        for _ in range(200):
            cases.append(post(rng.choice(["/v2/sandboxes", "/sandboxes"]), _create_body(rng)))
        for _ in range(60):  # bodies for the bystander's routes: only ones that cannot change it
            body = {k: v for k, v in {_key(rng): _value(rng) for _ in range(3)}.items()
                    if k not in ("timeout", "duration", "memory", "requireHealthyGuest")}
            body["bogus"] = 1  # rejected whole, whatever else it says
            route = rng.choice(["/sandboxes/{}/timeout", "/sandboxes/{}/pause", "/v2/sandboxes/{}/connect",
                                "/sandboxes/{}/refreshes", "/sandboxes/{}/resume"])
            cases.append(post(route.format(sid), body))
            net_body, net_path = _network(rng), f"/sandboxes/fuzz{rng.randrange(9)}/network"
            cases.append(lambda b=net_body, p=net_path: api.put(p, json=b))
        for _ in range(60):
            params = {rng.choice(["metadata", "state", "limit", "nextToken", "order", "template", "startedAfter",
                                  "sandbox_ids", "start", "end", "cursor", "level", "direction", "search"]):
                      str(rng.choice(WEIRD_STRINGS))[:300] for _ in range(3)}
            path = rng.choice(["/v2/sandboxes", "/sandboxes", f"/sandboxes/{sid}/metrics", "/sandboxes/metrics",
                               f"/sandboxes/{sid}/logs", f"/v2/sandboxes/{sid}/logs", f"/sandboxes/{sid}"])
            cases.append(lambda p=path, q=params: api.get(p, params=q))
        for _ in range(30):  # malformed JSON and wrong content types
            raw = rng.choice([b"{", b"[]", b"\xff\xfe", b"{\"templateID\": }", b"null", b"1" * 10000, b""])
            cases.append(lambda b=raw: api.post("/v2/sandboxes", content=b, headers={"Content-Type": "application/json"}))
        _run("api", cases, _error_shape)
        assert [s["sandboxID"] for s in api.get("/v2/sandboxes").json()] == [sid]  # no case made a sandbox
    _alive(sdk_env)


def _raw_request(server: Server, data: bytes) -> bytes:
    """Bytes straight to the listener (malformed HTTP no client library would send)."""
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(data)
        try:
            return s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return b""


def test_fuzz_proxy(sdk_env: Server, bystander: Sandbox) -> None:
    rng = random.Random(SEED + 1)
    sid = bystander.sandbox_id
    cases: list[Callable[[], httpx.Response | None]] = []
    for _ in range(150):
        headers = {}
        if rng.random() < 0.7:
            headers["E2b-Sandbox-Id"] = rng.choice([sid, sid.upper(), sid + "x", "", "../" + sid,
                                                    str(rng.choice(WEIRD_STRINGS))[:200]])
        if rng.random() < 0.7:
            headers["E2b-Sandbox-Port"] = rng.choice(["49983", "0", "-1", "65536", "99999999", "8000", "abc",
                                                      " 49983", "49983 ", "1e3"])
        if rng.random() < 0.4:
            headers["Host"] = rng.choice([f"49983-{sid}.sbx.test", f"0-{sid}.x", f"99999-{sid}.x", f"-{sid}.",
                                          f"49983-{sid}", "a" * 300 + ".x", f"8000-{sid.upper()}.x"])
        if rng.random() < 0.3:
            headers["X-Access-Token"] = rng.choice(["", "x" * 48, "\x7f"])
        if rng.random() < 0.2:
            headers["e2b-traffic-access-token"] = "x"
        path = rng.choice(["/", "/health", "/init", "/files", "/files?path=../../etc/passwd", "/envs", "/metrics",
                           "/process.Process/List", "/%2e%2e/", "/" + "a" * 3000, "/filesystem.Filesystem/Stat"])
        method = rng.choice(["GET", "POST", "PUT", "DELETE", "OPTIONS"])
        cases.append(lambda m=method, p=path, h=headers: _safe(lambda: httpx.request(
            m, sdk_env.url + p, headers=h, content=b"{}" if m == "POST" else None, timeout=15)))
    raw = [b"GET / HTTP/1.1\r\nHost: \r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 100000 + b"\r\n\r\n",
           b"GET /\r\n\r\n", b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.1\r\nHost: 49983-" + sid.encode()
           + b".x\r\nContent-Length: -1\r\n\r\n", b"GET / HTTP/1.1\r\nE2b-Sandbox-Id: " + sid.encode()
           + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nE2b-Sandbox-Id: " + sid.encode() + b"\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Key: bad\r\n\r\n"]
    for data in raw * 5:
        cases.append(lambda d=data: _raw_status(sdk_env, d))
    _run("proxy", cases, lambda r: r.status_code < 500 or r.status_code in (501, 502))
    _alive(sdk_env)


def _safe(fn: Callable[[], httpx.Response]) -> httpx.Response | None:
    """A request the client library itself refuses to send (bad header values) is no case."""
    try:
        return fn()
    except (httpx.LocalProtocolError, UnicodeEncodeError):
        return None


def _raw_status(server: Server, data: bytes) -> httpx.Response | None:
    reply = _raw_request(server, data)
    if not reply.startswith(b"HTTP/1.1 "):
        return None  # the server closed the connection: fine, as long as it lives on
    return httpx.Response(int(reply[9:12]), content=reply.partition(b"\r\n\r\n")[2])


def test_fuzz_envd(sdk_env: Server, bystander: Sandbox) -> None:
    """A target sandbox of its own: paths out of its root, symlinks out, multipart slips, huge
    headers and bodies. Its own files may change; the bystander's must not."""
    rng = random.Random(SEED + 2)
    target = Sandbox.create(timeout=300)
    try:
        target.commands.run("ln -s / /home/user/root-link; ln -s /home/user/../../.. /home/user/up", timeout=30)
        headers = {"E2b-Sandbox-Id": target.sandbox_id, "E2b-Sandbox-Port": "49983",
                   "X-Access-Token": target._envd_access_token or ""}  # noqa: SLF001 - the SDK keeps it private
        paths = ["../../etc/passwd", "/home/user/root-link/etc/hostname", "/home/user/up/proc/1/environ", "/proc/self/",
                 "/dev/zero", "", "/", "\x00", "/home/user/" + "a" * 5000, "~/../..", "/home/user/%2e%2e/",
                 "/sys/kernel", "/home/user/bystander.txt", "/tmp/" + "é🦀"]
        cases: list[Callable[[], httpx.Response | None]] = []
        for _ in range(60):
            p = rng.choice(paths)
            cases.append(lambda p=p: _safe(lambda: httpx.get(f"{sdk_env.url}/files", params={"path": p},
                                                             headers=headers, timeout=30)))
        for _ in range(40):
            name = rng.choice(["../../../escape.txt", "/etc/x", "a/../../b", "..", "", "x" * 300, "\x00x"])
            body = rng.choice([b"data", b"x" * rng.choice([0, 1, 2**20])])
            p = rng.choice([*paths[:6], "/tmp/fuzz"])
            cases.append(lambda n=name, b=body, p=p: _safe(lambda: httpx.post(
                f"{sdk_env.url}/files", params={"path": p}, headers=headers, files={"file": (n, b)}, timeout=60)))
        for _ in range(20):
            rpc = rng.choice(["/filesystem.Filesystem/Stat", "/filesystem.Filesystem/ListDir",
                              "/filesystem.Filesystem/Remove", "/filesystem.Filesystem/Move",
                              "/process.Process/Start", "/process.Process/SendSignal"])
            body = json.dumps({_key(rng): _value(rng) for _ in range(3)}).encode()
            cases.append(lambda r=rpc, b=body: httpx.post(f"{sdk_env.url}{r}", content=b, timeout=30, headers={
                **headers, "Content-Type": "application/json", "Connect-Protocol-Version": "1"}))
        for size in (16 * 1024, 60 * 1024):
            cases.append(lambda s=size: _safe(lambda: httpx.get(f"{sdk_env.url}/files", params={"path": "/tmp"},
                                                                headers={**headers, "X-Big": "a" * s}, timeout=30)))
        _run("envd", cases, lambda r: r.status_code < 500 or r.status_code in (501, 502, 507))
        # its envd lives on (as root: a case may have overwritten its /etc/passwd, as its user may)
        assert target.commands.run("echo alive", user="root").stdout == "alive\n"
    finally:
        target.kill()
    _alive(sdk_env)
