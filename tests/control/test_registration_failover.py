"""A registration's heartbeats against replicas that go silent or whose store refuses changes:
stub control services on 127.0.0.1 that answer the registry API the way the test says (ok, a
503 with Retry-After, or nothing at all), so the timing of a move is the registration's alone."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from meshlib.control.endpoints import ControlEndpoints
from meshlib.control.registration import Registration, beat_timeout
from meshlib.testing import RunningServer, serve
from tests.conftest import wait_until


@dataclass
class Heard:
    method: str
    instance: str | None
    at: float  # monotonic, when answered (or, for one never answered, when it came)


@dataclass
class StubReplica:
    """The registry API of one replica. `mode`: "ok" answers, "busy" answers a heartbeat 503
    with Retry-After as a replica whose etcd is out of reach does, "silent" never answers (a
    machine gone, a process stopped: the connection stays open)."""

    mode: str = "ok"
    heard: list[Heard] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    server: RunningServer | None = None

    def start(self) -> StubReplica:
        self.server = serve(
            Starlette(
                routes=[
                    Route("/v1/registry/{service}", self._register, methods=["POST"]),
                    Route("/v1/registry/{service}/{id}", self._beat, methods=["PUT", "DELETE"]),
                ]
            )
        )
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def beats(self) -> list[Heard]:
        return [h for h in self.heard if h.method == "PUT"]

    async def _register(self, request: Request) -> Response:
        body = await request.json()
        self.heard.append(Heard("POST", None, time.monotonic()))
        return JSONResponse({"id": "i-1", "ttl": body["ttl"]}, 201)

    async def _beat(self, request: Request) -> Response:
        instance = request.path_params["id"]
        if request.method == "DELETE":
            self.heard.append(Heard("DELETE", instance, time.monotonic()))
            return Response(status_code=204)
        if self.mode == "silent":
            self.heard.append(Heard("PUT-unanswered", instance, time.monotonic()))
            await asyncio.to_thread(self.release.wait)
            return Response(status_code=503)
        self.heard.append(Heard("PUT", instance, time.monotonic()))
        if self.mode == "busy":
            return JSONResponse(
                {"error": "the registry's store (etcd) is not reachable; try again"},
                503,
                headers={"Retry-After": "1"},
            )
        return JSONResponse({"id": instance, "ttl": 3})

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.stop()


@pytest.fixture
def stubs() -> Iterator[tuple[StubReplica, StubReplica]]:
    a, b = StubReplica().start(), StubReplica().start()
    yield a, b
    for s in (a, b):
        s.stop()


def test_a_heartbeat_waits_a_third_of_the_ttl_within_bounds() -> None:
    assert beat_timeout(3) == 1.0 and beat_timeout(6) == 2.0
    assert beat_timeout(1) == 1.0  # a floor: a request over a network is not answered in 0.33 s
    assert beat_timeout(10) == pytest.approx(10 / 3) and beat_timeout(3600) == 5.0


async def test_a_silent_replica_is_left_within_the_lease_and_the_id_is_kept(
    stubs: tuple[StubReplica, StubReplica],
) -> None:
    """ttl=3: the heartbeat to a replica gone silent gives up after a second, not after the
    client's 5 s timeout, so the next replica gets a heartbeat of the same id before the lease
    (3 s after the last heartbeat that landed) runs out: callers never lose the instance, and
    its id (breaker, ejection) stays."""
    a, b = stubs
    endpoints = ControlEndpoints([a.url, b.url], spread=False)
    registration = Registration(endpoints, "orders", "127.0.0.1:9001", ttl=3)
    task = asyncio.create_task(registration.run())
    try:
        await asyncio.wait_for(registration.registered.wait(), 5)
        await asyncio.to_thread(wait_until, lambda: len(a.beats()) >= 1, 5.0, "a heartbeat on A")
        a.mode = "silent"
        last = a.beats()[-1].at
        await asyncio.to_thread(wait_until, lambda: bool(b.beats()), 10.0, "a heartbeat on B")
        first = b.beats()[0]
        assert first.instance == "i-1"
        assert not [h for h in b.heard if h.method == "POST"]  # not registered anew
        assert first.at - last < registration.ttl, f"{first.at - last:.2f}s without a heartbeat landing"
        assert registration.url == b.url and endpoints.switches == 1
    finally:
        registration.stop()
        await asyncio.wait_for(task, 10)


async def test_a_503_with_retry_after_keeps_the_replica_and_warns_once(
    stubs: tuple[StubReplica, StubReplica], caplog: pytest.LogCaptureFixture
) -> None:
    """The replica in use answers heartbeats 503 with Retry-After (its etcd is out of reach): it
    is up, the watch on it is fine, so the process stays (no move, nothing told to the watch),
    says so once, and keeps the lease through another replica without moving there."""
    caplog.set_level(logging.DEBUG, logger="meshlib.control")
    a, b = stubs
    endpoints = ControlEndpoints([a.url, b.url], spread=False)
    moves: list[str] = []
    endpoints.on_move(lambda: moves.append(endpoints.current))
    registration = Registration(endpoints, "orders", "127.0.0.1:9001", ttl=1.5)
    task = asyncio.create_task(registration.run())
    try:
        await asyncio.wait_for(registration.registered.wait(), 5)
        a.mode = "busy"
        await asyncio.to_thread(wait_until, lambda: len(b.beats()) >= 2, 10.0, "two heartbeats sent to B")
        assert registration.url == a.url and endpoints.switches == 0 and moves == []
        await asyncio.to_thread(wait_until, lambda: len(a.beats()) >= 4, 10.0, "A asked again")
        assert {h.instance for h in b.beats()} == {"i-1"} and registration.instance_id == "i-1"
        assert endpoints.failures == 0 and not endpoints.outage.down
        a.mode = "ok"
        beats = len(a.beats())
        await asyncio.to_thread(wait_until, lambda: "again after" in caplog.text, 10.0, "a beat landing on A")
        assert len(a.beats()) > beats and registration.url == a.url
    finally:
        registration.stop()
        await asyncio.wait_for(task, 10)
    ours = [r for r in caplog.records if r.name == "meshlib.control"]
    warnings = [r.getMessage() for r in ours if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"registry at {a.url} cannot take orders" in warnings[0], warnings
    assert not [r for r in ours if "switching" in r.getMessage() or "unreachable" in r.getMessage()]
    info = [r.getMessage() for r in ours if r.levelno == logging.INFO]
    assert len([m for m in info if "landed on" in m]) == 1, info  # the heartbeats sent elsewhere: once
