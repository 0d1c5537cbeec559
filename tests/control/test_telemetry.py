"""The telemetry reporter: deltas per window, endpoint states, sending, and the graph end to end."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.balancing.orca import LoadReport
from meshlib.control.graph import parse_report, percentile
from meshlib.control.telemetry import IDLE_REPORTS, TelemetryReporter, interval_from_env
from meshlib.testing import serve
from tests.backend import dead_address
from tests.conftest import wait_until, write_rules
from tests.control import Control


def pairs(lat: Any) -> dict[int, int]:
    """A kept report's latency array (bucket, count, bucket, count, ...) as {bucket: count}."""
    return dict(zip(lat[::2], lat[1::2], strict=True))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def edges_by_key(report: dict) -> dict[tuple[str, str, str], dict]:
    return {(e["dir"], e["peer"], e["subset"]): e for e in report["edges"]}


def test_each_report_holds_the_traffic_since_the_last_one() -> None:
    mesh = meshlib.Mesh("checkout")
    clock = Clock()
    reporter = TelemetryReporter(mesh, "http://control", "cid", interval=2.0, clock=clock)
    try:
        for _ in range(90):
            mesh.stats.record("out", "orders", "v1", 200, 0.002)
        for _ in range(10):
            mesh.stats.record("out", "orders", "v1", 503, 0.040)
        mesh.stats.record("out", "payments", None, None, 1.5)
        mesh.stats.record("in", "web", None, 200, 0.001)
        clock.now += 2.5
        first = parse_report(reporter.collect())  # the server accepts what the client sends
        assert first["client"] == "cid" and first["service"] == "checkout"
        assert first["window"] == 2.5 and first["interval"] == 2.0
        edges = edges_by_key(first)
        assert edges["out", "orders", "v1"]["counts"] == {"2xx": 90, "5xx": 10}
        assert edges["out", "payments", ""]["counts"] == {"error": 1}
        assert edges["in", "web", ""]["counts"] == {"2xx": 1}
        hist = pairs(edges["out", "orders", "v1"]["lat"])
        assert sum(hist.values()) == 100
        assert percentile(hist, 0.5) == pytest.approx(2.0, rel=0.1)
        assert percentile(hist, 0.99) == pytest.approx(40.0, rel=0.1)

        for _ in range(5):
            mesh.stats.record("out", "orders", "v1", 200, 0.100)
        clock.now += 1.0
        second = reporter.collect()
        edges = edges_by_key(second)
        assert second["window"] == 1.0
        assert edges["out", "orders", "v1"]["counts"] == {"2xx": 5}
        # only this window's latencies, not the reservoir's older ones
        assert percentile(dict(map(tuple, edges["out", "orders", "v1"]["lat"])), 0.01) == pytest.approx(
            100.0, rel=0.1
        )
        # an idle edge stays listed, without counts, for a few reports, then goes
        assert edges["out", "payments", ""] == {
            "dir": "out",
            "peer": "payments",
            "subset": "",
            "counts": {},
            "lat": [],
        }
        for _ in range(IDLE_REPORTS - 1):
            assert ("out", "payments", "") in edges_by_key(reporter.collect())
        assert ("out", "payments", "") not in edges_by_key(reporter.collect())
        # a reset of the stats starts over instead of reporting negative counts
        mesh.stats.reset()
        mesh.stats.record("out", "orders", "v1", 200, 0.001)
        assert edges_by_key(reporter.collect())["out", "orders", "v1"]["counts"] == {"2xx": 1}
    finally:
        mesh.close()


def test_callers_with_odd_names_are_reported_as_unknown() -> None:
    mesh = meshlib.Mesh("orders")
    try:
        mesh.stats.record("in", "a b", None, 200, 0.001)  # x-mesh-source is whatever a caller sent
        mesh.stats.record("in", "x" * 300, None, 500, 0.001)
        mesh.stats.record("in", "unknown", None, 200, 0.001)
        report = parse_report(TelemetryReporter(mesh, "http://control", "cid").collect())
        (edge,) = report["edges"]
        assert edge["peer"] == "unknown" and edge["counts"] == {"2xx": 2, "5xx": 1}
        assert sum(pairs(edge["lat"]).values()) == 3
    finally:
        mesh.close()


def test_open_breakers_and_ejected_endpoints_are_reported(tmp_path: Path) -> None:
    rules = write_rules(
        tmp_path / "mesh.yaml",
        [
            {
                "kind": "Endpoints",
                "service": "orders",
                "endpoints": [{"address": "127.0.0.1:9001"}, {"address": "127.0.0.1:9002"}],
            },
            {
                "kind": "Destination",
                "service": "orders",
                "circuit_breaker": {"consecutive_failures": 2, "open_for": "30s"},
                "outlier_detection": {"consecutive_5xx": 2, "interval": "10s", "base_ejection": "30s"},
            },
        ],
    )
    mesh = meshlib.Mesh("checkout", config=rules)
    try:
        reporter = TelemetryReporter(mesh, "http://control", "cid")
        assert reporter.collect()["endpoints"] == []  # healthy: nothing to say
        dest = mesh.snapshot.plan("orders").destination
        breaker = mesh.resilience.breakers.get("127.0.0.1:9001", dest.circuit_breaker)
        breaker.record(True)
        breaker.record(True)
        assert breaker.state == "open"
        detector = mesh.resilience.detector("orders", dest.outlier_detection)
        detector.set_pool(["127.0.0.1:9001", "127.0.0.1:9002"])
        detector.record("127.0.0.1:9002", 503)
        detector.record("127.0.0.1:9002", 503)
        assert detector.ejected("127.0.0.1:9002")
        assert parse_report(reporter.collect())["endpoints"] == [
            {"service": "orders", "address": "127.0.0.1:9001", "breaker": "open", "ejected": False},
            {"service": "orders", "address": "127.0.0.1:9002", "breaker": "closed", "ejected": True},
        ]
    finally:
        mesh.close()


def test_weighted_round_robin_weights_are_reported(tmp_path: Path) -> None:
    a, b = "127.0.0.1:9001", "127.0.0.1:9002"
    rules = write_rules(
        tmp_path / "mesh.yaml",
        [
            {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": a}, {"address": b}]},
            {
                "kind": "Destination",
                "service": "orders",
                "load_balancer": "weighted_round_robin",
                "weighted_round_robin": {"blackout_period": "0s"},
            },
        ],
    )
    mesh = meshlib.Mesh("checkout", config=rules)
    try:
        reporter = TelemetryReporter(mesh, "http://control", "cid")
        assert reporter.collect()["weights"] == []  # no balancer yet
        mesh.loads.get(a).take_report(LoadReport(cpu_utilization=0.5, rps_fractional=30.0), time.monotonic())
        mesh.loads.get(b).take_report(LoadReport(cpu_utilization=0.5, rps_fractional=10.0), time.monotonic())
        mesh.snapshot.plans["orders"].balancer(None)
        assert parse_report(reporter.collect())["weights"] == [
            {"service": "orders", "address": a, "weight": 60.0},
            {"service": "orders", "address": b, "weight": 20.0},
        ]
    finally:
        mesh.close()


async def test_sending_with_the_join_token_and_failing_quietly(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[httpx.Request] = []
    answer = {"status": 204}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(answer["status"], json={"error": "no"} if answer["status"] >= 400 else None)

    mesh = meshlib.Mesh("checkout", token="join-secret")
    mesh.stats.record("out", "orders", None, 200, 0.01)
    reporter = TelemetryReporter(mesh, "http://control:7070/", "cid", interval=0.05)
    try:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            assert await reporter.report_once(http) is True
            request = seen[-1]
            assert request.method == "POST" and str(request.url) == "http://control:7070/v1/telemetry"
            assert request.headers["authorization"] == "Bearer join-secret"
            body = json.loads(request.content)
            assert body["client"] == "cid" and body["service"] == "checkout"
            assert len(request.content) < 400  # compact
            answer["status"] = 401
            assert await reporter.report_once(http) is False
        # a dead control service: a debug line, no exception, no warning
        with caplog.at_level(logging.DEBUG, logger="meshlib.control"):
            async with httpx.AsyncClient(transport=httpx.MockTransport(_refuse)) as dead:
                assert await reporter.report_once(dead) is False
        assert [r.levelno for r in caplog.records if "unreachable" in r.getMessage()] == [logging.DEBUG]
        assert reporter.sent == 1 and reporter.failed == 2
        # the loop keeps going through failures, on the interval
        async with httpx.AsyncClient(transport=httpx.MockTransport(_refuse)) as dead:
            looping = TelemetryReporter(mesh, "http://control", "cid", interval=0.02, http=dead)
            task = asyncio.create_task(looping.run())
            while looping.failed < 3:
                await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        mesh.close()
    # without a token, no Authorization header
    assert "authorization" not in TelemetryReporter(meshlib.Mesh("x"), "http://c", "id").headers()


def _refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def test_interval_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESH_TELEMETRY_INTERVAL", raising=False)
    assert interval_from_env() == 5.0
    for text, value in (("0.5", 0.5), ("0", 0.0), ("junk", 5.0), ("-1", 5.0), ("nan", 5.0)):
        monkeypatch.setenv("MESH_TELEMETRY_INTERVAL", text)
        assert interval_from_env() == value


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    c = Control(tmp_path / "data", ping=0.5)
    yield c
    c.stop()


def test_meshes_report_and_the_graph_shows_their_edge(
    control: Control, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_TELEMETRY_INTERVAL", "0.2")
    orders_mesh = meshlib.Mesh("orders", control=control.url, cache_dir=tmp_path / "c-orders")
    checkout = meshlib.Mesh("checkout", control=control.url, cache_dir=tmp_path / "c-checkout")
    server = serve(orders_mesh.asgi(_hello))
    try:
        r = control.http.post("/v1/registry/orders", json={"address": server.address, "ttl": 60})
        assert r.status_code == 201
        wait_until(lambda: checkout.snapshot.plan("orders") is not None, what="orders in the registry")

        def edge() -> dict | None:
            for e in control.http.get("/v1/graph").json()["edges"]:
                if (e["source"], e["destination"], e["view"]) == ("checkout", "orders", "out"):
                    return e if e["requests"] > 0 else None
            return None

        found: list[dict] = []
        with checkout.sync_client(timeout=5) as client:

            def traffic_shows() -> bool:
                assert client.get("http://orders/hello").status_code == 200
                e = edge()
                return e is not None and not found.append(e)

            wait_until(traffic_shows, 10, "the checkout->orders edge, measured by checkout")
        e = found[0]
        assert e["view"] == "out" and e["success_rate"] == 1.0 and e["rps"] > 0
        assert e["p50_ms"] is not None and e["p50_ms"] < 1000
        reports = control.plane.telemetry()
        assert checkout.link is not None and orders_mesh.link is not None
        assert reports[checkout.link.client_id]["report"]["service"] == "checkout"
        wait_until(lambda: orders_mesh.link.client_id in control.plane.telemetry(), what="orders' report")
        nodes = {n["service"]: n for n in control.http.get("/v1/graph").json()["nodes"]}
        assert nodes["orders"]["instances"] == 1 and nodes["checkout"]["reporters"] == 1
    finally:
        server.stop()
        checkout.close()
        orders_mesh.close()


async def _hello(scope: dict, receive: object, send: object) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"hello"})  # type: ignore[operator]


async def test_a_report_that_never_left_goes_to_the_next_replica(control: Control) -> None:
    mesh = meshlib.Mesh("checkout")
    mesh.stats.record("out", "orders", None, 200, 0.01)
    dead = f"http://{dead_address()}"
    reporter = TelemetryReporter(mesh, f"{dead},{control.url}", "cid-failover")
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:
            assert await reporter.report_once(http) is True  # refused by the first, taken by the second
            assert reporter.url == control.url and (reporter.sent, reporter.failed) == (1, 1)
            edges = control.plane.telemetry()["cid-failover"]["report"]["edges"]
            assert [(e["peer"], e["counts"]) for e in edges] == [("orders", {"2xx": 1})]  # sent once
            assert await reporter.report_once(http) is True  # the next goes straight to the second
            assert (reporter.sent, reporter.failed) == (2, 1)
    finally:
        mesh.close()


def test_adaptive_concurrency_limits_are_reported(tmp_path: Path) -> None:
    rules = write_rules(
        tmp_path / "mesh.yaml",
        [
            {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": "127.0.0.1:9001"}]},
            {"kind": "Destination", "service": "orders", "adaptive_concurrency": {"initial_limit": 12}},
        ],
    )
    mesh = meshlib.Mesh("checkout", config=rules)
    try:
        reporter = TelemetryReporter(mesh, "http://control", "cid")
        assert "limits" not in reporter.collect()  # none in use yet: nothing to say
        dest = mesh.snapshot.plan("orders").destination
        limiter = mesh.resilience.concurrency("out", "orders", dest.adaptive_concurrency)
        limiter.try_acquire()  # pinned to 3 while its minRTT is measured
        assert parse_report(reporter.collect())["limits"] == [
            {"dir": "out", "service": "orders", "limit": 3, "in_flight": 1}
        ]
    finally:
        mesh.close()
