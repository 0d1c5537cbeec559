"""Metrics: OpenTelemetry instruments on a MeterProvider given to the Mesh, and the Prometheus
text the middleware serves on `metrics_path`, checked against real traffic on 127.0.0.1."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import opentelemetry.metrics as metrics_api
import pytest
from flask import Flask
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from werkzeug.serving import make_server

import meshlib
import meshlib.wsgi
from meshlib.balancing.orca import LoadReport
from meshlib.rules import parse_documents
from meshlib.stats import DURATION_BUCKETS
from meshlib.telemetry import metrics_app, prometheus
from meshlib.testing import serve
from tests.backend import Backend
from tests.conftest import wait_until
from tests.telemetry.conftest import Flaky, point, relay, service

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a Prometheus text exposition, keyed by (name, labels)."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        key = (m.group(1), labels)
        assert key not in samples, f"duplicate series {key}"
        samples[key] = float(m.group(3))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= set(ls)]
    assert len(found) == 1, f"{name}{labels}: {len(found)} series"
    return found[0]


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def _attrs(point: Any, **want: Any) -> bool:
    return all(point.attributes.get(f"mesh.{k}") == v for k, v in want.items())


def test_otel_instruments_read_the_mesh_counters(meter: tuple[MeterProvider, InMemoryMetricReader]) -> None:
    provider, reader = meter
    front = meshlib.Mesh("front", metrics=provider)
    back = meshlib.Mesh("back", metrics=provider)  # a second Mesh on the same provider
    flaky = Flaky(failures=1)
    with service(back, flaky) as b, service(front, relay(front, "back")) as f:
        point(front, "back", b.address, retries=2)
        assert httpx.get(f"{f.url}/items/1", headers={"x-mesh-source": "edge"}).status_code == 200

        # the callee records a request once its response is sent: the caller may have it first
        def recorded() -> int:
            edge = back.stats.edges().get(("in", "front", ""))
            return sum(edge.by_class.values()) if edge is not None else 0

        wait_until(lambda: recorded() == 2, what="both requests recorded by the callee")
        points = _points(reader)
    front.close()
    back.close()

    requests = points["mesh.requests"]
    out = [p for p in requests if _attrs(p, direction="out", source="front", destination="back")]
    assert [(p.attributes["mesh.status_class"], p.value) for p in out] == [("2xx", 1)]
    into_back = {
        p.attributes["mesh.status_class"]: p.value
        for p in requests
        if _attrs(p, destination="back", direction="in")
    }
    assert into_back == {"5xx": 1, "2xx": 1}, "the retry shows as two inbound requests at the callee"

    sums = points["mesh.request.duration.sum"]
    out_sum = [p for p in sums if _attrs(p, direction="out", destination="back")]
    assert len(out_sum) == 1 and 0 < out_sum[0].value < 10
    buckets = points["mesh.request.duration.buckets"]
    out_b = [p for p in buckets if _attrs(p, direction="out", destination="back", status_class="2xx")]
    bounds = [*(repr(float(b)) for b in DURATION_BUCKETS), "+Inf"]
    assert [p.attributes["mesh.le"] for p in out_b] == bounds, "one cumulative series per bound"
    counts = [p.value for p in out_b]
    assert counts == sorted(counts) and counts[-1] == 1, "cumulative, ending at the count"
    into_back_inf = [p.value for p in buckets if _attrs(p, direction="in", source="front", le="+Inf")]
    assert sum(into_back_inf) == 2

    retries = [p for p in points["mesh.retries"] if _attrs(p, service="front", destination="back")]
    assert [p.value for p in retries] == [1]
    active = [p for p in points["mesh.requests.active"] if _attrs(p, direction="out", destination="back")]
    assert [p.value for p in active] == [0]


def test_without_a_meter_provider_no_instrument_is_made(monkeypatch: pytest.MonkeyPatch, fleet) -> None:
    proxy = type(metrics_api.get_meter_provider())
    if proxy.__name__ != "_ProxyMeterProvider":
        pytest.skip("a global MeterProvider was set in this process")
    made: list[str] = []
    monkeypatch.setattr(proxy, "get_meter", lambda self, *a, **k: made.append("meter"))
    _, server = fleet.start("payments")
    mesh = meshlib.Mesh("orders")
    point(mesh, "payments", server.address)
    with serve(mesh.asgi(Backend("orders"))) as front, mesh.sync_client() as client:
        assert client.get("http://payments/x").status_code == 200
        assert httpx.get(front.url).status_code == 200
    mesh.close()
    assert made == []
    assert mesh.telemetry.meters.get() is None


@pytest.fixture
def scraped() -> Iterator[tuple[meshlib.Mesh, Any]]:
    mesh = meshlib.Mesh("orders", metrics_path="/metrics")
    flaky = Flaky(failures=2)
    with service(mesh, flaky) as server:
        yield mesh, server
    mesh.close()


def test_prometheus_text_counts_traffic_and_not_scrapes(scraped) -> None:
    mesh, server = scraped
    with httpx.Client(base_url=server.url, headers={"x-mesh-source": "checkout"}) as c:
        statuses = [c.get(f"/items/{i}").status_code for i in range(5)]
        assert statuses == [503, 503, 200, 200, 200]
        first = c.get("/metrics")
        second = c.get("/metrics")
    assert first.status_code == 200
    assert first.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert first.text == second.text, "a scrape is not traffic"
    s = parse(first.text)
    edge = {"direction": "in", "source": "checkout", "destination": "orders", "subset": ""}
    assert value(s, "mesh_requests_total", status_class="2xx", **edge) == 3
    assert value(s, "mesh_requests_total", status_class="5xx", **edge) == 2
    for cls, n in (("2xx", 3), ("5xx", 2)):
        buckets = [
            value(s, "mesh_request_duration_seconds_bucket", status_class=cls, le=repr(b), **edge)
            for b in DURATION_BUCKETS
        ]
        inf = value(s, "mesh_request_duration_seconds_bucket", status_class=cls, le="+Inf", **edge)
        assert buckets == sorted(buckets) and buckets[-1] <= inf == n, "cumulative, ending at the count"
        assert value(s, "mesh_request_duration_seconds_count", status_class=cls, **edge) == n
        assert value(s, "mesh_request_duration_seconds_sum", status_class=cls, **edge) > 0
    assert value(s, "mesh_requests_active", direction="in", destination="orders") == 0
    assert mesh.stats.edge("in", "checkout").total == 5


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed"
)
def test_prometheus_text_passes_promtool(scraped) -> None:
    mesh, server = scraped
    mesh.stats.count("retries", 'odd "name"\nwith\\escapes')  # label values must be escaped
    mesh.stats.count("something_new", "x")
    mesh.stats.count("panic", "payments", 3)  # picks in panic mode get a family of their own
    httpx.get(f"{server.url}/items/1")
    text = httpx.get(f"{server.url}/metrics").text
    done = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    s = parse(text)
    assert value(s, "mesh_retries_total", destination='odd \\"name\\"\\nwith\\\\escapes') == 1
    assert value(s, "mesh_events_total", event="something_new", subject="x", service="orders") == 1
    assert value(s, "mesh_panic_total", destination="payments", service="orders") == 3


def test_scrape_bypasses_authorization_and_rate_limit(scraped) -> None:
    mesh, server = scraped
    docs = [
        {"kind": "Authorization", "service": "orders", "allow": [{"from": ["checkout"]}]},
        {"kind": "RateLimit", "service": "orders", "requests_per_second": 0.001, "burst": 1},
    ]
    mesh.apply_rules(parse_documents(docs, source="test"), "test")
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/items/1").status_code == 403
        assert c.get("/items/1", headers={"x-mesh-source": "checkout"}).status_code == 503  # flaky's first
        assert c.get("/items/1", headers={"x-mesh-source": "checkout"}).status_code == 429
        r = c.get("/metrics")
        assert c.post("/metrics").status_code == 405
        head = c.head("/metrics")
    assert r.status_code == 200
    # HEAD: a GET's headers, its length too, and no body (the next scrape may be a byte longer)
    assert head.status_code == 200 and head.content == b""
    assert abs(int(head.headers["content-length"]) - len(r.content)) < 200
    s = parse(r.text)
    assert value(s, "mesh_requests_total", source="unknown", status_class="4xx") == 1
    assert value(s, "mesh_requests_total", source="checkout", status_class="4xx") == 1
    assert value(s, "mesh_denied_total", destination="orders") == 1
    assert value(s, "mesh_rate_limited_total", destination="orders", service="orders") == 1


def test_metrics_path_is_off_by_default() -> None:
    mesh = meshlib.Mesh("orders")
    with serve(mesh.asgi(Backend("orders"))) as server:
        r = httpx.get(f"{server.url}/metrics")
    mesh.close()
    assert r.json()["path"] == "/metrics", "the app's own /metrics is left alone"


def test_metrics_app_on_a_port_of_its_own_and_outbound_series(fleet) -> None:
    _, payments = fleet.start("payments")
    mesh = meshlib.Mesh("orders")
    point(mesh, "payments", payments.address, retries=2)
    with mesh.sync_client() as client:
        for _ in range(3):
            client.get("http://payments/x")
    with serve(metrics_app(mesh)) as side:
        assert httpx.get(f"{side.url}/other").status_code == 404
        s = parse(httpx.get(f"{side.url}/metrics").text)
    mesh.close()
    out = {"direction": "out", "source": "orders", "destination": "payments", "subset": ""}
    assert value(s, "mesh_requests_total", status_class="2xx", **out) == 3
    assert value(s, "mesh_request_duration_seconds_count", status_class="2xx", **out) == 3
    assert value(s, "mesh_requests_active", direction="out", endpoint=payments.address) == 0


def test_wsgi_middleware_serves_metrics() -> None:
    mesh = meshlib.Mesh("payments", metrics_path="/metrics")
    app = Flask("payments")
    app.get("/pay")(lambda: "ok")
    app.wsgi_app = meshlib.wsgi.MeshMiddleware(app.wsgi_app, mesh=mesh)  # type: ignore[method-assign]
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        for _ in range(2):
            assert httpx.get(f"{url}/pay", headers={"x-mesh-source": "checkout"}).status_code == 200
        r = httpx.get(f"{url}/metrics")
    finally:
        server.shutdown()
        thread.join(5)
        mesh.close()
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    s = parse(r.text)
    assert value(s, "mesh_requests_total", direction="in", source="checkout", status_class="2xx") == 2
    assert value(s, "mesh_request_duration_seconds_count", source="checkout", status_class="2xx") == 2


def test_prequal_probes_and_pool_are_counted(meter: tuple[MeterProvider, InMemoryMetricReader]) -> None:
    from meshlib.telemetry.prometheus import render

    provider, reader = meter
    front = meshlib.Mesh("front", metrics=provider)
    back = meshlib.Mesh("back")
    with service(back, Flaky(failures=0)) as b:
        docs = [
            {"kind": "Endpoints", "service": "back", "endpoints": [{"address": b.address}]},
            {"kind": "Destination", "service": "back", "load_balancer": "prequal"},
        ]
        front.apply_rules(parse_documents(docs, source="test"), "test")
        with front.sync_client() as client:
            assert client.get("http://back/items/1").status_code == 200
            pool = front.snapshot.loads.probes.pools()[0]
            wait_until(lambda: len(pool) == 1, 5.0, "the probe's answer")
        points = _points(reader)
        text = render(front.telemetry)
    front.close()
    back.close()

    probes = {p.attributes["mesh.outcome"]: p.value for p in points["mesh.prequal.probes"]}
    assert probes == {"sent": 1}
    assert [(p.attributes["mesh.destination"], p.value) for p in points["mesh.prequal.pool"]] == [("back", 1)]
    samples = parse(text)
    assert value(samples, "mesh_prequal_probes_total", destination="back", outcome="sent") == 1
    assert value(samples, "mesh_prequal_pool_probes", destination="back") == 1


def test_each_endpoints_weight_in_a_weighted_round_robin_balancer(
    meter: tuple[MeterProvider, InMemoryMetricReader],
) -> None:
    """mesh.balancer.weight (OpenTelemetry) and mesh_balancer_weight (Prometheus): the weights
    the endpoints' load reports give them, for the balancers built so far."""
    provider, reader = meter
    a, b = "127.0.0.1:9001", "127.0.0.1:9002"
    mesh = meshlib.Mesh("orders", metrics=provider)
    mesh.apply_rules(
        parse_documents(
            [
                {"kind": "Endpoints", "service": "payments", "endpoints": [{"address": a}, {"address": b}]},
                {
                    "kind": "Destination",
                    "service": "payments",
                    "load_balancer": "weighted_round_robin",
                    "weighted_round_robin": {"blackout_period": "0s"},
                },
            ]
        ),
        "1",
    )
    assert "mesh_balancer_weight" not in prometheus.render(mesh.telemetry)  # no balancer built yet
    mesh.loads.get(a).take_report(LoadReport(cpu_utilization=0.5, rps_fractional=100.0), time.monotonic())
    mesh.loads.get(b).take_report(LoadReport(cpu_utilization=0.5, rps_fractional=50.0), time.monotonic())
    mesh.snapshot.plans["payments"].balancer(None)  # built by the first request, as a pick does
    s = parse(prometheus.render(mesh.telemetry))
    points = [p for p in _points(reader)["mesh.balancer.weight"] if _attrs(p, destination="payments")]
    mesh.close()
    assert value(s, "mesh_balancer_weight", destination="payments", endpoint=a) == 200.0
    assert value(s, "mesh_balancer_weight", destination="payments", endpoint=b) == 100.0
    assert {p.attributes["mesh.endpoint"]: p.value for p in points} == {a: 200.0, b: 100.0}
