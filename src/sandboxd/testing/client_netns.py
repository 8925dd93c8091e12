"""A network namespace where SDK clients resolve a test domain to a sandboxd on this host.

The domain mode is reached the way users reach it, by name: ``api.<domain>`` and
``<port>-<id>.<domain>`` over HTTPS on port 443. A test cannot touch the host's resolver, so the
clients run in a namespace of their own (``ip netns exec``) whose ``/etc/resolv.conf`` (from
``/etc/netns/<name>/``) points at dnsmasq inside it, answering the whole domain with the host
end of a veth pair — a TEST-NET-3 address (203.0.113.0/24) that the server listens on. Nothing
leaves the host: the namespace has no other route.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import string
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NETNS_ETC = Path("/etc/netns")


@dataclass(frozen=True)
class ClientNetns:
    name: str
    server_address: str  # the host's end: where the sandboxd of the test domain listens
    domain: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace (with its resolv.conf)."""
        return ["ip", "netns", "exec", self.name, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _free_block() -> int:
    """A /30 of 203.0.113.0/24 that no interface on this host has (concurrent test runs)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    free = [b for b in range(4, 252, 4) if f"203.0.113.{b + 1}/" not in used]
    if not free:
        raise RuntimeError("no free /30 in 203.0.113.0/24 on this host")
    return random.choice(free)


def _wait_dns(ns: ClientNetns, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    probe = ns.command(["getent", "hosts", f"api.{ns.domain}"])
    while time.monotonic() < deadline:
        out = subprocess.run(probe, capture_output=True, text=True).stdout
        if ns.server_address in out:
            return
        time.sleep(0.1)
    raise RuntimeError(f"dnsmasq in {ns.name} does not answer api.{ns.domain}")


@contextlib.contextmanager
def client_netns(domain: str) -> Iterator[ClientNetns]:
    """Make the namespace, its veth pair and its DNS server; remove all of it on exit."""
    tag = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
    name, host_if, ns_if = f"sdkm-{tag}", f"sdkm{tag}h", f"sdkm{tag}n"
    block = _free_block()
    host_ip, ns_ip = f"203.0.113.{block + 1}", f"203.0.113.{block + 2}"
    etc = NETNS_ETC / name
    dns: subprocess.Popen[bytes] | None = None
    try:
        _ip("netns", "add", name)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", name)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", name, "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        _ip("-n", name, "link", "set", ns_if, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        ns = ClientNetns(name, host_ip, domain)
        dns = subprocess.Popen(ns.command([
            "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll", "--user=root",
            "--listen-address=127.0.0.1", "--bind-interfaces", "--pid-file=", "--log-facility=-",
            f"--address=/{domain}/{host_ip}"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_dns(ns)
        yield ns
    finally:
        if dns is not None:
            dns.terminate()
            dns.wait(10)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(etc, ignore_errors=True)
