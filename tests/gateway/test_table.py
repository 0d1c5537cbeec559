from collections import Counter

from meshlib.gateway.table import GatewayTable
from meshlib.rules import RuleSet

GATEWAY = {"kind": "Gateway", "service": "edge", "listeners": [{"port": 8080}]}


def table(*routes: dict) -> GatewayTable:
    rules = RuleSet([GATEWAY, {"kind": "Route", "service": "edge", "routes": list(routes)}])
    return GatewayTable(rules.route("edge"))


def test_routes_match_host_path_and_headers_in_order() -> None:
    t = table(
        {
            "match": {"hosts": ["shop.example.com"], "headers": {"x-canary": {"exact": "1"}}},
            "to": [{"service": "canary"}],
        },
        {
            "match": {"hosts": ["shop.example.com"], "path": {"prefix": "/orders"}},
            "to": [{"service": "orders"}],
        },
        {"match": {"hosts": ["*.example.org"]}, "to": [{"service": "org"}]},
    )
    assert t.match("shop.example.com", "GET", "/orders/1", {}).choose(0.5) == "orders"
    assert t.match("shop.example.com", "GET", "/orders/1", {"x-canary": "1"}).choose(0.5) == "canary"
    assert t.match("shop.example.com", "GET", "/cart", {}) is None
    assert t.match("a.example.org", "GET", "/", {}).choose(0.5) == "org"
    assert t.match("example.net", "GET", "/orders", {}) is None


def test_services_are_drawn_by_weight() -> None:
    t = table({"to": [{"service": "a", "weight": 3}, {"service": "b", "weight": 1}]})
    route = t.match("any", "GET", "/", {})
    drawn = Counter(route.choose(i / 1000) for i in range(1000))
    assert drawn == {"a": 750, "b": 250}


def test_rewrite_and_timeout() -> None:
    t = table(
        {
            "match": {"path": {"prefix": "/api/"}},
            "to": [{"service": "a"}],
            "timeout": "2s",
            "rewrite": {"prefix": "/"},
        }
    )
    route = t.match("h", "GET", "/api/x", {})
    assert route.rewrite_path("/api/x") == "/x" and route.timeout == 2.0
