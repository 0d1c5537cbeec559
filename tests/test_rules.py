"""Rules documents: parsing, defaults, validation errors, cross references, RuleSet operations."""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlib.rules import (
    KINDS,
    AllowRule,
    AuthorizationDoc,
    BackoffSpec,
    BudgetSpec,
    CircuitBreakerSpec,
    DestinationDoc,
    EmptyRulesFile,
    EndpointsDoc,
    EndpointSpec,
    HeaderMatch,
    HedgeSpec,
    Match,
    OutlierSpec,
    RateLimitDoc,
    RetrySpec,
    RouteDoc,
    RouteRule,
    RuleProblem,
    RulesError,
    RuleSet,
    StringMatch,
    Target,
    format_duration,
    load_file,
    load_yaml,
    parse_documents,
    parse_duration,
    validate_document,
)

# The Rules example of DESIGN.md, verbatim.
DESIGN_EXAMPLE = """\
kind: Endpoints            # static discovery; the registry and other sources fill the same model
service: orders
endpoints:
  - {address: 127.0.0.1:8001, labels: {version: v1}, weight: 1}
  - {address: 127.0.0.1:8002, labels: {version: v2}}
---
kind: Destination          # how to reach a service (Istio DestinationRule)
service: orders
load_balancer: peak_ewma   # round_robin | random | least_request | peak_ewma | ring_hash
hash_on: header:x-user     # ring_hash only: header:NAME | cookie:NAME | source
subsets: {v1: {version: v1}, v2: {version: v2}}
circuit_breaker: {consecutive_failures: 5, open_for: 30s}
outlier_detection: {consecutive_5xx: 5, interval: 10s, base_ejection: 30s, max_ejection_percent: 50}
max_concurrent_requests: 1024
---
kind: Route                # what traffic goes where (Istio VirtualService); first match wins
service: orders
routes:
  - match: {headers: {x-canary: {exact: "true"}}}
    to: [{subset: v2}]
  - match: {path: {prefix: /api}, methods: [GET], source: checkout}
    to: [{subset: v1, weight: 90}, {subset: v2, weight: 10}]
    timeout: 2s
    retries: {attempts: 3, per_try_timeout: 500ms, on: [5xx, reset, connect-failure],
              budget: {percent: 20, min_per_second: 10}}
    fault: {delay: {percent: 10, duration: 100ms}, abort: {percent: 5, status: 503}}
    mirror: {subset: v3, percent: 10}
    rewrite: {prefix: /v2/api}
---
kind: Authorization        # who may call a service (Istio AuthorizationPolicy); default allow until one exists
service: orders
allow:
  - {from: [checkout], methods: [GET], paths: ["/orders/*"]}
---
kind: RateLimit
service: orders
requests_per_second: 100
burst: 20
scope: local               # local (per process) | global (shared through Redis)
"""  # noqa: E501

# The same example with its two inconsistencies resolved (see test_design_example_verbatim).
DESIGN_FIXED = DESIGN_EXAMPLE.replace("load_balancer: peak_ewma", "load_balancer: ring_hash").replace(
    "v2: {version: v2}}", "v2: {version: v2}, v3: {version: v3}}"
)


def problems_of(exc: pytest.ExceptionInfo[RulesError]) -> list[tuple[str, str]]:
    return [(p.document, p.field) for p in exc.value.problems]


def fields_of(exc: pytest.ExceptionInfo[RulesError]) -> list[str]:
    return [p.field for p in exc.value.problems]


def route(*rules: dict, service: str = "orders") -> dict:
    return {"kind": "Route", "service": service, "routes": list(rules)}


def destination(service: str = "orders", **fields: object) -> dict:
    return {"kind": "Destination", "service": service, **fields}


def problem(raw: dict) -> RuleProblem:
    """The single problem of one invalid document."""
    with pytest.raises(RulesError) as exc:
        validate_document(raw)
    assert len(exc.value.problems) == 1, exc.value.problems
    return exc.value.problems[0]


# ------------------------------------------------------------------------------------------
# The DESIGN example


def test_design_example_verbatim_reports_exactly_its_two_inconsistencies() -> None:
    with pytest.raises(RulesError) as exc:
        load_yaml(DESIGN_EXAMPLE, source="mesh.yaml")
    assert exc.value.problems == [
        RuleProblem(
            "Destination/orders (document 2 of mesh.yaml)",
            "hash_on",
            "hash_on is only used with load_balancer: ring_hash",
        ),
        RuleProblem(
            "Route/orders (document 3 of mesh.yaml)",
            "routes[1].mirror.subset",
            "subset 'v3' is not defined in Destination/orders",
        ),
    ]
    assert str(exc.value).splitlines()[1] == (
        "Route/orders (document 3 of mesh.yaml): routes[1].mirror.subset: "
        "subset 'v3' is not defined in Destination/orders"
    )


def test_design_example_documents_other_than_destination_validate_alone() -> None:
    raws = list(yaml.safe_load_all(DESIGN_EXAMPLE))
    for i, raw in enumerate(raws, start=1):
        if raw["kind"] != "Destination":
            assert validate_document(raw, index=i).kind == raw["kind"]


def test_design_example_fixed_parses_every_kind() -> None:
    rs = load_yaml(DESIGN_FIXED, source="mesh.yaml")
    assert len(rs) == 5
    assert [d.kind for d in rs.documents] == list(KINDS[:5])  # DESIGN.md's kinds; later ones come after

    ep = rs.endpoints("orders")
    assert isinstance(ep, EndpointsDoc)
    assert ep.endpoints == (
        EndpointSpec(address="127.0.0.1:8001", labels={"version": "v1"}, weight=1),
        EndpointSpec(address="127.0.0.1:8002", labels={"version": "v2"}),
    )

    dest = rs.destination("orders")
    assert isinstance(dest, DestinationDoc)
    assert dest.load_balancer == "ring_hash"
    assert dest.hash_on == "header:x-user"
    assert dest.subsets == {"v1": {"version": "v1"}, "v2": {"version": "v2"}, "v3": {"version": "v3"}}
    assert dest.circuit_breaker == CircuitBreakerSpec(consecutive_failures=5, open_for="30s")
    assert dest.circuit_breaker.open_for == 30.0
    assert dest.outlier_detection is not None
    assert dest.outlier_detection.interval == 10.0
    assert dest.outlier_detection.base_ejection == 30.0
    assert dest.outlier_detection.max_ejection_percent == 50
    assert dest.max_concurrent_requests == 1024

    rt = rs.route("orders")
    assert isinstance(rt, RouteDoc)
    first, second = rt.routes
    assert first.match.headers == {"x-canary": HeaderMatch(exact="true")}
    assert first.to == (Target(subset="v2"),)
    assert first.to[0].weight == 100
    assert second.match.path == StringMatch(prefix="/api")
    assert second.match.methods == ("GET",)
    assert second.match.source == ("checkout",)
    assert second.to == (Target(subset="v1", weight=90), Target(subset="v2", weight=10))
    assert second.timeout == 2.0
    assert second.retries is not None
    assert second.retries.attempts == 3
    assert second.retries.per_try_timeout == 0.5
    assert second.retries.on == ("5xx", "reset", "connect-failure")
    assert second.retries.budget == BudgetSpec(percent=20, min_per_second=10)
    assert second.fault is not None and second.fault.delay is not None and second.fault.abort is not None
    assert (second.fault.delay.percent, second.fault.delay.duration) == (10.0, 0.1)
    assert (second.fault.abort.percent, second.fault.abort.status) == (5.0, 503)
    assert second.mirror is not None and (second.mirror.subset, second.mirror.percent) == ("v3", 10.0)
    assert second.rewrite is not None and second.rewrite.prefix == "/v2/api"

    authz = rs.authorization("orders")
    assert isinstance(authz, AuthorizationDoc)
    assert authz.allow == (AllowRule(sources=("checkout",), methods=("GET",), paths=("/orders/*",)),)

    rl = rs.rate_limit("orders")
    assert isinstance(rl, RateLimitDoc)
    assert (rl.requests_per_second, rl.burst, rl.scope) == (100.0, 20, "local")


def test_design_example_round_trips_through_to_dicts() -> None:
    rs = load_yaml(DESIGN_FIXED)
    dicts = rs.to_dicts()
    json.dumps(dicts)  # JSON-able
    assert parse_documents(dicts) == rs
    assert parse_documents(json.loads(json.dumps(dicts))) == rs
    assert load_yaml(yaml.safe_dump_all(dicts)) == rs


# ------------------------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("100us", 0.0001),
        ("100µs", 0.0001),
        ("0s", 0.0),
        ("1m30s", 90.0),
        ("1h2m3s", 3723.0),
        (".5s", 0.5),
        (" 2s ", 2.0),
        ("100ms", 0.1),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (30, "needs a unit"),
        (2.5, "needs a unit"),
        (True, "needs a unit"),
        (None, "needs a unit"),
        ("30", "has no unit"),
        ("1.5", "has no unit"),
        ("-1s", "cannot be negative"),
        ("", "empty duration"),
        ("2 s", "invalid duration"),
        ("2x", "invalid duration"),
        ("s", "invalid duration"),
        ("1e3ms", "invalid duration"),
        ("2S", "invalid duration"),
    ],
)
def test_parse_duration_refuses(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (2.0, "2s"), (1.5, "1500ms"), (60.0, "1m"), (90.0, "90s"), (3600.0, "1h"),
     (0.0001, "100us"), (0.0, "0s"), (0.1, "100ms"), (7200.0, "2h")],
)  # fmt: skip
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("seconds", [1e-7, 0.3333, 1 / 3, 123.456789, 2.5e-5, 86400.5])
def test_format_duration_round_trips_awkward_values(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_durations_dump_as_strings() -> None:
    assert CircuitBreakerSpec().model_dump() == {
        "consecutive_failures": 5,
        "open_for": "30s",
        "half_open_requests": 1,
        "backoff": {"base": "1s", "max": None},
    }
    assert BackoffSpec().model_dump(mode="json") == {"base": "25ms", "max": "250ms"}


def test_duration_fields_refuse_bare_numbers() -> None:
    p = problem(route({"timeout": 30}))
    assert p.field == "routes[0].timeout"
    assert "needs a unit" in p.reason
    p = problem(route({"timeout": "30"}))
    assert p.field == "routes[0].timeout"
    assert "has no unit" in p.reason


def test_durations_that_must_be_positive() -> None:
    p = problem(route({"timeout": "0s"}))
    assert (p.field, p.reason) == ("routes[0].timeout", "must be longer than 0s")
    p = problem(destination(circuit_breaker={"open_for": "0ms"}))
    assert p.field == "circuit_breaker.open_for"


# ------------------------------------------------------------------------------------------
# Defaults and normalisation per kind


def test_defaults() -> None:
    assert DestinationDoc(kind="Destination", service="a").load_balancer == "round_robin"
    o = OutlierSpec()
    assert (o.consecutive_5xx, o.consecutive_gateway_errors, o.interval, o.base_ejection) == (5, None, 10, 30)
    assert (o.max_ejection_percent, o.success_rate_threshold) == (50, 0.8)
    assert (o.success_rate_window, o.success_rate_min_requests) == (30.0, 100)
    r = RetrySpec()
    assert (r.attempts, r.per_try_timeout, r.on) == (2, None, ("5xx", "reset", "connect-failure"))
    assert (r.retriable_status_codes, r.non_idempotent, r.max_body_bytes) == ((), False, 65536)
    assert (r.backoff.base, r.backoff.max) == (0.025, 0.25)
    assert (r.budget.percent, r.budget.min_per_second, r.budget.window) == (20.0, 10.0, 10.0)
    rule = RouteRule()
    assert rule.match == Match()
    assert rule.to == (Target(subset=None, weight=100),)
    assert (rule.timeout, rule.retries, rule.fault, rule.mirror, rule.rewrite, rule.hedge) == (None,) * 6
    assert RouteRule(name="default").name == "default"


def test_endpoints_addresses() -> None:
    doc = validate_document(
        {
            "kind": "Endpoints",
            "service": "orders",
            "endpoints": [{"address": "[::1]:8080"}, {"address": "orders-1.internal:80", "weight": 3}],
        }
    )
    assert isinstance(doc, EndpointsDoc)
    assert [e.address for e in doc.endpoints] == ["[::1]:8080", "orders-1.internal:80"]
    assert [e.weight for e in doc.endpoints] == [1, 3]
    assert doc.endpoints[0].labels == {}
    assert validate_document({"kind": "Endpoints", "service": "a", "endpoints": []}).endpoints == ()


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "must be host:port"),
        ("127.0.0.1:0", "port must be a number from 1 to 65535"),
        ("127.0.0.1:65536", "port must be a number from 1 to 65535"),
        ("127.0.0.1:http", "port must be a number"),
        ("::1:8080", "write an IPv6 address in brackets"),
        ("[::zz]:8080", "is not an IPv6 address"),
        ("[::1:8080", "unclosed '['"),
        ("bad_host:80", "not a valid host name"),
        ("999.999.999.999:80", "'999.999.999.999' is not an IPv4 address"),
        (":80", "must be host:port"),
    ],
)
def test_endpoint_address_errors(address: str, reason: str) -> None:
    p = problem(
        {"kind": "Endpoints", "service": "a", "endpoints": [{"address": "h:1"}, {"address": address}]}
    )
    assert p.field == "endpoints[1].address"
    assert reason in p.reason


def test_destination_hash_on() -> None:
    d = validate_document(destination(load_balancer="ring_hash", hash_on="header:X-User"))
    assert d.hash_on == "header:x-user"
    d = validate_document(destination(load_balancer="ring_hash", hash_on="cookie:UserId"))
    assert d.hash_on == "cookie:UserId"
    d = validate_document(destination(load_balancer="ring_hash"))
    assert d.hash_on is None  # no key: each request lands at a random point of the ring
    assert validate_document(destination(load_balancer="random")).hash_on is None

    p = problem(destination(load_balancer="ring_hash", hash_on="query:x"))
    assert (p.field, p.reason) == (
        "hash_on",
        "invalid hash_on 'query:x': use header:NAME, cookie:NAME or source",
    )
    p = problem(destination(hash_on="source"))
    assert (p.field, p.reason) == ("hash_on", "hash_on is only used with load_balancer: ring_hash")


def test_destination_zone_aware() -> None:
    assert validate_document(destination()).zone_aware is None  # off by default
    d = validate_document(destination(zone_aware={}))
    assert d.zone_aware is not None and d.zone_aware.min_cluster_size == 6  # Envoy's default
    d = validate_document(destination(zone_aware={"min_cluster_size": 3}))
    assert d.zone_aware is not None and d.zone_aware.min_cluster_size == 3
    assert problem(destination(zone_aware={"min_cluster_size": 0})).field == "zone_aware.min_cluster_size"
    assert problem(destination(zone_aware={"min_size": 3})).field == "zone_aware.min_size"  # unknown key


def test_destination_peak_ewma_decay() -> None:
    assert validate_document(destination(load_balancer="peak_ewma")).ewma_decay is None  # the default
    d = validate_document(destination(load_balancer="peak_ewma", peak_ewma={}))
    assert d.ewma_decay == 10.0  # Finagle's and Linkerd's
    d = validate_document(destination(load_balancer="peak_ewma", peak_ewma={"decay": "2500ms"}))
    assert d.ewma_decay == 2.5
    assert d.model_dump(mode="json")["peak_ewma"] == {"decay": "2500ms"}
    for bad, reason in [
        ("50ms", "must be between 100ms and 10m"),
        ("11m", "must be between 100ms and 10m"),
        ("0s", "must be longer than 0s"),
    ]:
        p = problem(destination(load_balancer="peak_ewma", peak_ewma={"decay": bad}))
        assert (p.field, p.reason) == ("peak_ewma.decay", reason), p
    assert problem(destination(load_balancer="peak_ewma", peak_ewma={"decay": 10})).field == "peak_ewma.decay"
    p = problem(destination(load_balancer="peak_ewma", peak_ewma={"half_life": "5s"}))
    assert p.field == "peak_ewma.half_life"  # unknown key
    p = problem(destination(load_balancer="least_request", peak_ewma={"decay": "5s"}))
    assert (p.field, p.reason) == (
        "peak_ewma",
        "peak_ewma options are only used with load_balancer: peak_ewma",
    )
    p = problem(destination(peak_ewma={"decay": "5s"}))  # round_robin, the default
    assert p.field == "peak_ewma"


def test_destination_weighted_round_robin() -> None:
    wrr = "weighted_round_robin"
    assert validate_document(destination(load_balancer=wrr)).weighted_round_robin is None
    d = validate_document(destination(load_balancer=wrr, weighted_round_robin={}))
    spec = d.weighted_round_robin
    assert spec is not None  # gRFC A58's defaults
    assert (spec.blackout_period, spec.weight_expiration_period) == (10.0, 180.0)
    assert (spec.weight_update_period, spec.error_utilization_penalty) == (1.0, 1.0)
    assert spec.latency_tolerance == 2.0  # meshlib's own (0: A58 as written)
    given = {
        "blackout_period": "0s",
        "weight_expiration_period": "30s",
        "weight_update_period": "250ms",
        "error_utilization_penalty": 2.5,
        "latency_tolerance": 0.0,
    }
    d = validate_document(destination(load_balancer=wrr, weighted_round_robin=given))
    assert d.model_dump(mode="json")[wrr] == given
    for field, bad, reason in [
        ("blackout_period", "2h", "must be at most 1h"),
        ("weight_expiration_period", "0s", "must be longer than 0s"),
        ("weight_expiration_period", "61m", "must be at most 1h"),
        ("weight_update_period", "50ms", "must be between 100ms and 1m"),
        ("weight_update_period", "2m", "must be between 100ms and 1m"),
        ("error_utilization_penalty", -1, "Input should be greater than or equal to 0"),
        ("error_utilization_penalty", 101, "Input should be less than or equal to 100"),
        ("latency_tolerance", 0.5, "must be 0 (off) or at least 1 (the median endpoint itself is never cut)"),
        ("latency_tolerance", 101, "Input should be less than or equal to 100"),
    ]:
        p = problem(destination(load_balancer=wrr, weighted_round_robin={field: bad}))
        assert (p.field, p.reason) == (f"{wrr}.{field}", reason), p
    assert problem(destination(load_balancer=wrr, weighted_round_robin={"oob": True})).field == f"{wrr}.oob"
    p = problem(destination(load_balancer="peak_ewma", weighted_round_robin={}))
    assert (p.field, p.reason) == (
        wrr,
        "weighted_round_robin options are only used with load_balancer: " + wrr,
    )


def test_destination_errors() -> None:
    with pytest.raises(RulesError) as exc:
        validate_document(
            destination(
                load_balancer="fastest",
                subsets={"v1": {}, "bad name": {"a": "b"}, "v2": {"version": 2}},
                circuit_breaker={"consecutive_failures": 0, "half_open_requests": 0},
                outlier_detection={
                    "max_ejection_percent": 101,
                    "success_rate_threshold": 1.5,
                    "interval": "-1s",
                },
                max_concurrent_requests=0,
            )
        )
    assert fields_of(exc) == [
        "load_balancer",
        "subsets.v1",
        'subsets["bad name"]',
        "subsets.v2.version",
        "circuit_breaker.consecutive_failures",
        "circuit_breaker.half_open_requests",
        "outlier_detection.interval",
        "outlier_detection.max_ejection_percent",
        "outlier_detection.success_rate_threshold",
        "max_concurrent_requests",
    ]
    reasons = {p.field: p.reason for p in exc.value.problems}
    assert reasons["subsets.v2.version"] == "Input should be a valid string"
    assert reasons['subsets["bad name"]'].startswith("invalid key: invalid subset name 'bad name'")
    assert "cannot be negative" in reasons["outlier_detection.interval"]
    assert "'round_robin'" in reasons["load_balancer"]


def test_match_normalisation() -> None:
    doc = validate_document(
        route(
            {
                "match": {
                    "headers": {"X-User": {"prefix": "a"}, "x-debug": {"present": False}},
                    "methods": ["get", "Post"],
                    "source": "checkout",
                }
            }
        )
    )
    m = doc.routes[0].match
    assert set(m.headers) == {"x-user", "x-debug"}
    assert m.headers["x-debug"].present is False
    assert m.methods == ("GET", "POST")
    assert m.source == ("checkout",)
    doc = validate_document(route({"match": {"source": ["a", "b"], "methods": "delete"}}))
    assert doc.routes[0].match.source == ("a", "b")
    assert doc.routes[0].match.methods == ("DELETE",)


def test_match_errors() -> None:
    with pytest.raises(RulesError) as exc:
        validate_document(
            route(
                {"match": {"path": {"exact": "/a", "prefix": "/b"}}},
                {"match": {"path": {}}},
                {"match": {"path": {"regex": "("}}},
                {"match": {"path": {"prefix": "api"}}},
                {"match": {"headers": {"x-a": {}, "bad header": {"exact": "x"}, "x-b": {"exact": True}}}},
                {"match": {"headers": {"X-A": {"exact": "1"}, "x-a": {"exact": "2"}}}},
                {"match": {"methods": ["GE T"], "source": ["Checkout"]}},
            )
        )
    assert fields_of(exc) == [
        "routes[0].match.path",
        "routes[1].match.path",
        "routes[2].match.path.regex",
        "routes[3].match.path",
        "routes[4].match.headers.x-a",
        'routes[4].match.headers["bad header"]',
        "routes[4].match.headers.x-b.exact",
        "routes[5].match.headers",
        "routes[6].match.methods[0]",
        "routes[6].match.source[0]",
    ]
    reasons = [p.reason for p in exc.value.problems]
    assert reasons[0] == "set exactly one of exact, prefix, regex, not exact and prefix"
    assert reasons[1] == "set exactly one of exact, prefix, regex"
    assert reasons[2].startswith("invalid regular expression '('")
    assert reasons[3] == "path 'api' must start with '/'"
    assert reasons[4] == "set exactly one of exact, prefix, regex, present"
    assert reasons[7] == "header 'x-a' is listed twice (header names are case-insensitive)"


def test_regex_is_stored_as_pattern() -> None:
    doc = validate_document(route({"match": {"path": {"regex": r"/orders/\d+"}}}))
    assert doc.routes[0].match.path == StringMatch(regex=r"/orders/\d+")


def test_targets_and_weights() -> None:
    with pytest.raises(RulesError) as exc:
        validate_document(
            route(
                {"to": [{"subset": "v1", "weight": 0}, {"subset": "v2", "weight": 0}]},
                {"to": [{"subset": "v1"}, {"subset": "v1"}]},
                {"to": []},
                {"to": [{"subset": "v1", "weight": -1}, {"weight": 1.5}]},
                {"to": [{}, {}]},
            )
        )
    assert exc.value.problems == [
        RuleProblem(
            "Route/orders (document 1 of rules)",
            "routes[0].to",
            "the target weights add up to 0; at least one must be positive",
        ),
        RuleProblem("Route/orders (document 1 of rules)", "routes[1].to", "subset 'v1' is listed twice"),
        RuleProblem(
            "Route/orders (document 1 of rules)",
            "routes[2].to",
            "needs at least 1 entry",
        ),
        RuleProblem(
            "Route/orders (document 1 of rules)",
            "routes[3].to[0].weight",
            "Input should be greater than or equal to 0",
        ),
        RuleProblem(
            "Route/orders (document 1 of rules)",
            "routes[3].to[1].weight",
            "Input should be a valid integer, got a number with a fractional part",
        ),
        RuleProblem(
            "Route/orders (document 1 of rules)", "routes[4].to", "the whole service is listed twice"
        ),
    ]


def test_zero_weight_target_is_fine_beside_a_positive_one() -> None:
    doc = validate_document(route({"to": [{"weight": 100}, {"subset": "v2", "weight": 0}]}))
    assert [t.weight for t in doc.routes[0].to] == [100, 0]


def test_retries() -> None:
    doc = validate_document(
        route(
            {
                "retries": {
                    "attempts": 1,
                    "on": ["gateway-error", 429, "retriable-status-codes"],
                    "retriable_status_codes": [503, 504],
                    "non_idempotent": True,
                    "backoff": {"base": "10ms", "max": "1s"},
                    "budget": {"percent": 0, "min_per_second": 0, "window": "1m"},
                    "max_body_bytes": 0,
                }
            },
            {"retries": {"on": "reset"}},
        )
    )
    r = doc.routes[0].retries
    assert r is not None
    assert r.on == ("gateway-error", "429", "retriable-status-codes")
    assert r.retriable_status_codes == (503, 504)
    assert (r.backoff.base, r.backoff.max, r.budget.window) == (0.01, 1.0, 60.0)
    assert doc.routes[1].retries is not None and doc.routes[1].retries.on == ("reset",)


def test_retry_errors() -> None:
    with pytest.raises(RulesError) as exc:
        validate_document(
            route(
                {"retries": {"attempts": 0, "on": ["5xx", "timeout"], "per_try_timeout": "0s"}},
                {"retries": {"on": ["retriable-status-codes"]}},
                {"retries": {"retriable_status_codes": [503]}},
                {"retries": {"on": ["retriable-status-codes"], "retriable_status_codes": [99, 600]}},
                {"retries": {"backoff": {"base": "1s", "max": "10ms"}, "budget": {"percent": 101}}},
                {"retries": {"max_body_bytes": -1, "non_idempotent": "maybe"}},
            )
        )
    assert fields_of(exc) == [
        "routes[0].retries.attempts",
        "routes[0].retries.per_try_timeout",
        "routes[0].retries.on[1]",
        "routes[1].retries.retriable_status_codes",
        "routes[2].retries.retriable_status_codes",
        "routes[3].retries.retriable_status_codes[0]",
        "routes[3].retries.retriable_status_codes[1]",
        "routes[4].retries.backoff",
        "routes[4].retries.budget.percent",
        "routes[5].retries.non_idempotent",
        "routes[5].retries.max_body_bytes",
    ]
    reasons = [p.reason for p in exc.value.problems]
    assert reasons[3] == "'retriable-status-codes' is in on, so list at least one status code here"
    assert reasons[4] == "listed codes are only retried when 'retriable-status-codes' is in on"
    assert reasons[7] == "max (10ms) is shorter than base (1s)"


def test_hedge() -> None:
    doc = validate_document(
        route(
            {"hedge": {"delay": "50ms"}},
            {"hedge": {"delay": "p99", "max_hedges": 2}},
            {"hedge": {}},
            {"hedge": {"percentile": 90}},
        )
    )
    hedges = [r.hedge for r in doc.routes]
    assert hedges == [
        HedgeSpec(delay="50ms"),
        HedgeSpec(percentile=99.0, max_hedges=2),
        HedgeSpec(percentile=95.0),
        HedgeSpec(delay="p90"),
    ]
    assert hedges[0] is not None and (hedges[0].delay, hedges[0].percentile) == (0.05, None)
    assert [h.model_dump(mode="json", exclude_defaults=True) for h in hedges if h] == [
        {"delay": "50ms"},
        {"max_hedges": 2, "delay": "p99"},
        {"delay": "p95"},
        {"delay": "p90"},
    ]
    with pytest.raises(RulesError) as exc:
        validate_document(
            route(
                {"hedge": {"delay": "p100"}},
                {"hedge": {"delay": "p95", "percentile": 90}},
                {"hedge": {"delay": "10ms", "percentile": 90}},
                {"hedge": {"max_hedges": 0}},
                {"hedge": {"delay": "soon"}},
            )
        )
    assert fields_of(exc) == [
        "routes[0].hedge.percentile",
        "routes[1].hedge",
        "routes[2].hedge",
        "routes[3].hedge.max_hedges",
        "routes[4].hedge.delay",
    ]


def test_fault_mirror_rewrite() -> None:
    doc = validate_document(
        route(
            {
                "match": {"path": {"prefix": "/api"}},
                "fault": {"abort": {"percent": 1.5}},
                "mirror": {},
                "rewrite": {"prefix": "/"},
            }
        )
    )
    rule = doc.routes[0]
    assert rule.fault is not None and rule.fault.abort is not None
    assert (rule.fault.abort.percent, rule.fault.abort.status, rule.fault.delay) == (1.5, 503, None)
    assert rule.mirror is not None and (rule.mirror.subset, rule.mirror.percent) == (None, 100.0)
    with pytest.raises(RulesError) as exc:
        validate_document(
            route(
                {"fault": {}},
                {"fault": {"delay": {"percent": 101}, "abort": {"status": 600, "percent": -1}}},
                {"mirror": {"percent": 200}},
                {"rewrite": {"prefix": "/v2"}},
                {"match": {"path": {"exact": "/a"}}, "rewrite": {"prefix": "/b"}},
                {"match": {"path": {"prefix": "/a"}}, "rewrite": {"prefix": "b"}},
            )
        )
    assert fields_of(exc) == [
        "routes[0].fault",
        "routes[1].fault.delay.percent",
        "routes[1].fault.delay.duration",
        "routes[1].fault.abort.percent",
        "routes[1].fault.abort.status",
        "routes[2].mirror.percent",
        "routes[3].rewrite",
        "routes[4].rewrite",
        "routes[5].rewrite.prefix",
    ]
    reasons = [p.reason for p in exc.value.problems]
    assert reasons[0] == "set delay, abort or both"
    assert reasons[2] == "required field is missing"
    assert reasons[6] == "rewrite.prefix needs a prefix path match (match: {path: {prefix: ...}})"


def test_route_document_errors() -> None:
    with pytest.raises(RulesError) as exc:
        validate_document({"kind": "Route", "service": "orders", "routes": []})
    assert exc.value.problems == [
        RuleProblem("Route/orders (document 1 of rules)", "routes", "needs at least 1 entry")
    ]
    p = problem(route({"name": "a"}, {"name": "a"}))
    assert (p.field, p.reason) == ("routes", "rule name 'a' is used more than once")
    p = problem({"kind": "Route", "service": "orders"})
    assert (p.document, p.field, p.reason) == (
        "Route/orders (document 1 of rules)",
        "routes",
        "required field is missing",
    )


def test_failed_rule_does_not_also_report_a_short_list() -> None:
    # pydantic also counts the list as too short once its only item failed: not reported.
    p = problem(route({"timeout": 1}))
    assert p.field == "routes[0].timeout"


def test_authorization() -> None:
    doc = validate_document(
        {
            "kind": "Authorization",
            "service": "orders",
            "allow": [{"from": "*", "methods": "get", "paths": "/orders/*"}, {}, {"sources": ["checkout"]}],
        }
    )
    assert isinstance(doc, AuthorizationDoc)
    assert doc.allow[0] == AllowRule(sources=("*",), methods=("GET",), paths=("/orders/*",))
    assert doc.allow[1] == AllowRule()
    assert doc.allow[2].sources == ("checkout",)
    assert validate_document({"kind": "Authorization", "service": "orders"}).allow == ()
    assert doc.model_dump(mode="json", by_alias=True)["allow"][0]["from"] == ["*"]

    with pytest.raises(RulesError) as exc:
        validate_document(
            {
                "kind": "Authorization",
                "service": "orders",
                "allow": [{"from": ["Checkout"], "paths": ["orders"], "methods": ["G T"], "hosts": ["x"]}],
            }
        )
    assert fields_of(exc) == [
        "allow[0].from[0]",
        "allow[0].methods[0]",
        "allow[0].paths[0]",
        "allow[0].hosts",
    ]
    assert exc.value.problems[3].reason == "unknown field; allowed: from, methods, paths, from_users, claims"


def test_rate_limit() -> None:
    doc = validate_document({"kind": "RateLimit", "service": "a", "requests_per_second": 2.5})
    assert isinstance(doc, RateLimitDoc)
    assert (doc.burst, doc.scope) == (3, "local")  # burst defaults to ceil(rps)
    doc = validate_document({"kind": "RateLimit", "service": "a", "requests_per_second": 10, "burst": 0})
    assert doc.burst == 0
    with pytest.raises(RulesError) as exc:
        validate_document(
            {"kind": "RateLimit", "service": "a", "requests_per_second": 0, "burst": -1, "scope": "cluster"}
        )
    assert fields_of(exc) == ["requests_per_second", "burst", "scope"]
    p = problem({"kind": "RateLimit", "service": "a", "requests_per_second": float("inf")})
    assert (p.field, p.reason) == ("requests_per_second", "Input should be a finite number")


# ------------------------------------------------------------------------------------------
# Document-level errors: kind, service, unknown fields, shape


def test_missing_and_unknown_kind() -> None:
    with pytest.raises(RulesError) as exc:
        parse_documents(
            [{"service": "a"}, {"kind": "VirtualService", "service": "a"}, {"kind": 3}], source="x"
        )
    assert exc.value.problems == [
        RuleProblem(
            "document 1 of x",
            "kind",
            f"required field is missing; one of: {', '.join(KINDS)}",
        ),
        RuleProblem(
            "document 2 of x",
            "kind",
            f"unknown kind 'VirtualService'; expected one of: {', '.join(KINDS)}",
        ),
        RuleProblem(
            "document 3 of x",
            "kind",
            f"unknown kind 3; expected one of: {', '.join(KINDS)}",
        ),
    ]


@pytest.mark.parametrize("name", ["Orders", "orders_v2", "-orders", "orders-", "a" * 254, "", "or ders"])
def test_bad_service_names(name: str) -> None:
    p = problem({"kind": "RateLimit", "service": name, "requests_per_second": 1})
    assert p.field == "service"
    assert p.document == (
        f"RateLimit/{name} (document 1 of rules)" if name else "RateLimit (document 1 of rules)"
    )


@pytest.mark.parametrize("name", ["orders", "a", "orders.prod.svc.cluster.local", "v2-api", "a" * 253, "9"])
def test_good_service_names(name: str) -> None:
    assert validate_document({"kind": "RateLimit", "service": name, "requests_per_second": 1}).service == name


def test_missing_service_names_the_kind_only() -> None:
    p = problem({"kind": "Route", "routes": [{}]})
    assert (p.document, p.field, p.reason) == (
        "Route (document 1 of rules)",
        "service",
        "required field is missing",
    )


def test_unknown_fields_list_the_allowed_ones() -> None:
    with pytest.raises(RulesError) as exc:
        validate_document(route({"retry": {"attempts": 3}, "retries": {"backof": {}}}, service="orders"))
    assert exc.value.problems == [
        RuleProblem(
            "Route/orders (document 1 of rules)",
            "routes[0].retries.backof",
            "unknown field; allowed: attempts, per_try_timeout, on, retriable_status_codes, non_idempotent, "
            "backoff, budget, max_body_bytes",
        ),
        RuleProblem(
            "Route/orders (document 1 of rules)",
            "routes[0].retry",
            "unknown field; allowed: match, to, timeout, retries, fault, mirror, rewrite, hedge, redirect, "
            "name",
        ),
    ]
    p = problem({"kind": "Endpoints", "service": "a", "endpoints": [], "labels": {}})
    assert (p.field, p.reason) == ("labels", "unknown field; allowed: kind, service, endpoints, discovery")


def test_validate_document_uses_index_and_source() -> None:
    with pytest.raises(RulesError) as exc:
        validate_document({"kind": "RateLimit", "service": "a"}, index=7, source="limits.yaml")
    assert exc.value.problems == [
        RuleProblem(
            "RateLimit/a (document 7 of limits.yaml)", "requests_per_second", "required field is missing"
        )
    ]


def test_every_problem_is_reported_at_once() -> None:
    text = """\
kind: Endpoints
service: orders
endpoints:
  - {address: 127.0.0.1:8001}
  - {address: 127.0.0.1:8001}
  - {address: nowhere, weight: 0}
---
kind: Destination
service: orders
load_balancer: fastest
subsets: {v1: {version: v1}}
---
kind: Route
service: orders
routes:
  - to: [{subset: v1}, {subset: v9}]
    timeout: 5
---
- just a list
---
kind: RateLimit
service: orders
requests_per_second: -1
---
kind: Route
service: orders
routes: [{to: [{subset: v2}]}]
"""
    with pytest.raises(RulesError) as exc:
        load_yaml(text, source="mesh.yaml")
    assert problems_of(exc) == [
        ("Endpoints/orders (document 1 of mesh.yaml)", "endpoints[2].address"),
        ("Endpoints/orders (document 1 of mesh.yaml)", "endpoints[2].weight"),
        ("Endpoints/orders (document 1 of mesh.yaml)", "endpoints[1].address"),
        ("Destination/orders (document 2 of mesh.yaml)", "load_balancer"),
        ("Route/orders (document 3 of mesh.yaml)", "routes[0].timeout"),
        ("document 4 of mesh.yaml", ""),
        ("RateLimit/orders (document 5 of mesh.yaml)", "requests_per_second"),
        ("Route/orders (document 6 of mesh.yaml)", ""),
        ("Route/orders (document 6 of mesh.yaml)", "routes[0].to[0].subset"),
    ]
    reasons = [p.reason for p in exc.value.problems]
    assert reasons[2] == "duplicate address 127.0.0.1:8001 (also endpoints[0])"
    assert reasons[5] == "a document must be a mapping of fields, got list"
    assert reasons[7] == "duplicate Route for service 'orders' (already defined by document 3 of mesh.yaml)"
    # The failed Destination's subsets are still known, so document 6's subset is checked
    # against them; document 3 is not checked because it failed itself.
    assert len(str(exc.value).splitlines()) == 9


def test_error_string_format() -> None:
    err = RulesError(
        [
            RuleProblem("Route/orders (document 2 of mesh.yaml)", "routes[0].to[1].subset", "bad"),
            RuleProblem("document 3 of mesh.yaml", "", "not a mapping"),
        ]
    )
    assert str(err) == (
        "Route/orders (document 2 of mesh.yaml): routes[0].to[1].subset: bad\n"
        "document 3 of mesh.yaml: not a mapping"
    )
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert copy.problems == err.problems and str(copy) == str(err)
    assert err.to_dicts()[1] == {
        "document": "document 3 of mesh.yaml",
        "field": "",
        "reason": "not a mapping",
    }


# ------------------------------------------------------------------------------------------
# Cross references


def test_route_subset_not_defined_in_destination() -> None:
    with pytest.raises(RulesError) as exc:
        parse_documents(
            [
                destination(subsets={"v1": {"version": "v1"}, "v2": {"version": "v2"}}),
                route({"to": [{"subset": "v1"}, {"subset": "v3"}], "mirror": {"subset": "v4"}}, {"to": [{}]}),
            ],
            source="mesh.yaml",
        )
    assert [str(p) for p in exc.value.problems] == [
        "Route/orders (document 2 of mesh.yaml): routes[0].to[1].subset: "
        "subset 'v3' is not defined in Destination/orders",
        "Route/orders (document 2 of mesh.yaml): routes[0].mirror.subset: "
        "subset 'v4' is not defined in Destination/orders",
    ]


def test_route_subset_without_destination() -> None:
    with pytest.raises(RulesError) as exc:
        parse_documents([route({"to": [{"subset": "v1"}]}), destination(service="payments")])
    assert exc.value.problems == [
        RuleProblem(
            "Route/orders (document 1 of rules)",
            "routes[0].to[0].subset",
            "subset 'v1' needs a Destination for orders, and there is none",
        )
    ]


def test_routes_without_subsets_need_no_destination() -> None:
    rs = parse_documents([route({"to": [{"weight": 1}]}, {"mirror": {"percent": 5}})])
    assert rs.route("orders") is not None


def test_destination_may_come_after_the_route() -> None:
    rs = parse_documents([route({"to": [{"subset": "v1"}]}), destination(subsets={"v1": {"v": "1"}})])
    assert len(rs) == 2


def test_subsets_are_per_service() -> None:
    with pytest.raises(RulesError) as exc:
        parse_documents(
            [destination(service="payments", subsets={"v1": {"v": "1"}}), route({"to": [{"subset": "v1"}]})]
        )
    assert fields_of(exc) == ["routes[0].to[0].subset"]


def test_duplicate_documents() -> None:
    with pytest.raises(RulesError) as exc:
        parse_documents([destination(), destination(load_balancer="random"), destination(service="b")])
    assert exc.value.problems == [
        RuleProblem(
            "Destination/orders (document 2 of rules)",
            "",
            "duplicate Destination for service 'orders' (already defined by document 1 of rules)",
        )
    ]


def test_unreadable_failed_destination_suppresses_reference_checks() -> None:
    with pytest.raises(RulesError) as exc:
        parse_documents([destination(subsets=["v1"]), route({"to": [{"subset": "v1"}]})])
    assert problems_of(exc) == [("Destination/orders (document 1 of rules)", "subsets")]


def test_failed_destination_subsets_still_checked() -> None:
    with pytest.raises(RulesError) as exc:
        parse_documents(
            [destination(subsets={"v1": {"v": "1"}}, load_balancer="x"), route({"to": [{"subset": "v2"}]})]
        )
    assert fields_of(exc) == ["load_balancer", "routes[0].to[0].subset"]


# ------------------------------------------------------------------------------------------
# RuleSet


@pytest.fixture
def rules() -> RuleSet:
    return load_yaml(DESIGN_FIXED, source="mesh.yaml")


def test_ruleset_accessors(rules: RuleSet) -> None:
    assert rules.get("Route", "orders") is rules.route("orders")
    assert rules.get("Endpoints", "orders") is rules.endpoints("orders")
    assert rules.get("Authorization", "orders") is rules.authorization("orders")
    assert rules.get("RateLimit", "orders") is rules.rate_limit("orders")
    assert rules.get("Destination", "nobody") is None
    assert rules.route("nobody") is None
    with pytest.raises(ValueError, match="unknown kind 'route'"):
        rules.get("route", "orders")
    assert rules.services() == frozenset({"orders"})
    assert list(rules) == list(rules.documents)


def test_ruleset_order_is_stable() -> None:
    docs = [
        {"kind": "RateLimit", "service": "b", "requests_per_second": 1},
        route({}, service="b"),
        {"kind": "Endpoints", "service": "b", "endpoints": []},
        route({}, service="a"),
        {"kind": "Endpoints", "service": "a", "endpoints": []},
    ]
    rs = parse_documents(docs)
    assert [(d.kind, d.service) for d in rs.documents] == [
        ("Endpoints", "a"),
        ("Endpoints", "b"),
        ("Route", "a"),
        ("Route", "b"),
        ("RateLimit", "b"),
    ]
    assert parse_documents(reversed(docs)) == rs
    assert hash(parse_documents(reversed(docs))) == hash(rs)
    assert rs.services() == frozenset({"a", "b"})


def test_ruleset_empty_and_equality(rules: RuleSet) -> None:
    assert len(RuleSet.EMPTY) == 0
    assert RuleSet.EMPTY == parse_documents([]) == load_yaml("") == load_yaml("---\n---\n")
    assert RuleSet.EMPTY.services() == frozenset()
    assert rules != RuleSet.EMPTY
    assert rules == load_yaml(DESIGN_FIXED)
    assert {rules, load_yaml(DESIGN_FIXED), RuleSet.EMPTY} == {rules, RuleSet.EMPTY}
    assert rules != "rules"
    assert repr(RuleSet.EMPTY) == "RuleSet([])"


def test_ruleset_constructor_validates(rules: RuleSet) -> None:
    assert RuleSet(rules.documents) == rules
    with pytest.raises(RulesError) as exc:
        RuleSet([RouteDoc(kind="Route", service="a", routes=[RouteRule(to=[Target(subset="v1")])])])
    assert exc.value.problems[0].field == "routes[0].to[0].subset"


def test_ruleset_and_documents_are_immutable(rules: RuleSet) -> None:
    with pytest.raises(AttributeError):
        rules.documents = ()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        rules.extra = 1  # type: ignore[attr-defined]
    dest = rules.destination("orders")
    assert dest is not None
    with pytest.raises(ValueError, match="frozen"):
        dest.load_balancer = "random"  # type: ignore[misc]
    assert isinstance(rules.documents, tuple)
    rt = rules.route("orders")
    assert rt is not None and isinstance(rt.routes, tuple) and isinstance(rt.routes[1].to, tuple)
    # Documents with dict fields are hashable all the same, and equal ones hash alike.
    assert hash(dest) == hash(load_yaml(DESIGN_FIXED).destination("orders"))
    assert pickle.loads(pickle.dumps(rules)) == rules


def test_apply_adds_and_replaces(rules: RuleSet) -> None:
    new_rl = RateLimitDoc(kind="RateLimit", service="orders", requests_per_second=5)
    after = rules.apply([new_rl, {"kind": "Endpoints", "service": "payments", "endpoints": []}])
    assert after.rate_limit("orders") == new_rl
    assert after.endpoints("payments") is not None
    assert len(after) == 6
    assert after.route("orders") is rules.route("orders")
    assert rules.rate_limit("orders") is not None and rules.rate_limit("orders").requests_per_second == 100
    assert rules.apply([]) == rules


def test_apply_checks_references_both_ways(rules: RuleSet) -> None:
    # A new Destination that drops a subset the existing Route uses.
    with pytest.raises(RulesError) as exc:
        rules.apply([destination(subsets={"v1": {"version": "v1"}})])
    assert [str(p) for p in exc.value.problems] == [
        "Route/orders: routes[0].to[0].subset: subset 'v2' is not defined in Destination/orders",
        "Route/orders: routes[1].to[1].subset: subset 'v2' is not defined in Destination/orders",
        "Route/orders: routes[1].mirror.subset: subset 'v3' is not defined in Destination/orders",
    ]
    # A new Route that uses a subset the existing Destination lacks.
    with pytest.raises(RulesError) as exc:
        rules.apply([route({"to": [{"subset": "v9"}]})], source="PUT /v1/config")
    assert exc.value.problems == [
        RuleProblem(
            "Route/orders (document 1 of PUT /v1/config)",
            "routes[0].to[0].subset",
            "subset 'v9' is not defined in Destination/orders",
        )
    ]
    # Both at once is fine.
    after = rules.apply([route({"to": [{"subset": "v9"}]}), destination(subsets={"v9": {"version": "v9"}})])
    assert after.destination("orders") is not None and set(after.destination("orders").subsets) == {"v9"}


def test_apply_collects_every_problem_and_refuses_duplicates(rules: RuleSet) -> None:
    with pytest.raises(RulesError) as exc:
        rules.apply(
            [
                {"kind": "RateLimit", "service": "orders"},
                {"kind": "RateLimit", "service": "orders", "requests_per_second": 1},
                {"kind": "Nope"},
            ]
        )
    assert problems_of(exc) == [
        ("RateLimit/orders (document 1 of update)", "requests_per_second"),
        ("document 3 of update", "kind"),
        ("RateLimit/orders (document 2 of update)", ""),
    ]


def test_apply_with_a_broken_destination_does_not_blame_the_route(rules: RuleSet) -> None:
    with pytest.raises(RulesError) as exc:
        rules.apply([destination(subsets={"v1": {"version": "v1"}, "v2": {"version": "v2"}, "v3": {}})])
    assert problems_of(exc) == [("Destination/orders (document 1 of update)", "subsets.v3")]


def test_without(rules: RuleSet) -> None:
    after = rules.without("RateLimit", "orders")
    assert after.rate_limit("orders") is None
    assert len(after) == 4
    assert rules.rate_limit("orders") is not None
    assert after.without("RateLimit", "orders") is after  # absent: unchanged
    assert rules.without("Route", "orders").without("Destination", "orders").destination("orders") is None
    with pytest.raises(ValueError, match="unknown kind"):
        rules.without("Ratelimit", "orders")


def test_without_a_destination_a_route_needs(rules: RuleSet) -> None:
    with pytest.raises(RulesError) as exc:
        rules.without("Destination", "orders")
    assert [p.field for p in exc.value.problems] == [
        "routes[0].to[0].subset",
        "routes[1].to[0].subset",
        "routes[1].to[1].subset",
        "routes[1].mirror.subset",
    ]
    assert exc.value.problems[0] == RuleProblem(
        "Route/orders",
        "routes[0].to[0].subset",
        "subset 'v2' needs a Destination for orders, and there is none",
    )


def test_to_dicts_round_trip_with_every_field() -> None:
    docs = [
        {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": "[::1]:8080", "weight": 2}]},
        destination(
            load_balancer="ring_hash",
            subsets={"v1": {"version": "v1", "app.kubernetes.io/name": "orders"}},
            circuit_breaker={"consecutive_failures": 3, "open_for": "1m30s", "half_open_requests": 2},
            outlier_detection={
                "consecutive_5xx": 3,
                "consecutive_gateway_errors": 2,
                "interval": "1500ms",
                "base_ejection": "1m",
                "max_ejection_percent": 0,
                "success_rate_threshold": 0.5,
                "success_rate_window": "1h",
                "success_rate_min_requests": 1,
            },
            max_concurrent_requests=8,
        ),
        route(
            {
                "name": "canary",
                "match": {
                    "path": {"prefix": "/api"},
                    "headers": {"X-Canary": {"present": True}, "x-user": {"regex": "a.*"}},
                    "methods": ["post"],
                    "source": ["checkout", "cart"],
                },
                "to": [{"subset": "v1", "weight": 0}, {"weight": 3}],
                "timeout": "100us",
                "retries": {
                    "attempts": 5,
                    "per_try_timeout": "0.25s",
                    "on": ["retriable-status-codes", "429"],
                    "retriable_status_codes": [502],
                    "non_idempotent": True,
                    "backoff": {"base": "0s", "max": "1s"},
                    "budget": {"percent": 12.5, "min_per_second": 0, "window": "30s"},
                    "max_body_bytes": 10,
                },
                "fault": {"delay": {"duration": "1s"}, "abort": {"status": 429, "percent": 0.5}},
                "mirror": {"subset": "v1", "percent": 1},
                "rewrite": {"prefix": "/v2/"},
                "hedge": {"delay": "p99.5", "max_hedges": 3},
            },
            {"hedge": {"delay": "20ms"}, "match": {"path": {"exact": "/x"}}},
            {},
        ),
        {"kind": "Authorization", "service": "orders", "allow": [{"from": "*"}, {}]},
        {"kind": "RateLimit", "service": "orders", "requests_per_second": 0.5, "scope": "global"},
    ]
    rs = parse_documents(docs)
    dicts = rs.to_dicts()
    assert json.loads(json.dumps(dicts)) == dicts
    again = parse_documents(dicts)
    assert again == rs
    assert again.to_dicts() == dicts
    by_kind = {d["kind"]: d for d in dicts}
    # Defaults are left out; explicit values that differ from them stay.
    assert by_kind["Route"]["routes"][2] == {}
    assert by_kind["Route"]["routes"][0]["timeout"] == "100us"
    assert by_kind["Route"]["routes"][0]["hedge"] == {"max_hedges": 3, "delay": "p99.5"}
    assert by_kind["Destination"]["circuit_breaker"]["open_for"] == "90s"
    assert "hash_on" not in by_kind["Destination"]
    assert by_kind["Authorization"]["allow"] == [{"from": ["*"]}, {}]
    assert by_kind["RateLimit"] == {
        "kind": "RateLimit",
        "service": "orders",
        "requests_per_second": 0.5,
        "burst": 1,
        "scope": "global",
    }
    assert load_yaml(yaml.safe_dump_all(dicts)) == rs


# ------------------------------------------------------------------------------------------
# YAML


def test_yaml_syntax_error_has_a_line_number() -> None:
    text = "kind: Route\nservice: orders\n---\nkind: Route\nservice: a\nroutes: [{timeout: 1s\n"
    with pytest.raises(RulesError) as exc:
        load_yaml(text, source="mesh.yaml")
    (p,) = exc.value.problems
    assert p.document == "document 2 of mesh.yaml"
    assert p.field == ""
    assert p.reason.startswith("YAML error at line 7, column 1:")
    assert "line 7" in str(exc.value)


def test_yaml_bad_indentation_line_number() -> None:
    with pytest.raises(RulesError) as exc:
        load_yaml("kind: Route\n  service: orders\n")
    assert "line 2" in exc.value.problems[0].reason


def test_yaml_duplicate_keys_are_refused() -> None:
    with pytest.raises(RulesError) as exc:
        load_yaml("kind: RateLimit\nservice: a\nrequests_per_second: 1\nrequests_per_second: 2\n")
    (p,) = exc.value.problems
    assert p.reason == (
        "YAML error at line 4, column 1: found duplicate key 'requests_per_second' (first at line 3)"
    )


def test_yaml_non_mapping_documents() -> None:
    with pytest.raises(RulesError) as exc:
        load_yaml("just a string\n---\n- a\n- b\n---\n42\n", source="f.yaml")
    assert [str(p) for p in exc.value.problems] == [
        "document 1 of f.yaml: a document must be a mapping of fields, got str",
        "document 2 of f.yaml: a document must be a mapping of fields, got list",
        "document 3 of f.yaml: a document must be a mapping of fields, got int",
    ]


def test_yaml_empty_documents_are_skipped_but_counted() -> None:
    text = "---\n# nothing here\n---\nkind: Route\nservice: a\n---\n"
    with pytest.raises(RulesError) as exc:
        load_yaml(text, source="f.yaml")
    assert problems_of(exc) == [("Route/a (document 2 of f.yaml)", "routes")]
    assert len(load_yaml("---\n---\nkind: Route\nservice: a\nroutes: [{}]\n---\n")) == 1


def test_yaml_on_key_and_yaml12_booleans() -> None:
    # YAML 1.1 would read `on` as True and `yes` as a boolean.
    text = """\
kind: Route
service: a
routes:
  - match: {headers: {x-flag: {exact: yes}}}
    retries: {on: [reset, 429]}
"""
    rule = load_yaml(text).route("a").routes[0]  # type: ignore[union-attr]
    assert rule.match.headers["x-flag"].exact == "yes"
    assert rule.retries is not None and rule.retries.on == ("reset", "429")
    # Output of a plain YAML 1.1 loader is accepted too.
    rs = parse_documents(yaml.safe_load_all(text.replace("yes", '"yes"')))
    assert rs.route("a").routes[0].retries.on == ("reset", "429")  # type: ignore[union-attr]
    # true/false stay booleans.
    rt = load_yaml("kind: Route\nservice: a\nroutes: [{match: {headers: {x: {present: false}}}}]\n").route(
        "a"
    )
    assert rt is not None and rt.routes[0].match.headers["x"].present is False


def test_yaml_unquoted_boolean_where_a_string_is_expected() -> None:
    with pytest.raises(RulesError) as exc:
        load_yaml("kind: Route\nservice: a\nroutes:\n  - match: {headers: {x-canary: {exact: true}}}\n")
    assert exc.value.problems == [
        RuleProblem(
            "Route/a (document 1 of rules)",
            "routes[0].match.headers.x-canary.exact",
            "Input should be a valid string",
        )
    ]


def test_load_file(tmp_path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(DESIGN_FIXED, encoding="utf-8")
    assert load_file(path) == load_yaml(DESIGN_FIXED)
    assert load_file(str(path)) == load_yaml(DESIGN_FIXED)
    path.write_text(DESIGN_EXAMPLE, encoding="utf-8")
    with pytest.raises(RulesError) as exc:
        load_file(path)
    assert exc.value.problems[0].document == "Destination/orders (document 2 of mesh.yaml)"
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"kind: Route\xff\n")
    with pytest.raises(RulesError) as exc:
        load_file(bad)
    assert exc.value.problems[0].document == "bad.yaml"
    with pytest.raises(FileNotFoundError):
        load_file(tmp_path / "missing.yaml")


def test_reference_examples_parse() -> None:
    """Every YAML example in docs/rules.md is valid, and together they form a valid set
    (fragments of a document, such as one route rule, are fenced as `yml` and not read)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "rules.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == len(KINDS) + 1  # one per kind, and `[]` (no rules on purpose), which adds nothing
    rs = load_yaml("---\n".join(blocks), source="rules.md")
    assert list(dict.fromkeys(d.kind for d in rs.documents)) == list(KINDS)  # Gateway's brings its Route


# ------------------------------------------------------------------------------------------
# Hostile input: always a RulesError naming the document and the field, and numbers are bounded


def endpoints(**endpoint: object) -> dict:
    return {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": "10.0.0.1:80", **endpoint}]}


def rate_limit(**fields: object) -> dict:
    return {"kind": "RateLimit", "service": "orders", "requests_per_second": 10, **fields}


def hedge(**fields: object) -> dict:
    return route({"hedge": {"delay": "10ms", **fields}})


@pytest.mark.parametrize("kind", [["Route"], {"Route": 1}, 3, 1.5, True, ""])
def test_a_kind_that_is_not_a_known_name_is_a_problem_of_field_kind(kind: object) -> None:
    raw = {"kind": kind, "service": "orders", "routes": [{}]}
    with pytest.raises(RulesError) as exc:
        parse_documents([raw], source="mesh.yaml")
    assert problems_of(exc) == [("document 1 of mesh.yaml", "kind")]
    assert exc.value.problems[0].reason.startswith("unknown kind ")
    with pytest.raises(RulesError) as exc:
        RuleSet.EMPTY.apply([raw])
    assert fields_of(exc) == ["kind"]
    with pytest.raises(ValueError, match="unknown kind"):
        RuleSet.EMPTY.get(kind, "orders")  # type: ignore[arg-type]


def test_a_list_as_kind_in_yaml_names_document_and_field() -> None:
    text = "kind: Route\nservice: a\nroutes: [{}]\n---\nkind: [Route]\nservice: orders\n"
    with pytest.raises(RulesError) as exc:
        load_yaml(text, source="mesh.yaml")
    assert problems_of(exc) == [("document 2 of mesh.yaml", "kind")]


@pytest.mark.parametrize(
    ("duration", "reason"),
    [
        ("1" + "0" * 400 + "s", "duration text is longer than 64 characters (402)"),
        ("9" * 60 + "h", "must be at most 24h"),
        ("24h1us", "must be at most 24h"),
        ("25h", "must be at most 24h"),
        ("1441m", "must be at most 24h"),
    ],
)
def test_durations_are_at_most_a_day(duration: str, reason: str) -> None:
    p = problem(route({"timeout": duration}))
    assert (p.document, p.field, p.reason) == (
        "Route/orders (document 1 of rules)",
        "routes[0].timeout",
        reason,
    )


def test_a_day_is_the_longest_duration_accepted() -> None:
    rule = validate_document(route({"timeout": "24h", "retries": {"budget": {"window": "1440m"}}})).routes[0]
    assert rule.timeout == 86400.0 and rule.retries is not None and rule.retries.budget.window == 86400.0
    assert parse_duration("1000h") == 3_600_000.0  # the parser itself is not capped (token lifetimes)


def test_a_duration_too_large_for_a_float_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="longer than 64 characters"):
        parse_duration("1" + "0" * 400 + "s")  # 1e400 s: an OverflowError once
    assert parse_duration("9" * 62 + "h") < math.inf  # the longest text allowed still fits a float


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (endpoints(weight=True), "endpoints[0].weight"),
        (route({"to": [{"weight": True}]}), "routes[0].to[0].weight"),
        (route({"retries": {"attempts": True}}), "routes[0].retries.attempts"),
        (route({"retries": {"budget": {"percent": True}}}), "routes[0].retries.budget.percent"),
        (
            route({"retries": {"budget": {"min_per_second": False}}}),
            "routes[0].retries.budget.min_per_second",
        ),
        (route({"retries": {"max_body_bytes": True}}), "routes[0].retries.max_body_bytes"),
        (hedge(max_hedges=True), "routes[0].hedge.max_hedges"),
        (route({"fault": {"abort": {"percent": True}}}), "routes[0].fault.abort.percent"),
        (destination(max_concurrent_requests=True), "max_concurrent_requests"),
        (destination(circuit_breaker={"consecutive_failures": True}), "circuit_breaker.consecutive_failures"),
        (
            destination(outlier_detection={"max_ejection_percent": True}),
            "outlier_detection.max_ejection_percent",
        ),
        (rate_limit(requests_per_second=True), "requests_per_second"),
        (rate_limit(burst=False), "burst"),
    ],
)
def test_booleans_are_not_numbers(raw: dict, field: str) -> None:
    p = problem(raw)
    assert p.field == field
    assert p.reason in ("expected a number, got true", "expected a number, got false")


@pytest.mark.parametrize(
    ("raw", "field", "text"),
    [
        (endpoints(weight=" 7 "), "endpoints[0].weight", "' 7 '"),
        (route({"to": [{"weight": "1"}]}), "routes[0].to[0].weight", "'1'"),
        (route({"retries": {"attempts": "3"}}), "routes[0].retries.attempts", "'3'"),
        (destination(max_concurrent_requests="10"), "max_concurrent_requests", "'10'"),
        (rate_limit(requests_per_second="100"), "requests_per_second", "'100'"),
        (rate_limit(burst="1e3"), "burst", "'1e3'"),
    ],
)
def test_quoted_numbers_are_not_numbers(raw: dict, field: str, text: str) -> None:
    """A quoted number is a slip worth showing, as `true` is: lax pydantic would read it."""
    p = problem(raw)
    assert (p.field, p.reason) == (
        field,
        f"expected a number, got the string {text} (write it without quotes)",
    )


def test_a_boolean_duration_is_refused_as_a_duration() -> None:
    p = problem(route({"timeout": True}))
    assert (p.field, p.reason) == (
        "routes[0].timeout",
        "a duration needs a unit, e.g. '250ms' or '2s'; got True",
    )


BOUNDS = [
    # (document with the field set to N, field path, largest value accepted)
    (lambda n: endpoints(weight=n), "endpoints[0].weight", 10_000),
    (lambda n: route({"to": [{"weight": n}]}), "routes[0].to[0].weight", 10_000),
    (lambda n: route({"retries": {"attempts": n}}), "routes[0].retries.attempts", 10),
    (lambda n: hedge(max_hedges=n), "routes[0].hedge.max_hedges", 5),
    (
        lambda n: route({"retries": {"max_body_bytes": n}}),
        "routes[0].retries.max_body_bytes",
        64 * 1024 * 1024,
    ),
    (lambda n: route({"retries": {"budget": {"percent": n}}}), "routes[0].retries.budget.percent", 100),
    (
        lambda n: route({"retries": {"budget": {"min_per_second": n}}}),
        "routes[0].retries.budget.min_per_second",
        1_000_000,
    ),
    (lambda n: route({"mirror": {"percent": n}}), "routes[0].mirror.percent", 100),
    (lambda n: destination(max_concurrent_requests=n), "max_concurrent_requests", 1_000_000),
    (
        lambda n: destination(circuit_breaker={"consecutive_failures": n}),
        "circuit_breaker.consecutive_failures",
        1_000_000,
    ),
    (
        lambda n: destination(circuit_breaker={"half_open_requests": n}),
        "circuit_breaker.half_open_requests",
        1_000_000,
    ),
    (
        lambda n: destination(outlier_detection={"consecutive_5xx": n}),
        "outlier_detection.consecutive_5xx",
        1_000_000,
    ),
    (
        lambda n: destination(outlier_detection={"consecutive_gateway_errors": n}),
        "outlier_detection.consecutive_gateway_errors",
        1_000_000,
    ),
    (
        lambda n: destination(outlier_detection={"success_rate_min_requests": n}),
        "outlier_detection.success_rate_min_requests",
        1_000_000,
    ),
    (
        lambda n: destination(outlier_detection={"max_ejection_percent": n}),
        "outlier_detection.max_ejection_percent",
        100,
    ),
    (lambda n: rate_limit(requests_per_second=n), "requests_per_second", 1_000_000),
    (lambda n: rate_limit(burst=n), "burst", 1_000_000),
]


@pytest.mark.parametrize(("build", "field", "largest"), BOUNDS, ids=[b[1] for b in BOUNDS])
def test_every_number_has_an_upper_bound(build, field: str, largest: int) -> None:
    validate_document(build(largest))
    p = problem(build(largest + 1))
    assert (p.field, p.reason) == (field, f"Input should be less than or equal to {largest}")
    for too_big in (10**4000, 1e308, -1e308):  # a 4,000-digit count was once accepted
        assert problem(build(too_big)).field == field


def test_a_huge_number_in_yaml_names_the_document() -> None:
    text = "kind: Route\nservice: a\nroutes: [{}]\n---\nkind: Destination\nservice: b\n"
    text += "max_concurrent_requests: " + "9" * 5000 + "\n"
    with pytest.raises(RulesError) as exc:
        load_yaml(text, source="mesh.yaml")
    (p,) = exc.value.problems
    assert p.document == "document 2 of mesh.yaml"
    assert p.reason.startswith("YAML error: ValueError: ")


@pytest.mark.parametrize("number", ["1e400", ".inf", ".nan", "-.inf"])
def test_numbers_are_finite(number: str) -> None:
    with pytest.raises(RulesError) as exc:
        load_yaml(f"kind: RateLimit\nservice: a\nrequests_per_second: {number}\n", source="m.yaml")
    assert problems_of(exc) == [("RateLimit/a (document 1 of m.yaml)", "requests_per_second")]


@pytest.mark.parametrize(
    ("text", "document", "field"),
    [
        (
            "kind: Route\nservice: !!binary b3JkZXJz\nroutes: [{}]\n",
            "Route (document 1 of m.yaml)",
            "service",
        ),
        (
            "kind: Endpoints\nservice: a\nendpoints: [{address: 'a:80', labels: {v: !!binary MQ==}}]\n",
            "Endpoints/a (document 1 of m.yaml)",
            "endpoints[0].labels",
        ),
        (
            "kind: Destination\nservice: a\nsubsets: {!!binary djE=: {version: v1}}\n",
            "Destination/a (document 1 of m.yaml)",
            "subsets",
        ),
        ("kind: Route\nservice: 2024-01-01\nroutes: [{}]\n", "Route (document 1 of m.yaml)", "service"),
        (
            "kind: Route\nservice: a\nroutes: [{name: 2024-01-01 10:00:00}]\n",
            "Route/a (document 1 of m.yaml)",
            "routes[0].name",
        ),
    ],
)
def test_binary_and_timestamps_are_not_text(text: str, document: str, field: str) -> None:
    with pytest.raises(RulesError) as exc:
        load_yaml(text, source="m.yaml")
    assert problems_of(exc) == [(document, field)]


def test_bytes_from_python_are_not_text() -> None:
    p = problem({"kind": "Route", "service": b"orders", "routes": [{}]})
    assert (p.field, p.reason) == ("service", "expected text, got binary data (bytes)")
    p = problem(route({"match": {"methods": [b"GET"]}}))
    assert p.field == "routes[0].match.methods"


def test_a_regex_too_deep_to_compile_is_a_problem() -> None:
    p = problem(route({"match": {"path": {"regex": "(" * 5000 + ")" * 5000}}}))
    assert (p.field, p.reason) == (
        "routes[0].match.path.regex",
        "regular expression too large or too deeply nested",
    )
    p = problem(route({"match": {"path": {"regex": "a{99999999999999999999}"}}}))
    assert p.field == "routes[0].match.path.regex"


def test_a_huge_service_name_is_not_repeated_whole() -> None:
    p = problem({"kind": "Route", "service": "a" * 100_000, "routes": [{}]})
    assert p.field == "service" and len(str(p)) < 1000


# ------------------------------------------------------------------------------------------
# Empty rules files


@pytest.mark.parametrize("content", ["", "\n\n", "# every rule removed\n", "---\n---\n", "~\n"])
def test_a_rules_file_with_no_document_is_refused(tmp_path: Path, content: str) -> None:
    f = tmp_path / "mesh.yaml"
    f.write_text(content)
    with pytest.raises(EmptyRulesFile) as exc:
        load_file(f)
    assert isinstance(exc.value, RulesError)
    (p,) = exc.value.problems
    assert p.document == "mesh.yaml" and "write [] to have no rules on purpose" in p.reason
    assert load_yaml(content) == RuleSet.EMPTY  # text given in code is not a file caught half-written


def test_an_empty_list_document_means_no_rules_on_purpose(tmp_path: Path) -> None:
    f = tmp_path / "mesh.yaml"
    f.write_text("# no rules for now\n[]\n")
    assert load_file(f) == RuleSet.EMPTY
    f.write_text("[]\n---\nkind: Route\nservice: a\nroutes: [{}]\n")
    assert len(load_file(f)) == 1
    f.write_text("[]\n---\nkind: Route\nservice: a\n")
    with pytest.raises(RulesError) as exc:
        load_file(f)
    assert problems_of(exc) == [("Route/a (document 2 of mesh.yaml)", "routes")]


# ------------------------------------------------------------------------------------------
# Property: whatever the values, validation answers with rules or a RulesError


def _json_like() -> st.SearchStrategy[object]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(),
        st.text(max_size=20),
        st.binary(max_size=5),
        st.sampled_from(["1" + "0" * 400 + "s", "25h", "p95", "[::1]:80", "5xx", "(((", "Route"]),
    )

    def nested(inner: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
        return st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3))

    return st.recursive(scalars, nested, max_leaves=8)


_VALID = [
    endpoints(weight=2, labels={"v": "1"}),
    destination(
        subsets={"v1": {"v": "1"}}, circuit_breaker={}, outlier_detection={}, max_concurrent_requests=5
    ),
    route({"timeout": "1s", "retries": {}, "hedge": {}, "fault": {"abort": {}}, "mirror": {}, "to": [{}]}),
    {"kind": "Authorization", "service": "orders", "allow": [{"from": "a", "methods": "GET", "paths": "/x"}]},
    rate_limit(burst=3),
]


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _replaced(doc: object, path: tuple, new: object) -> object:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        return {**doc, head: _replaced(doc[head], rest, new)}
    assert isinstance(doc, list)
    return [_replaced(v, rest, new) if i == head else v for i, v in enumerate(doc)]


@st.composite
def _mutated(draw: st.DrawFn) -> object:
    doc = draw(st.sampled_from(_VALID))
    path = draw(st.sampled_from(_paths(doc)[1:]))
    return _replaced(doc, path, draw(_json_like()))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_any_value_in_any_field_gives_rules_or_a_rules_error(doc: object) -> None:
    try:
        rules = parse_documents([doc])  # type: ignore[list-item]
    except RulesError as exc:
        assert exc.problems and all(p.document for p in exc.problems)
        return
    assert parse_documents(rules.to_dicts()) == rules  # what is accepted dumps and loads back
