"""No option silently ignored: every field of E2B's create and network bodies is implemented or
answered in E2B's error shape naming it; Idempotency-Key; the ingress options (allowPublicTraffic,
maskRequestHost) through the proxy, with the real SDK."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox, Secret

from sandboxd.store.db import Database

from .conftest import Server

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("body, status, field", [
    ({"bogus": 1}, 400, "bogus"),
    ({"network": {"bogus": 1}}, 400, "network.bogus"),
    ({"network": {"denyOut": ["example.com"]}}, 400, "network.denyOut[0]"),
    ({"network": {"allowOut": ["300.1.1.1"]}}, 400, "network.allowOut[0]"),
    ({"network": {"allowOut": ["example.com"]}}, 400, "network.allowOut"),  # without deny all: E2B's 400
    ({"network": {"denyOut": ["fe80::/10"]}}, 400, "network.denyOut[0]"),
    ({"network": {"dnsServers": ["dns.example"]}}, 400, "network.dnsServers[0]"),
    ({"network": {"httpsPorts": [70000]}}, 400, "network.httpsPorts[0]"),
    ({"allow_internet_access": False, "network": {"allowOut": ["198.51.100.7"]}}, 400, "network.allowOut"),
    ({"autoResume": {"enabled": True, "x": 1}}, 400, "autoResume.x"),
    ({"mcp": {"github": {}}}, 501, "mcp"),
    ({"autoResume": {"enabled": True}}, 400, "autoResume"),  # without autoPause, as the SDKs check
    ({"autoResume": {"enabled": True}, "autoPause": True, "autoPauseMemory": False}, 400, "autoResume"),
    ({"iam": {"tokens": {"aws": {"audience": "sts", "token_type": "JWT-SVID"}}}}, 501, "iam.tokens"),
    ({"volumeMounts": [{"name": "v", "path": "/data"}]}, 404, "volumeMounts[0].name"),  # no such volume
    ({"network": {"egressProxy": {"address": "proxy.example:1080"}}}, 501, "network.egressProxy"),
    ({"network": {"rules": {"api.example.com": [{"transform": {"body": "b"}}]}}}, 400,
     "network.rules['api.example.com'][0].transform.body"),
    ({"network": {"rules": {"api.example.com": [{"transform": {"headers": {"A": "${e2b.secrets.no-such-one}"}}}]}}},
     400, "network.rules['api.example.com'][0].transform.headers['A']"),
    ({"network": {"rules": {"10.0.0.1": []}}}, 400, "network.rules['10.0.0.1']"),
])
def test_create_options_are_honoured_or_named(sdk_env: Server, body: dict, status: int, field: str) -> None:
    with sdk_env.api() as api:
        for path in ("/v2/sandboxes", "/sandboxes"):
            r = api.post(path, json={"templateID": "base", **body})
            assert r.status_code == status, (path, r.text)
            assert r.json()["code"] == status and field in r.json()["message"], r.text
        assert api.get("/v2/sandboxes").json() == []  # nothing was made


def test_sdk_surfaces_the_named_option(sdk_env: Server) -> None:
    with pytest.raises(Exception, match=r"network\.rules"):  # a secret that does not exist
        Sandbox.create(network={"allow_out": ["api.example.com"], "deny_out": ["0.0.0.0/0"],
                                "rules": {"api.example.com": [{"transform": {"headers": {
                                    "X-A": Secret.fill("no-such-secret-here")}}}]}})


def test_network_update_body_is_checked(sdk_env: Server, sandbox: Sandbox) -> None:
    with sdk_env.api() as api:
        r = api.put(f"/sandboxes/{sandbox.sandbox_id}/network", json={"denyOut": ["nope!"]})
        assert r.status_code == 400 and "denyOut[0]" in r.json()["message"]
        r = api.put(f"/sandboxes/{sandbox.sandbox_id}/network", json={"allowPublicTraffic": False})
        assert r.status_code == 400 and "allowPublicTraffic" in r.json()["message"]
        assert api.put("/sandboxes/nosuchsandbox/network", json={}).status_code == 404


def test_idempotency_key_returns_the_same_sandbox(sdk_env: Server) -> None:
    first = Sandbox.create(timeout=60, idempotency_key="np-retry-1")
    try:
        again = Sandbox.create(timeout=60, idempotency_key="np-retry-1")
        assert again.sandbox_id == first.sandbox_id
        with sdk_env.api() as api:
            r = api.post("/v2/sandboxes", json={"templateID": "base"}, headers={"Idempotency-Key": "np-retry-1"})
            assert r.status_code == 201 and r.json()["sandboxID"] == first.sandbox_id
            r = api.post("/v2/sandboxes", json={"templateID": "base"}, headers={"Idempotency-Key": "Bad Key"})
            assert r.status_code == 400 and "Idempotency-Key" in r.json()["message"]
            assert len(api.get("/v2/sandboxes").json()) == 1
            # another API key's same Idempotency-Key is another create
            key2 = Database(sdk_env.settings.db_url).create_api_key("second")
            r = httpx.post(f"{sdk_env.url}/v2/sandboxes", json={"templateID": "base", "timeout": 30},
                           headers={"X-API-Key": key2, "Idempotency-Key": "np-retry-1"}, timeout=60)
            assert r.status_code == 201 and r.json()["sandboxID"] != first.sandbox_id
            api.delete(f"/sandboxes/{r.json()['sandboxID']}")
    finally:
        first.kill()


_ECHO_SERVER = r"""
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (self.headers.get('Host', '') + '|' + self.headers.get('e2b-traffic-access-token', '')).encode()
        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(('0.0.0.0', 8000), H).serve_forever()
"""


def _port_get(server: Server, sbx: Sandbox, port: int, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(f"{server.url}/", headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(port),
                                                **(headers or {})}, timeout=10)


def _serve_echo(server: Server, sbx: Sandbox, headers: dict[str, str]) -> None:
    sbx.files.write("/tmp/echo.py", _ECHO_SERVER)
    sbx.commands.run("python3 /tmp/echo.py", background=True)
    deadline = time.monotonic() + 20
    while _port_get(server, sbx, 8000, headers).status_code == 502:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_private_traffic_needs_the_token_and_host_is_masked(sdk_env: Server) -> None:
    sbx = Sandbox.create(timeout=60, network={"allow_public_traffic": False,
                                              "mask_request_host": "${PORT}-masked.example.test"})
    public = Sandbox.create(timeout=60)
    try:
        token = sbx.traffic_access_token
        assert token and public.traffic_access_token is None
        _serve_echo(sdk_env, sbx, {"e2b-traffic-access-token": token})
        r = _port_get(sdk_env, sbx, 8000)
        assert r.status_code == 403 and "e2b-traffic-access-token" in r.json()["message"]
        assert _port_get(sdk_env, sbx, 8000, {"e2b-traffic-access-token": "x" * len(token)}).status_code == 403
        r = _port_get(sdk_env, sbx, 8000, {"e2b-traffic-access-token": token})
        assert r.status_code == 200
        assert r.text == "8000-masked.example.test|"  # the token is not passed on to the sandbox
        assert sbx.commands.run("echo envd").stdout == "envd\n"  # envd: its own token, as before
        info = sbx.get_info()
        assert info.network and info.network.get("allow_public_traffic") is False
        fork = sbx.fork(timeout=60)[0]
        assert not isinstance(fork, Exception)
        try:  # a private sandbox's fork is private too (with a token of its own)
            assert fork.traffic_access_token and fork.traffic_access_token != token
            _serve_echo(sdk_env, fork, {"e2b-traffic-access-token": fork.traffic_access_token})
            assert _port_get(sdk_env, fork, 8000).status_code == 403
        finally:
            fork.kill()

        _serve_echo(sdk_env, public, {})
        assert _port_get(sdk_env, public, 8000).status_code == 200  # public: no token needed
    finally:
        sbx.kill()
        public.kill()


def test_auto_resume_on_traffic(sdk_env: Server) -> None:
    """autoResume: a request for a paused sandbox resumes it (memory and processes as they
    were) and is then served; without it the sandbox stays paused."""
    sbx = Sandbox.create(timeout=60, lifecycle={"on_timeout": "pause", "auto_resume": True})
    plain = Sandbox.create(timeout=60)
    try:
        _serve_echo(sdk_env, sbx, {})
        sbx.pause()
        plain.pause()
        assert sbx.get_info().state.value == "paused"
        r = _port_get(sdk_env, sbx, 8000)
        assert r.status_code == 200 and r.text.endswith("|")  # the server started before the pause
        assert sbx.get_info().state.value == "running"
        assert sbx.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": True}
        assert _port_get(sdk_env, plain, 8000).status_code == 502
        assert plain.get_info().state.value == "paused"
    finally:
        sbx.kill()
        plain.kill()


_WS_AND_TLS_SERVER = r"""
import base64, hashlib, http.server, socket, ssl, sys, threading
def ws(conn):
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(4096)
    lines = head.decode().split("\r\n")
    fields = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
    accept = base64.b64encode(hashlib.sha1((fields["sec-websocket-key"]
                              + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
    text = fields.get("host", "").encode()
    conn.sendall(bytes([0x81, len(text)]) + text)
    conn.recv(1024)
def serve(port, wrap):
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port)); srv.listen()
    while True:
        conn, _ = srv.accept()
        try:
            threading.Thread(target=ws, args=(wrap(conn),), daemon=True).start()
        except Exception:
            conn.close()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[1], sys.argv[2])
threading.Thread(target=serve, args=(8001, lambda c: c), daemon=True).start()
serve(8443, lambda c: ctx.wrap_socket(c, server_side=True))
"""


def test_websockets_get_the_mask_and_https_ports(sdk_env: Server, tmp_path: Path) -> None:
    from websockets.sync.client import connect

    from sandboxd.tls import ensure_server_cert

    tls = ensure_server_cert(tmp_path, "sandbox.test")
    sbx = Sandbox.create(timeout=60, network={"mask_request_host": "${PORT}-masked.example.test",
                                              "https_ports": [8443]})
    try:
        sbx.files.write("/tmp/cert.pem", tls.cert.read_text())
        sbx.files.write("/tmp/key.pem", tls.key.read_text())
        sbx.files.write("/tmp/ws.py", _WS_AND_TLS_SERVER)
        sbx.commands.run("python3 /tmp/ws.py /tmp/cert.pem /tmp/key.pem", background=True)
        ws_url = sdk_env.url.replace("http", "ws", 1) + "/"
        for port in (8001, 8443):
            deadline = time.monotonic() + 20
            while True:
                try:
                    with connect(ws_url, additional_headers={"E2b-Sandbox-Id": sbx.sandbox_id,
                                                             "E2b-Sandbox-Port": str(port)}, open_timeout=5) as ws:
                        assert ws.recv(timeout=5) == f"{port}-masked.example.test"
                    break
                except (OSError, Exception):  # noqa: BLE001 - the server is still starting
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.3)
    finally:
        sbx.kill()
