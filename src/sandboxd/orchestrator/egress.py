"""A sandbox's egress policy: what it may reach, checked once at create or update, then enforced
by nftables in its slot namespace (addresses) and by the egress proxy (names).

E2B's semantics, which the SDKs document: with no ``deny_out`` everything public is allowed;
``allow_out`` beats ``deny_out``; ``allow_internet_access=False`` is ``deny_out=["0.0.0.0/0"]``;
a name in ``allow_out`` needs ``deny_out`` to hold all traffic (else the name adds nothing and the
user is told so) and is matched against the TLS SNI or HTTP Host of the connection, never against
DNS answers (which the sandbox controls). Whatever the rules say, private, link-local, loopback and
other non-public ranges stay unreachable (:data:`DENIED_RANGES`).

``rules`` (E2B's ``network.rules``): per-host request transforms, ``{host: [{"transform":
{"headers": {name: value}}}]}``. They grant nothing (the host must be allowed as well); the egress
proxy terminates TLS for a matching host only, with the sandbox's own CA, sets the headers, and
re-originates TLS to the destination, verifying its certificate for that host. A value may hold
``${e2b.secrets.<name>}`` placeholders (the SDK's ``Secret.fill``): the proxy puts the secret's
current value in per request, so the value never enters the sandbox. Plain HTTP is never
transformed: the sandbox chooses the address, and only a verified certificate proves the host.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
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
#: A header name (RFC 9110 token) and the placeholders a transform's value may hold
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
PLACEHOLDER = re.compile(r"\$\{e2b\.([a-z]+)\.([^}]*)\}")
MAX_HEADER_VALUE = 8192
#: Headers that frame or route the request: a transform setting one would break the stream or
#: send it elsewhere than the certificate was checked for
FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade", "te",
                             "trailer", "keep-alive", "proxy-connection", "expect"})


class PolicyError(ValueError):
    """An egress rule the server will not take; ``field`` names the offending one (E2B's field
    path, e.g. ``network.allowOut[2]``); ``status`` 400, or 501 for what sandboxd lacks."""

    def __init__(self, field_name: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.status = status


@dataclass(frozen=True)
class HostRule:
    """The rules of one ``rules`` key: the host (exact, or ``*.suffix``) and each rule's headers,
    in order (a later rule's header replaces an earlier one of the same name)."""

    host: str
    transforms: tuple[tuple[tuple[str, str], ...], ...]

    def headers(self) -> dict[str, tuple[str, str]]:
        """lower-cased name → (name, value) after every transform, in order."""
        out: dict[str, tuple[str, str]] = {}
        for transform in self.transforms:
            for name, value in transform:
                out[name.lower()] = (name, value)
        return out

    def to_json(self) -> list[dict[str, Any]]:
        return [{"transform": {"headers": dict(t)}} if t else {} for t in self.transforms]


def secret_names(value: str) -> Iterator[str]:
    """The secrets a header value's placeholders name (``${e2b.secrets.<name>}``)."""
    for m in PLACEHOLDER.finditer(value):
        if m[1] == "secrets":
            yield m[2]


@dataclass(frozen=True)
class EgressPolicy:
    """Normalised rules. ``deny_cidrs`` holding ``0.0.0.0/0`` is "deny by default"."""

    allow_cidrs: tuple[str, ...] = ()
    allow_domains: tuple[str, ...] = ()
    deny_cidrs: tuple[str, ...] = ()
    dns_servers: tuple[str, ...] = field(default=DEFAULT_DNS)
    rules: tuple[HostRule, ...] = ()

    @property
    def needs_proxy(self) -> bool:
        """Whether the slot's egress proxy has work: names to allow, or requests to transform."""
        return bool(self.allow_domains or self.rules)

    def allows_address(self, address: str) -> bool:
        """Whether the address rules alone let a connection to ``address`` through (names aside;
        the private ranges are checked apart)."""
        ip = ipaddress.IPv4Address(address)
        if any(ip in ipaddress.IPv4Network(c) for c in self.effective_allow):
            return True
        return not any(ip in ipaddress.IPv4Network(c) for c in self.deny_cidrs)

    def rule_for(self, host: str) -> HostRule | None:
        """E2B's match: an exact key first, else the longest ``*.`` key whose suffix the host
        ends with (below it, at any depth: never the apex); rule sets are not merged."""
        host = host.lower().rstrip(".")
        wild: HostRule | None = None
        for rule in self.rules:
            if rule.host == host:
                return rule
            if (rule.host.startswith("*.") and host.endswith(rule.host[1:])
                    and (wild is None or len(rule.host) > len(wild.host))):
                wild = rule
        return wild

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
        out: dict[str, Any] = {"allowOut": [*self.allow_cidrs, *self.allow_domains], "denyOut": list(self.deny_cidrs),
                               "dnsServers": list(self.dns_servers)}
        if self.rules:
            out["rules"] = {r.host: r.to_json() for r in self.rules}
        return out

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
                   dns_servers=tuple(data.get("dnsServers", DEFAULT_DNS)),
                   rules=_rules(data.get("rules"), "rules", lambda _: True))

    @classmethod
    def parse(cls, allow_internet: bool, allow_out: list[str] | None, deny_out: list[str] | None,
              dns_servers: list[str] | None, prefix: str = "network", rules: Any = None,
              secret_exists: Callable[[str], bool] = lambda _: False) -> EgressPolicy:
        """Check and normalise the rules of a create (or update) body; raise :class:`PolicyError`
        naming the first bad field. ``secret_exists`` tells whether a placeholder's secret does."""
        prefix = f"{prefix}." if prefix else ""
        host_rules = _rules(rules, f"{prefix}rules", secret_exists)
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
                   tuple(dict.fromkeys(deny)), dns, host_rules)


def _rules(raw: Any, where: str, secret_exists: Callable[[str], bool]) -> tuple[HostRule, ...]:
    """``rules`` in E2B's shape, ``{host: [{"transform": {"headers": {name: value}}}]}``, and
    nothing else (an unknown key is a 400 naming it)."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise PolicyError(where, "an object of host name → list of rules")
    if len(raw) > MAX_RULES:
        raise PolicyError(where, f"at most {MAX_RULES} hosts")
    out: dict[str, HostRule] = {}
    for key, items in raw.items():
        at = f"{where}[{key!r}]"
        if not isinstance(key, str) or _is_address(key.strip()):
            raise PolicyError(at, "a key is a host name ('api.example.com' or '*.example.com'): transforms "
                                  "apply to HTTPS requests, matched by the name the certificate is checked for")
        host = _domain(key, at)
        if host in out:
            raise PolicyError(at, f"{host!r} is given twice (keys are compared lower-cased)")
        if not isinstance(items, list):
            raise PolicyError(at, "a list of rules")
        transforms = tuple(_transform(item, f"{at}[{i}]", secret_exists) for i, item in enumerate(items))
        out[host] = HostRule(host, transforms)
    return tuple(out.values())


def _transform(item: Any, where: str, secret_exists: Callable[[str], bool]) -> tuple[tuple[str, str], ...]:
    if not isinstance(item, dict):
        raise PolicyError(where, "a rule is an object with 'transform'")
    for key in item:
        if key != "transform":
            raise PolicyError(f"{where}.{key}", "unknown key (a rule has 'transform' only)")
    transform = item.get("transform")
    if transform is None:
        return ()
    if not isinstance(transform, dict):
        raise PolicyError(f"{where}.transform", "an object with 'headers'")
    for key in transform:
        if key != "headers":
            raise PolicyError(f"{where}.transform.{key}", "unknown key (a transform has 'headers' only)")
    headers = transform.get("headers") or {}
    if not isinstance(headers, dict):
        raise PolicyError(f"{where}.transform.headers", "an object of header name → value")
    out = []
    for name, value in headers.items():
        at = f"{where}.transform.headers[{name!r}]"
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise PolicyError(at, "not a valid HTTP header name")
        if name.lower() in FRAMING_HEADERS:
            raise PolicyError(at, f"{name} frames or routes the request and cannot be set by a transform")
        if not isinstance(value, str) or len(value) > MAX_HEADER_VALUE or re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value):
            raise PolicyError(at, f"a string of at most {MAX_HEADER_VALUE} characters without control characters")
        for m in PLACEHOLDER.finditer(value):
            if m[1] == "identity":
                raise PolicyError(at, f"{m[0]}: workload identity tokens (iam) are not implemented", 501)
            if m[1] != "secrets":
                raise PolicyError(at, f"{m[0]}: unknown placeholder (use ${{e2b.secrets.<name>}})")
            if not secret_exists(m[2]):
                raise PolicyError(at, f"{m[0]}: no secret named {m[2]!r} (Secret.create it first)")
        out.append((name, value))
    return tuple(out)


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
