"""Adaptive concurrency end to end: uvicorn servers with a known capacity (a semaphore of
`CAPACITY` slots, `SERVICE_S` of work in each) offered twice what they can serve.

Server side (a ConcurrencyLimit document in the ASGI middleware): the limit settles near the
capacity, admitted requests keep a latency near the unloaded one, the excess gets 503 with
retry-after, and a caller class keeps its guaranteed share. Client side (a Destination's
adaptive_concurrency): the excess fails fast with ConcurrencyLimitedError.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from werkzeug.serving import make_server

import meshlib
from meshlib.asgi import MeshMiddleware
from meshlib.testing import RunningServer, serve
from meshlib.wsgi import MeshMiddleware as WsgiMesh
from tests.conftest import wait_until, write_rules

CAPACITY = 8
SERVICE_S = 0.2  # the server does CAPACITY requests at a time, 200 ms each: 40 a second at most
OFFERED = 2 * CAPACITY / SERVICE_S  # requests a second: twice what the server can do
RUN_S = 4.0
SETTLED_S = 2.5  # figures are taken after this (the limit has found its level)


class Capacity:
    """An ASGI app that serves `CAPACITY` requests at a time; the others wait their turn (the
    queue a limit exists to keep short)."""

    def __init__(self) -> None:
        self.slots: asyncio.Semaphore | None = None
        self.served = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if self.slots is None:
            self.slots = asyncio.Semaphore(CAPACITY)
        async with self.slots:
            await asyncio.sleep(SERVICE_S)
        self.served += 1
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


@dataclass
class Outcomes:
    """What the callers saw after the limit settled: latencies of admitted requests, refusals."""

    ok: list[float] = field(default_factory=list)
    refused: list[httpx.Response] = field(default_factory=list)
    refused_fast: list[float] = field(default_factory=list)


async def drive(
    send: Any, rates: dict[str, float], groups: dict[str, Outcomes], run_s: float = RUN_S
) -> None:
    """Open-loop callers: requests of each group arrive at `rates[group]` a second (evenly,
    whatever happens to the earlier ones, as independent users do); `send(group)` makes one
    call and returns the response, or raises."""
    start = time.monotonic()
    end = start + run_s
    calls: list[asyncio.Task[None]] = []

    async def call(group: str, due: float) -> None:
        out = groups[group]
        sent = time.monotonic()  # not `due`: a loop that fell behind is the test's delay, not the server's
        try:
            response = await send(group)
        except meshlib.ConcurrencyLimitedError:
            if due - start > SETTLED_S:
                out.refused_fast.append(time.monotonic() - sent)
            return
        if due - start <= SETTLED_S:
            return
        if response.status_code == 200:
            out.ok.append(time.monotonic() - sent)
        else:
            out.refused.append(response)

    due = dict.fromkeys(rates, start)
    while (now := time.monotonic()) < end:
        for group, rate in rates.items():
            while due[group] <= now:
                calls.append(asyncio.ensure_future(call(group, due[group])))
                due[group] += 1.0 / rate
        await asyncio.sleep(min(due.values()) - now)
    await asyncio.gather(*calls)


def check_latency(admitted: list[float]) -> None:
    """Admitted requests stay near the unloaded 200 ms. Unlimited, the queue would grow by 40
    requests a second: 2.5 to 4 s of waiting (12 to 20 times) while figures are taken. The
    bounds leave room for a machine whose other work delays this process's event loops (the
    median, 1.5-2x on a quiet one, is the steadier figure; the limit keeps a queue of a few on
    purpose, and Vegas, which moves on every request, swings wider)."""
    median, p90 = statistics.median(admitted), statistics.quantiles(admitted, n=10)[-1]
    assert median < 2.5 * SERVICE_S and p90 < 5 * SERVICE_S, (median, p90)


@pytest.fixture
def limited(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[meshlib.Mesh, RunningServer]]:
    doc = {"kind": "ConcurrencyLimit", "service": "orders", "min_limit": 2, "max_limit": 200} | request.param
    orders = meshlib.Mesh("orders", config=write_rules(tmp_path / "orders.yaml", [doc]))
    app = MeshMiddleware(Capacity(), mesh=orders)
    try:
        with serve(app) as server:
            yield orders, server
    finally:
        orders.close()


# minRTT measured over 8 requests 4 at a time (0.4 s), then the limit recomputed every 500 ms:
# well above the latency (a shorter interval judges a limit by requests admitted under the one
# before, and overshoots)
GRADIENT = {
    "algorithm": "gradient",
    "gradient": {"interval": "500ms", "min_rtt": {"requests": 8, "concurrency": 4}},
}
# vegas re-probes its no-load latency every probe_multiplier x limit requests (jittered) by taking
# the latency of that moment, queue included (Netflix's design): the limit then climbs for a while
# (to 20-33 here, in about one run of ten). Too rare for a 4 s run to show settling back: kept out
VEGAS = {"algorithm": "vegas", "initial_limit": 4, "vegas": {"probe_multiplier": 1000}}
# gradient2 judges each 500 ms window against its long average of the windows before; it starts
# at the capacity's half, so what it learns is its own growth, not a fall from the default 20
GRADIENT2 = {"algorithm": "gradient2", "initial_limit": 4, "gradient2": {"window": "500ms"}}


@pytest.mark.parametrize(
    "limited", [GRADIENT, VEGAS, GRADIENT2], ids=["gradient", "vegas", "gradient2"], indirect=True
)
async def test_server_limit_settles_near_capacity_and_refuses_the_excess(
    limited: tuple[meshlib.Mesh, RunningServer],
) -> None:
    orders, server = limited
    groups = {"checkout": Outcomes()}
    async with httpx.AsyncClient(
        base_url=f"http://{server.address}", timeout=10, limits=httpx.Limits()
    ) as http:
        await drive(lambda g: http.get("/", headers={"x-mesh-source": g}), {"checkout": OFFERED}, groups)
    out = groups["checkout"]
    limiter = orders.resilience.concurrency_limits()[0][2]
    # near the capacity: the server's 8 and a queue of a few that keeps it busy (less when this
    # machine's other work slows the server down: the goodput below says it is not too low)
    assert CAPACITY / 2 <= limiter.current <= 3 * CAPACITY, limiter.current
    check_latency(out.ok)
    # the server stays busy: at least 60% of its capacity is used (more on a quiet machine)
    goodput = len(out.ok) / (RUN_S - SETTLED_S)
    assert goodput >= 0.6 * CAPACITY / SERVICE_S, goodput
    # the excess: 503 with retry-after, counted
    assert out.refused and all(r.status_code == 503 for r in out.refused)
    assert all(r.headers["retry-after"] == "1" and r.text == "overloaded" for r in out.refused)
    assert orders.stats.counter("concurrency_limited", "orders") >= len(out.refused)


@pytest.mark.parametrize("limited", [GRADIENT | {"partition_by": "source", "partitions": {"gold": 0.8}}],
                         ids=["gold-80%"], indirect=True)  # fmt: skip
async def test_server_limit_keeps_a_caller_class_its_share(
    limited: tuple[meshlib.Mesh, RunningServer],
) -> None:
    orders, server = limited
    groups = {"gold": Outcomes(), "bronze": Outcomes()}
    async with httpx.AsyncClient(
        base_url=f"http://{server.address}", timeout=10, limits=httpx.Limits()
    ) as http:
        # a quarter of the requests are gold: what they need in flight is within their 80% of the limit
        rates = {"gold": OFFERED / 4, "bronze": OFFERED * 3 / 4}
        await drive(lambda g: http.get("/", headers={"x-mesh-source": g}), rates, groups)
    refused = {g: len(o.refused) / (len(o.refused) + len(o.ok)) for g, o in groups.items()}
    # without shares both would be refused alike (half of all requests are over the capacity)
    assert refused["bronze"] > 0.4, refused
    assert refused["gold"] < refused["bronze"] / 2, refused
    assert orders.resilience.concurrency_limits()[0][2].partition_in_flight("gold") == 0  # all handed back


async def test_client_limit_fails_the_excess_fast(tmp_path: Path) -> None:
    app = Capacity()
    with serve(app) as server:
        docs = [
            {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": server.address}]},
            {
                "kind": "Destination",
                "service": "orders",
                "adaptive_concurrency": {"min_limit": 2, "max_limit": 200} | GRADIENT,
            },
        ]
        cfg = write_rules(tmp_path / "mesh.yaml", docs)
        async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
            groups = {"checkout": Outcomes()}
            await drive(lambda g: client.get("http://orders/"), {"checkout": OFFERED}, groups)
            limiter = mesh.resilience.concurrency_limits()[0][2]
    out = groups["checkout"]
    assert CAPACITY / 2 <= limiter.current <= 3 * CAPACITY, limiter.current
    check_latency(out.ok)
    assert len(out.ok) / (RUN_S - SETTLED_S) >= 0.6 * CAPACITY / SERVICE_S
    # the excess never reached the server, and failed at once
    assert out.refused_fast and statistics.median(out.refused_fast) < SERVICE_S / 20  # ~0.3 ms: no IO
    assert mesh.stats.counter("concurrency_limited", "orders") >= len(out.refused_fast)
    assert not out.refused


PINNED = {  # the limit starts with its minRTT measurement: pinned to one request at a time
    "kind": "ConcurrencyLimit",
    "service": "orders",
    "min_limit": 1,
    "gradient": {"min_rtt": {"concurrency": 1}},
}


@contextmanager
def held_wsgi(tmp_path: Path, doc: dict) -> Iterator[tuple[meshlib.Mesh, httpx.Client, threading.Event]]:
    """A WSGI app behind the middleware under `doc`, with one request to /hold running in it
    until the event yielded is set; and a client to send more."""
    orders = meshlib.Mesh("orders", config=write_rules(tmp_path / "orders.yaml", [doc]))
    running, release = threading.Event(), threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/hold":
            running.set()
            release.wait(5)
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"ok"]

    srv = make_server("127.0.0.1", 0, WsgiMesh(app, mesh=orders), threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{srv.server_port}", timeout=5) as http:
            held = threading.Thread(target=http.get, args=("/hold",))
            held.start()
            assert running.wait(5)
            try:
                yield orders, http, release
            finally:
                release.set()
                held.join(5)
    finally:
        srv.shutdown()
        orders.close()


def test_wsgi_middleware_applies_the_limit(tmp_path: Path) -> None:
    """The same sequence behind WSGI: a limit pinned to one request refuses a second one while
    the first runs, and takes it once the first is done."""
    with held_wsgi(tmp_path, PINNED) as (orders, http, release):
        refused = http.get("/")
        release.set()
        wait_until(lambda: orders.resilience.concurrency_limits()[0][2].in_flight == 0, 5, "the slot back")
        assert http.get("/").status_code == 200
    assert (refused.status_code, refused.headers["retry-after"], refused.text) == (503, "1", "overloaded")
    assert orders.stats.counter("concurrency_limited", "orders") == 1


def test_a_header_names_the_caller_class(tmp_path: Path) -> None:
    """partition_by a header: a class under its share gets in past the (pinned) limit; a request
    of no class, or of a class at its share, does not."""
    doc = PINNED | {"partition_by": "header:X-Class", "partitions": {"gold": 1.0}}
    with held_wsgi(tmp_path, doc) as (orders, http, _):  # /hold, of no class, has the slot
        assert http.get("/", headers={"x-class": "bronze"}).status_code == 503
        assert http.get("/").status_code == 503
        gold = http.get("/", headers={"x-class": "gold"})  # its share: ceil(1.0 x 1) = 1 request
        assert gold.status_code == 200
    assert orders.stats.counter("concurrency_limited", "orders") == 2
