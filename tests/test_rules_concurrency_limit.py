"""The ConcurrencyLimit document and a Destination's adaptive_concurrency: each problem named by
document, field and reason."""

from __future__ import annotations

import pytest

from meshlib.rules import RuleProblem, RulesError, RuleSet, validate_document


def problem(raw: dict) -> RuleProblem:
    with pytest.raises(RulesError) as exc:
        validate_document(raw)
    assert len(exc.value.problems) == 1, exc.value.problems
    return exc.value.problems[0]


def limit(**fields: object) -> dict:
    return {"kind": "ConcurrencyLimit", "service": "orders", **fields}


def destination(**fields: object) -> dict:
    return {"kind": "Destination", "service": "orders", **fields}


def test_a_valid_document_with_defaults_filled_in() -> None:
    rules = RuleSet([validate_document(limit(partition_by="Header:X-Class", partitions={"gold": 0.6}))])
    doc = rules.concurrency_limit("orders")
    assert doc is not None and doc.algorithm == "gradient"
    assert doc.partition_by == "header:x-class"
    assert doc.gradient is not None and doc.gradient.min_rtt.requests == 50  # the defaults, spelled out
    assert doc.gradient2 is None and doc.vegas is None
    assert doc.retry_after == 1.0


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"algorithm": "aimd"}, "algorithm", "Input should be 'gradient', 'gradient2' or 'vegas'"),
        ({"min_limit": 10, "max_limit": 5}, "max_limit", "must be at least min_limit (10)"),
        (
            {"min_limit": 2, "max_limit": 5, "initial_limit": 6},
            "initial_limit",
            "must be between min_limit (2) and max_limit (5)",
        ),
        ({"max_limit": 2_000_000}, "max_limit", "Input should be less than or equal to 1000000"),
        ({"vegas": {"smoothing": 0.5}}, "vegas", "vegas options are only used with algorithm: vegas"),
        (
            {"algorithm": "vegas", "vegas": {"smoothing": 0}},
            "vegas.smoothing",
            "Input should be greater than 0",
        ),
        (
            {"gradient": {"min_rtt": {"jitter": 150}}},
            "gradient.min_rtt.jitter",
            "Input should be less than or equal to 100",
        ),
        ({"gradient": {"interval": "0s"}}, "gradient.interval", "must be longer than 0s"),
        (
            {"algorithm": "gradient2", "gradient2": {"tolerance": 0.5}},
            "gradient2.tolerance",
            "Input should be greater than or equal to 1",
        ),
        ({"partitions": {"a": 0.5}}, "partitions", "partitions need partition_by (source or header:NAME)"),
        (
            {"partition_by": "cookie:x"},
            "partition_by",
            "invalid partition_by 'cookie:x': use source or header:NAME",
        ),
        (
            {"partition_by": "source", "partitions": {"a": 0.7, "b": 0.4}},
            "partitions",
            "the shares add up to more than 1",
        ),
        (
            {"partition_by": "source", "partitions": {"a": 0}},
            "partitions",
            "the share of 'a' must be above 0 and at most 1, not 0",
        ),
        ({"retry_after": 1}, "retry_after", None),
    ],
)
def test_problems_name_the_field(fields: dict, field: str, reason: str | None) -> None:
    p = problem(limit(**fields))
    assert p.document.startswith("ConcurrencyLimit/orders")
    assert p.field == field
    if reason is not None:
        assert p.reason == reason


def test_destination_adaptive_concurrency() -> None:
    doc = validate_document(destination(adaptive_concurrency={"algorithm": "vegas", "max_limit": 50}))
    spec = doc.adaptive_concurrency  # type: ignore[union-attr]
    assert spec is not None and spec.vegas is not None and spec.max_limit == 50
    p = problem(destination(max_concurrent_requests=10, adaptive_concurrency={}))
    assert (p.field, p.reason) == (
        "adaptive_concurrency",
        "set max_concurrent_requests or adaptive_concurrency, not both",
    )
    assert (
        problem(destination(adaptive_concurrency={"partitions": {}})).field
        == "adaptive_concurrency.partitions"
    )


def test_an_external_host_has_no_concurrency_limit_of_its_own() -> None:
    external = {"kind": "External", "service": "api.example.com", "ports": [{"port": 443}]}
    with pytest.raises(RulesError) as exc:
        RuleSet([external, limit(service="api.example.com")])
    (p,) = exc.value.problems
    assert p.document.startswith("ConcurrencyLimit/api.example.com") and p.field == "service"
    assert "runs no meshlib" in p.reason
