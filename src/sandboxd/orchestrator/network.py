"""Per-sandbox network slots: two namespaces, two veth pairs, one DNAT rule.

Slot N of prefix P::

    host (root ns)            slot ns "P-N"                         guest ns "P-N-g"
    PN-h 10.a.b.(4N+1)/30 ── eth-h 10.a.b.(4N+2)/30
                              gl 169.254.0.22/30 ─────────────────── eth0 169.254.0.21/30 (runsc)

Why two namespaces: every guest has the same address (169.254.0.21), so snapshots and templates
never embed a per-sandbox IP; the slot namespace gives each guest a unique, host-routable
address (its ``host_address``) and DNATs it to the guest. Its forward chain lets only the host's
connections in: nothing the guest starts leaves the slot (egress is a later, explicit policy).
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

GUEST_ADDRESS = "169.254.0.21"
GATEWAY_ADDRESS = "169.254.0.22"
NETNS_DIR = Path("/var/run/netns")


class NetworkError(RuntimeError):
    """A slot could not be created; carries the failing command's stderr."""


@dataclass(frozen=True)
class NetworkSlot:
    index: int
    netns: str
    guest_netns: str
    host_address: str
    host_side_address: str
    host_veth: str

    @property
    def guest_netns_path(self) -> str:
        return str(NETNS_DIR / self.guest_netns)


def _run(*argv: str, stdin: str | None = None) -> None:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")


def _nft_rules(slot: NetworkSlot) -> str:
    """DNAT host → guest; forward only connections the host opened (and their replies)."""
    return f"""
table ip sbx {{
  chain dnat_to_guest {{ type nat hook prerouting priority dstnat; iifname "eth-h" ip daddr {slot.host_address} dnat to {GUEST_ADDRESS}; }}
  chain guard_forward {{ type filter hook forward priority filter; policy drop;
    ct state established,related accept;
    iifname "eth-h" oifname "gl" ip daddr {GUEST_ADDRESS} accept; }}
  chain guard_input {{ type filter hook input priority filter; policy drop;
    ct state established,related accept; iifname "lo" accept; }}
}}
"""


class SlotPool:
    """Creates and removes slots; indexes are unique per prefix on this host."""

    def __init__(self, prefix: str = "sbx", base_cidr: str = "10.213.0.0/16", max_slots: int = 1024) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", prefix):
            raise ValueError("network prefix must be 1-6 lowercase letters/digits (interface names are ≤15 chars)")
        self.prefix = prefix
        self.network = ipaddress.ip_network(base_cidr)
        self.max_slots = min(max_slots, self.network.num_addresses // 4)
        self._lock = threading.Lock()
        self._reserved: set[int] = set()

    def slot(self, index: int) -> NetworkSlot:
        """The names and addresses of slot ``index`` (pure computation)."""
        block = self.network.network_address + 4 * index
        return NetworkSlot(index=index, netns=f"{self.prefix}-{index}", guest_netns=f"{self.prefix}-{index}-g",
                           host_address=str(block + 2), host_side_address=str(block + 1),
                           host_veth=f"{self.prefix}{index}-h")

    def acquire(self) -> NetworkSlot:
        """Create the lowest free slot; on failure remove whatever was made and raise."""
        slot = self.slot(self._reserve())
        try:
            self._create(slot)
        except BaseException:
            self._destroy(slot)
            with self._lock:
                self._reserved.discard(slot.index)
            raise
        return slot

    def release(self, slot: NetworkSlot) -> None:
        """Remove the slot's namespaces (and with them its veths); idempotent."""
        self._destroy(slot)
        with self._lock:
            self._reserved.discard(slot.index)

    def restore_guest_address(self, slot: NetworkSlot) -> None:
        """runsc moves the guest address into gVisor's netstack and strips it from eth0; put it
        back before the next start or restore of a sandbox in this slot."""
        _run("ip", "-n", slot.guest_netns, "-batch", "-", stdin=(
            f"addr replace {GUEST_ADDRESS}/30 dev eth0\nlink set eth0 up\n"
            f"route replace default via {GATEWAY_ADDRESS}\n"))

    def existing(self) -> list[int]:
        """Indexes of this prefix's slot namespaces present on the host."""
        pattern = re.compile(rf"^{re.escape(self.prefix)}-(\d+)(-g)?$")
        names = os.listdir(NETNS_DIR) if NETNS_DIR.is_dir() else []
        return sorted({int(m[1]) for n in names if (m := pattern.match(n))})

    def cleanup_stale(self, keep: set[int]) -> list[int]:
        """Remove every slot of this prefix not in ``keep`` (after a crash); return their indexes."""
        stale = [i for i in self.existing() if i not in keep]
        for i in stale:
            self.release(self.slot(i))
        with self._lock:
            self._reserved |= set(keep)
        return stale

    # -- internals -----------------------------------------------------------------------------

    def _reserve(self) -> int:
        with self._lock:
            taken = self._reserved | set(self.existing())
            for i in range(self.max_slots):
                if i not in taken:
                    self._reserved.add(i)
                    return i
        raise NetworkError(f"all {self.max_slots} network slots are in use")

    def _create(self, s: NetworkSlot) -> None:
        _run("ip", "netns", "add", s.netns)
        _run("ip", "netns", "add", s.guest_netns)
        _run("ip", "-batch", "-", stdin=(
            f"link add {s.host_veth} type veth peer name eth-h netns {s.netns}\n"
            f"addr add {s.host_side_address}/30 dev {s.host_veth}\n"
            f"link set {s.host_veth} up\n"))
        _run("ip", "-n", s.netns, "-batch", "-", stdin=(
            f"link set lo up\naddr add {s.host_address}/30 dev eth-h\nlink set eth-h up\n"
            f"link add gl type veth peer name eth0 netns {s.guest_netns}\n"
            f"addr add {GATEWAY_ADDRESS}/30 dev gl\nlink set gl up\n"))
        _run("ip", "-n", s.guest_netns, "-batch", "-", stdin=(
            f"link set lo up\naddr add {GUEST_ADDRESS}/30 dev eth0\nlink set eth0 up\n"
            f"route add default via {GATEWAY_ADDRESS}\n"))
        _run("ip", "netns", "exec", s.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _run("ip", "netns", "exec", s.netns, "nft", "-f", "-", stdin=_nft_rules(s))

    def _destroy(self, s: NetworkSlot) -> None:
        for ns in (s.guest_netns, s.netns):
            if (NETNS_DIR / ns).exists():
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if Path(f"/sys/class/net/{s.host_veth}").exists():  # deleting the slot ns normally removes it
            subprocess.run(["ip", "link", "del", s.host_veth], capture_output=True)
