"""Gateway documents, Match.hosts and Target.service: what is accepted and what is refused, with
the document, the field and the reason."""

from __future__ import annotations

from typing import Any

import pytest

from meshlib.rules import RulesError, RuleSet

GATEWAY: dict[str, Any] = {
    "kind": "Gateway",
    "service": "edge",
    "listeners": [
        {"port": 8080, "https_redirect": True},
        {"port": 8443, "tls": [{"hosts": ["Shop.Example.com"], "certificate": "/c", "key": "/k"}]},
    ],
}
ROUTE: dict[str, Any] = {
    "kind": "Route",
    "service": "edge",
    "routes": [
        {
            "match": {"hosts": ["shop.example.com", "*.example.org"], "path": {"prefix": "/orders"}},
            "to": [{"service": "orders", "weight": 90}, {"service": "orders-next", "weight": 10}],
            "timeout": "5s",
            "rewrite": {"prefix": "/"},
        }
    ],
}


def problems(*docs: dict[str, Any]) -> list[str]:
    with pytest.raises(RulesError) as info:
        RuleSet(list(docs))
    return [f"{p.field}: {p.reason}" for p in info.value.problems]


def test_a_gateway_and_its_route() -> None:
    rules = RuleSet([GATEWAY, ROUTE])
    gateway = rules.gateway("edge")
    assert gateway is not None and gateway.https_port == 8443 and gateway.trusted_hops == 0
    assert gateway.listeners[1].tls[0].hosts == ("shop.example.com",)  # host names are lowercased
    route = rules.route("edge")
    assert route is not None and [t.service for t in route.routes[0].to] == ["orders", "orders-next"]
    assert RuleSet(rules.to_dicts()) == rules


def test_a_gateways_route_is_not_a_client_route() -> None:
    rules = RuleSet([GATEWAY, ROUTE])
    from meshlib.snapshot import Snapshot

    assert Snapshot(rules).plans["edge"].routes.routes == ()  # callers of edge are not routed by it


@pytest.mark.parametrize(
    ("listeners", "reason"),
    [
        ([{"port": 80}, {"port": 80}], "port 80 is listed more than once"),
        ([{"port": 80, "https_redirect": True}], "https_redirect needs a listener with tls"),
        ([{"port": 0}], "greater than or equal to 1"),
        ([{"port": 443, "tls": []}], "at least 1 entr"),
        (
            [
                {
                    "port": 443,
                    "https_redirect": True,
                    "tls": [{"hosts": "a.b", "certificate": "c", "key": "k"}],
                }
            ],
            "plain HTTP",
        ),
        ([{"port": 443, "tls": [{"hosts": ["a.b:443"], "certificate": "c", "key": "k"}]}], "without a port"),
        ([], "at least 1 entr"),
    ],
)
def test_bad_listeners_are_refused(listeners: list[dict[str, Any]], reason: str) -> None:
    found = problems({**GATEWAY, "listeners": listeners})
    assert any(reason in p for p in found), found


def test_trusted_hops_are_bounded() -> None:
    assert any("less than or equal to 16" in p for p in problems({**GATEWAY, "trusted_hops": 17}))


def test_target_service_is_required_in_a_gateways_route_and_refused_elsewhere() -> None:
    bad = {
        "kind": "Route",
        "service": "edge",
        "routes": [{"to": [{"subset": "v1"}], "retries": {"attempts": 2}}],
    }
    found = problems(GATEWAY, bad)
    assert any(p.startswith("routes[0].to[0].service: required in a gateway's Route") for p in found), found
    assert any(p.startswith("routes[0].to[0].subset:") for p in found), found
    assert any(p.startswith("routes[0].retries: set it in the target service's own Route") for p in found), (
        found
    )
    found = problems({**ROUTE, "service": "orders"})
    assert (
        "routes[0].match.hosts: only a gateway's Route matches hosts, and there is no Gateway/orders" in found
    )
    assert any(p.startswith("routes[0].to[1].service: only a gateway's Route") for p in found), found


def test_a_gateway_in_use_cannot_be_removed_alone() -> None:
    rules = RuleSet([GATEWAY, ROUTE])
    with pytest.raises(RulesError):
        rules.without("Gateway", "edge")
    assert rules.without("Route", "edge").without("Gateway", "edge") == RuleSet.EMPTY


def test_one_service_listed_twice_is_refused() -> None:
    twice = {**ROUTE, "routes": [{"to": [{"service": "orders"}, {"service": "orders"}]}]}
    assert any("service 'orders' is listed twice" in p for p in problems(GATEWAY, twice))
