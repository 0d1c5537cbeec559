"""Destination and Route documents apply to an External host as to a mesh service: its fixed
endpoints are the pool, and the route's timeout and retries and the breaker act on them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

import meshlib
from meshlib.rules import RuleSet
from tests.conftest import Fleet

HOST = "api.partner.example"


def external(*addresses: str) -> dict[str, Any]:
    return {"kind": "External", "service": HOST, "ports": [{"port": 80}], "endpoints": list(addresses)}


@pytest.fixture
def mesh() -> Iterator[meshlib.Mesh]:
    m = meshlib.Mesh("checkout")
    yield m
    m.close()


def test_retries_of_the_route_reach_past_failures(mesh: meshlib.Mesh, fleet: Fleet) -> None:
    backend, server = fleet.start("partner")
    backend.fail_status, backend.fail_times = 503, 2
    route = {
        "kind": "Route",
        "service": HOST,
        "routes": [{"timeout": "5s", "retries": {"attempts": 3, "backoff": {"base": "1ms", "max": "2ms"}}}],
    }
    mesh.apply_rules(RuleSet([external(server.address), route]), "t1")
    with mesh.sync_client() as client:
        r = client.get(f"http://{HOST}/whoami")
    assert r.status_code == 200 and backend.hits == 3
    assert mesh.stats.counter("retries", HOST) == 2
    assert mesh.stats.edge("out", HOST).by_class == {"2xx": 1}
    sent = {name for seen in backend.seen for name in seen["headers"]}
    assert not {"x-mesh-source", "x-mesh-timeout", "x-mesh-attempt"} & sent  # the mesh's own stay inside


async def test_the_route_timeout_bounds_a_slow_external(mesh: meshlib.Mesh, fleet: Fleet) -> None:
    backend, server = fleet.start("partner")
    backend.delay = 2.0
    route = {"kind": "Route", "service": HOST, "routes": [{"timeout": "200ms"}]}
    mesh.apply_rules(RuleSet([external(server.address), route]), "t1")
    started = time.monotonic()
    async with mesh.client() as client:
        with pytest.raises(meshlib.DeadlineExceeded):
            await client.get(f"http://{HOST}/whoami")
    assert time.monotonic() - started < 1.5


def test_the_breaker_stops_calls_to_a_failing_endpoint(mesh: meshlib.Mesh, fleet: Fleet) -> None:
    backend, server = fleet.start("partner")
    backend.fail_status = 500
    destination = {
        "kind": "Destination",
        "service": HOST,
        "circuit_breaker": {"consecutive_failures": 2, "open_for": "30s"},
        "outlier_detection": {"max_ejection_percent": 100},
        "panic_threshold": 0,
    }
    mesh.apply_rules(RuleSet([external(server.address), destination]), "t1")
    with mesh.sync_client() as client:
        assert [client.get(f"http://{HOST}/x").status_code for _ in range(2)] == [500, 500]
        with pytest.raises(meshlib.CircuitOpenError, match=HOST):
            client.get(f"http://{HOST}/x")
    assert backend.hits == 2  # the third call never left


def test_calls_are_balanced_over_the_fixed_endpoints(mesh: meshlib.Mesh, fleet: Fleet) -> None:
    a, server_a = fleet.start("a")
    b, server_b = fleet.start("b")
    mesh.apply_rules(RuleSet([external(server_a.address, server_b.address)]), "t1")
    with mesh.sync_client() as client:
        names = [client.get(f"http://{HOST}/whoami").json()["name"] for _ in range(10)]
    assert sorted(set(names)) == ["a", "b"] and a.hits + b.hits == 10
    assert {s["headers"]["host"] for s in a.seen + b.seen} == {HOST}


def test_an_external_without_endpoints_connects_to_its_host_by_dns(mesh: meshlib.Mesh, fleet: Fleet) -> None:
    """`localhost.` stands in for a DNS name: the pool is the host itself, at the declared port."""
    backend, server = fleet.start("partner")
    doc = {"kind": "External", "service": "localhost", "ports": [{"port": server.port}]}
    mesh.apply_rules(RuleSet([doc]), "t1")
    plan = mesh.snapshot.externals["localhost"][server.port]
    assert [e.address for e in plan.endpoints] == [f"localhost:{server.port}"]
    with mesh.sync_client() as client:
        assert client.get(f"http://localhost:{server.port}/whoami").status_code == 200
    assert mesh.stats.edge("out", "localhost").by_class == {"2xx": 1}  # it went through the stack
    assert backend.hits == 1


def test_an_external_and_endpoints_of_one_name_are_refused() -> None:
    endpoints = {"kind": "Endpoints", "service": HOST, "endpoints": [{"address": "127.0.0.1:1"}]}
    with pytest.raises(meshlib.rules.RulesError) as exc:
        RuleSet([endpoints, external("127.0.0.1:2")])
    [problem] = exc.value.problems
    assert problem.document == f"External/{HOST} (document 2)" and problem.field == "service"
    assert "mesh service or an External host, not both" in problem.reason


async def test_the_bulkhead_caps_calls_in_flight_to_an_external(mesh: meshlib.Mesh, fleet: Fleet) -> None:
    backend, server = fleet.start("partner")
    backend.delay = 0.3
    destination = {"kind": "Destination", "service": HOST, "max_concurrent_requests": 1}
    mesh.apply_rules(RuleSet([external(server.address), destination]), "t1")
    async with mesh.client() as client:
        results = await asyncio.gather(
            client.get(f"http://{HOST}/a"), client.get(f"http://{HOST}/b"), return_exceptions=True
        )
    assert sorted(type(r).__name__ for r in results) == ["BulkheadFullError", "Response"]
    assert backend.hits == 1
