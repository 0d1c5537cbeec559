"""The control API over a real server: rules, history, rollback, auth, registry, restart."""

from __future__ import annotations

import stat
from array import array
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from meshlib.control.auth import ADMIN_PREFIX, AdminToken, ensure_token
from tests.control import DESTINATION, ROUTE, Control


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    c = Control(tmp_path / "data", ping=0.2, stale_after=0.3)
    yield c
    c.stop()


def _version(c: Control) -> int:
    return c.http.get("/v1/config").json()["version"]


def test_apply_bumps_version_and_get_shows_it(control: Control) -> None:
    assert control.http.get("/v1/config").json() == {"version": 0, "documents": []}
    r = control.apply([DESTINATION, ROUTE])
    assert r.status_code == 200 and r.json() == {"version": 1, "changed": True}
    assert control.http.get("/v1/config").json() == {"version": 1, "documents": [DESTINATION, ROUTE]}
    # the same documents again: no new version
    assert control.apply([ROUTE]).json() == {"version": 1, "changed": False}
    # upsert by (kind, service): a new Route replaces the old one, the Destination stays
    route2 = {**ROUTE, "routes": [{"to": [{"subset": "v1"}], "timeout": "2s"}]}
    assert control.http.put("/v1/config", json={"documents": [route2]}, headers=control.admin).json() == {
        "version": 2,
        "changed": True,
    }
    assert control.http.get("/v1/config").json()["documents"] == [DESTINATION, route2]
    assert control.plane.version == 2 and control.plane.applies_total == 2


def test_dry_run_changes_nothing(control: Control) -> None:
    control.apply([DESTINATION])
    r = control.apply([ROUTE], dry_run=1)
    assert r.status_code == 200 and r.json() == {"valid": True, "version": 1, "changed": True}
    assert control.http.get("/v1/config").json() == {"version": 1, "documents": [DESTINATION]}
    assert len(control.http.get("/v1/history").json()) == 2
    bad = {**ROUTE, "routes": [{"to": [{"subset": "nope"}]}]}
    r = control.apply([bad], dry_run="true")
    assert r.status_code == 422 and r.json()["problems"][0]["field"] == "routes[0].to[0].subset"
    assert _version(control) == 1


def test_invalid_apply_is_refused_whole_with_precise_problems(control: Control) -> None:
    control.apply([DESTINATION])
    bad_route = {"kind": "Route", "service": "orders", "routes": [{"to": [{"subset": "v3"}]}]}
    good_other = {"kind": "RateLimit", "service": "payments", "requests_per_second": 5}
    r = control.apply([good_other, bad_route])
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "invalid rules"
    assert body["problems"] == [
        {
            "document": "Route/orders (document 2 of request)",
            "field": "routes[0].to[0].subset",
            "reason": "subset 'v3' is not defined in Destination/orders",
        }
    ]
    # several problems at once, each with document, field and reason
    r = control.apply([{"kind": "Nope", "service": "x"}, {"kind": "Destination", "service": "Bad Name"}])
    problems = r.json()["problems"]
    assert r.status_code == 422 and len(problems) == 2
    assert all(set(p) == {"document", "field", "reason"} for p in problems)
    assert control.http.get("/v1/config").json() == {"version": 1, "documents": [DESTINATION]}
    assert control.plane.rejected_total == 2


def test_yaml_body(control: Control) -> None:
    text = """
kind: Destination
service: orders
subsets: {v1: {version: v1}}
---
kind: Route
service: orders
routes:
  - to: [{subset: v1}]
    retries: {attempts: 3, on: [5xx, reset]}
"""
    r = control.http.put(
        "/v1/config", content=text, headers={**control.admin, "content-type": "application/yaml"}
    )
    assert r.status_code == 200, r.text
    route = control.http.get("/v1/config").json()["documents"][1]
    assert route["routes"][0]["retries"] == {"attempts": 3, "on": ["5xx", "reset"]}
    # a YAML error is a 400 naming the line
    r = control.http.put(
        "/v1/config", content="kind: [unclosed\n", headers={**control.admin, "content-type": "text/yaml"}
    )
    assert r.status_code == 400 and "line" in r.json()["error"]
    # invalid documents in YAML are a 422 like JSON ones
    r = control.http.put(
        "/v1/config",
        content=yaml.safe_dump({"kind": "Route", "service": "orders", "routes": "no"}),
        headers={**control.admin, "content-type": "application/x-yaml"},
    )
    assert r.status_code == 422 and r.json()["problems"][0]["field"] == "routes"


def test_delete(control: Control) -> None:
    control.apply([DESTINATION, ROUTE])
    r = control.http.delete("/v1/config/Destination/orders", headers=control.admin)
    assert r.status_code == 422  # the Route needs its subsets
    assert "subset" in r.json()["problems"][0]["reason"]
    assert control.http.delete("/v1/config/Route/orders", headers=control.admin).json() == {"version": 2}
    assert control.http.delete("/v1/config/Route/orders", headers=control.admin).status_code == 404
    assert control.http.delete("/v1/config/Gateway/orders", headers=control.admin).status_code == 404
    assert control.http.get("/v1/config").json() == {"version": 2, "documents": [DESTINATION]}


def test_history_and_versions(control: Control) -> None:
    control.apply([DESTINATION])
    control.http.put("/v1/config", json={"documents": [ROUTE], "message": "canary"}, headers=control.admin)
    history = control.http.get("/v1/history").json()
    assert [(h["version"], h["documents"], h["message"]) for h in history] == [
        (2, 2, "canary"),
        (1, 1, "apply Destination/orders"),
        (0, 0, "empty"),
    ]
    assert all(isinstance(h["created"], float) for h in history)
    assert [h["version"] for h in control.http.get("/v1/history", params={"limit": 1}).json()] == [2]
    one = control.http.get("/v1/history/1").json()
    assert one["version"] == 1 and one["message"] == "apply Destination/orders"
    assert one["documents"] == [DESTINATION]
    assert control.http.get("/v1/history/7").status_code == 404


def test_rollback(control: Control) -> None:
    control.apply([DESTINATION])
    control.apply([ROUTE])
    r = control.http.post("/v1/rollback/1", headers=control.admin)
    assert r.status_code == 200 and r.json() == {"version": 3, "changed": True}
    assert control.http.get("/v1/config").json() == {"version": 3, "documents": [DESTINATION]}
    assert control.http.get("/v1/history").json()[0]["message"] == "rollback to version 1"
    # rolling back to what is already current commits nothing
    assert control.http.post("/v1/rollback/1", headers=control.admin).json() == {
        "version": 3,
        "changed": False,
    }
    assert control.http.post("/v1/rollback/0", headers=control.admin).json()["version"] == 4
    assert control.http.get("/v1/config").json()["documents"] == []
    assert control.http.post("/v1/rollback/99", headers=control.admin).status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/v1/config", [DESTINATION]),
        ("PUT", "/v1/config?dry_run=1", [DESTINATION]),
        ("DELETE", "/v1/config/Destination/orders", None),
        ("POST", "/v1/rollback/0", None),
    ],
)
def test_mutations_need_the_admin_token(control: Control, method: str, path: str, body: object) -> None:
    control.apply([DESTINATION])
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {control.token}"},
        {"Authorization": f"Bearer {control.token}x"},
        {"Authorization": f"Bearer {control.token[:-1]}"},
        {"Authorization": "Bearer \u00e9\u00e9".encode("utf-8")},
    ):
        r = control.http.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert control.token not in r.text
    assert _version(control) == 1
    r = control.http.request(method, path, json=body, headers={"Authorization": f"bearer  {control.token}"})
    assert r.status_code == 200, r.text


def test_admin_token_file(tmp_path: Path, control: Control) -> None:
    path = control.data_dir / "admin.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(control.token) >= 32
    assert control.plane.new_admin_token == control.token  # this start created it
    again, created = ensure_token(control.data_dir)
    assert (again, created) == (control.token, False)
    other, created = ensure_token(tmp_path / "other")
    assert created and other != control.token
    # token_urlsafe may begin with "-", which argparse reads as an option: `--token -abc` fails.
    assert other.startswith(ADMIN_PREFIX) and control.token.startswith(ADMIN_PREFIX)
    auth = AdminToken(control.token)
    assert auth.check(f"Bearer {control.token}") and not auth.check(None) and not auth.check("")
    assert control.token not in repr(auth)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "admin.token").write_text("\n")
    with pytest.raises(ValueError):
        ensure_token(tmp_path / "empty")


def test_registry_endpoints(control: Control) -> None:
    r = control.http.post(
        "/v1/registry/orders", json={"address": "127.0.0.1:8001", "labels": {"version": "v1"}, "weight": 2}
    )
    assert r.status_code == 201
    first = r.json()
    assert first["ttl"] == 10 and len(first["id"]) >= 8
    second = control.http.post("/v1/registry/orders", json={"address": "127.0.0.1:8002", "ttl": 60}).json()
    listing = control.http.get("/v1/registry/orders").json()
    assert [(i["id"], i["address"], i["labels"], i["weight"]) for i in listing["orders"]] == [
        (first["id"], "127.0.0.1:8001", {"version": "v1"}, 2),
        (second["id"], "127.0.0.1:8002", {}, 1),
    ]
    assert 9 < listing["orders"][0]["expires_in"] <= 10
    everything = control.http.get("/v1/registry").json()
    assert [i["id"] for i in everything["orders"]] == [first["id"], second["id"]]
    assert control.http.get("/v1/registry/payments").json() == {"payments": []}
    r = control.http.put(f"/v1/registry/orders/{first['id']}")
    assert r.status_code == 200 and r.json() == {"id": first["id"], "ttl": 10}
    r = control.http.put(f"/v1/registry/orders/{first['id']}", json={"ttl": 30})
    assert r.json() == {"id": first["id"], "ttl": 30}
    assert control.http.put("/v1/registry/orders/unknown").status_code == 404
    assert control.http.put(f"/v1/registry/payments/{first['id']}").status_code == 404
    assert control.http.delete(f"/v1/registry/orders/{first['id']}").status_code == 204
    assert control.http.delete(f"/v1/registry/orders/{first['id']}").status_code == 404
    assert [i["id"] for i in control.http.get("/v1/registry/orders").json()["orders"]] == [second["id"]]


def test_telemetry_health_metrics_dashboard(control: Control) -> None:
    edge = {"dir": "out", "peer": "orders", "subset": "", "counts": {"2xx": 5}, "lat": [[8, 5]]}
    report = {"client": "c1", "service": "checkout", "interval": 5.0, "window": 5.0, "edges": [edge]}
    assert control.http.post("/v1/telemetry", json=report).status_code == 204
    kept = control.plane.telemetry()["c1"]["report"]
    assert kept == {**report, "edges": [{**edge, "lat": array("q", [8, 5])}], "endpoints": []}
    bad = {**report, "edges": [{"to": "orders", "2xx": 5}]}
    assert control.http.post("/v1/telemetry", json=bad).status_code == 422
    health = control.http.get("/healthz").json()
    assert health == {"status": "ok", "version": 0, "revision": 0, "epoch": control.plane.hub.epoch}
    control.apply([DESTINATION])
    metrics = control.http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for line in (
        "meshlib_control_version 1",
        "meshlib_control_revision 1",
        "meshlib_control_subscribers 0",
        "meshlib_control_subscribers_dropped_total 0",
        "meshlib_control_applies_total 1",
        "meshlib_control_rejected_total 0",
        "meshlib_control_registry_instances 0",
    ):
        assert line in metrics.text.splitlines()
    control.http.post("/v1/registry/payments", json={"address": "127.0.0.1:9000"})
    page = control.http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'id="graph"' in page.text and 'src="dashboard/app.js"' in page.text
    script = control.http.get("/dashboard/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    etag = {"if-none-match": script.headers["etag"]}
    assert control.http.get("/dashboard/app.js", headers=etag).status_code == 304
    assert control.http.get("/dashboard/style.css").headers["content-type"].startswith("text/css")
    for missing in ("/dashboard/index.html", "/dashboard/nope.js", "/dashboard/..%2Fapp.py"):
        assert control.http.get(missing).status_code == 404


def test_json_errors_for_unknown_routes_and_methods(control: Control) -> None:
    r = control.http.get("/v1/nope")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    r = control.http.post("/v1/config", json=[])
    assert r.status_code == 405 and "PUT" in r.headers["allow"] and "error" in r.json()


def test_restart_keeps_rules_versions_and_registry_with_a_new_epoch(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = Control(data)
    try:
        first.apply([DESTINATION, ROUTE])
        first.apply([{"kind": "RateLimit", "service": "orders", "requests_per_second": 10}])
        reg = first.http.post("/v1/registry/orders", json={"address": "127.0.0.1:8001", "ttl": 30}).json()
        before = first.http.get("/v1/config").json()
        epoch = first.http.get("/healthz").json()["epoch"]
        token = first.token
    finally:
        first.stop()
    second = Control(data)
    try:
        assert second.http.get("/v1/config").json() == before
        assert before["version"] == 2
        health = second.http.get("/healthz").json()
        assert health["epoch"] != epoch and health["revision"] == 0 and health["version"] == 2
        assert [h["version"] for h in second.http.get("/v1/history").json()] == [2, 1, 0]
        assert second.token == token and second.plane.new_admin_token is None
        # registered instances survive the restart and keep heartbeating with the same id
        assert second.http.put(f"/v1/registry/orders/{reg['id']}").status_code == 200
        assert second.apply([DESTINATION]).json() == {"version": 2, "changed": False}
        r = second.apply([{**DESTINATION, "load_balancer": "random"}])
        assert r.json() == {"version": 3, "changed": True}
    finally:
        second.stop()


def test_plain_httpx_client_errors_never_5xx(control: Control) -> None:
    # a smoke pass over every route with no body at all
    for method, path in [
        ("GET", "/"),
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("GET", "/v1/config"),
        ("GET", "/v1/history"),
        ("GET", "/v1/clients"),
        ("GET", "/v1/registry"),
        ("POST", "/v1/ack"),
        ("POST", "/v1/telemetry"),
        ("POST", "/v1/registry/orders"),
        ("PUT", "/v1/registry/orders/x"),
        ("DELETE", "/v1/registry/orders/x"),
        ("PUT", "/v1/config"),
        ("HEAD", "/v1/config"),
    ]:
        r = control.http.request(method, path, headers=control.admin)
        assert r.status_code < 500, (method, path, r.status_code)
    assert isinstance(control.http.get("/v1/clients").json(), list)
    with httpx.Client(base_url=control.url) as c:
        assert c.head("/v1/watch").status_code == 200
    assert control.plane.hub.subscribers == 0
