"""The `checkout` client: calls `orders` through the mesh and shows which version answered.

    python examples/checkout.py                  # 20 orders, then one payment
    python examples/checkout.py --count 200 --canary

With examples/mesh.yaml about 1 order in 10 is answered by v2; with --canary (the header
`x-canary: true`) every one is. Edit the weights in mesh.yaml while it runs to move traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

import meshlib

CONFIG = os.environ.get("MESH_CONFIG") or str(Path(__file__).with_name("mesh.yaml"))

mesh = meshlib.Mesh("checkout", config=CONFIG)


@mesh.call("orders")
async def get_order(client: httpx.AsyncClient, order_id: int, *, canary: bool = False) -> dict[str, Any]:
    """GET http://orders/orders/{id}: the mesh picks the subset and the instance."""
    headers = {"x-canary": "true"} if canary else {}
    response = await client.get(f"/orders/{order_id}", headers=headers)
    response.raise_for_status()
    return response.json()


def pay(order_id: int, amount: float) -> dict[str, Any]:
    """POST http://payments/payments with a plain (sync) httpx client, through the same mesh."""
    with mesh.sync_client() as client:
        response = client.post("http://payments/payments", json={"order": order_id, "amount": amount})
        response.raise_for_status()
        return response.json()


async def run(count: int, canary: bool, interval: float) -> Counter[str]:
    answered: Counter[str] = Counter()
    for order_id in range(1, count + 1):
        try:
            order = await get_order(order_id, canary=canary)
        except httpx.HTTPError as exc:
            print(f"order {order_id:>3}: failed: {exc!r}")
            answered["failed"] += 1
        else:
            print(f"order {order_id:>3}: answered by orders {order['version']}")
            answered[order["version"]] += 1
        await asyncio.sleep(interval)

    # A sync client is as meshed as an async one; run it on a thread to keep the loop free.
    try:
        receipt = await asyncio.to_thread(pay, count, 42.0)
        print(f"payment for order {count}: {receipt['status']} (receipt {receipt['receipt']})")
    except httpx.HTTPError as exc:
        print(f"payment for order {count}: failed: {exc!r}")
    return answered


def main() -> None:
    parser = argparse.ArgumentParser(description="Call orders through the mesh and tally the versions.")
    parser.add_argument("--count", type=int, default=20, help="orders to fetch (default 20)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between calls (default 0.1)")
    parser.add_argument("--canary", action="store_true", help="send x-canary: true (routed to v2)")
    args = parser.parse_args()

    async def main_async() -> Counter[str]:
        async with mesh:  # closes the mesh and its shared clients at the end
            return await run(args.count, args.canary, args.interval)

    answered = asyncio.run(main_async())
    print("answered by: " + ", ".join(f"{v} {n}" for v, n in sorted(answered.items())))


if __name__ == "__main__":
    main()
