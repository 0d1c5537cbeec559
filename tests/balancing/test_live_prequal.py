"""prequal end to end: a real Mesh's clients, real uvicorn servers of known capacities behind
the mesh's middleware (which answers the probes), rules from a file.

A server here serves `workers` requests at a time, each for `service` seconds, and queues the
rest: its requests in flight and its latency grow with what it is sent beyond its capacity, as
a real server's do. An outer counter sees the probes before the middleware answers them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.probing import PROBE_PATH
from meshlib.testing import RunningServer, serve
from tests.conftest import write_rules

URL = "http://orders/work"


class Capacity:
    """`workers` at a time, `service` seconds each; answers its name."""

    def __init__(self, name: str, workers: int, service: float) -> None:
        self.name = name
        self.workers = workers
        self.service = service
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if self._slots is None:  # made on the server's own loop
            self._slots = asyncio.Semaphore(self.workers)
        async with self._slots:
            await asyncio.sleep(self.service)
        body = self.name.encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class ProbeCounter:
    """Counts the probes reaching a server, then hands everything to the meshed app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.probes = 0
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == PROBE_PATH:
            with self.lock:
                self.probes += 1
        await self.app(scope, receive, send)


@pytest.fixture
def servers() -> Iterator[list[tuple[ProbeCounter, RunningServer, meshlib.Mesh]]]:
    """A fast server (4 workers) and a slow one (1 worker), 10 ms a request: capacities 4 : 1."""
    started = []
    for name, workers in (("fast", 4), ("slow", 1)):
        mesh = meshlib.Mesh("orders")
        counter = ProbeCounter(mesh.asgi(Capacity(name, workers, 0.010)))
        started.append((counter, serve(counter), mesh))
    yield started
    for _, server, mesh in started:
        server.stop()
        mesh.close()


def rules(tmp_path: Path, servers: list[tuple[ProbeCounter, RunningServer, meshlib.Mesh]], **prequal: Any) -> Path:
    endpoints = [{"address": server.address} for _, server, _ in servers]
    docs: list[dict[str, Any]] = [
        {"kind": "Endpoints", "service": "orders", "endpoints": endpoints},
        {"kind": "Destination", "service": "orders", "load_balancer": "prequal"}
        | ({"prequal": prequal} if prequal else {}),
    ]
    return write_rules(tmp_path / "mesh.yaml", docs)


async def offered(client: httpx.AsyncClient, seconds: float, width: int) -> Counter[str]:
    """`width` callers sending back to back for `seconds`: who answered how often."""
    end = time.monotonic() + seconds
    counts: Counter[str] = Counter()

    async def caller() -> None:
        while time.monotonic() < end:
            r = await client.get(URL)
            r.raise_for_status()
            counts[r.text] += 1

    await asyncio.gather(*(caller() for _ in range(width)))
    return counts


def test_the_slower_server_gets_less(tmp_path: Path, servers: list[Any]) -> None:
    """Six callers against capacities 4 and 1: an even split would queue three deep at the slow
    one. prequal sees its requests in flight and latency and sends it clearly less than half."""
    mesh = meshlib.Mesh("checkout", config=rules(tmp_path, servers))

    async def run() -> Counter[str]:
        async with mesh.client() as client:
            await offered(client, 0.3, 6)  # the pool fills
            return await offered(client, 1.5, 6)

    try:
        counts = asyncio.run(run())
        sent = mesh.stats.counter("probes_sent", "orders")
    finally:
        mesh.close()
    total = counts["fast"] + counts["slow"]
    assert total > 300
    assert counts["slow"] / total < 0.3  # capacity share 0.2; an even split is 0.5
    assert sent > 50  # it did probe (and the picks used the answers: the split above)


def test_probes_keep_to_their_rate(tmp_path: Path, servers: list[Any]) -> None:
    """Hundreds of picks a second ask for a probe each; the destination's `max_probe_rate` (20 a
    second) is what reaches the servers, counted there."""
    mesh = meshlib.Mesh("checkout", config=rules(tmp_path, servers, max_probe_rate=20))
    started = time.monotonic()

    async def run() -> Counter[str]:
        async with mesh.client() as client:
            return await offered(client, 1.0, 4)

    try:
        counts = asyncio.run(run())
        elapsed = time.monotonic() - started
        time.sleep(0.3)  # let the last probes land (they are bounded, so at most a few)
    finally:
        mesh.close()
    probes = sum(counter.probes for counter, _, _ in servers)
    assert sum(counts.values()) > 150  # far more picks than probes
    assert 10 <= probes <= 2 + 20 * elapsed


def test_a_sync_client_on_threads_is_probed_for_too(tmp_path: Path, servers: list[Any]) -> None:
    mesh = meshlib.Mesh("checkout", config=rules(tmp_path, servers))
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    end = time.monotonic() + 1.5

    def caller(client: httpx.Client) -> None:
        while time.monotonic() < end:
            r = client.get(URL)
            r.raise_for_status()
            with lock:
                counts[r.text] += 1

    try:
        with mesh.sync_client() as client, ThreadPoolExecutor(6) as pool:
            for f in [pool.submit(caller, client) for _ in range(6)]:
                f.result()
        sent = mesh.stats.counter("probes_sent", "orders")
    finally:
        mesh.close()
    total = counts["fast"] + counts["slow"]
    assert total > 200 and sent > 50
    assert counts["slow"] / total < 0.3
