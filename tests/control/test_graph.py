"""The service graph from telemetry reports: merge math, views, freshness, endpoint states."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from meshlib.control.graph import build_graph, parse_report, percentile
from meshlib.control.telemetry import bucket_bounds, bucket_of, histogram
from tests.control import Control

NOW = 1_000_000.0


def report(client: str, service: str | None, edges: list[dict], **extra: Any) -> dict[str, Any]:
    return parse_report({"client": client, "service": service, "interval": 5.0, "edges": edges, **extra})


def edge(direction: str, peer: str, counts: dict[str, int], latencies: list[float] = (), subset: str = ""):
    return {"dir": direction, "peer": peer, "subset": subset, "counts": counts, "lat": histogram(latencies)}


def stored(*reports: dict[str, Any], age: float = 1.0) -> dict[str, dict[str, Any]]:
    return {r["client"]: {"received": NOW - age, "report": r} for r in reports}


def edges_of(graph: dict) -> dict[tuple[str, str], dict]:
    return {(e["source"], e["destination"]): e for e in graph["edges"]}


def true_quantile(values: list[float], q: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, max(0, int(q * len(data) + 0.5) - 1))]


def test_buckets_cover_latencies_within_their_width() -> None:
    for ms in (0.013, 0.5, 1.0, 1.07, 3.3, 42.0, 999.0, 12_345.0):
        low, high = bucket_bounds(bucket_of(ms))
        assert low < ms <= high * (1 + 1e-9)
        assert high / low == pytest.approx(2 ** (1 / 8))
    assert bucket_of(0) == bucket_of(-1) == bucket_of(float("nan")) == -80
    assert bucket_of(float("inf")) == bucket_of(1e30) == 200


def test_percentiles_from_a_histogram_are_within_a_bucket() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(1.5, 0.8) for _ in range(5000)]  # milliseconds
    hist = {b: n for b, n in histogram(v / 1000 for v in values)}
    for q in (0.5, 0.9, 0.99):
        assert percentile(hist, q) == pytest.approx(true_quantile(values, q), rel=0.10)
    assert percentile({}, 0.5) is None


def test_rates_add_across_processes_each_over_its_own_window() -> None:
    rng = random.Random(1)
    lat_a = [rng.uniform(0.001, 0.004) for _ in range(100)]
    lat_b = [rng.uniform(0.010, 0.030) for _ in range(300)]
    a = report("a", "checkout", [edge("out", "orders", {"2xx": 98, "5xx": 2}, lat_a, "v1")], window=10.0)
    b = report(
        "b", "checkout", [edge("out", "orders", {"2xx": 285, "error": 5, "4xx": 10}, lat_b, "v2")], window=5.0
    )
    graph = build_graph(stored(a, b), {"orders": 2, "checkout": 2}, now=NOW)
    e = edges_of(graph)[("checkout", "orders")]
    # 100 requests over 10 s + 300 over 5 s
    assert e["rps"] == pytest.approx(10 + 60)
    # failures are 5xx and connection errors, a 4xx is the caller's problem: 2/10 s + 5/5 s fail
    assert e["success_rate"] == pytest.approx((9.8 + 59.0) / 70, abs=1e-4)
    assert e["requests"] == 400 and e["reporters"] == 2 and e["view"] == "out"
    assert e["subsets"] == {
        "v1": {"rps": 10.0, "success_rate": 0.98},
        "v2": {"rps": 60.0, "success_rate": pytest.approx(59 / 60, abs=1e-4)},
    }
    merged = [x * 1000 for x in lat_a + lat_b]  # the histograms merge by count, not by rate
    assert e["p50_ms"] == pytest.approx(true_quantile(merged, 0.5), rel=0.10)
    assert e["p99_ms"] == pytest.approx(true_quantile(merged, 0.99), rel=0.10)
    assert e["p50_ms"] <= e["p90_ms"] <= e["p99_ms"]
    nodes = {n["service"]: n for n in graph["nodes"]}
    assert nodes["checkout"] == {"service": "checkout", "instances": 2, "reporters": 2}
    assert nodes["orders"] == {"service": "orders", "instances": 2, "reporters": 0}


def test_the_callers_view_wins_and_the_called_side_fills_in() -> None:
    caller = report("c1", "checkout", [edge("out", "orders", {"2xx": 50}, [0.002] * 50)])
    orders = report(
        "o1",
        "orders",
        [
            edge("in", "checkout", {"2xx": 45}, [0.001] * 45),  # ignored: the caller reported it
            edge("in", "billing", {"2xx": 20, "5xx": 5}, [0.001] * 25),  # billing is not connected
            edge("in", "unknown", {"2xx": 10}, [0.001] * 10),
        ],
    )
    edges = edges_of(build_graph(stored(caller, orders), {}, now=NOW))
    assert edges[("checkout", "orders")]["view"] == "out"
    assert edges[("checkout", "orders")]["rps"] == pytest.approx(10.0)
    assert edges[("billing", "orders")]["view"] == "in"
    assert edges[("billing", "orders")]["rps"] == pytest.approx(5.0)
    assert edges[("billing", "orders")]["success_rate"] == pytest.approx(0.8)
    assert ("unknown", "orders") in edges
    assert edges[("checkout", "orders")]["p50_ms"] == pytest.approx(2.0, rel=0.10)


def test_old_reports_drop_out() -> None:
    live = report("live", "checkout", [edge("out", "orders", {"2xx": 5})])
    old = report("old", "billing", [edge("out", "orders", {"2xx": 5})])
    short = report("short", "search", [edge("out", "orders", {"2xx": 5})], interval=0.2)
    telemetry = {
        **stored(live, age=14.0),  # within three 5 s intervals
        **stored(old, age=16.0),  # not
        **stored(short, age=1.0),  # three 0.2 s intervals are long gone
    }
    graph = build_graph(telemetry, {}, now=NOW)
    assert set(edges_of(graph)) == {("checkout", "orders")}
    assert {n["service"] for n in graph["nodes"]} == {"checkout", "orders"}
    # and never older than max_age, whatever the interval says
    slow = report("slow", "checkout", [edge("out", "orders", {"2xx": 5})], interval=60.0)
    assert build_graph(stored(slow, age=31.0), {}, now=NOW)["edges"] == []


def test_idle_edges_and_endpoint_states() -> None:
    states = [
        {"service": "orders", "address": "10.0.0.1:80", "breaker": "open", "ejected": False},
        {"service": "orders", "address": "10.0.0.2:80", "breaker": "closed", "ejected": True},
        {"service": "payments", "address": "10.0.0.9:80", "breaker": "half-open", "ejected": False},
    ]
    a = report("a", "checkout", [edge("out", "orders", {})], endpoints=states)
    b = report(
        "b",
        "checkout",
        [],
        endpoints=[{"service": "orders", "address": "10.0.0.1:80", "breaker": "half-open", "ejected": True}],
    )
    edges = edges_of(build_graph(stored(a, b), {}, now=NOW))
    orders = edges[("checkout", "orders")]
    assert orders["rps"] == 0 and orders["success_rate"] is None and orders["p99_ms"] is None
    assert orders["breakers"] == {"open": 1, "half_open": 0, "ejected": 2}
    assert orders["endpoints"] == [
        {"address": "10.0.0.1:80", "breaker": "open", "ejected": True, "reporters": 2},
        {"address": "10.0.0.2:80", "breaker": "closed", "ejected": True, "reporters": 1},
    ]
    # an open breaker with no traffic in the window still shows on its edge
    assert edges[("checkout", "payments")]["breakers"] == {"open": 0, "half_open": 1, "ejected": 0}


def test_endpoint_weights_show_on_their_edge_as_the_callers_mean() -> None:
    a = report("a", "checkout", [], weights=[{"service": "orders", "address": "10.0.0.1:80", "weight": 30.0}])
    b = report("b", "checkout", [], weights=[{"service": "orders", "address": "10.0.0.1:80", "weight": 10.0}])
    old = report("c", "checkout", [])  # a client without weights (or before them): nothing
    orders = edges_of(build_graph(stored(a, b, old), {}, now=NOW))[("checkout", "orders")]
    assert orders["endpoints"] == [
        {
            "address": "10.0.0.1:80",
            "breaker": "closed",
            "ejected": False,
            "reporters": 0,
            "weight": 20.0,
            "weight_reporters": 2,
        }
    ]
    assert orders["breakers"] == {"open": 0, "half_open": 0, "ejected": 0}
    with pytest.raises(ValidationError):
        report("d", "checkout", [], weights=[{"service": "orders", "address": "x:1", "weight": -1.0}])


@pytest.mark.parametrize(
    "body",
    [
        {"client": "c", "edges": {}},
        {"client": "c", "edges": [{"dir": "sideways", "peer": "x"}]},
        {"client": "c", "edges": [{"dir": "out", "peer": ""}]},
        {"client": "c", "edges": [{"dir": "out", "peer": "a b"}]},
        {"client": "c", "edges": [{"dir": "out", "peer": "x", "counts": {"2xx": -1}}]},
        {"client": "c", "edges": [{"dir": "out", "peer": "x", "counts": {"2xx": "1"}}]},
        {"client": "c", "edges": [{"dir": "out", "peer": "x", "counts": {"2xx": True}}]},
        {"client": "c", "edges": [{"dir": "out", "peer": "x", "counts": {"7xx": 1}}]},
        {"client": "c", "edges": [{"dir": "out", "peer": "x", "lat": [[1]]}]},
        {"client": "c", "edges": [{"dir": "out", "peer": "x", "lat": [[9999, 1]]}]},
        {"client": "c", "edges": [{"dir": "out", "peer": "x", "lat": [[1, 0]]}]},
        {"client": "c", "edges": [{"dir": "out", "peer": "x", "surprise": 1}]},
        {"client": "c", "window": 0},
        {"client": "c", "interval": -1},
        {"client": "c", "service": 5},
        {"client": "c", "endpoints": [{"service": "x", "address": "a", "breaker": "ajar"}]},
    ],
)
def test_malformed_reports_are_refused(body: dict) -> None:
    with pytest.raises(ValidationError):
        parse_report(body)


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    c = Control(tmp_path / "data", ping=0.2)
    yield c
    c.stop()


def test_graph_endpoint_over_http(control: Control) -> None:
    assert control.http.get("/v1/graph").json()["edges"] == []
    control.http.post("/v1/registry/orders", json={"address": "127.0.0.1:9001"})
    body = {
        "client": "c1",
        "service": "checkout",
        "interval": 5,
        "window": 2,
        "edges": [edge("out", "orders", {"2xx": 19, "5xx": 1}, [0.003] * 20, "v1")],
    }
    assert control.http.post("/v1/telemetry", json=body).status_code == 204
    bad = {**body, "edges": [{"dir": "out", "peer": "orders", "counts": {"2xx": "many"}}]}
    r = control.http.post("/v1/telemetry", json=bad)
    assert r.status_code == 422 and r.json()["problems"][0]["field"] == "edges.0.counts.2xx"
    graph = control.http.get("/v1/graph").json()
    assert graph["nodes"] == [
        {"service": "checkout", "instances": 0, "reporters": 1},
        {"service": "orders", "instances": 1, "reporters": 0},
    ]
    (e,) = graph["edges"]
    assert e["source"] == "checkout" and e["destination"] == "orders"
    assert e["rps"] == 10.0 and e["success_rate"] == 0.95
    assert e["p50_ms"] == pytest.approx(3.0, rel=0.1)


def test_diff_between_versions(control: Control) -> None:
    """The dashboard's diff endpoint: unified diffs of the YAML documents of two versions."""
    docs = [{"kind": "Destination", "service": "orders", "subsets": {"v1": {"version": "v1"}}}]
    assert control.apply(docs).json()["version"] == 1
    docs[0]["load_balancer"] = "random"
    assert control.apply(docs).json()["version"] == 2
    d = control.http.get("/v1/diff").json()
    assert d["from"] == 1 and d["to"] == 2 and d["changed"] is True and d["truncated"] is False
    lines = d["diff"].splitlines()
    assert lines[:2] == ["--- version 1", "+++ version 2"]
    assert "+load_balancer: random" in lines
    first = control.http.get("/v1/diff", params={"from": 0, "to": 1}).json()["diff"].splitlines()
    assert "+kind: Destination" in first and "+service: orders" in first
    same = control.http.get("/v1/diff", params={"from": 2, "to": 2}).json()
    assert same["changed"] is False and same["diff"] == ""
    assert control.http.get("/v1/diff", params={"from": 1, "to": 9}).status_code == 404
    for bad in ({"from": "x"}, {"to": "-1"}, {"from": "1e3"}):
        r = control.http.get("/v1/diff", params=bad)
        assert r.status_code == 400 and "error" in r.json()


def test_concurrency_limits_are_summed_per_edge_and_per_node() -> None:
    def report(client: str, service: str, limits: list[dict]) -> dict:
        return {
            "received": 100.0,
            "report": parse_report({"client": client, "service": service, "limits": limits}),
        }

    graph = build_graph(
        {
            "c1": report(
                "c1", "checkout", [{"dir": "out", "service": "orders", "limit": 12, "in_flight": 3}]
            ),
            "c2": report("c2", "checkout", [{"dir": "out", "service": "orders", "limit": 9, "in_flight": 9}]),
            "o1": report("o1", "orders", [{"dir": "in", "service": "orders", "limit": 20, "in_flight": 1}]),
            "o2": report("o2", "orders", [{"dir": "in", "service": "orders", "limit": 16, "in_flight": 0}]),
        },
        {},
        now=101.0,
    )
    (edge,) = graph["edges"]
    assert (edge["source"], edge["destination"], edge["concurrency_limit"]) == ("checkout", "orders", 21)
    nodes = {n["service"]: n.get("concurrency_limit") for n in graph["nodes"]}
    assert nodes == {"checkout": None, "orders": 36}
