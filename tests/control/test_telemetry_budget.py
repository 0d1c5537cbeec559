"""The telemetry memory budget measures memory: what a report may hold is bounded, a kept report
is charged what it really takes (not its request bytes), and a flood of the largest reports
allowed leaves a real `meshlib control` process within its budget."""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from meshlib.control import ControlPlane, ControlSettings
from meshlib.control.graph import kept_size, parse_report
from meshlib.control.telemetry import MAX_BUCKET, MAX_EDGES, MAX_ENDPOINTS, MIN_BUCKET
from tests.control.process import ControlProcess

MB = 1 << 20
BUDGET = 64 * MB  # the control service's default


def largest_report(client: str, edges: int = 170) -> dict[str, Any]:
    """Close to 1 MiB of JSON (the default body limit) of what costs most to keep: edges with
    a count in every latency bucket there is, each count a large number."""
    lat = [[MIN_BUCKET + i, 10**12 - i] for i in range(MAX_BUCKET - MIN_BUCKET + 1)]
    return {
        "client": client,
        "service": "flood",
        "interval": 30.0,
        "window": 30.0,
        "edges": [
            {"dir": "out", "peer": f"peer-{i:04d}-{'p' * 54}", "counts": {"2xx": 10**12}, "lat": lat}
            for i in range(edges)
        ],
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"edges": [{"dir": "out", "peer": f"p{i}"} for i in range(MAX_EDGES + 1)]}, "edges"),
        (
            {"endpoints": [{"service": "s", "address": f"h:{i}"} for i in range(MAX_ENDPOINTS + 1)]},
            "endpoints",
        ),
        ({"edges": [{"dir": "out", "peer": "p", "lat": [[1, 1]] * (MAX_BUCKET - MIN_BUCKET + 2)}]}, "lat"),
        ({"edges": [{"dir": "out", "peer": "p" * 257}]}, "peer"),
        ({"service": "s" * 257}, "service"),
    ],
)
def test_reports_beyond_the_bounds_are_refused(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_report({"client": "c", **body})
    assert any(field in map(str, e["loc"]) for e in info.value.errors())


def test_kept_size_is_what_the_kept_report_takes() -> None:
    """Charged at least the memory the kept report holds (traced by the allocator), and not
    wildly more; the request bytes it used to be charged are several times less."""
    text = json.dumps(largest_report("c1"))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        data = json.loads(text)  # as a request body arrives
        kept = parse_report(data)
        del data  # what the request left behind is what the report keeps
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= kept_size(kept) <= 1.3 * held
    assert len(text) < MB


def test_a_flood_of_the_largest_reports_stays_within_the_budget(tmp_path: Path) -> None:
    """25 clients each send a report of the kind that costs most to keep (~1 MiB,
    unauthenticated): the service keeps them in their compact form, charged what they take,
    and its RSS grows by less than its 64 MB budget. Kept as parsed JSON and charged by request
    bytes (25 MB, within the budget), the same reports took about 150 MB."""
    control = ControlProcess(tmp_path / "data")
    try:
        with httpx.Client(base_url=control.url, timeout=60.0) as http:
            body = largest_report("warm-up")
            assert MB * 0.9 < len(json.dumps(body)) < MB
            assert http.post("/v1/telemetry", json=body).status_code == 204
            assert http.get("/v1/graph").status_code == 200
            baseline = control.rss()
            flood = 25
            for n in range(flood):
                r = http.post("/v1/telemetry", json=largest_report(f"client-{n}"))
                assert r.status_code == 204, r.text
            r = http.post("/v1/telemetry", json=largest_report("too-many", edges=MAX_EDGES + 1))
            assert r.status_code in (413, 422)
            grown = control.rss() - baseline
            graph = http.get("/v1/graph").json()
        reporters = next(n["reporters"] for n in graph["nodes"] if n["service"] == "flood")
        assert reporters == flood + 1
        assert grown < BUDGET, f"RSS grew by {grown / MB:.0f} MB"
    finally:
        control.stop()


def test_the_budget_drops_the_oldest_reports_by_what_they_take(tmp_path: Path) -> None:
    """With a budget of three large reports, a fourth pushes out the oldest; a small report is
    charged little, so many small ones fit where a few large ones do."""
    plane = ControlPlane(ControlSettings(tmp_path))
    try:
        large = parse_report(json.loads(json.dumps(largest_report("probe", edges=50))))
        plane.telemetry_budget = 3 * kept_size(large) + 1000
        for n in range(4):
            report = parse_report(json.loads(json.dumps(largest_report(f"big-{n}", edges=50))))
            plane.report(report["client"], report, kept_size(report))
        assert sorted(plane.telemetry()) == ["big-1", "big-2", "big-3"]
        for n in range(100):
            report = parse_report({"client": f"small-{n}", "edges": [{"dir": "out", "peer": "orders"}]})
            assert kept_size(report) < 3000
            plane.report(report["client"], report, kept_size(report))
        kept = plane.telemetry()
        assert len(kept) >= 100 and "big-3" in kept and "big-0" not in kept
    finally:
        plane.close()
