"""Hedged requests against real servers: the slow endpoint stops setting the latency."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import meshlib
from meshlib.resilience.hedge import MIN_SAMPLES
from tests.conftest import Fleet, wait_until, write_rules

GENEROUS = {"percent": 100, "min_per_second": 1000}


def rules(addresses: list[str], hedge: dict, budget: dict | None = None) -> list[dict]:
    route: dict = {"hedge": hedge}
    if budget is not None:
        route["retries"] = {"attempts": 1, "budget": budget}
    return [
        {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": a} for a in addresses]},
        {"kind": "Route", "service": "orders", "routes": [route]},
    ]


@pytest.fixture
def slow_and_fast(fleet: Fleet) -> tuple:
    slow, s1 = fleet.start("slow")
    fast, s2 = fleet.start("fast")
    slow.delay = 1.0  # far above the bounds on a hedged call's time below: a stall cannot blur them
    return slow, fast, [s1.address, s2.address]


async def test_hedge_after_fixed_delay_cuts_the_tail_and_cancels_the_loser(
    tmp_path: Path, slow_and_fast
) -> None:
    slow, fast, addresses = slow_and_fast
    cfg = write_rules(tmp_path / "mesh.yaml", rules(addresses, {"delay": "50ms"}, GENEROUS))
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        took = []
        for _ in range(10):
            t0 = time.monotonic()
            r = await client.get("http://orders/whoami")
            took.append(time.monotonic() - t0)
            assert r.status_code == 200 and r.json()["name"] == "fast"
        assert max(took) < 0.7  # without hedging, half of them would take 1 s
        assert mesh.stats.counter("hedges", "orders") >= 1
        # the losing copies were cancelled: the slow server sees its connections dropped
        await asyncio.to_thread(wait_until, lambda: slow.in_flight == 0, 5.0, "cancelled hedges to end")
        assert all(e.load.outstanding == 0 for e in mesh.snapshot.plan("orders").endpoints)
        hedged = [s for s in fast.seen if s["headers"].get("x-mesh-attempt") == "2"]
        assert hedged, "hedge copies are marked as attempt 2"


def test_sync_client_hedges_too(tmp_path: Path, slow_and_fast) -> None:
    _, _, addresses = slow_and_fast
    cfg = write_rules(tmp_path / "mesh.yaml", rules(addresses, {"delay": "50ms"}, GENEROUS))
    with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.sync_client() as client:
        for _ in range(6):
            t0 = time.monotonic()
            assert client.get("http://orders/whoami").json()["name"] == "fast"
            assert time.monotonic() - t0 < 0.7
        assert mesh.stats.counter("hedges", "orders") >= 1


async def test_hedges_draw_on_the_retry_budget(tmp_path: Path, slow_and_fast) -> None:
    slow, _, addresses = slow_and_fast
    slow.delay = 0.2
    # reserve 1/s x 10 s = 10 hedges, plus 0 % of traffic: the budget runs out
    cfg = write_rules(
        tmp_path / "mesh.yaml", rules(addresses, {"delay": "20ms"}, {"percent": 0, "min_per_second": 1})
    )
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        await asyncio.gather(*(client.get("http://orders/whoami") for _ in range(40)))
        assert mesh.stats.counter("hedges", "orders") <= 10
        assert mesh.stats.counter("budget_exhausted", "orders") >= 1


async def test_percentile_trigger_waits_for_samples_then_hedges_the_tail(
    tmp_path: Path, fleet: Fleet
) -> None:
    backends = [fleet.start(f"b{i}") for i in range(3)]
    cfg = write_rules(
        tmp_path / "mesh.yaml", rules([s.address for _, s in backends], {"delay": "p90"}, GENEROUS)
    )
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        for _ in range(MIN_SAMPLES - 1):  # too few samples for a percentile: no hedging yet
            await client.get("http://orders/whoami")
        assert mesh.stats.counter("hedges", "orders") == 0
        for _ in range(20):  # all fast: the window fills with fast latencies
            await client.get("http://orders/whoami")
        backends[0][0].delay = 1.0  # one endpoint turns slow: its requests are hedged
        took = []
        for _ in range(9):
            t0 = time.monotonic()
            await client.get("http://orders/whoami")
            took.append(time.monotonic() - t0)
        assert max(took) < 0.7  # not slow's second
        assert mesh.stats.counter("hedges", "orders") >= 1


async def test_non_idempotent_requests_are_not_hedged(tmp_path: Path, slow_and_fast) -> None:
    slow, fast, addresses = slow_and_fast
    cfg = write_rules(tmp_path / "mesh.yaml", rules(addresses, {"delay": "20ms"}, GENEROUS))
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        await asyncio.gather(*(client.post("http://orders/pay") for _ in range(4)))
    assert mesh.stats.counter("hedges", "orders") == 0
    assert slow.hits + fast.hits == 4
