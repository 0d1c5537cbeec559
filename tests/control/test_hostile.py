"""Hostile input on every endpoint: each answer is a 4xx with a JSON error, never a 5xx, and
the server keeps serving (and logs no error) afterwards."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.control import DESTINATION, ROUTE, Control, ErrorRecords

BODY_ENDPOINTS = [
    ("PUT", "/v1/config"),
    ("PUT", "/v1/config?dry_run=1"),
    ("POST", "/v1/ack"),
    ("POST", "/v1/registry/orders"),
    ("PUT", "/v1/registry/orders/{id}"),
    ("POST", "/v1/telemetry"),
]

JSON = "application/json"

# (name, body, content type): each is refused by every endpoint that reads a body
BAD_BODIES = [
    ("truncated object", b"{", JSON),
    ("truncated list", b"[1, 2", JSON),
    ("trailing garbage", b'{"a": 1} x', JSON),
    ("NaN", b"NaN", JSON),
    ("Infinity inside", b'{"ttl": Infinity, "client": "c", "address": "h:1"}', JSON),
    ("float overflow", b'{"ttl": 1e999, "client": "c", "address": "h:1"}', JSON),
    ("int of 5000 digits", b'{"ttl": ' + b"9" * 5000 + b"}", JSON),
    ("nested 100k deep", b"[" * 100_000 + b"]" * 100_000, JSON),
    ("lone surrogate", b'{"client": "\\ud800", "address": "\\udfff:1", "documents": ["\\ud800"]}', JSON),
    ("not UTF-8", b'{"client": "\xff\xfe"}', JSON),
    ("UTF-16 junk", "\ufeff{".encode("utf-16"), JSON),
    ("null", b"null", JSON),
    ("true", b"true", JSON),
    ("number", b"42", JSON),
    ("string", b'"documents"', JSON),
    ("list of junk", b'[1, "a", null, [], {"kind": 5}]', JSON),
    ("nested garbage", b'{"documents": {"a": [1, {"b": null}]}, "client": {"x": []}, "ttl": [1]}', JSON),
    ("strings for numbers", b'{"client": "c", "revision": "1", "address": "h:1", "ttl": "10"}', JSON),
    ("form encoded", b"a=b&c=d", "application/x-www-form-urlencoded"),
    ("plain text", b'{"client": "c"}', "text/plain"),
    ("multipart", b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x"),
    ("xml", b"<a/>", "application/xml"),
]


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    c = Control(tmp_path / "data", ping=0.2)
    yield c
    c.stop()


@pytest.fixture
def errors(control: Control) -> Iterator[list[logging.LogRecord]]:
    handler = ErrorRecords()
    loggers = [logging.getLogger(n) for n in ("meshlib.control", "uvicorn.error", "uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.records
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.fixture
def instance(control: Control) -> str:
    control.apply([DESTINATION, ROUTE])
    r = control.http.post("/v1/registry/orders", json={"address": "127.0.0.1:8001", "ttl": 60})
    return r.json()["id"]


def refused(r: httpx.Response, *statuses: int) -> dict:
    """Assert a 4xx (one of `statuses` if given) with a JSON error body; return the body."""
    assert 400 <= r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text[:300])
    if statuses:
        assert r.status_code in statuses, (r.request.url, r.status_code, r.text[:300])
    body = r.json()
    assert isinstance(body, dict) and isinstance(body["error"], str)
    return body


def healthy(control: Control) -> None:
    r = control.http.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_bad_bodies_on_every_endpoint(control: Control, instance: str, errors: list) -> None:
    version = control.plane.version
    for method, path in BODY_ENDPOINTS:
        url = path.format(id=instance)
        for name, body, content_type in BAD_BODIES:
            if path == "/v1/telemetry" and name == "strings for numbers":
                continue  # a telemetry report is free-form beyond its client id
            r = control.http.request(
                method, url, content=body, headers={**control.admin, "content-type": content_type}
            )
            refused(r)
            assert r.status_code != 413, name
    assert control.plane.version == version
    assert errors == []
    healthy(control)


def test_empty_bodies(control: Control, instance: str, errors: list) -> None:
    for method, path in BODY_ENDPOINTS:
        for body in (b"", b"  \n "):
            r = control.http.request(method, path.format(id=instance), content=body, headers=control.admin)
            if path.endswith("{id}"):
                assert r.status_code == 200  # a heartbeat needs no body
            else:
                refused(r, 400)
    assert errors == []


@pytest.mark.parametrize("chunked", [False, True])
def test_huge_bodies_get_413(control: Control, instance: str, errors: list, chunked: bool) -> None:
    huge = b"[" + b'"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",' * (2 * 1024 * 1024 // 33) + b"1]"
    assert len(huge) > (2 << 20) - 64
    for method, path in BODY_ENDPOINTS:
        content = (huge[i : i + 65536] for i in range(0, len(huge), 65536)) if chunked else huge
        r = control.http.request(method, path.format(id=instance), content=content, headers=control.admin)
        refused(r, 413)
    # a Content-Length far beyond anything worth reading is refused before reading any of it
    host, port = control.server.host, control.server.port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /v1/ack HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\n{")
        answer = b""
        while b"}" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"error"' in answer
    assert errors == []
    healthy(control)


def test_rules_documents_of_every_wrong_shape(control: Control, errors: list) -> None:
    cases = [
        [{"kind": "Gateway", "service": "orders"}],
        [{"kind": None, "service": "orders"}],
        [{"service": "orders"}],
        [{"kind": "Destination"}],
        [{"kind": "Destination", "service": 5}],
        [{"kind": "Destination", "service": "orders", "subsets": "v1"}],
        [{"kind": "Route", "service": "orders", "routes": [{"to": [{"subset": "ghost"}]}]}],
        [{"kind": "Route", "service": "orders", "routes": [{"timeout": 30, "to": [{}]}]}],
        [{"kind": "Endpoints", "service": "orders", "endpoints": [{"address": "nope"}]}],
        [{"kind": "RateLimit", "service": "o", "requests_per_second": -1}],
        [{"kind": "Destination", "service": "\u202e\U0001f4a5\x00", "load_balancer": "\ufffd"}],
        [DESTINATION, DESTINATION],
        [[DESTINATION]],
        ["Destination"],
        {"documents": "x"},
        {"documents": None},
        {"documents": [DESTINATION], "extra": 1},
        {"documents": [DESTINATION], "message": 5},
        {"message": "no documents"},
        {"kind": "Destination", "service": "orders"},
        {},
    ]
    for body in cases:
        body_out = refused(control.apply(body), 422)  # type: ignore[arg-type]
        assert "problems" in body_out or body_out["error"]
        refused(control.apply(body, dry_run=1), 422)  # type: ignore[arg-type]
    assert control.http.get("/v1/config").json() == {"version": 0, "documents": []}
    assert errors == []


def test_yaml_bodies(control: Control, errors: list) -> None:
    yaml_type = {**control.admin, "content-type": "application/yaml"}
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i, name in enumerate("bcdefghij"):
        prev = "abcdefghij"[i]
        laughs += f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]\n"
    cases = [
        ("billion laughs", laughs, 400),
        ("cyclic", "kind: &a [*a]\n", 400),
        ("python tag", "!!python/object:os.system {}\n", 400),
        ("syntax", "kind: [\n", 400),
        ("tabs", "kind:\tDestination\n\t- x", 400),
        ("duplicate key", "kind: Destination\nkind: Route\nservice: o\n", 400),
        ("surrogate", 'kind: "\\ud800"\nservice: o\n', 400),
        ("scalar", "just a string\n", 422),
        ("dates and sets", "kind: Destination\nservice: 2024-01-01\nsubsets: !!set {a, b}\n", 422),
        ("binary", "kind: !!binary aGVsbG8=\nservice: o\n", 422),
        ("complex key", "? [a, b]\n: c\n", 400),
        ("documents not a list", "documents: 5\n", 422),
    ]
    for name, text, status in cases:
        r = control.http.put("/v1/config", content=text.encode(), headers=yaml_type)
        assert refused(r, status), name
    r = control.http.put("/v1/config", content=b"\xff\xfe", headers=yaml_type)
    refused(r, 400)
    assert control.plane.version == 0
    assert errors == []


def test_registry_bodies(control: Control, instance: str, errors: list) -> None:
    good = {"address": "127.0.0.1:9001"}
    cases = [
        {},
        {"address": None},
        {"address": 5},
        {"address": "no-port"},
        {"address": "127.0.0.1:99999"},
        {"address": "::1:80"},
        {"address": "h:1" + "1" * 400},
        {**good, "ttl": 0},
        {**good, "ttl": -1},
        {**good, "ttl": 0.5},
        {**good, "ttl": 3601},
        {**good, "ttl": 1e308},
        {**good, "ttl": "10"},
        {**good, "ttl": True},
        {**good, "ttl": None},
        {**good, "ttl": [10]},
        {**good, "weight": 0},
        {**good, "weight": "1"},
        {**good, "weight": 1.5},
        {**good, "weight": 10**30},
        {**good, "labels": ["a"]},
        {**good, "labels": {"a": 1}},
        {**good, "labels": {"a": {"b": "c"}}},
        {**good, "extra": 1},
    ]
    for body in cases:
        refused(control.http.post("/v1/registry/orders", json=body), 422)
    for bad_ttl in ({"ttl": 0}, {"ttl": "5"}, {"ttl": 99999}, {"nope": 1}, [], "x"):
        refused(control.http.put(f"/v1/registry/orders/{instance}", json=bad_ttl), 422)
    for service in ("BAD", "a b", "-x", "x" * 300, "\u00e9", "%00", "a_b"):
        refused(control.http.post(f"/v1/registry/{service}", json=good), 400)
        refused(control.http.get(f"/v1/registry/{service}"), 400)
    refused(control.http.put("/v1/registry/orders/%00%ff"), 404)
    refused(control.http.delete("/v1/registry/orders/" + "x" * 5000), 404)
    refused(control.http.delete(f"/v1/registry/payments/{instance}"), 404)
    assert len(control.plane.registry) == 1
    assert errors == []


def test_ack_and_telemetry_bodies(control: Control, errors: list) -> None:
    for body in (
        {},
        {"client": ""},
        {"client": "a b"},
        {"client": "x" * 300},
        {"client": 5},
        {"client": "c", "revision": "1"},
        {"client": "c", "revision": -1},
        {"client": "c", "revision": 1.5},
        {"client": "c", "version": 2**64},
        {"client": "c", "ok": "yes"},
        {"client": "c", "error": 5},
        {"client": "c", "error": "e" * 20_000},
        {"client": "c", "service": ["s"]},
    ):
        refused(control.http.post("/v1/ack", json=body), 422)
    for body in ({}, {"client": None}, {"client": "\x00"}, {"client": ["c"]}):
        refused(control.http.post("/v1/telemetry", json=body), 422)
    for body in ([], [{"client": "c"}], "c"):
        refused(control.http.post("/v1/ack", json=body), 422)
        refused(control.http.post("/v1/telemetry", json=body), 422)
    assert control.http.get("/v1/clients").json() == [] and control.plane.telemetry() == {}
    assert errors == []


def test_paths_and_query_parameters(control: Control, instance: str, errors: list) -> None:
    admin = control.admin
    for v in ("abc", "-1", "1.5", "1e3", "0x10", "99999999999999999999999", "%F0%9F%92%A5", "%20"):
        refused(control.http.post(f"/v1/rollback/{v}", headers=admin), 400)
        refused(control.http.get(f"/v1/history/{v}"), 400)
    refused(control.http.post("/v1/rollback/9223372036854775807", headers=admin), 404)
    refused(control.http.get("/v1/history/9223372036854775807"), 404)
    for limit in ("abc", "0", "-1", "10001", "1e3", "99999999999999999999", ""):
        refused(control.http.get("/v1/history", params={"limit": limit}), 400)
    refused(control.http.put("/v1/config", params={"dry_run": "maybe"}, json=[], headers=admin), 400)
    for params in (
        {"client": "\x00"},
        {"client": "a b"},
        {"client": "x" * 300},
        {"service": "s" * 300},
        {"service": "\n"},
    ):
        refused(control.http.get("/v1/watch", params=params), 400)
    for path in ("/v1/config/%00/%00", "/v1/config/Destination/\u202e", "/v1/config/" + "K" * 3000 + "/x"):
        refused(control.http.delete(path, headers=admin), 404)
    refused(control.http.get("/v1/config/a/b/c"), 404)
    refused(control.http.get("/v1/\u00e9\U0001f4a5"), 404)
    refused(control.http.post("/healthz"), 405)
    refused(control.http.patch("/v1/config", json=[]), 405)
    refused(control.http.get("/v1/ack"), 405)
    refused(control.http.put("/v1/rollback/1", headers=admin), 405)
    refused(control.http.get("/v1/registry/orders/" + instance), 405)
    assert control.plane.version == 1 and len(control.plane.registry) == 1
    assert errors == []
    healthy(control)


def test_unauthorised_hostile_requests_are_401_before_anything_else(control: Control, errors: list) -> None:
    for headers in ({}, {"authorization": "Bearer " + "x" * 8000}, {"authorization": b"Bearer \xff\xfe"}):
        refused(control.http.put("/v1/config", content=b"{", headers=headers), 401)
        refused(control.http.put("/v1/config", content=b"x" * (2 << 20), headers=headers), 401)
        refused(control.http.delete("/v1/config/Nope/x", headers=headers), 401)
        refused(control.http.post("/v1/rollback/abc", headers=headers), 401)
    assert errors == []
    healthy(control)


def test_odd_last_event_ids_get_a_snapshot(control: Control, errors: list) -> None:
    for last in ("", ":", "::::", "x" * 4000, "\u00e9:1", f"{control.plane.hub.epoch}:{'9' * 100}"):
        headers = {"last-event-id": last.encode("utf-8")}
        with control.http.stream("GET", "/v1/watch", params={"client": "odd"}, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("id: ")
            assert next(lines) == "event: snapshot"
    assert errors == []
    healthy(control)


def test_an_apply_message_with_control_characters_is_refused(control: Control, errors: list) -> None:
    """The message is kept in the history and logged when committed: a newline would forge a
    log line, an escape sequence reach the terminal of whoever reads `meshlib history`."""
    for message in ("hello\n2026-12-05 18:00:00,000 CRITICAL meshlib.control: FAKE", "red\x1b[31m", "a\tb"):
        for body in (
            {"documents": [DESTINATION], "message": message},
            f"documents: [{{kind: Destination, service: orders}}]\nmessage: {message!r}\n".replace("'", '"'),
        ):
            if isinstance(body, str):
                r = control.http.put(
                    "/v1/config", content=body, headers={**control.admin, "content-type": "application/yaml"}
                )
            else:
                r = control.http.put("/v1/config", json=body, headers=control.admin)
            assert refused(r, 422)["error"].startswith('"message" must be printable text'), r.text
    assert control.plane.version == 0
    r = control.http.put(
        "/v1/config",
        json={"documents": [DESTINATION], "message": "déployé ✓ (canary 10%)"},
        headers=control.admin,
    )
    assert r.status_code == 200
    assert control.http.get("/v1/history?limit=1").json()[0]["message"] == "déployé ✓ (canary 10%)"
    assert errors == []


def test_small_refusals_say_it_once_and_briefly(control: Control, errors: list) -> None:
    """A number beyond Python's int limit is "too large", without Python's advice on raising the
    limit; a bad service name is named once; a long name in a 404 is cut, as ids are."""
    big = "9" * 5000
    json_body = f'[{{"kind": "Destination", "service": "orders", "max_concurrent_requests": {big}}}]'
    yaml_body = f"kind: Destination\nservice: orders\nmax_concurrent_requests: {big}\n"
    for body, media in ((json_body, JSON), (yaml_body, "application/yaml")):
        for dry_run in ("1", "0"):
            r = control.http.put(
                "/v1/config",
                params={"dry_run": dry_run},
                content=body,
                headers={**control.admin, "content-type": media},
            )
            error = refused(r, 400)["error"]
            assert "number too large" in error and "sys." not in error and "9999" not in error, error
    ack = b'{"client": "c", "revision": -' + big.encode() + b"}"
    assert refused(control.http.post("/v1/ack", content=ack), 400)["error"].startswith("number too large")

    error = refused(control.http.get("/v1/registry/BAD"), 400)["error"]
    assert (
        error.startswith("invalid service name 'BAD': use lowercase") and error.count("invalid service") == 1
    )
    r = control.http.post("/v1/registry/Orders", json={"address": "127.0.0.1:1"})
    assert refused(r, 400)["error"].count("invalid service name") == 1

    control.apply([{"kind": "Endpoints", "service": "b", "endpoints": []}])
    for path in ("/v1/config/Endpoints/" + "a" * 5000, "/v1/config/" + "K" * 5000 + "/b"):
        r = control.http.delete(path, headers=control.admin)
        assert r.status_code == 404 and len(r.text) < 400, r.text[:500]
    # a name that is no service name names no document: never another one, even percent-encoded
    for name in ("b%3Foops", "b%23oops", "B", "b%0A"):
        r = control.http.delete(f"/v1/config/Endpoints/{name}", headers=control.admin)
        assert refused(r, 404)["error"].startswith("invalid service name"), r.text
    assert control.http.get("/v1/config").json()["version"] == 1
    assert errors == []
