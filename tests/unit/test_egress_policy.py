"""Egress rules as E2B documents them: parsing, precedence, names, and the fields errors name."""

from __future__ import annotations

import pytest

from sandboxd.orchestrator.egress import ALL_TRAFFIC, NO_EGRESS, OPEN_EGRESS, EgressPolicy, PolicyError
from sandboxd.orchestrator.network import egress_nft


def test_defaults_and_allow_internet_access() -> None:
    assert EgressPolicy.parse(True, None, None, None) == OPEN_EGRESS
    assert EgressPolicy.parse(False, None, None, None).deny_cidrs == (ALL_TRAFFIC,)
    assert EgressPolicy.from_json(None, allow_internet=False) == NO_EGRESS
    assert EgressPolicy.from_json(None, allow_internet=True) == OPEN_EGRESS


def test_addresses_names_and_round_trip() -> None:
    p = EgressPolicy.parse(True, ["198.51.100.7", "203.0.113.0/24", "API.Example.com.", "*.example.org"],
                           ["0.0.0.0/0", "198.51.100.7"], ["198.51.100.53"])
    assert p.allow_cidrs == ("198.51.100.7/32", "203.0.113.0/24")
    assert p.allow_domains == ("api.example.com", "*.example.org")
    assert p.effective_allow == ("198.51.100.7/32", "203.0.113.0/24", "198.51.100.53")
    assert EgressPolicy.from_json(p.to_json()) == p
    assert p.allows_host("api.example.com") and p.allows_host("API.example.com.")
    assert p.allows_host("a.b.example.org") and not p.allows_host("example.org")
    assert not p.allows_host("evil-api.example.com") and not p.allows_host("api.example.com.evil")


@pytest.mark.parametrize("allow_internet, allow, deny, dns, field", [
    (True, None, ["example.com"], None, "network.denyOut[0]"),
    (True, ["1.2.3.4/33"], None, None, "network.allowOut[0]"),
    (True, ["under_score..com"], None, None, "network.allowOut[0]"),
    (True, ["example.com"], None, None, "network.allowOut"),
    (True, ["::1"], None, None, "network.allowOut[0]"),
    (True, [""], None, None, "network.allowOut[0]"),
    (False, ["198.51.100.1"], None, None, "network.allowOut"),
    (True, None, None, ["one.one"], "network.dnsServers[0]"),
    (True, None, None, ["8.8.8.8"] * 11, "network.dnsServers"),
])
def test_bad_rules_name_their_field(allow_internet: bool, allow: list[str] | None, deny: list[str] | None,
                                    dns: list[str] | None, field: str) -> None:
    with pytest.raises(PolicyError) as err:
        EgressPolicy.parse(allow_internet, allow, deny, dns)
    assert err.value.field == field


def test_nft_redirects_only_when_names_are_allowed() -> None:
    assert "redirect" not in egress_nft(NO_EGRESS)
    named = EgressPolicy.parse(True, ["api.example.com"], ["0.0.0.0/0"], [])
    assert "redirect to :" in egress_nft(named)
    assert "elements" not in egress_nft(OPEN_EGRESS)
