"""A fake internet for egress tests: a network namespace of the test's own, reached from the host
through a veth, holding TEST-NET addresses only (RFC 5737: 198.51.100.0/24 and 203.0.113.0/24,
never routed on the real internet), serving HTTP on every address, and optionally HTTPS and DNS.

Each instance picks random /30 and host addresses, so concurrent test runs on one host do not
clash; everything it made goes away when the context exits.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: A server answering GET with ``<its address> <Host header> <TLS server name or ->``, over HTTP
#: on :8080 and, given a certificate, over HTTPS on :8443 (both on every address of the namespace).
_SERVER = r"""
import http.server, socketserver, ssl, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        sni = getattr(self.connection, "sni", "-")
        body = f"{self.connection.getsockname()[0]} {self.headers.get('Host')} {sni}\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
plain = S(("0.0.0.0", 8080), H)
threading.Thread(target=plain.serve_forever, daemon=True).start()
if len(sys.argv) > 2:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    def sni_cb(sock, name, _ctx): sock.sni = name or "-"
    ctx.sni_callback = sni_cb
    class T(S):
        def get_request(self):
            conn, addr = self.socket.accept()
            tls = ctx.wrap_socket(conn, server_side=True)
            tls.sni = getattr(tls, "sni", "-")
            return tls, addr
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


def _wait_port(netns: str, address: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    probe = f"import socket; socket.create_connection(({address!r}, {port}), timeout=0.5).close()"
    deadline = time.monotonic() + 15
    while subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", probe],
                         capture_output=True).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"fake internet server on {address}:{port} did not start")
        time.sleep(0.1)


@contextlib.contextmanager
def fake_internet(names: dict[str, str] | None = None, tls: tuple[Path, Path] | None = None) -> Iterator[FakeInternet]:
    """``names``: DNS records (name → one of the hosts, by index "0"/"1" or an address) served by
    dnsmasq in the namespace; ``tls``: (certificate, key) for the HTTPS server on :8443."""
    tag = secrets.token_hex(3)
    ns, veth = f"tinet{tag}", f"tin{tag}-h"
    block = 4 * random.randrange(1, 63)
    host_side, first = f"198.51.100.{block + 1}", f"198.51.100.{block + 2}"
    last = random.randrange(2, 250)
    second, dns = f"203.0.113.{last}", f"203.0.113.{last + 1}"  # DNS on an address of its own
    procs: list[subprocess.Popen[bytes]] = []
    _sh("ip", "netns", "add", ns)
    try:
        _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _sh("ip", "addr", "add", f"{host_side}/30", "dev", veth)
        _sh("ip", "link", "set", veth, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{first}/30", "dev", "eth0")
        _sh("ip", "-n", ns, "addr", "add", f"{second}/32", "dev", "lo")
        _sh("ip", "-n", ns, "addr", "add", f"{dns}/32", "dev", "lo")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", ns, "route", "add", "default", "via", host_side)
        for address in (second, dns):
            _sh("ip", "route", "add", f"{address}/32", "via", first)
        argv = ["ip", "netns", "exec", ns, sys.executable, "-c", _SERVER]
        if tls:
            argv += [str(tls[0]), str(tls[1])]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_port(ns, first, 8080, procs[-1])
        if tls:
            _wait_port(ns, first, 8443, procs[-1])
        net = FakeInternet(ns, host_side, [first, second])
        if names:
            records = {n: (net.hosts[int(a)] if a.isdigit() and len(a) == 1 else a) for n, a in names.items()}
            args = [f"--address=/{n}/{a}" for n, a in records.items()]
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "dnsmasq", "--no-daemon", "--no-resolv",
                                           "--no-hosts", f"--listen-address={dns}", "--bind-interfaces",
                                           "--port=53", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            net.dns, net.names = dns, records
        yield net
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for address in (second, dns):
            subprocess.run(["ip", "route", "del", f"{address}/32"], capture_output=True)
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextlib.contextmanager
def host_listener(address: str) -> Iterator[int]:
    """A TCP listener of the host's own on ``address`` (a service a sandbox must never reach)."""
    with socket.socket() as srv:
        srv.bind((address, 0))
        srv.listen()
        yield srv.getsockname()[1]
