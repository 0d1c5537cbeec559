"""Adaptive concurrency: a service that can do 4 requests at a time, offered twice that.

    python examples/overload.py              # 5 s of load, then what happened
    python examples/overload.py --seconds 10

`orders` (uvicorn on 127.0.0.1, started here) serves 4 requests at a time, 100 ms each; more
wait in a queue. Its ConcurrencyLimit document lets the mesh find how many it should take at
once from their latency: the rest are answered 503 with retry-after at once, instead of
joining a queue that makes everyone late. The caller sends 80 requests a second (twice the
capacity), open loop, through a Mesh client.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter
from typing import Any

import meshlib
from meshlib.asgi import MeshMiddleware
from meshlib.rules import load_yaml
from meshlib.testing import serve

ORDERS_RULES = """
kind: ConcurrencyLimit
service: orders
algorithm: gradient
min_limit: 2
max_limit: 100
gradient: {interval: 500ms, min_rtt: {interval: 60s, jitter: 15, requests: 12, concurrency: 4}}
retry_after: 1s
"""


class Orders:
    """4 requests at a time, 100 ms each."""

    def __init__(self) -> None:
        self.slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.slots = self.slots or asyncio.Semaphore(4)
        async with self.slots:
            await asyncio.sleep(0.1)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


async def offer(client: Any, rate: float, seconds: float) -> tuple[Counter[int], list[float]]:
    """`rate` requests a second for `seconds`, whatever the answers: statuses, latencies of 200s."""
    statuses: Counter[int] = Counter()
    admitted: list[float] = []

    async def one() -> None:
        started = time.monotonic()
        response = await client.get("http://orders/")
        statuses[response.status_code] += 1
        if response.status_code == 200:
            admitted.append(time.monotonic() - started)

    calls = []
    start = time.monotonic()
    for n in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        calls.append(asyncio.ensure_future(one()))
    await asyncio.gather(*calls)
    return statuses, admitted


async def run(seconds: float) -> dict[str, Any]:
    orders = meshlib.Mesh("orders")
    orders.apply_rules(load_yaml(ORDERS_RULES, source="orders.yaml"), "1")
    try:
        with serve(MeshMiddleware(Orders(), mesh=orders)) as server:
            caller = meshlib.Mesh("checkout")
            endpoints = f"kind: Endpoints\nservice: orders\nendpoints: [{{address: '{server.address}'}}]\n"
            caller.apply_rules(load_yaml(endpoints, source="checkout.yaml"), "1")
            async with caller, caller.client(timeout=30) as client:
                statuses, admitted = await offer(client, 80, seconds)
        limit = orders.resilience.concurrency_limits()[0][2].current
    finally:
        orders.close()
    return {"statuses": dict(statuses), "admitted_p50_ms": statistics.median(admitted) * 1e3, "limit": limit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    result = asyncio.run(run(args.seconds))
    print(f"answers by status: {result['statuses']}")
    print(f"admitted requests' median latency: {result['admitted_p50_ms']:.0f} ms (unloaded: 100 ms)")
    print(f"the limit orders settled on: {result['limit']} (its capacity: 4)")


if __name__ == "__main__":
    main()
