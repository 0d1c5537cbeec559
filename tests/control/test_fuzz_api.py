"""Schemathesis against a live control service, driven by its own `/openapi.json`.

Every operation but the watch stream (which does not end) gets schema-derived valid and
invalid requests, with the admin token, a service's join token, and without (no token, a
wrong token), against a control service with security off and one with security on. Every
answer must be a documented status with a body of the documented type, and never a 5xx. The
runs are bounded and deterministic: a fixed seed, no example database, no stateful phase.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from meshlib.control import openapi
from tests.control import DESTINATION, ROUTE, Control
from tests.control.test_security_api import SecureControl

RATE_LIMIT = {"kind": "RateLimit", "service": "orders", "requests_per_second": 100}
TIMED = {
    "kind": "Route",
    "service": "orders",
    "routes": [
        {"to": [{"subset": "v1"}], "timeout": "1.5s", "retries": {"attempts": 2, "per_try_timeout": "250ms"}}
    ],
}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MAX_EXAMPLES = 8

CONFIG = {
    "seed": 20260401,
    "suppress-health-check": ["too_slow"],  # a loaded machine is slow, not wrong
    "generation": {
        "mode": "all",
        "max-examples": MAX_EXAMPLES,
        "deterministic": True,
        "database": "none",
        "with-security-parameters": False,
    },
    "phases": {"stateful": {"enabled": False}},
    "request-timeout": 10,
    "operations": [
        # The coverage phase walks every field of every kind of rules document: thousands of
        # requests. More generated documents instead.
        {
            "include-path": "/v1/config",
            "include-method": "PUT",
            "phases": {"coverage": {"enabled": False}},
            "generation": {"max-examples": 3 * MAX_EXAMPLES},
        }
    ],
}


def load(security: bool, *, guarded: bool = False) -> Any:
    """The schema as the service serves it (tests/control/test_openapi.py checks they agree),
    loaded at collection so that each operation is a test of its own; `guarded`: only the
    operations that need a token or certificate."""
    doc = copy.deepcopy(openapi.document(security))
    del doc["paths"]["/v1/watch"]  # a stream that does not end
    if guarded:
        for item in doc["paths"].values():
            for method in [m for m, op in item.items() if not op.get("security")]:
                del item[method]
        doc["paths"] = {path: item for path, item in doc["paths"].items() if item}
    config = copy.deepcopy(CONFIG)
    if guarded:  # the token is checked before anything else: fewer requests say as much
        config["phases"] = {**config["phases"], "coverage": {"enabled": False}}
    schema = schemathesis.openapi.from_dict(doc, config=schemathesis.Config.from_dict(config))
    return schema


def populate(http: httpx.Client, admin: dict[str, str]) -> None:
    """Some of everything, so that the answers checked against the schema are not all empty."""
    assert http.put("/v1/config", json=[DESTINATION, ROUTE], headers=admin).status_code == 200
    assert http.put("/v1/config", json=[RATE_LIMIT, TIMED], headers=admin).status_code == 200
    r = http.post(
        "/v1/registry/orders", json={"address": "127.0.0.1:8001", "labels": {"version": "v1"}}, headers=admin
    )
    assert r.status_code == 201, r.text
    ack = {"client": "c1", "service": "checkout", "revision": 1, "version": 2, "ok": False, "error": "bad"}
    assert http.post("/v1/ack", json=ack, headers=admin).status_code == 204
    edge = {"dir": "out", "peer": "orders", "subset": "v1", "counts": {"2xx": 9, "5xx": 1}, "lat": [[40, 10]]}
    endpoint = {"service": "orders", "address": "127.0.0.1:8001", "breaker": "open"}
    report = {"client": "c1", "service": "checkout", "edges": [edge], "endpoints": [endpoint]}
    assert http.post("/v1/telemetry", json=report, headers=admin).status_code == 204


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    c = Control(tmp_path_factory.mktemp("fuzz") / "data", ping=0.2)
    populate(c.http, c.admin)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureControl]:
    c = SecureControl(tmp_path_factory.mktemp("fuzz-secure") / "data", tls=False)
    populate(c.http, c.admin)
    yield c
    c.http.close()
    c.server.stop()


plain_api = load(False)
plain_guarded = load(False, guarded=True)
secure_api = load(True)
secure_guarded = load(True, guarded=True)


def own_method(case: schemathesis.Case) -> bool:
    """False for the requests with another method that schemathesis sends to check the 405."""
    return case.method.upper() == case.operation.method.upper()


@plain_api.parametrize()
def test_plain_admin(case: schemathesis.Case, plain: Control) -> None:
    case.call_and_validate(base_url=plain.url, headers=plain.admin, checks=CHECKS)


@plain_guarded.parametrize()
def test_plain_no_token(case: schemathesis.Case, plain: Control) -> None:
    response = case.call_and_validate(base_url=plain.url, headers={}, checks=CHECKS)
    if own_method(case) and case.operation.definition.raw.get("security") == [{"adminToken": []}]:
        assert response.status_code == 401


@secure_api.parametrize()
def test_secure_admin(case: schemathesis.Case, secure: SecureControl) -> None:
    case.call_and_validate(base_url=secure.url, headers=secure.admin, checks=CHECKS)


@pytest.fixture(scope="module")
def orders_token(secure: SecureControl) -> str:
    return secure.token("orders", ttl=3600)


@secure_guarded.parametrize()
def test_secure_join_token(case: schemathesis.Case, secure: SecureControl, orders_token: str) -> None:
    """A service's join token: the admin routes refuse it (401), the others let it act for its
    own service only (403 for another)."""
    bearer = {"Authorization": f"Bearer {orders_token}"}
    response = case.call_and_validate(base_url=secure.url, headers=bearer, checks=CHECKS)
    security = case.operation.definition.raw.get("security")
    if own_method(case) and security == [{"adminToken": []}]:
        assert response.status_code == 401
    service = (case.path_parameters or {}).get("service")
    if own_method(case) and service is not None and service != "orders" and response.status_code < 400:
        raise AssertionError(f"a token of orders acted for {service!r}: {response.status_code}")


@secure_guarded.parametrize()
def test_secure_wrong_token(case: schemathesis.Case, secure: SecureControl) -> None:
    wrong = {"Authorization": "Bearer mjt_wrong"}
    response = case.call_and_validate(base_url=secure.url, headers=wrong, checks=CHECKS)
    if own_method(case) and case.operation.definition.raw.get("security"):
        assert response.status_code == 401


def test_the_checks_catch_an_answer_that_breaks_the_schema(plain: Control) -> None:
    """The fuzz tests would notice a drift: the same live answer fails against a document
    that says something else about it."""
    doc = copy.deepcopy(openapi.document(False))
    doc["components"]["schemas"]["Health"]["properties"]["epoch"] = {"type": "integer"}
    case = schemathesis.openapi.from_dict(doc)["/healthz"]["GET"].Case()
    with pytest.raises(FailureGroup, match="Response violates schema"):
        case.call_and_validate(base_url=plain.url, checks=CHECKS)
    plain_api["/healthz"]["GET"].Case().call_and_validate(base_url=plain.url, checks=CHECKS)


# A case the fuzzing found (its coverage phase, too slow to run here on every rules field):
# a rules document whose `kind` is an object, not a string. Refused by the rules validation.
@pytest.mark.parametrize(
    ("body", "media"),
    [
        (b"documents:\n- kind: {}\n  service: ''\n  requests_per_second: 5.0e-324\n", "application/yaml"),
        (b'[{"kind": {}, "service": "orders"}]', "application/json"),
        (b'[{"kind": ["Route"], "service": "orders"}]', "application/json"),
    ],
    ids=["yaml", "json", "json-list"],
)
def test_a_document_whose_kind_is_not_a_string_is_refused(plain: Control, body: bytes, media: str) -> None:
    for params in ({"dry_run": "1"}, {}):
        r = plain.http.put(
            "/v1/config", content=body, params=params, headers={**plain.admin, "Content-Type": media}
        )
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "invalid rules"
