"""Per-sandbox network slots: two namespaces, two veth pairs, one DNAT rule.

Slot N of prefix P::

    host (ns of this process)  slot ns "P-N"                        guest ns "P-N-g"
    P-N-h 10.a.b.(4N+1)/30 ─── eth-h 10.a.b.(4N+2)/30
                               gl 169.254.0.22/30 ─────────────────── eth0 169.254.0.21/30 (runtime)

Why two namespaces: every guest has the same address (169.254.0.21), so snapshots and templates
never embed a per-sandbox IP; the slot namespace gives each guest a unique, host-routable
address (its ``host_address``) and DNATs it to the guest. Its guard lets the host's connections
in and the guest's out to public addresses only; which of those it may reach is the sandbox's
egress policy (:func:`egress_nft`, names through the egress proxy, ``orchestrator/egress*.py``).

Why the guest address is put back only between runs: the runtime (gVisor's netstack) owns eth0
through a packet socket and answers for 169.254.0.21 itself; runsc reads the address from eth0 at
start and strips it, because a kernel holding it too would answer the guest's connections first,
with RSTs. So :meth:`SlotPool.restore_guest_address` refuses while a process is in the guest
namespace, and is called before each start or restore in a reused slot.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sandboxd.errors import StartError
from sandboxd.orchestrator.egress import DENIED_RANGES, NO_EGRESS, EgressPolicy
from sandboxd.orchestrator.egress_ca import SandboxCA
from sandboxd.orchestrator.egress_proxy import EgressProxy

GUEST_ADDRESS = "169.254.0.21"
GATEWAY_ADDRESS = "169.254.0.22"
NETNS_DIR = Path("/var/run/netns")
SYS_NET = Path("/sys/class/net")
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,5}")  # "P-16383-h" must fit in 15 chars


class NetworkError(StartError):
    """A slot could not be created; carries the failing command's stderr."""


@dataclass(frozen=True)
class NetworkSlot:
    index: int
    netns: str  # slot namespace
    guest_netns: str  # the runtime's namespace (eth0 = 169.254.0.21)
    host_address: str  # what the host dials to reach the guest (DNAT in the slot namespace)
    host_side_address: str  # the host's end of the slot link (the guest must never reach it)
    host_veth: str  # "P-N-h": the dashes keep prefixes "ab1" and "ab" apart (ab1-2-h, ab-12-h)

    @property
    def guest_netns_path(self) -> str:
        return str(NETNS_DIR / self.guest_netns)

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)


def _run(*argv: str, stdin: str | None = None) -> None:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")




#: Where the egress proxy listens in each slot namespace (on the gateway address): connections the
#: rules send there are let through only if their TLS SNI or HTTP Host is a name ``allow_out`` names.
EGRESS_PROXY_PORT = 15001


def _slot_nft(slot: NetworkSlot) -> str:
    """DNAT host → guest; forward the host's connections to the guest (and their replies), and
    the guest's own connections to public addresses only, masqueraded behind the slot address
    (what else they may reach is :func:`egress_nft`'s table); the slot namespace itself accepts
    nothing new from the guest but what the egress rules redirect to the egress proxy."""
    denied = ", ".join(DENIED_RANGES)
    return f"""
table ip sbx {{
  chain dnat_to_guest {{ type nat hook prerouting priority dstnat;
    iifname "eth-h" ip daddr {slot.host_address} dnat to {GUEST_ADDRESS}; }}
  chain egress {{ type nat hook postrouting priority srcnat; oifname "eth-h" ip saddr {GUEST_ADDRESS} masquerade; }}
}}
table inet sbx_guard {{
  chain forward {{ type filter hook forward priority filter; policy drop;
    iifname "eth-h" oifname "gl" ct state established,related accept;
    iifname "eth-h" oifname "gl" ip daddr {GUEST_ADDRESS} ct direction original accept;
    iifname "gl" oifname "eth-h" ct direction reply accept;
    iifname "gl" oifname "eth-h" ip saddr {GUEST_ADDRESS} ip daddr != {{ {denied} }} accept;
  }}
  chain input {{ type filter hook input priority filter; policy drop;
    ct state established,related accept; iifname "lo" accept;
    iifname "gl" ip daddr {GATEWAY_ADDRESS} tcp dport {EGRESS_PROXY_PORT} ct status dnat accept; }}
}}
"""


def _set(name: str, cidrs: tuple[str, ...]) -> str:
    elements = f" elements = {{ {', '.join(cidrs)} }};" if cidrs else ""
    return f"  set {name} {{ type ipv4_addr; flags interval; auto-merge;{elements} }}\n"


def egress_nft(policy: EgressPolicy) -> str:
    """The slot's ``sbx_egress`` table, replaced whole (one nft transaction) at each change, so
    a running sandbox's rules change at once. Judged on every packet the guest sends, not only
    on new connections: a connection the new rules deny stops, it is not grandfathered. With
    names allowed, new TCP connections the addresses alone would deny go to the egress proxy;
    with request transforms (``rules``), every new one on ports 80 and 443 as well."""
    denied = 'iifname "gl" ct direction original ip daddr @deny'
    redirect = ""
    if policy.needs_proxy:
        public = f'iifname "gl" meta l4proto tcp ip daddr != {{ {", ".join(DENIED_RANGES)} }}'
        to_proxy = f"redirect to :{EGRESS_PROXY_PORT};"
        redirect = "  chain by_name { type nat hook prerouting priority dstnat;\n"
        if policy.allow_domains:
            redirect += f"    {public} ip daddr != @allow ip daddr @deny {to_proxy}\n"
        if policy.rules:
            redirect += f"    {public} tcp dport {{ 80, 443 }} {to_proxy}\n"
        redirect += "  }\n"
    return ("table ip sbx_egress {}\ndelete table ip sbx_egress\ntable ip sbx_egress {\n"
            + _set("allow", policy.effective_allow) + _set("deny", policy.deny_cidrs)
            + "  chain forward { type filter hook forward priority filter + 1; policy accept;\n"
            + "    iifname \"gl\" ct direction original ip daddr @allow accept;\n"
            + f"    {denied} meta l4proto tcp reject with tcp reset;\n"
            + f"    {denied} reject with icmp type admin-prohibited; }}\n"
            + redirect + "}\n")


def host_nft(prefix: str, base_cidr: str) -> str:
    """The host's part of egress, one table per server: slots' traffic (already masqueraded to
    their slot address) is masqueraded again on the way out, and never forwarded to private or
    local ranges (defence in depth: the slot namespace already drops those); nothing from a slot
    reaches the host's own services, whatever address of the host it dials (replies to the
    host's connections to its guests excepted)."""
    denied = ", ".join(DENIED_RANGES)
    return f"""
table ip sandboxd_{prefix} {{
  chain forward {{ type filter hook forward priority filter; policy accept;
    iifname "{prefix}-*" ip daddr {{ {denied} }} drop; }}
  chain input {{ type filter hook input priority filter; policy accept;
    iifname "{prefix}-*" ct state established,related accept; iifname "{prefix}-*" drop; }}
  chain postrouting {{ type nat hook postrouting priority srcnat;
    ip saddr {base_cidr} oifname != "{prefix}-*" masquerade; }}
}}
"""


class SlotPool:
    """Creates and removes slots; indexes are unique per prefix on this host.

    Two servers on one host need different prefixes *and* different base networks."""

    def __init__(self, prefix: str = "sbx", base_cidr: str = "10.213.0.0/16", max_slots: int = 1024) -> None:
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError("network prefix must be 1-6 lowercase letters/digits starting with a letter "
                             "(interface names are ≤15 chars)")
        self.prefix = prefix
        self.network = ipaddress.ip_network(base_cidr)
        self.max_slots = min(max_slots, self.network.num_addresses // 4)
        self._lock = threading.Lock()
        self._reserved: set[int] = set()
        self.egress_proxy = EgressProxy()  # a slot's names; started when a slot first allows one

    def setup_host(self) -> None:
        """Once per server start (and per builder: build slots have a pool of their own): IPv4
        forwarding and this pool's egress table on the host (replaced, so a changed policy
        applies). Only sandboxes created with internet access have a path to it; the others'
        slot namespace drops everything they send."""
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        table = f"sandboxd_{self.prefix}"  # replaced in one transaction: never a moment without it
        _run("nft", "-f", "-", stdin=f"table ip {table} {{}}\ndelete table ip {table}\n"
                                     + host_nft(self.prefix, str(self.network)))

    def teardown_host(self) -> None:
        subprocess.run(["nft", "delete", "table", "ip", f"sandboxd_{self.prefix}"], capture_output=True)

    def slot(self, index: int) -> NetworkSlot:
        """The names and addresses of slot ``index`` (pure computation)."""
        block = self.network.network_address + 4 * index
        return NetworkSlot(index=index, netns=f"{self.prefix}-{index}", guest_netns=f"{self.prefix}-{index}-g",
                           host_address=str(block + 2), host_side_address=str(block + 1),
                           host_veth=f"{self.prefix}-{index}-h")

    def acquire(self, policy: EgressPolicy = NO_EGRESS, ca: SandboxCA | None = None) -> NetworkSlot:
        """Create the lowest free slot; on failure remove exactly what this call made and raise
        :class:`NetworkError` (never anything another process made under the same names, e.g. a
        leftover host veth, which :meth:`cleanup_stale` removes)."""
        return self._build(self.slot(self._reserve()), policy, ca)

    def recreate(self, index: int, policy: EgressPolicy = NO_EGRESS, ca: SandboxCA | None = None) -> NetworkSlot:
        """Make slot ``index`` again (a paused sandbox keeps its index, but not its namespaces
        across a reboot of the host); a slot that exists is left as it is."""
        with self._lock:
            self._reserved.add(index)
        if index in self.existing():
            return self.slot(index)
        return self._build(self.slot(index), policy, ca)

    def _build(self, slot: NetworkSlot, policy: EgressPolicy, ca: SandboxCA | None = None) -> NetworkSlot:
        """Create a reserved slot, or undo what was made of it and give the reservation up."""
        try:
            with contextlib.ExitStack() as undo:
                self._create(slot, undo.callback, policy, ca)
                undo.pop_all()
        except BaseException:
            with self._lock:
                self._reserved.discard(slot.index)
            raise
        return slot

    def release(self, slot: NetworkSlot) -> None:
        """Remove the slot's veths and namespaces; idempotent."""
        self.egress_proxy.close(slot.netns)
        _delete_link(slot.host_veth)  # first, synchronously: namespace teardown is asynchronous
        for ns in (slot.guest_netns, slot.netns):
            _delete_netns(ns)
        with self._lock:
            self._reserved.discard(slot.index)

    def set_egress(self, slot: NetworkSlot, policy: EgressPolicy, ca: SandboxCA | None = None) -> None:
        """Replace the slot's egress rules in one transaction (a running sandbox's too), and the
        names and transforms of its egress proxy (``ca``: the sandbox's, for transforms). The
        proxy is given them first, so no connection reaches it under rules it does not know."""
        self._serve_names(slot, policy, ca)
        _run("ip", "netns", "exec", slot.netns, "nft", "-f", "-", stdin=egress_nft(policy))

    def _serve_names(self, slot: NetworkSlot, policy: EgressPolicy, ca: SandboxCA | None = None) -> None:
        try:
            self.egress_proxy.apply(slot.netns, slot.netns_path, policy, (GATEWAY_ADDRESS, EGRESS_PROXY_PORT), ca)
        except OSError as exc:
            raise NetworkError(f"egress proxy in {slot.netns}: {exc}") from exc

    def restore_guest_address(self, slot: NetworkSlot) -> None:
        """Put 169.254.0.21/30 and the default route back on the guest's eth0 (idempotent).

        runsc takes them from eth0 at every start or restore and strips them; call this before
        starting or restoring a sandbox in a slot that had one. Never while one runs: the kernel
        would then answer for the guest (connections to it get RSTs), so that raises."""
        if users := _processes_in_netns(slot.guest_netns_path):
            raise NetworkError(f"{slot.guest_netns} is in use by pids {users[:5]}: the runtime owns the "
                               "guest address while it runs; restore it before the next start")
        _run("ip", "-n", slot.guest_netns, "-batch", "-", stdin=(
            f"addr replace {GUEST_ADDRESS}/30 dev eth0\nlink set eth0 up\n"
            f"route replace default via {GATEWAY_ADDRESS}\n"))

    def existing(self) -> list[int]:
        """Indexes of this prefix's slot namespaces present on the host."""
        pattern = re.compile(rf"^{re.escape(self.prefix)}-(\d+)(-g)?$")
        names = os.listdir(NETNS_DIR) if NETNS_DIR.is_dir() else []
        return sorted({int(m[1]) for n in names if (m := pattern.match(n))})

    def cleanup_stale(self, keep: set[int]) -> list[int]:
        """Remove every slot of this prefix not in ``keep`` (after a crash), including host veths
        left without a namespace; return the removed indexes. ``keep`` stays reserved."""
        stale = sorted({i for i in [*self.existing(), *self._host_veth_indexes()] if i not in keep})
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

    def _host_veth_indexes(self) -> list[int]:
        pattern = re.compile(rf"^{re.escape(self.prefix)}-(\d+)-h$")
        names = os.listdir(SYS_NET) if SYS_NET.is_dir() else []
        return [int(m[1]) for n in names if (m := pattern.match(n))]

    def _create(self, s: NetworkSlot, on_undo: Callable[..., object], policy: EgressPolicy,
                ca: SandboxCA | None = None) -> None:
        """Build the slot; register the undo of each step right after it succeeded, so a failure
        (e.g. a name clash with an interface someone else made) removes only what this call made."""
        for ns in (s.netns, s.guest_netns):
            _run("ip", "netns", "add", ns)
            on_undo(_delete_netns, ns)
        _run("ip", "link", "add", s.host_veth, "type", "veth", "peer", "name", "eth-h", "netns", s.netns)
        on_undo(_delete_link, s.host_veth)  # runs before the namespaces go (LIFO)
        _run("ip", "-batch", "-", stdin=(
            f"addr add {s.host_side_address}/30 dev {s.host_veth}\nlink set {s.host_veth} up\n"))
        _run("ip", "-n", s.netns, "-batch", "-", stdin=(
            f"link set lo up\naddr add {s.host_address}/30 dev eth-h\nlink set eth-h up\n"
            f"link add gl type veth peer name eth0 netns {s.guest_netns}\n"
            f"addr add {GATEWAY_ADDRESS}/30 dev gl\nlink set gl up\n"
            f"route add default via {s.host_side_address}\n"))
        _run("ip", "-n", s.guest_netns, "-batch", "-", stdin=(
            f"link set lo up\naddr add {GUEST_ADDRESS}/30 dev eth0\nlink set eth0 up\n"
            f"route add default via {GATEWAY_ADDRESS}\n"))
        _run("ip", "netns", "exec", s.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _run("ip", "netns", "exec", s.netns, "nft", "-f", "-", stdin=_slot_nft(s) + egress_nft(policy))
        self._serve_names(s, policy, ca)
        on_undo(self.egress_proxy.close, s.netns)


def _delete_netns(name: str) -> None:
    if (NETNS_DIR / name).exists():
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _delete_link(name: str) -> None:
    if (SYS_NET / name).exists():
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def _processes_in_netns(netns_path: str) -> list[int]:
    """Pids whose network namespace is the one bound at ``netns_path``."""
    try:
        target = os.stat(netns_path)
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{entry.name}/ns/net")
                if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                    pids.append(int(entry.name))
    return pids
