"""Route tables: first match wins; a rule without conditions takes every request it sees."""

from __future__ import annotations

import pytest

from meshlib.routing import RouteTable
from meshlib.rules import RouteDoc, RulesError, validate_document


def table(*rules: dict) -> RouteTable:
    return RouteTable(RouteDoc.model_validate({"kind": "Route", "service": "api", "routes": list(rules)}))


def test_a_rule_without_conditions_matches_everything_after_the_rules_before_it() -> None:
    routes = table(
        {"name": "canary", "match": {"headers": {"x-canary": {"exact": "true"}}}},
        {"name": "split", "to": [{"subset": "v1", "weight": 90}, {"weight": 10}]},
        {"name": "never", "match": {"path": {"prefix": "/"}}},
    )
    canary, split, never = routes.routes
    assert split.match.always and not canary.match.always and not never.match.always
    assert routes.match("GET", "/a", {"x-canary": "true"}, None) is canary
    assert routes.match("POST", "/b", {}, "caller") is split
    assert routes.match("GET", "/a", {"x-canary": "false"}, None) is split


def test_conditions_of_every_kind_are_not_always() -> None:
    for match in (
        {"methods": ["GET"]},
        {"path": {"exact": "/a"}},
        {"source": ["caller"]},
        {"headers": {"x-a": {"present": True}}},
    ):
        (rule,) = table({"match": match}).routes
        assert not rule.match.always
        assert table({"match": match}).match("PUT", "/z", {}, "other").name == "default"


def test_the_destination_cap_is_a_policy_of_every_route() -> None:
    routes = RouteTable(
        RouteDoc.model_validate({"kind": "Route", "service": "api", "routes": [{"name": "r"}]}), bulkhead=3
    )
    assert [r.bulkhead for r in (*routes.routes, routes.default)] == [3, 3]
    assert "bulkhead" in routes.routes[0].policies and "bulkhead" in routes.default.policies
    assert "bulkhead" not in table({"name": "r"}).routes[0].policies


def test_the_destination_breaker_is_a_policy_of_every_route() -> None:
    from meshlib.rules import CircuitBreakerSpec

    spec = CircuitBreakerSpec()
    doc = RouteDoc.model_validate({"kind": "Route", "service": "api", "routes": [{"name": "r"}]})
    routes = RouteTable(doc, breaker=spec)
    assert routes.routes[0].breaker is spec and "breaker" in routes.default.policies
    assert "breaker" not in RouteTable(doc).routes[0].policies


@pytest.mark.parametrize("status", [100, 101, 199])
def test_a_fault_abort_answers_with_a_final_status_never_a_1xx(status: int) -> None:
    doc = {"kind": "Route", "service": "api", "routes": [{"fault": {"abort": {"status": status}}}]}
    with pytest.raises(RulesError) as exc:
        validate_document(doc)
    [problem] = exc.value.problems
    assert problem.field == "routes[0].fault.abort.status" and "200" in problem.reason
    for final in (200, 204, 304, 599):
        doc["routes"] = [{"fault": {"abort": {"status": final}}}]
        route = validate_document(doc)
        assert isinstance(route, RouteDoc)
        fault = route.routes[0].fault
        assert fault is not None and fault.abort is not None and fault.abort.status == final
