"""A sandbox's egress policy: what it may reach, checked once at create or update, then enforced
by nftables in its slot namespace (addresses) and by the egress proxy (names).

E2B's semantics, which the SDKs document: with no ``deny_out`` everything public is allowed;
``allow_out`` beats ``deny_out``; ``allow_internet_access=False`` is ``deny_out=["0.0.0.0/0"]``;
a name in ``allow_out`` needs ``deny_out`` to hold all traffic (else the name adds nothing and the
user is told so) and is matched against the TLS SNI or HTTP Host of the connection, never against
DNS answers (which the sandbox controls). Whatever the rules say, private, link-local, loopback and
other non-public ranges stay unreachable (:data:`DENIED_RANGES`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

ALL_TRAFFIC = "0.0.0.0/0"
#: Never reachable from a sandbox, whatever its rules: the host's own networks, other
#: sandboxes, link-local (the gateway), loopback, CGNAT, multicast and reserved space.
DENIED_RANGES = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
                 "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4")
#: E2B's default nameserver, allowed when ``allow_out`` names a domain and ``dnsServers`` is absent
DEFAULT_DNS = ("8.8.8.8",)
MAX_DNS_SERVERS = 10
MAX_RULES = 1000
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"^(\*\.)?({_LABEL}\.)*{_LABEL}$")


class PolicyError(ValueError):
    """An egress rule the server will not take; ``field`` names the offending one (E2B's field
    path, e.g. ``network.allowOut[2]``)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class EgressPolicy:
    """Normalised rules. ``deny_cidrs`` holding ``0.0.0.0/0`` is "deny by default"."""

    allow_cidrs: tuple[str, ...] = ()
    allow_domains: tuple[str, ...] = ()
    deny_cidrs: tuple[str, ...] = ()
    dns_servers: tuple[str, ...] = field(default=DEFAULT_DNS)

    @property
    def denies_all(self) -> bool:
        return ALL_TRAFFIC in self.deny_cidrs

    @property
    def is_open(self) -> bool:
        """Every public address, as a sandbox without rules."""
        return not self.deny_cidrs

    @property
    def effective_allow(self) -> tuple[str, ...]:
        """Addresses allowed whatever ``deny_out`` says: ``allow_out``'s, and the DNS servers when
        a name is allowed (E2B lets the sandbox resolve the names it may reach)."""
        return self.allow_cidrs + (self.dns_servers if self.allow_domains else ())

    def allows_host(self, host: str) -> bool:
        """Whether a TLS server name or HTTP host is one ``allow_out`` names (``*.x`` matches any
        name below ``x``, not ``x`` itself, as on E2B)."""
        host = host.lower().rstrip(".")
        for domain in self.allow_domains:
            if domain.startswith("*."):
                if host.endswith(domain[1:]) and len(host) > len(domain) - 1:
                    return True
            elif host == domain:
                return True
        return False

    def to_json(self) -> dict[str, Any]:
        return {"allowOut": [*self.allow_cidrs, *self.allow_domains], "denyOut": list(self.deny_cidrs),
                "dnsServers": list(self.dns_servers)}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, allow_internet: bool = True) -> EgressPolicy:
        """What :meth:`to_json` stored (trusted: it was checked when it was made)."""
        data = data or {}
        if not data and not allow_internet:
            return cls(deny_cidrs=(ALL_TRAFFIC,))
        allow = data.get("allowOut") or []
        return cls(allow_cidrs=tuple(a for a in allow if _is_address(a)),
                   allow_domains=tuple(a for a in allow if not _is_address(a)),
                   deny_cidrs=tuple(data.get("denyOut") or ()),
                   dns_servers=tuple(data.get("dnsServers", DEFAULT_DNS)))

    @classmethod
    def parse(cls, allow_internet: bool, allow_out: list[str] | None, deny_out: list[str] | None,
              dns_servers: list[str] | None, prefix: str = "network") -> EgressPolicy:
        """Check and normalise the rules of a create (or update) body; raise :class:`PolicyError`
        naming the first bad field."""
        prefix = f"{prefix}." if prefix else ""
        allow_cidrs: list[str] = []
        allow_domains: list[str] = []
        for i, raw in enumerate(_bounded(allow_out, f"{prefix}allowOut")):
            where = f"{prefix}allowOut[{i}]"
            if (cidr := _cidr(raw, where)) is not None:
                allow_cidrs.append(cidr)
            else:
                allow_domains.append(_domain(raw, where))
        deny: list[str] = []
        for i, raw in enumerate(_bounded(deny_out, f"{prefix}denyOut")):
            where = f"{prefix}denyOut[{i}]"
            cidr = _cidr(raw, where)
            if cidr is None:
                raise PolicyError(where, f"{raw!r} is not an IPv4 address or CIDR block: deny_out takes "
                                         "addresses only (deny all with '0.0.0.0/0' and allow names in allow_out)")
            deny.append(cidr)
        if not allow_internet:
            if allow_out:
                raise PolicyError(f"{prefix}allowOut", "a sandbox with allow_internet_access=false reaches "
                                  "nothing; to allow some destinations, deny_out ['0.0.0.0/0'] and allow_out them")
            deny = [ALL_TRAFFIC]
        if allow_domains and ALL_TRAFFIC not in deny:
            raise PolicyError(f"{prefix}allowOut", "a domain in allow_out needs deny_out to hold '0.0.0.0/0' "
                              "(all other traffic denied); without it every destination is allowed already")
        dns = DEFAULT_DNS if dns_servers is None else tuple(_dns(dns_servers, f"{prefix}dnsServers"))
        return cls(tuple(dict.fromkeys(allow_cidrs)), tuple(dict.fromkeys(allow_domains)),
                   tuple(dict.fromkeys(deny)), dns)


#: No egress at all (``allow_internet_access=False``), and the default of a bare slot
NO_EGRESS = EgressPolicy(deny_cidrs=(ALL_TRAFFIC,))
#: Every public address (a sandbox created without rules)
OPEN_EGRESS = EgressPolicy()


def _bounded(items: list[str] | None, where: str) -> list[str]:
    items = items or []
    if len(items) > MAX_RULES:
        raise PolicyError(where, f"at most {MAX_RULES} entries")
    return items


def _is_address(raw: str) -> bool:
    try:
        ipaddress.IPv4Network(raw, strict=False)
    except ValueError:
        return False
    return True


def _cidr(raw: str, where: str) -> str | None:
    """The CIDR of an IPv4 address or block; None if it is not one (then it may be a name)."""
    if not isinstance(raw, str) or not raw.strip():
        raise PolicyError(where, "an empty entry")
    raw = raw.strip()
    if ":" in raw:
        raise PolicyError(where, f"{raw!r}: IPv6 is not supported (sandboxes have IPv4 egress only)")
    if not re.fullmatch(r"[0-9./]+", raw):
        return None
    try:
        return str(ipaddress.IPv4Network(raw, strict=False))
    except ValueError as exc:
        raise PolicyError(where, f"{raw!r} is not a valid IPv4 address or CIDR block: {exc}") from exc


def _domain(raw: str, where: str) -> str:
    name = raw.strip().lower().rstrip(".")
    if len(name) > 253 or not _DOMAIN.fullmatch(name) or "." not in name.lstrip("*."):
        raise PolicyError(where, f"{raw!r} is neither an IPv4 address, a CIDR block nor a domain name "
                                 "(a leading '*.' matches subdomains)")
    return name


def _dns(servers: list[str], where: str) -> list[str]:
    if len(servers) > MAX_DNS_SERVERS:
        raise PolicyError(where, f"at most {MAX_DNS_SERVERS} servers")
    out = []
    for i, raw in enumerate(servers):
        try:
            out.append(str(ipaddress.IPv4Address(raw)))
        except ValueError as exc:
            raise PolicyError(f"{where}[{i}]", f"{raw!r} is not an IPv4 address") from exc
    return out
