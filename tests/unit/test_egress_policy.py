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


RULES = {"API.Example.com": [{"transform": {"headers": {"Authorization": "Bearer ${e2b.secrets.key}", "X-A": "1"}}},
                             {"transform": {"headers": {"x-a": "2"}}}],
         "*.example.com": [{"transform": {"headers": {"X-Wild": "w"}}}],
         "*.b.example.com": [{}]}


def test_rules_match_as_e2b_says_and_round_trip() -> None:
    p = EgressPolicy.parse(True, ["api.example.com"], ["0.0.0.0/0"], None, rules=RULES,
                           secret_exists=lambda name: name == "key")
    assert p.needs_proxy
    rule = p.rule_for("api.example.com.")
    assert rule is not None and rule.host == "api.example.com"  # exact first, keys lower-cased
    assert rule.headers() == {"authorization": ("Authorization", "Bearer ${e2b.secrets.key}"), "x-a": ("x-a", "2")}
    wild = p.rule_for("x.example.com")
    assert wild is not None and wild.host == "*.example.com"
    deep = p.rule_for("c.b.example.com")  # the longest wildcard suffix; rule sets are not merged
    assert deep is not None and deep.host == "*.b.example.com" and deep.headers() == {}
    assert p.rule_for("example.com") is None  # a wildcard never matches its apex
    assert EgressPolicy.from_json(p.to_json()) == p
    assert p.to_json()["rules"]["api.example.com"][0] == {"transform": {"headers": {
        "Authorization": "Bearer ${e2b.secrets.key}", "X-A": "1"}}}
    assert "redirect" in egress_nft(EgressPolicy.parse(True, None, None, None, rules={"a.example.com": []}))


@pytest.mark.parametrize("rules, field, status", [
    ([], "network.rules", 400),
    ({"198.51.100.7": []}, "network.rules['198.51.100.7']", 400),
    ({"*": []}, "network.rules['*']", 400),
    ({"a.example.com": {}}, "network.rules['a.example.com']", 400),
    ({"a.example.com": [{"transform": {"headers": {"X": "y"}}, "match": 1}]}, "network.rules['a.example.com'][0].match", 400),
    ({"a.example.com": [{"transform": {"body": "x"}}]}, "network.rules['a.example.com'][0].transform.body", 400),
    ({"a.example.com": [{"transform": {"headers": {"Bad Name": "y"}}}]},
     "network.rules['a.example.com'][0].transform.headers['Bad Name']", 400),
    ({"a.example.com": [{"transform": {"headers": {"Host": "evil.test"}}}]},
     "network.rules['a.example.com'][0].transform.headers['Host']", 400),
    ({"a.example.com": [{"transform": {"headers": {"X": "a\r\nB: c"}}}]},
     "network.rules['a.example.com'][0].transform.headers['X']", 400),
    ({"a.example.com": [{"transform": {"headers": {"X": "${e2b.secrets.nope}"}}}]},
     "network.rules['a.example.com'][0].transform.headers['X']", 400),
    ({"a.example.com": [{"transform": {"headers": {"X": "${e2b.identity.tokens.aws}"}}}]},
     "network.rules['a.example.com'][0].transform.headers['X']", 501),
])
def test_bad_rules_name_their_key(rules: object, field: str, status: int) -> None:
    with pytest.raises(PolicyError) as err:
        EgressPolicy.parse(True, None, None, None, rules=rules)
    assert (err.value.field, err.value.status) == (field, status)
