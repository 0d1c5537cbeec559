"""`RateLimit` with `scope: global`: one bucket shared through a real redis-server.

Each test starts its own redis-server (Debian's binary, never the system service) on a free
port of 127.0.0.1, without persistence, and kills it at the end. The live tests run two
instances of one service, each a Mesh with MeshMiddleware over uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import meshlib
from meshlib.asgi import MeshMiddleware
from meshlib.resilience.ratelimit import TokenBucket
from meshlib.resilience.state import ResilienceState
from meshlib.rules import RateLimitDoc
from meshlib.stats import TrafficStats
from meshlib.testing import RunningServer, serve
from tests.clock import Clock
from tests.conftest import write_rules

redis = pytest.importorskip("redis", reason="the redis package (meshlib[redis]) is not installed")

from meshlib.resilience.global_ratelimit import KEY_PREFIX, GlobalTokenBucket, redis_client  # noqa: E402

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
pytestmark = pytest.mark.skipif(
    not Path(REDIS_SERVER).exists(), reason="redis-server is not installed (apt-get install redis-server)"
)

RATE, BURST = 1, 10
"""A token a second: a burst of 30 requests held up by a loaded machine for several seconds
still cannot refill enough to make one bucket look like two (5 a second needed it within 1.5 s)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server process of this test's own, which the test may stop and start again."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.2)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start")
                time.sleep(0.01)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    yield server
    server.stop()


# --------------------------------------------------------------------------------------------
# The Lua bucket against the local one


def test_lua_arithmetic_matches_the_local_bucket(redis_server: RedisServer) -> None:
    clock = Clock(1_000_000.25)
    client = redis_client(redis_server.url, timeout=1)
    rng = random.Random(7)
    for rate, burst in [(5, 10), (100, 2), (0.5, 0), (7, 1)]:
        local = TokenBucket(rate, burst, clock=clock)
        shared = GlobalTokenBucket(client, f"svc-{rate}-{burst}", rate, burst, server_clock=clock)
        for step in range(300):
            n = rng.choice([1, 1, 1, 2, 0.5])
            expected = local.try_acquire(n)
            got = shared.try_acquire(n)
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-9), (rate, burst, step, n)
            clock.advance(rng.choice([0, 0, 0.001, 0.05, 0.2, 1 / rate, 3.0]))
        assert shared.refused == local.refused > 0
        assert not shared.degraded
    client.close()


def test_shared_by_two_clients_on_redis_time(redis_server: RedisServer) -> None:
    a = GlobalTokenBucket(redis_client(redis_server.url, timeout=1), "orders", RATE, BURST)
    b = GlobalTokenBucket(redis_client(redis_server.url, timeout=1), "orders", RATE, BURST)
    t = time.monotonic()
    grants = [(a if i % 2 else b).try_acquire() for i in range(BURST)]
    refusal = a.try_acquire()
    elapsed = time.monotonic() - t
    assert grants == [0.0] * BURST  # a full bucket to start with, taken by both
    # the next token is due 1/rate after the first was taken, less what refilled meanwhile
    assert 1 / RATE - elapsed - 0.01 <= refusal <= 1 / RATE, (refusal, elapsed)
    assert b.try_acquire() > 0  # b sees the same empty bucket
    raw = redis_server.client()
    assert raw.exists(KEY_PREFIX + "orders")
    # idle keys expire: after the time to refill completely (10 s), plus a second
    assert 0 < raw.pttl(KEY_PREFIX + "orders") <= math.ceil(BURST / RATE * 1000) + 1000
    raw.close()
    assert a.try_acquire(BURST + 1) == math.inf  # more than the bucket holds, as locally


def test_script_reloaded_after_redis_forgets_it(redis_server: RedisServer) -> None:
    bucket = GlobalTokenBucket(redis_client(redis_server.url, timeout=1), "orders", RATE, BURST)
    assert bucket.try_acquire() == 0.0
    raw = redis_server.client()
    raw.script_flush()
    assert bucket.try_acquire() == 0.0  # EVALSHA failed with NOSCRIPT: EVAL
    assert not bucket.degraded
    assert BURST - 2 <= float(raw.hget(KEY_PREFIX + "orders", "tokens")) < BURST - 1  # two taken
    raw.close()


def test_global_without_redis_is_local_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="meshlib.server")
    state = ResilienceState(TrafficStats())
    doc = RateLimitDoc(
        kind="RateLimit", service="orders", requests_per_second=RATE, burst=BURST, scope="global"
    )
    limiters = {id(state.limiter(doc)) for _ in range(100)}
    assert len(limiters) == 1
    assert isinstance(state.limiter(doc), TokenBucket)
    warnings = [r for r in caplog.records if "scope: global" in r.getMessage()]
    assert len(warnings) == 1, caplog.records
    assert "per process" in warnings[0].getMessage()


def test_global_with_redis_builds_the_shared_bucket(redis_server: RedisServer) -> None:
    state = ResilienceState(TrafficStats(), redis=redis_server.url)
    doc = RateLimitDoc(
        kind="RateLimit", service="orders", requests_per_second=RATE, burst=BURST, scope="global"
    )
    local = doc.model_copy(update={"scope": "local"})
    assert isinstance(state.limiter(doc), GlobalTokenBucket)
    assert state.limiter(doc) is state.limiter(doc)
    assert isinstance(state.limiter(local), TokenBucket)  # a local document stays local
    state.close()


# --------------------------------------------------------------------------------------------
# Two instances of one service, live


class Instance:
    def __init__(self, mesh: meshlib.Mesh, server: RunningServer) -> None:
        self.mesh = mesh
        self.server = server
        self.hits = 0

    @property
    def url(self) -> str:
        return f"http://{self.server.address}/work"

    def limiter(self) -> TokenBucket | GlobalTokenBucket:
        doc = self.mesh.snapshot.rules.rate_limit("orders")
        assert doc is not None
        return self.mesh.resilience.limiter(doc)


def start_instance(config: Path, url: str | None) -> Instance:
    mesh = meshlib.Mesh("orders", config=config, redis=url)
    instance: Instance

    async def work(request: Request) -> PlainTextResponse:
        instance.hits += 1
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/work", work)])
    app.add_middleware(MeshMiddleware, mesh=mesh)
    instance = Instance(mesh, serve(app))
    return instance


@pytest.fixture
def instances(
    tmp_path: Path, redis_server: RedisServer, request: pytest.FixtureRequest
) -> Iterator[list[Instance]]:
    scope = getattr(request, "param", "global")
    doc = {
        "kind": "RateLimit",
        "service": "orders",
        "requests_per_second": RATE,
        "burst": BURST,
        "scope": scope,
    }
    config = write_rules(tmp_path / "orders.yaml", [doc])
    started = [start_instance(config, redis_server.url) for _ in range(2)]
    yield started
    for i in started:
        i.server.server.should_exit = True
    for i in started:
        i.server.stop()
        i.mesh.close()


async def burst_of(instances: list[Instance], n: int) -> tuple[list[httpx.Response], float]:
    """`n` requests back to back, alternating between the instances (one after the other, not
    all at once: concurrent ones may reach one instance first and leave the other nothing)."""
    async with httpx.AsyncClient(timeout=10) as client:
        t = time.monotonic()
        responses = [await client.get(instances[i % 2].url) for i in range(n)]
        return responses, time.monotonic() - t


def check_refusals(responses: list[httpx.Response]) -> None:
    assert {r.status_code for r in responses} <= {200, 429}, [r.status_code for r in responses]
    assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 429)


async def test_two_instances_share_one_budget(instances: list[Instance]) -> None:
    responses, elapsed = await burst_of(instances, 30)
    ok = sum(r.status_code == 200 for r in responses)
    check_refusals(responses)
    # one bucket of 10 for both, plus what refilled (1/s) while the burst went out
    assert BURST <= ok <= BURST + math.floor(RATE * elapsed), (ok, elapsed)
    assert elapsed < 8, f"the burst took {elapsed:.2f}s: too slow to tell one bucket from two"
    assert sum(i.hits for i in instances) == ok
    assert all(i.hits > 0 for i in instances)  # both instances took from the shared bucket
    refused = sum(i.mesh.stats.counter("rate_limited", "orders") for i in instances)
    assert refused == 30 - ok
    assert all(isinstance(i.limiter(), GlobalTokenBucket) for i in instances)
    assert all(i.mesh.stats.counter("ratelimit_fallback", "orders") == 0 for i in instances)


@pytest.mark.parametrize("instances", ["local"], indirect=True)
async def test_local_scope_gives_each_instance_its_bucket(instances: list[Instance]) -> None:
    responses, elapsed = await burst_of(instances, 30)
    ok = sum(r.status_code == 200 for r in responses)
    check_refusals(responses)
    # 15 requests to each instance, each with a bucket of 10 of its own: about twice as many
    assert 2 * BURST <= ok <= 2 * (BURST + math.floor(RATE * elapsed)), (ok, elapsed)
    assert all(10 <= i.hits <= 15 for i in instances), [i.hits for i in instances]


async def test_redis_down_fails_open_then_recovers(
    instances: list[Instance], redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshlib.server")
    async with httpx.AsyncClient(timeout=10) as client:
        for i in range(4):
            assert (await client.get(instances[i % 2].url)).status_code == 200
        assert all(not i.limiter().degraded for i in instances)  # type: ignore[union-attr]

        redis_server.stop()  # mid-run
        t = time.monotonic()
        statuses = [(await client.get(instances[i % 2].url)).status_code for i in range(40)]
        elapsed = time.monotonic() - t
        assert set(statuses) <= {200, 429}, statuses  # served (or limited), never a 5xx
        assert 200 in statuses
        assert all(i.limiter().degraded for i in instances)  # type: ignore[union-attr]
        fallback = [i.mesh.stats.counter("ratelimit_fallback", "orders") for i in instances]
        assert all(f > 0 for f in fallback), fallback
        assert sum(fallback) >= 30  # Redis is not asked on every request while it is down
        # the fallback is the per-process bucket, full at first: 20 requests each, 10 + refill pass
        ok = statuses.count(200)
        assert 2 * BURST <= ok <= 2 * (BURST + math.floor(RATE * elapsed)), (ok, elapsed)
        assert all(i.limiter().errors == 1 for i in instances)  # type: ignore[union-attr]

        async def retried() -> bool:  # Redis tried again after the backoff, and still down
            for i in range(2):
                assert (await client.get(instances[i].url)).status_code in (200, 429)
            return all(i.limiter().errors >= 2 for i in instances)  # type: ignore[union-attr]

        deadline = time.monotonic() + 10
        while not await retried():
            assert time.monotonic() < deadline, "Redis was never tried again"
            await asyncio.sleep(0.05)
        down = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
        assert len(down) == 2, [r.getMessage() for r in caplog.records]  # once per instance
        assert all(r.levelno == logging.WARNING for r in down)

        redis_server.start()  # an empty Redis on the same port

        async def recovered() -> bool:
            for i in range(2):
                await client.get(instances[i].url)
            return all(not i.limiter().degraded for i in instances)  # type: ignore[union-attr]

        deadline = time.monotonic() + 10
        while not await recovered():
            assert time.monotonic() < deadline, "the instances never went back to Redis"
            await asyncio.sleep(0.05)
        back = [r for r in caplog.records if "Redis is back" in r.getMessage()]
        assert len(back) == 2, [r.getMessage() for r in caplog.records]
        assert len([r for r in caplog.records if "Redis unavailable" in r.getMessage()]) == 2

    fallback = [i.mesh.stats.counter("ratelimit_fallback", "orders") for i in instances]
    raw = redis_server.client()
    assert raw.exists(KEY_PREFIX + "orders")
    raw.close()
    # global again: one bucket for both (at most 10 + refill of 30), and no fallback
    responses, elapsed = await burst_of(instances, 30)
    ok = sum(r.status_code == 200 for r in responses)
    check_refusals(responses)
    assert ok <= BURST + math.floor(RATE * elapsed), (ok, elapsed)
    assert elapsed < 8, elapsed  # two buckets would pass 20
    assert [i.mesh.stats.counter("ratelimit_fallback", "orders") for i in instances] == fallback
