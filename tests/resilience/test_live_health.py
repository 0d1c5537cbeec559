"""Endpoint health end to end: circuit breakers and outlier ejection through a real Mesh, with
uvicorn backends on 127.0.0.1 that start and stop failing on command.

The unit tests of the breaker and the detector drive them with fake clocks; these check that
their decisions steer real traffic: which server gets requests while an endpoint is open or
ejected, and that it gets them back once it recovers.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import httpx
import pytest

import meshlib
from meshlib.testing import serve
from tests.backend import Backend
from tests.conftest import Fleet, write_rules

URL = "http://orders/whoami"
OUTLIERS = {"consecutive_5xx": 3, "base_ejection": "2s", "max_ejection_percent": 50, "interval": "10s"}
# The breaker alone decides about a one-endpoint pool: no panic mode, and a budget that lets it
# take the whole pool out (outlier ejection itself kept out of the way).
ALONE = {"panic_threshold": 0, "outlier_detection": {"consecutive_5xx": 1000, "max_ejection_percent": 100}}


def start(fleet: Fleet, name: str) -> tuple[Backend, str]:
    backend, server = fleet.start(name, {"name": name})
    return backend, server.address


def rules(tmp_path: Path, addresses: Sequence[str], **dest: object) -> Path:
    docs: list[dict] = [
        {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": a} for a in addresses]},
        {"kind": "Destination", "service": "orders"} | dest,
    ]
    return write_rules(tmp_path / "mesh.yaml", docs)


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll `check` (a function or a coroutine function) until it returns True; the seconds
    that took. Fails after `timeout`."""
    started = time.monotonic()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            break
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def status_or_open(client: httpx.AsyncClient) -> int | str:
    try:
        return (await client.get(URL)).status_code
    except meshlib.CircuitOpenError:
        return "open"


# --------------------------------------------------------------------------------------------
# Circuit breakers


async def test_breaker_opens_half_opens_and_closes(tmp_path: Path, fleet: Fleet) -> None:
    backend, addr = start(fleet, "one")
    backend.fail_status = 503
    # open_for 1 s: the refusal below must come before it (less its jitter) on a loaded machine too
    cfg = rules(tmp_path, [addr], circuit_breaker={"consecutive_failures": 3, "open_for": "1s"}, **ALONE)
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        breakers, stats = mesh.resilience.breakers, mesh.stats
        for _ in range(3):
            assert (await client.get(URL)).status_code == 503
        opened = time.monotonic()
        assert breakers.states() == {addr: "open"}

        t = time.monotonic()
        try:
            await client.get(URL)
        except meshlib.CircuitOpenError as exc:
            refused_in = time.monotonic() - t
            assert "open breaker" in str(exc)
        else:
            raise AssertionError("an open breaker let a request through")
        assert refused_in < 0.4, refused_in  # no wait for the trial (0.5 s at least)
        assert backend.hits == 3  # refused without touching the network

        backend.fail_status = None  # the endpoint recovers

        async def succeeds() -> bool:
            return await status_or_open(client) == 200

        await eventually(succeeds, 3.0, "the half-open trial to succeed")
        reopened_after = time.monotonic() - opened
        # nothing went through before the backoff had passed (open_for less its jitter, at
        # most half); then the one trial did
        assert reopened_after >= 0.49, reopened_after
        assert backend.hits == 3 + 1
        assert breakers.states() == {addr: "closed"}
        assert [await status_or_open(client) for _ in range(5)] == [200] * 5
    assert stats.counter("breaker_open", addr) == 1
    assert stats.counter("breaker_half_open", addr) == 1
    assert stats.counter("breaker_closed", addr) == 1


async def test_failed_trial_opens_the_breaker_again(tmp_path: Path, fleet: Fleet) -> None:
    backend, addr = start(fleet, "one")
    backend.fail_status = 503
    # open_for 1 s: the third request and the one after the trial must come within it (less its
    # jitter) on a loaded machine too; 200 ms left a stalled test thread 100 ms
    cfg = rules(tmp_path, [addr], circuit_breaker={"consecutive_failures": 2, "open_for": "1s"}, **ALONE)
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        assert [await status_or_open(client) for _ in range(3)] == [503, 503, "open"]

        async def trial_sent() -> bool:
            return await status_or_open(client) == 503

        await eventually(trial_sent, 3.0, "a half-open trial")
        assert backend.hits == 3
        # the trial failed: open again for a fresh open_for, not closed and not half-open
        assert mesh.resilience.breakers.states() == {addr: "open"}
        assert await status_or_open(client) == "open"
    assert mesh.stats.counter("breaker_open", addr) == 2
    assert mesh.stats.counter("breaker_closed", addr) == 0


def test_balancer_skips_an_endpoint_with_an_open_breaker(tmp_path: Path, fleet: Fleet) -> None:
    bad, bad_addr = start(fleet, "bad")
    _, good_addr = start(fleet, "good")
    bad.fail_status = 503
    cfg = rules(
        tmp_path,
        [bad_addr, good_addr],
        circuit_breaker={"consecutive_failures": 2, "open_for": "30s", "backoff": {"base": "30s"}},
    )
    with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.sync_client() as client:
        breakers = mesh.resilience.breakers
        before = []
        while breakers.states().get(bad_addr) != "open":
            before.append(client.get(URL).status_code)
            assert len(before) < 20, before
        assert before.count(503) == 2  # no retries here: the two failures reached the caller
        hits = bad.hits
        statuses = [client.get(URL).status_code for _ in range(50)]
    assert statuses == [200] * 50
    assert bad.hits == hits
    assert breakers.states() == {bad_addr: "open", good_addr: "closed"}


async def test_breaker_under_concurrency(tmp_path: Path, fleet: Fleet) -> None:
    backend, addr = start(fleet, "one")
    backend.fail_status = 503
    breaker = {"consecutive_failures": 5, "open_for": "30s", "backoff": {"base": "30s"}}  # no probe here
    cfg = rules(tmp_path, [addr], circuit_breaker=breaker, **ALONE)
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:

        async def burst() -> list[int | str]:
            t = time.monotonic()
            results = await asyncio.wait_for(
                asyncio.gather(*(status_or_open(client) for _ in range(50))), timeout=10
            )
            assert time.monotonic() - t < 5
            return results

        first = await burst()
        assert set(first) <= {503, "open"}
        assert first.count(503) >= 5  # it took five failures to open it
        assert backend.hits == first.count(503)  # an "open" never reached the server
        assert mesh.resilience.breakers.states() == {addr: "open"}

        hits = backend.hits
        t = time.monotonic()
        second = await burst()
        assert time.monotonic() - t < 2.0  # no request waited on anything (hits: none sent)
        assert second == ["open"] * 50
        assert backend.hits == hits
    # late failures of requests let through before it opened did not open it "again"
    assert mesh.stats.counter("breaker_open", addr) == 1


class Gated:
    """`/ok?gate=G` answers 200 and `/fail?gate=G` answers 503, each once the test has opened gate
    G: the order of the answers is the test's, not a race of timers on a loaded machine."""

    def __init__(self) -> None:
        self.hits = 0
        self.opened: set[str] = set()

    async def __call__(self, scope: dict, receive: object, send: Callable) -> None:
        if scope["type"] != "http":
            return
        self.hits += 1
        gate = scope["query_string"].decode().partition("gate=")[2]
        while gate and gate not in self.opened:
            await asyncio.sleep(0.005)
        status = 200 if scope["path"] == "/ok" else 503
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


async def test_request_from_before_the_breaker_opened_is_not_the_trial(tmp_path: Path) -> None:
    app = Gated()
    with serve(app) as server:
        addr = server.address
        cfg = rules(
            tmp_path, [addr], circuit_breaker={"consecutive_failures": 2, "open_for": "200ms"}, **ALONE
        )
        async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
            breakers = mesh.resilience.breakers
            # admitted while closed, answers (a success) long after the breaker has opened
            straggler = asyncio.create_task(client.get("http://orders/ok?gate=straggler"))
            await eventually(lambda: app.hits == 1, 2.0, "the slow request to arrive")
            assert [(await client.get("http://orders/fail")).status_code for _ in range(2)] == [503, 503]
            assert breakers.states() == {addr: "open"}
            breaker = breakers.peek(addr)
            assert breaker is not None
            await eventually(breaker.available, 2.0, "open_for to pass")
            # the trial: it will fail, after the straggler has succeeded
            trial = asyncio.create_task(client.get("http://orders/fail?gate=trial"))
            await eventually(lambda: breakers.states()[addr] == "half-open", 2.0, "the trial")
            await eventually(lambda: app.hits == 4, 2.0, "the trial to arrive")
            app.opened.add("straggler")
            assert (await straggler).status_code == 200
            # the straggler's success says nothing about the endpoint now: still waiting for the trial
            assert breakers.states() == {addr: "half-open"}
            app.opened.add("trial")
            assert (await trial).status_code == 503
            assert breakers.states() == {addr: "open"}
            with pytest.raises(meshlib.CircuitOpenError):
                await client.get("http://orders/ok")


async def test_callers_cancelling_does_not_open_the_breaker(tmp_path: Path, fleet: Fleet) -> None:
    backend, addr = start(fleet, "slow-but-fine")
    backend.delay = 0.3
    cfg = rules(
        tmp_path,
        [addr],
        circuit_breaker={"consecutive_failures": 3, "open_for": "30s"},
        outlier_detection=OUTLIERS,
    )
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        for _ in range(3):  # the caller's own patience runs out; the endpoint did nothing wrong
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.get(URL), 0.05)
        assert mesh.resilience.breakers.states() == {addr: "closed"}
        assert mesh.stats.counter("ejections", "orders") == 0
        assert (await client.get(URL)).status_code == 200


# --------------------------------------------------------------------------------------------
# Outlier detection


async def test_outlier_is_ejected_and_returns(tmp_path: Path, fleet: Fleet) -> None:
    bad, bad_addr = start(fleet, "bad")
    goods = [start(fleet, name) for name in ("good-1", "good-2")]
    bad.fail_status = 503
    cfg = rules(tmp_path, [bad_addr, *(a for _, a in goods)], outlier_detection=OUTLIERS)
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        spec = mesh.snapshot.plans["orders"].destination.outlier_detection
        detector = mesh.resilience.detector("orders", spec)

        async def ejected() -> bool:
            await client.get(URL)
            return mesh.stats.counter("ejections", "orders") >= 1

        await eventually(ejected, 5.0, "the failing endpoint to be ejected")
        since = time.monotonic()
        assert bad.hits == 3  # three 5xx in a row
        assert detector.ejected_addresses() == {bad_addr}

        statuses = await asyncio.gather(*((client.get(URL)) for _ in range(60)))
        assert [r.status_code for r in statuses] == [200] * 60
        assert bad.hits == 3
        # still ejected now, so none of the 60 could have gone to it
        assert detector.ejected(bad_addr), time.monotonic() - since

        bad.fail_status = None

        async def back() -> bool:
            await client.get(URL)
            return bad.hits > 3

        await eventually(back, 3.0, "the ejected endpoint to get traffic again")
        returned_after = time.monotonic() - since
        assert returned_after >= 1.9, returned_after  # not before base_ejection (2 s)
        assert detector.ejected_addresses() == frozenset()
        counts = [b.hits for b in (bad, *(g for g, _ in goods))]
        before = counts[:]
        await asyncio.gather(*(client.get(URL) for _ in range(30)))
        counts = [b.hits - n for b, n in zip((bad, *(g for g, _ in goods)), before, strict=True)]
    # back in the rotation with an equal share (round robin may give it one pick to catch up)
    assert all(9 <= n <= 11 for n in counts), counts
    assert mesh.stats.counter("ejections", "orders") == 1


async def test_max_ejection_percent_keeps_half_in_service(tmp_path: Path, fleet: Fleet) -> None:
    started = [start(fleet, name) for name in ("a", "b")]
    for backend, _ in started:
        backend.fail_status = 503
    outliers = OUTLIERS | {"base_ejection": "30s"}
    cfg = rules(tmp_path, [a for _, a in started], outlier_detection=outliers)
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        spec = mesh.snapshot.plans["orders"].destination.outlier_detection
        detector = mesh.resilience.detector("orders", spec)
        statuses = [(await client.get(URL)).status_code for _ in range(30)]
        ejected = detector.ejected_addresses()
        hits = [b.hits for b, _ in started]
        more = [(await client.get(URL)).status_code for _ in range(10)]
    assert statuses == [503] * 30 and more == [503] * 10  # the service still gets its traffic
    assert len(ejected) == 1  # both fail, but 50% of two endpoints is one
    assert mesh.stats.counter("ejections", "orders") == 1
    survivor = next(i for i, (_, a) in enumerate(started) if a not in ejected)
    assert started[survivor][0].hits == hits[survivor] + 10
    assert started[1 - survivor][0].hits == hits[1 - survivor]
