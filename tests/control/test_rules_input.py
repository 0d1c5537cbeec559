"""Hostile rules documents sent to a real control service: each is a 422 naming the document and
the field, with or without dry run, never a 500; nothing is committed and nothing is logged as an
error."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.control import DESTINATION, ROUTE, Control, ErrorRecords

ORDERS = "Route/orders (document 1 of request)"

# (name, document, the problem's document, the problem's field)
HOSTILE_JSON: list[tuple[str, dict[str, Any], str, str]] = [
    ("list as kind", {"kind": ["Route"], "service": "orders"}, "document 1 of request", "kind"),
    ("object as kind", {"kind": {"Route": 1}, "service": "orders"}, "document 1 of request", "kind"),
    (
        "duration of 401 digits",
        {"kind": "Route", "service": "orders", "routes": [{"timeout": "1" + "0" * 400 + "s"}]},
        ORDERS,
        "routes[0].timeout",
    ),
    (
        "duration beyond a day",
        {"kind": "Route", "service": "orders", "routes": [{"timeout": "9" * 60 + "h"}]},
        ORDERS,
        "routes[0].timeout",
    ),
    (
        "true as a weight",
        {"kind": "Route", "service": "orders", "routes": [{"to": [{"weight": True}]}]},
        ORDERS,
        "routes[0].to[0].weight",
    ),
    (
        "true as attempts",
        {"kind": "Route", "service": "orders", "routes": [{"retries": {"attempts": True}}]},
        ORDERS,
        "routes[0].retries.attempts",
    ),
    (
        "4,000-digit bulkhead",
        {"kind": "Destination", "service": "payments", "max_concurrent_requests": int("9" * 4000)},
        "Destination/payments (document 1 of request)",
        "max_concurrent_requests",
    ),
    (
        "a thousand hedges",
        {"kind": "Route", "service": "orders", "routes": [{"hedge": {"delay": "1ms", "max_hedges": 1000}}]},
        ORDERS,
        "routes[0].hedge.max_hedges",
    ),
    (
        "regex too deep",
        {
            "kind": "Route",
            "service": "orders",
            "routes": [{"match": {"path": {"regex": "(" * 3000 + ")" * 3000}}}],
        },
        ORDERS,
        "routes[0].match.path.regex",
    ),
    (
        "false as a burst",
        {"kind": "RateLimit", "service": "orders", "requests_per_second": 5, "burst": False},
        "RateLimit/orders (document 1 of request)",
        "burst",
    ),
]

# (name, YAML body, the problem's document, the problem's field)
HOSTILE_YAML: list[tuple[str, str, str, str]] = [
    ("list as kind", "kind: [Route]\nservice: orders\n", "document 1 of request", "kind"),
    (
        "binary service name",
        "kind: Route\nservice: !!binary b3JkZXJz\nroutes: [{}]\n",
        "Route (document 1 of request)",
        "service",
    ),
    (
        "timestamp as a rule name",
        "kind: Route\nservice: orders\nroutes: [{name: 2024-01-01}]\n",
        ORDERS,
        "routes[0].name",
    ),
    (
        "infinite rate",
        "kind: RateLimit\nservice: orders\nrequests_per_second: .inf\n",
        "RateLimit/orders (document 1 of request)",
        "requests_per_second",
    ),
    (
        "huge duration",
        "kind: Route\nservice: orders\nroutes: [{timeout: 1" + "0" * 400 + "s}]\n",
        ORDERS,
        "routes[0].timeout",
    ),
]


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    c = Control(tmp_path / "data", ping=0.2)
    c.apply([DESTINATION, ROUTE]).raise_for_status()
    yield c
    c.stop()


@pytest.fixture
def errors() -> Iterator[list[logging.LogRecord]]:
    handler = ErrorRecords()
    loggers = [logging.getLogger(n) for n in ("meshlib", "uvicorn.error", "uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.records
    for logger in loggers:
        logger.removeHandler(handler)


def assert_refused(control: Control, send: Any, document: str, field: str) -> None:
    version = control.plane.version
    for params in ({"dry_run": "1"}, {}):
        r = send(params)
        assert r.status_code == 422, (params, r.status_code, r.text[:300])
        body = r.json()
        assert body["error"] == "invalid rules"
        assert [(p["document"], p["field"]) for p in body["problems"]] == [(document, field)], body
        assert len(r.content) < 2000  # the hostile value is not echoed back whole
    assert control.plane.version == version


@pytest.mark.parametrize(("name", "doc", "document", "field"), HOSTILE_JSON, ids=[h[0] for h in HOSTILE_JSON])
def test_hostile_json_documents_are_422_naming_document_and_field(
    control: Control, errors: list, name: str, doc: dict, document: str, field: str
) -> None:
    assert_refused(control, lambda params: control.apply([doc], **params), document, field)
    assert errors == []


@pytest.mark.parametrize(
    ("name", "text", "document", "field"), HOSTILE_YAML, ids=[h[0] for h in HOSTILE_YAML]
)
def test_hostile_yaml_documents_are_422_naming_document_and_field(
    control: Control, errors: list, name: str, text: str, document: str, field: str
) -> None:
    headers = {**control.admin, "content-type": "application/yaml"}

    def send(params: dict) -> Any:
        return control.http.put("/v1/config", content=text.encode(), headers=headers, params=params)

    assert_refused(control, send, document, field)
    assert errors == []


def test_the_bounds_themselves_are_accepted(control: Control) -> None:
    doc = {
        "kind": "Route",
        "service": "orders",
        "routes": [
            {"timeout": "24h", "retries": {"attempts": 10}, "hedge": {"delay": "1ms", "max_hedges": 5}}
        ],
    }
    r = control.apply([doc])
    assert r.status_code == 200, r.text
    assert control.http.get("/v1/config").json()["documents"][-1]["routes"][0]["hedge"]["max_hedges"] == 5
