"""prequal in one process: two `orders` instances of different capacity, a client that probes.

    python examples/prequal_balancing.py --seconds 3

Both instances run the mesh's ASGI middleware, which answers the balancer's probes
(`GET /.meshlib/probe`: requests in flight and a latency estimate) without the app seeing them.
`fast` serves two requests at a time in 10 ms each, `slow` two at a time in 40 ms (a quarter of
the capacity). The client's Destination says `load_balancer: prequal`; it prints how many
requests each instance answered, and how many probes were sent for them. Try
`--balancer round_robin` for the even split, or `least_request`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

import meshlib
from meshlib.testing import RunningServer, serve


class Instance:
    """`workers` requests at a time, `service` seconds each; answers its name."""

    def __init__(self, name: str, workers: int, service: float) -> None:
        self.name, self.workers, self.service = name, workers, service
        self.slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.workers)
        async with self.slots:
            await asyncio.sleep(self.service)
        body = self.name.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})


def start_instances() -> list[tuple[RunningServer, meshlib.Mesh]]:
    running = []
    for name, workers, service in (("fast", 2, 0.010), ("slow", 2, 0.040)):
        mesh = meshlib.Mesh("orders")  # the instance's own Mesh: its middleware answers probes
        running.append((serve(mesh.asgi(Instance(name, workers, service))), mesh))
    return running


def rules_file(directory: Path, addresses: list[str], balancer: str) -> Path:
    docs = [
        {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": a} for a in addresses]},
        {"kind": "Destination", "service": "orders", "load_balancer": balancer},
    ]
    path = directory / "mesh.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


async def call(mesh: meshlib.Mesh, seconds: float, width: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    end = time.monotonic() + seconds
    async with mesh.client() as client:

        async def caller() -> None:
            while time.monotonic() < end:
                counts[(await client.get("http://orders/work")).text] += 1

        await asyncio.gather(*(caller() for _ in range(width)))
    return counts


def run(seconds: float = 3.0, width: int = 6, balancer: str = "prequal") -> tuple[Counter[str], int]:
    """Who answered how often, and how many probes the client sent."""
    running = start_instances()
    try:
        with tempfile.TemporaryDirectory() as directory:
            config = rules_file(Path(directory), [server.address for server, _ in running], balancer)
            client = meshlib.Mesh("checkout", config=config)
            try:
                counts = asyncio.run(call(client, seconds, width))
                return counts, client.stats.counter("probes_sent", "orders")
            finally:
                client.close()
    finally:
        for server, mesh in running:
            server.stop()
            mesh.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--callers", type=int, default=6, help="requests in flight from the client")
    parser.add_argument("--balancer", default="prequal")
    args = parser.parse_args()
    counts, probes = run(args.seconds, args.callers, args.balancer)
    total = sum(counts.values())
    for name in ("fast", "slow"):
        print(f"{name:>5}: {counts[name]:5d} requests ({counts[name] / max(total, 1):.0%})")
    print(f"probes sent: {probes}")


if __name__ == "__main__":
    main()
