"""A fake internet for egress tests: a network namespace of the test's own, reached from the host
through a veth, holding TEST-NET addresses only (RFC 5737: 198.51.100.0/24 and 203.0.113.0/24,
never routed on the real internet), serving HTTP on every address, and optionally HTTPS and DNS.

Concurrent test runs on one host each make their own: the addresses are chosen under a host-wide
lock among those no interface or route of the host uses yet, and configured before the lock is
let go. (Random picks alone clashed: two links with one /30 send both runs' traffic to the first
namespace, and the second run's 203.0.113.x, routed via an address that namespace does not have,
becomes a black hole — a probe times out.) Everything it made goes away when the context exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: An HTTP/1.1 server (connections kept alive) answering GET and POST with ``<its address> <Host
#: header> <TLS server name or ->``, over HTTP on :8080 and, given a certificate, over HTTPS on
#: :8443 and :443 (all on every address of the namespace); each request's headers (and a POST's
#: body length and SHA-256) are appended to a log (a JSON line), never sent back.
_SERVER = r"""
import hashlib, http.server, json, socketserver, ssl, sys, threading
LOG = open(sys.argv[1], "a", buffering=1)
LOCK = threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def setup(self):
        if hasattr(self.request, "do_handshake"):  # TLS: in this connection's thread, not the accept loop
            self.request.do_handshake()
        super().setup()
    def _body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            out = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                out += self.rfile.read(size); self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""): pass
            return out
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))
    def do_POST(self):
        self.do_GET(self._body())
    def do_GET(self, posted=None):
        sni = getattr(self.connection, "sni", "-")
        entry = {"address": self.connection.getsockname()[0], "sni": sni, "path": self.path, "peer": self.client_address[1],
                 "headers": [[k, v] for k, v in self.headers.items()]}
        if posted is not None:
            entry.update(body_len=len(posted), body_sha256=hashlib.sha256(posted).hexdigest())
        with LOCK:
            LOG.write(json.dumps(entry) + "\n")
        body = f"{self.connection.getsockname()[0]} {self.headers.get('Host')} {sni}\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
plain = S(("0.0.0.0", 8080), H)
threading.Thread(target=plain.serve_forever, daemon=True).start()
if len(sys.argv) > 3:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    def sni_cb(sock, name, _ctx): sock.sni = name or "-"
    ctx.sni_callback = sni_cb
    class T(S):
        def get_request(self):
            conn, addr = self.socket.accept()
            conn.settimeout(30)
            tls = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            tls.sni = getattr(tls, "sni", "-")
            return tls, addr
    threading.Thread(target=T(("0.0.0.0", 443), H).serve_forever, daemon=True).start()
    T(("0.0.0.0", 8443), H).serve_forever()
else:
    threading.Event().wait()
"""


def _sh(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")


@dataclass
class FakeInternet:
    netns: str
    host_side: str  # the host's own address on the link (a "public" address of the host)
    hosts: list[str]  # addresses the namespace answers on, first 198.51.100.x, then 203.0.113.x
    dns: str | None = None  # a DNS server there (dnsmasq, on an address of its own), if names were given
    names: dict[str, str] = field(default_factory=dict)
    log: Path | None = None  # where the server appends each request it got

    def requests(self) -> list[dict[str, Any]]:
        """Every request the server got so far: address, sni, path and headers (name → value,
        names lower-cased; a repeated name keeps its last value)."""
        if self.log is None or not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            entry = json.loads(line)
            entry["headers"] = {k.lower(): v for k, v in entry["headers"]}
            out.append(entry)
        return out


#: Held while one run picks and configures its addresses, so another never picks the same ones.
LOCK_FILE = Path("/run/sandboxd-fake-internet.lock")


def _in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host has an address in or a route to (the default route aside)."""
    out = []
    for argv in (["ip", "-4", "-o", "addr"], ["ip", "-4", "route"]):
        for word in subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split():
            with contextlib.suppress(ValueError):
                out.append(ipaddress.IPv4Network(word, strict=False))
    return out


def _free(candidate: str, used: list[ipaddress.IPv4Network]) -> bool:
    net = ipaddress.IPv4Network(candidate, strict=False)
    return not any(net.overlaps(u) for u in used)


def _pick_addresses() -> tuple[int, int]:
    """A /30 of 198.51.100.0/24 and two adjacent addresses of 203.0.113.0/24 the host does not
    use (call with :data:`LOCK_FILE` held)."""
    used = _in_use()
    blocks = [b for b in range(4, 252, 4) if _free(f"198.51.100.{b}/30", used)]
    lasts = [n for n in range(2, 250) if _free(f"203.0.113.{n}/31", used) and _free(f"203.0.113.{n + 1}/32", used)]
    if not blocks or not lasts:
        raise RuntimeError("no free TEST-NET addresses left for another fake internet on this host")
    return random.choice(blocks), random.choice(lasts)


def _wait_port(netns: str, address: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    probe = f"import socket; socket.create_connection(({address!r}, {port}), timeout=0.5).close()"
    deadline = time.monotonic() + 15
    while subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", probe],
                         capture_output=True).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"fake internet server on {address}:{port} did not start")
        time.sleep(0.1)


def _answers(server: str, name: str) -> bool:
    """Whether the DNS server at ``server`` (reached through the host's route) answers an A
    query for ``name`` with at least one record."""
    query = secrets.token_bytes(2) + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    query += b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.sendto(query, (server, 53))
            reply = sock.recv(512)
        except OSError:
            return False
    return reply[:2] == query[:2] and int.from_bytes(reply[6:8], "big") > 0


def _wait_dns(server: str, name: str, proc: subprocess.Popen[bytes]) -> None:
    """Until dnsmasq answers for ``name``: a sandbox's first lookup must not race its start."""
    deadline = time.monotonic() + 15
    while not _answers(server, name):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"fake internet DNS on {server} did not answer for {name}")
        time.sleep(0.1)


@contextlib.contextmanager
def fake_internet(names: dict[str, str] | None = None, tls: tuple[Path, Path] | None = None) -> Iterator[FakeInternet]:
    """``names``: DNS records (name → one of the hosts, by index "0"/"1" or an address) served by
    dnsmasq in the namespace; ``tls``: (certificate, key) for the HTTPS servers on :8443 and :443."""
    tag = secrets.token_hex(3)
    ns, veth = f"tinet{tag}", f"tin{tag}-h"
    procs: list[subprocess.Popen[bytes]] = []
    routes: list[str] = []
    log = Path(tempfile.mkdtemp(prefix="fake-internet-")) / "requests.jsonl"
    _sh("ip", "netns", "add", ns)
    try:
        _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        with open(LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # let go when closed, after the host has our addresses
            block, last = _pick_addresses()
            host_side, first = f"198.51.100.{block + 1}", f"198.51.100.{block + 2}"
            second, dns = f"203.0.113.{last}", f"203.0.113.{last + 1}"  # DNS on an address of its own
            _sh("ip", "addr", "add", f"{host_side}/30", "dev", veth)
            _sh("ip", "link", "set", veth, "up")
            for address in (second, dns):
                _sh("ip", "route", "add", f"{address}/32", "via", first, "dev", veth, "onlink")
                routes.append(address)
        _sh("ip", "-n", ns, "addr", "add", f"{first}/30", "dev", "eth0")
        _sh("ip", "-n", ns, "addr", "add", f"{second}/32", "dev", "lo")
        _sh("ip", "-n", ns, "addr", "add", f"{dns}/32", "dev", "lo")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", ns, "route", "add", "default", "via", host_side)
        argv = ["ip", "netns", "exec", ns, sys.executable, "-c", _SERVER, str(log)]
        if tls:
            argv += [str(tls[0]), str(tls[1])]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_port(ns, first, 8080, procs[-1])
        if tls:
            _wait_port(ns, first, 8443, procs[-1])
            _wait_port(ns, first, 443, procs[-1])
        net = FakeInternet(ns, host_side, [first, second], log=log)
        if names:
            records = {n: (net.hosts[int(a)] if a.isdigit() and len(a) == 1 else a) for n, a in names.items()}
            args = [f"--address=/{n}/{a}" for n, a in records.items()]
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "dnsmasq", "--no-daemon", "--no-resolv",
                                           "--no-hosts", f"--listen-address={dns}", "--bind-interfaces",
                                           "--port=53", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            net.dns, net.names = dns, records
            _wait_dns(dns, next(iter(records)), procs[-1])
        yield net
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(log.parent, ignore_errors=True)
        for address in routes:
            subprocess.run(["ip", "route", "del", f"{address}/32", "dev", veth], capture_output=True)
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextlib.contextmanager
def host_listener(address: str) -> Iterator[int]:
    """A TCP listener of the host's own on ``address`` (a service a sandbox must never reach)."""
    with socket.socket() as srv:
        srv.bind((address, 0))
        srv.listen()
        yield srv.getsockname()[1]
