"""Load reports and weighted_round_robin, in one process: `python examples/load_reports.py`.

Three "orders" servers behind the mesh middleware report their load on every response (ORCA's
`endpoint-load-metrics` header). Each says how busy it is with `mesh.load.set_application_utilization`:
here its request rate times what a request costs it, and one of them does four times the work
per request. A client whose Destination says `load_balancer: weighted_round_robin` weighs each
server by `qps / utilization` (gRPC's A58) and sends the costly one a quarter of the others' share.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import ExitStack
from typing import Any

import meshlib
from meshlib.asgi import MeshMiddleware
from meshlib.rules import parse_documents
from meshlib.testing import serve

COSTS = {"orders-a": 1.0, "orders-b": 1.0, "orders-heavy": 4.0}  # work per request, relative


class Orders:
    """An ASGI app that tells its load: utilization = requests per second x cost per request."""

    def __init__(self, name: str, cost: float) -> None:
        self.name, self.cost = name, cost
        # load_reports=True: report whatever the rules say (by default a server reports while its
        # own Destination names weighted_round_robin, which the control service's rules would)
        self.mesh = meshlib.Mesh("orders", load_reports=True)
        self.mesh.load.period = 0.1  # rates sampled ten times a second: the example is short

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        load = self.mesh.load
        load.set_application_utilization(load.report().rps_fractional * self.cost / 1000)
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": self.name.encode()})


def rules(addresses: list[str]) -> list[dict[str, Any]]:
    return [
        {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": a} for a in addresses]},
        {
            "kind": "Destination",
            "service": "orders",
            "load_balancer": "weighted_round_robin",
            # A58's defaults but the blackout (10s) and the update period (1s): a short example
            "weighted_round_robin": {"blackout_period": "0s", "weight_update_period": "100ms"},
        },
    ]


async def call(mesh: meshlib.Mesh, warm: int, n: int) -> Counter[str]:
    async with mesh.client() as client:
        for _ in range(warm):  # the first reports arrive, the weights follow
            await client.get("http://orders/")
        return Counter([(await client.get("http://orders/")).text for _ in range(n)])


def main(warm: int = 300, n: int = 900) -> Counter[str]:
    with ExitStack() as stack:
        addresses = []
        for name, cost in COSTS.items():
            app = Orders(name, cost)
            stack.enter_context(app.mesh)
            server = serve(MeshMiddleware(app, mesh=app.mesh))
            stack.callback(server.stop)
            addresses.append(server.address)
        client = stack.enter_context(meshlib.Mesh("checkout"))
        client.apply_rules(parse_documents(rules(addresses)), "example")
        shares = asyncio.run(call(client, warm, n))
        weights = client.snapshot.plans["orders"].balancer(None).weights()  # type: ignore[attr-defined]
    for (name, _), address in zip(COSTS.items(), addresses, strict=True):
        print(f"{name:13} {shares[name] / n:6.1%} of the requests, weight {weights[address]:.3g}")
    return shares


if __name__ == "__main__":
    main()
