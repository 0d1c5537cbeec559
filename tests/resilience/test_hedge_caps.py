"""The run-time caps on hedging, against real slow servers: copies per call, hedges per second."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import meshlib
from meshlib.resilience.hedge import HEDGE_BURST, MAX_HEDGES_PER_SECOND, HedgeFilter
from meshlib.rules import MAX_HEDGES, RouteDoc, RuleSet
from tests.clock import Clock
from tests.conftest import Fleet, write_rules

GENEROUS = {"percent": 100, "min_per_second": 1000}  # the budget never stops a hedge here


@pytest.fixture
def slow(fleet: Fleet) -> list[str]:
    addresses = []
    for name in ("slow-a", "slow-b"):
        backend, server = fleet.start(name)
        backend.delay = 0.4
        addresses.append(server.address)
    return addresses


def rules(addresses: list[str], max_hedges: int) -> list[dict]:
    hedge = {"delay": "5ms", "max_hedges": max_hedges}
    return [
        {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": a} for a in addresses]},
        {
            "kind": "Route",
            "service": "orders",
            "routes": [{"hedge": hedge, "retries": {"attempts": 1, "budget": GENEROUS}}],
        },
    ]


def hedge_filter(mesh: meshlib.Mesh) -> HedgeFilter:
    return next(f for f in mesh.stack.filters if isinstance(f, HedgeFilter))


async def test_a_call_sends_at_most_max_hedges_copies_whatever_the_model_says(
    tmp_path: Path, slow: list[str]
) -> None:
    cfg = write_rules(tmp_path / "mesh.yaml", rules(slow, MAX_HEDGES))
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        # A model built without validation (model_copy does not validate) asks for 1,000 copies;
        # 5 ms apart over a 400 ms answer, that would be about 80 of them.
        current = mesh.snapshot.rules
        route = current.route("orders")
        assert route is not None and route.routes[0].hedge is not None
        rule = route.routes[0]
        unchecked = rule.model_copy(update={"hedge": rule.hedge.model_copy(update={"max_hedges": 1000})})
        doc = route.model_copy(update={"routes": (unchecked,)})
        mesh.apply_rules(RuleSet([d for d in current if not isinstance(d, RouteDoc)] + [doc]), "unchecked")
        assert mesh.snapshot.rules.route("orders").routes[0].hedge.max_hedges == 1000  # type: ignore[union-attr]
        r = await client.get("http://orders/whoami")
        assert r.status_code == 200
        assert mesh.stats.counter("hedges", "orders") == MAX_HEDGES
        assert mesh.stats.counter("hedge_rate_limited", "orders") == 0  # the per-call cap, not the rate


async def test_hedges_per_second_to_a_service_are_capped(tmp_path: Path, slow: list[str]) -> None:
    cfg = write_rules(tmp_path / "mesh.yaml", rules(slow, MAX_HEDGES))
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        clock = Clock()
        hedge_filter(mesh).clock = clock  # before the first hedge: the service's bucket uses it
        # 20 calls each wanting 5 hedges: 100 wanted, the bucket holds HEDGE_BURST (time stands still)
        await asyncio.gather(*(client.get("http://orders/whoami") for _ in range(20)))
        assert mesh.stats.counter("hedges", "orders") == HEDGE_BURST
        assert mesh.stats.counter("hedge_rate_limited", "orders") >= 1
        # a tenth of a second later, a tenth of a second's worth more
        clock.advance(0.1)
        await asyncio.gather(*(client.get("http://orders/whoami") for _ in range(20)))
        assert mesh.stats.counter("hedges", "orders") == HEDGE_BURST + int(MAX_HEDGES_PER_SECOND * 0.1)
