"""weighted_round_robin end to end: uvicorn servers behind the mesh middleware report their load
on every response, a real Mesh client reads the reports and weighs by them.

Each server models its utilization as its request rate times a cost per request (what a CPU
figure is, for a server whose requests all cost the same): a server whose requests cost four
times as much reports four times the utilization at the same rate, and A58's weight,
qps / utilization, is 1 / cost. So it should get a quarter of the others' share. A server that
answers slowly at the same cost (a slow dependency, not its own load) reports the same
utilization per request: A58 alone keeps its share, meshlib's latency tolerance cuts it.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.asgi import MeshMiddleware
from meshlib.balancing import WeightedRoundRobin
from meshlib.balancing.orca import HEADER, parse_report
from meshlib.testing import serve
from tests.balancing.test_live import URL, orders_docs
from tests.conftest import write_rules

WRR = {"blackout_period": "0s", "weight_update_period": "100ms"}
# A58's shares exactly: the latency cut off. These servers share the test's interpreter, and one
# whose thread waits its turn for a while answers slower for that while, which the cut acts on
A58 = WRR | {"latency_tolerance": 0}


class Reporting:
    """A server whose utilization is its rate times `cost` (when `cost` is set)."""

    def __init__(self, name: str, cost: float | None, delay: float = 0.0) -> None:
        self.name = name
        self.cost = cost
        self.delay = delay
        self.mesh = meshlib.Mesh("orders", load_reports=cost is not None)
        self.mesh.load.period = 0.05  # rates sampled often: the test is short

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.cost is not None:
            load = self.mesh.load
            load.set_application_utilization(load.report().rps_fractional * self.cost)
        body = json.dumps({"name": self.name}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def servers() -> Iterator[Any]:
    with ExitStack() as stack:

        def start(name: str, cost: float | None, delay: float = 0.0) -> str:
            app = Reporting(name, cost, delay)
            stack.enter_context(app.mesh)
            running = serve(MeshMiddleware(app, mesh=app.mesh))
            stack.callback(running.stop)
            return running.address

        yield start


async def shares(client: httpx.AsyncClient, warm: int, n: int) -> Counter[str]:
    for _ in range(warm):
        (await client.get(URL)).raise_for_status()
    seen: Counter[str] = Counter()
    for _ in range(n):
        r = await client.get(URL)
        seen[r.json()["name"]] += 1
    return seen


async def test_a_server_that_reports_more_utilization_gets_proportionally_less(
    tmp_path: Path, servers: Any
) -> None:
    addresses = [servers("costly", 4.0), servers("a", 1.0), servers("b", 1.0)]
    docs = orders_docs(addresses, "weighted_round_robin", weighted_round_robin=A58)
    cfg = write_rules(tmp_path / "mesh.yaml", docs)
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        response = await client.get(URL)
        assert parse_report(response.headers[HEADER]) is not None  # the servers report
        seen = await shares(client, 300, 900)
        balancer = mesh.snapshot.plans["orders"].balancer(None)
        assert isinstance(balancer, WeightedRoundRobin)
        weights = balancer.weights()
    # weights 1/4 : 1 : 1, so shares 1/9, 4/9, 4/9 (round robin would give 1/3 each)
    assert weights[addresses[0]] / weights[addresses[1]] == pytest.approx(0.25, rel=0.1)
    assert 0.08 < seen["costly"] / 900 < 0.15, seen
    assert 0.39 < seen["a"] / 900 < 0.5, seen
    assert 0.39 < seen["b"] / 900 < 0.5, seen


async def test_without_reports_every_server_gets_an_equal_share(tmp_path: Path, servers: Any) -> None:
    addresses = [servers("a", None), servers("b", None), servers("c", None)]
    docs = orders_docs(addresses, "weighted_round_robin", weighted_round_robin=WRR)
    cfg = write_rules(tmp_path / "mesh.yaml", docs)
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        response = await client.get(URL)
        assert HEADER not in response.headers
        seen = await shares(client, 0, 300)
        loads = [mesh.loads.get(a) for a in addresses]
    assert seen == {"a": 100, "b": 100, "c": 100}  # round robin, exactly
    assert all(load.report is None for load in loads)


async def test_one_server_without_reports_gets_the_mean_weight(tmp_path: Path, servers: Any) -> None:
    addresses = [servers("silent", None), servers("a", 1.0), servers("b", 3.0)]
    docs = orders_docs(addresses, "weighted_round_robin", weighted_round_robin=A58)
    cfg = write_rules(tmp_path / "mesh.yaml", docs)
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        seen = await shares(client, 300, 900)
    # weights 1, 1/3 and their mean 2/3: shares 1/2, 1/6 and 1/3
    assert 0.28 < seen["silent"] / 900 < 0.39, seen
    assert 0.44 < seen["a"] / 900 < 0.56, seen
    assert 0.12 < seen["b"] / 900 < 0.21, seen


@pytest.mark.parametrize(
    ("tolerance", "low", "high"), [(2.0, 0.0, 0.2), (0.0, 0.25, 0.42)], ids=["cut", "a58"]
)
async def test_a_server_slow_but_not_busy_keeps_little_traffic(
    tmp_path: Path, servers: Any, tolerance: float, low: float, high: float
) -> None:
    # the same cost per request, so the same A58 weight; "slow" takes 20 ms an answer where the
    # others take well under 1: cut to a tenth of its weight (1/21 of the traffic; less when this
    # machine slows the others down too), where A58 as written keeps it a third
    addresses = [servers("slow", 1.0, delay=0.02), servers("a", 1.0), servers("b", 1.0)]
    docs = orders_docs(
        addresses, "weighted_round_robin", weighted_round_robin=WRR | {"latency_tolerance": tolerance}
    )
    cfg = write_rules(tmp_path / "mesh.yaml", docs)
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        seen = await shares(client, 50, 300)
        weights = mesh.snapshot.plans["orders"].balancer(None).weights()
    # cut, its weight may reach the floor (0.01) on a busy machine: ~1.5 of 300 expected, so
    # none is no failure; it stays in rotation with a weight above zero
    assert low <= seen["slow"] / 300 < high, (seen, weights)
    assert weights[addresses[0]] > 0, weights
