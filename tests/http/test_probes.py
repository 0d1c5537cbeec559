"""The HTTP prober against real uvicorn servers on 127.0.0.1 answering the probe format.

The servers here are a bare ASGI app around a `ServerLoad` (the figures a meshed server
answers with); the middleware's own answer is tested in tests/test_middleware_probe.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

import meshlib
from meshlib.balancing.prequal import PrequalOptions, ProbePool
from meshlib.balancing.probe_budget import ProbeBudget
from meshlib.endpoint import Endpoint
from meshlib.http.probes import HttpProber
from meshlib.probing import PROBE_PATH, answer
from meshlib.server_load import ServerLoad
from meshlib.testing import RunningServer, bind, serve
from tests.conftest import wait_until


class ProbeServer:
    """Answers probes with its `load` (plus `extra_rif`), after `delay`, or with `status`."""

    def __init__(self) -> None:
        self.load = ServerLoad()
        self.delay = 0.0
        self.status = 200
        self.peers: list[Any] = []  # the client address of each probe: a new one per connection
        self.paths: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.paths.append(scope["path"])
        self.peers.append(tuple(scope["client"]))
        if self.delay:
            await asyncio.sleep(self.delay)
        headers = [(k.encode(), v.encode()) for k, v in answer(self.load)] if self.status == 200 else []
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
def probed() -> Iterator[tuple[ProbeServer, RunningServer]]:
    app = ProbeServer()
    server = serve(app)
    yield app, server
    server.stop()


@pytest.fixture
def mesh() -> Iterator[meshlib.Mesh]:
    m = meshlib.Mesh("caller")
    yield m
    m.close()


def endpoint(server: RunningServer) -> Endpoint:
    return Endpoint(server.address)


def test_an_answer_reaches_the_pool_and_the_connection_is_kept(
    mesh: meshlib.Mesh, probed: tuple[ProbeServer, RunningServer]
) -> None:
    app, server = probed
    for _ in range(3):  # three requests in flight, one of them done at 20 ms with three in flight
        app.load.begin()
    started = app.load.begin()
    app.load.end(started - 0.020)
    # rates no loop here can reach: a probe answered before this thread polls once may be
    # followed by the next within a millisecond, which the default rates would refuse
    prober = HttpProber(mesh, ProbeBudget(max_rate=1e9))
    pool = ProbePool("orders")
    options = PrequalOptions(max_probe_rate=1e9)
    ep = endpoint(server)
    for n in range(1, 4):
        prober.probe(pool, [ep], options)
        wait_until(lambda n=n: pool.sent == n and not pool.pending, 5.0, "a probe answered")  # type: ignore[misc]
    (probe,) = pool.probes()
    assert (probe.address, probe.rif) == (server.address, 3)
    # the server's 20 ms, plus what the machine took between begin() and end() above: a thread
    # switch there may take more than the 5 ms the bound once allowed
    assert 0.019 <= probe.latency < 0.07, probe.latency
    assert app.paths == [PROBE_PATH] * 3
    assert len(set(app.peers)) == 1  # one connection, reused by every probe
    assert mesh.stats.counter("probes_sent", "orders") == 3
    assert mesh.stats.counter("probes_failed", "orders") == 0


def test_probes_to_one_destination_keep_to_their_rate(
    mesh: meshlib.Mesh, probed: tuple[ProbeServer, RunningServer]
) -> None:
    app, server = probed
    prober = HttpProber(mesh)
    pool = ProbePool("orders")
    options = PrequalOptions(max_probe_rate=20.0)
    ep = endpoint(server)
    start = time.monotonic()
    while time.monotonic() - start < 0.5:  # a pick every millisecond asks for a probe
        prober.probe(pool, [ep], options)
        time.sleep(0.001)
    elapsed = time.monotonic() - start
    wait_until(lambda: not pool.pending, 5.0, "the last probe")
    assert 5 <= pool.sent <= 2 + 20 * elapsed  # a burst of two, then twenty a second
    assert len(app.paths) == pool.sent


def test_one_probe_at_a_time_per_endpoint(
    mesh: meshlib.Mesh, probed: tuple[ProbeServer, RunningServer]
) -> None:
    app, server = probed
    app.delay = 0.2
    prober = HttpProber(mesh)
    pool = ProbePool("orders")
    ep = endpoint(server)
    for _ in range(10):
        prober.probe(pool, [ep], PrequalOptions(probe_timeout=1.0))
    assert pool.sent == 1
    wait_until(lambda: len(pool) == 1, 5.0, "the answer")


def test_a_slow_an_erroring_and_an_absent_endpoint_fail_their_probes(
    mesh: meshlib.Mesh, probed: tuple[ProbeServer, RunningServer]
) -> None:
    app, server = probed
    prober = HttpProber(mesh)
    pool = ProbePool("orders")
    ep = endpoint(server)
    pool.add(ep.address, 0, 0.001, 16)
    app.delay = 0.3
    prober.probe(pool, [ep], PrequalOptions(probe_timeout=0.05))
    wait_until(lambda: pool.failed == 1, 5.0, "the timeout")
    assert len(pool) == 0  # what it said before is not trusted any more
    app.delay, app.status = 0.0, 500
    prober.probe(pool, [ep], PrequalOptions(max_probe_rate=1000))
    wait_until(lambda: pool.failed == 2, 5.0, "the 500")
    closed = bind("127.0.0.1", 0)
    nobody = Endpoint(f"127.0.0.1:{closed.getsockname()[1]}")
    closed.close()
    prober.probe(pool, [nobody], PrequalOptions())
    wait_until(lambda: pool.failed == 3, 5.0, "the refused connection")
    assert mesh.stats.counter("probes_failed", "orders") == 3
    assert len(pool) == 0 and not pool.pending
