"""Retry and hedge decisions without IO, on a clock moved by hand.

The live tests (test_live_retry.py, test_live_hedge.py) show the drivers send, sleep and race;
these pin down what `RetryDecision` and `Race` decide in the cases a live test cannot time
reliably: an outcome exactly at the deadline, a budget that runs out mid-call, a backoff that
would outlast the deadline, an original that fails after its copy was sent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.pipeline import Call
from meshlib.resilience.budget import RetryBudget
from meshlib.resilience.classify import Failure
from meshlib.resilience.hedge import Race
from meshlib.resilience.ratelimit import TokenBucket
from meshlib.resilience.retry import RetryDecision
from meshlib.routing import CompiledRoute
from meshlib.rules import RouteRule
from meshlib.stats import TrafficStats
from tests.clock import Clock
from tests.conftest import wait_until


class Reply:
    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.status, self.headers = status, headers or {}

    def __repr__(self) -> str:
        return f"Reply({self.status})"


class Wire:
    """What the decisions read of a protocol: status, a header, failure kinds, body size."""

    def status(self, response: Reply) -> int:
        return response.status

    def header(self, response: Reply, name: str) -> str | None:
        return response.headers.get(name)

    def failure_kind(self, error: BaseException) -> Failure | None:
        return Failure.CONNECT if isinstance(error, ConnectionRefusedError) else None

    def body_size(self, request: Any) -> int | None:
        return 0

    def idempotent(self, call: Call, concurrent: bool = False) -> bool:
        return call.method in ("GET", "PUT", "DELETE")

    def condition(self, response: Reply) -> str | None:
        return None

    def copy_request(self, request: Any) -> Any:
        return SimpleNamespace(headers={})


def route(**rule: Any) -> CompiledRoute:
    return CompiledRoute(RouteRule.model_validate({"name": "r", **rule}), 0)


def make_call(clock: Clock, *, method: str = "GET", timeout: float | None = None) -> Call:
    call = Call(
        plan=SimpleNamespace(name="orders"),  # type: ignore[arg-type]
        wire=Wire(),  # type: ignore[arg-type]
        request=SimpleNamespace(headers={}),
        method=method,
        path="/",
        headers={},
        source=None,
        deadline=None if timeout is None else clock() + timeout,
    )
    return call


# -- retries -------------------------------------------------------------------------------------


def retries(
    clock: Clock,
    *,
    attempts: int = 3,
    budget: RetryBudget | None = None,
    timeout: float | None = None,
    method: str = "GET",
) -> tuple[RetryDecision, TrafficStats, RetryBudget]:
    policy = route(retries={"attempts": attempts, "backoff": {"base": "25ms", "max": "250ms"}}).retry
    assert policy is not None
    stats = TrafficStats()
    budget = budget or RetryBudget(clock=clock)
    decision = RetryDecision(
        make_call(clock, method=method, timeout=timeout), policy, budget, stats, clock=clock, draw=lambda: 1.0
    )
    return decision, stats, budget


def test_a_good_first_attempt_is_handed_back_and_withdraws_nothing() -> None:
    decision, stats, budget = retries(Clock())
    before = budget.balance()
    assert decision.after(Reply(200), None) is None
    assert budget.balance() == before and stats.counter("retries", "orders") == 0


def test_backoff_doubles_from_base_and_the_last_attempt_goes_to_the_caller() -> None:
    decision, stats, _ = retries(Clock(), attempts=3)
    assert decision.after(Reply(503), None) == pytest.approx(0.025)
    assert decision.after(Reply(503), None) == pytest.approx(0.05)
    assert decision.after(Reply(503), None) is None  # the third attempt was the last
    assert stats.counter("retries", "orders") == 2


def test_a_budget_that_runs_out_mid_call_ends_the_retries() -> None:
    clock = Clock()
    one_retry = RetryBudget(percent=0, min_per_second=0.1, window=10, clock=clock)  # a reserve of 1
    decision, stats, _ = retries(clock, attempts=5, budget=one_retry)
    assert decision.after(None, ConnectionRefusedError()) is not None
    assert decision.after(None, ConnectionRefusedError()) is None
    assert stats.counter("retries", "orders") == 1 and stats.counter("budget_exhausted", "orders") == 1


@pytest.mark.parametrize(("left", "retried"), [(0.024, False), (0.025, False), (0.026, True)])
def test_a_backoff_that_would_end_at_or_past_the_deadline_is_not_slept(left: float, retried: bool) -> None:
    clock = Clock(1.0)  # exact in binary: 1.0 + 0.025 compares as written
    decision, stats, _ = retries(clock, timeout=left)
    pause = decision.after(Reply(502), None)
    assert (pause is not None) is retried
    assert stats.counter("retry_deadline", "orders") == (0 if retried else 1)


def test_retry_after_stretches_the_backoff_and_a_long_one_goes_to_the_caller() -> None:
    decision, _, _ = retries(Clock())
    assert decision.after(Reply(503, {"retry-after": "2"}), None) == 2.0
    decision, stats, _ = retries(Clock())
    assert decision.after(Reply(429, {"retry-after": "11"}), None) is None
    assert stats.counter("retries", "orders") == 0


def test_a_request_that_was_sent_is_retried_only_when_it_may_be_sent_again() -> None:
    decision, _, _ = retries(Clock(), method="POST")
    assert decision.after(Reply(503), None) is None  # it reached the peer: not replayable
    decision, _, _ = retries(Clock(), method="POST")
    assert decision.after(None, ConnectionRefusedError()) is not None  # it never left


def test_an_error_outside_the_policy_goes_straight_to_the_caller() -> None:
    decision, _, _ = retries(Clock())
    assert decision.after(None, KeyError("a bug")) is None


# -- hedging -------------------------------------------------------------------------------------


def race(
    clock: Clock,
    *,
    max_hedges: int = 1,
    timeout: float | None = None,
    budget: RetryBudget | None = None,
    rate: TokenBucket | None = None,
) -> tuple[Race, TrafficStats]:
    policy = route(hedge={"delay": "50ms", "max_hedges": max_hedges}).hedge
    assert policy is not None
    stats = TrafficStats()
    r = Race(
        make_call(clock, timeout=timeout),
        policy,
        budget or RetryBudget(clock=clock),
        stats,
        rate or TokenBucket(100, 20, clock=clock),
        clock=clock,
    )
    return r, stats


def test_an_original_that_answers_in_time_wins_without_a_copy() -> None:
    clock = Clock()
    r, stats = race(clock)
    assert r.wait() == pytest.approx(0.05)
    ok = Reply(200)
    r.settle(r.started, ok, None)
    assert r.winner is not None and r.result() is ok and r.discard == []
    assert stats.counter("hedges", "orders") == 0


def test_the_copy_wins_and_the_original_arriving_later_is_discarded() -> None:
    clock = Clock()
    r, stats = race(clock)
    clock.advance(0.05)
    twin = r.copy()
    assert twin is not None and twin is not r.call and twin.endpoint is None
    assert r.wait() is None  # max_hedges reached: wait for whichever answers
    fast, slow = Reply(200), Reply(200)
    r.settle(clock(), fast, None)
    r.settle(r.started, slow, None)
    assert r.result() is fast and r.discard == [slow]
    assert stats.counter("hedges", "orders") == 1


def test_a_winner_arriving_exactly_at_the_deadline_still_wins_and_no_copy_starts_then() -> None:
    clock = Clock()
    r, stats = race(clock, timeout=0.05)
    clock.advance(0.05)  # the delay ends exactly at the deadline
    assert r.copy() is None and r.hedges == 0
    ok = Reply(200)
    r.settle(r.started, ok, None)
    assert r.result() is ok
    assert stats.counter("hedges", "orders") == 0


def test_an_original_that_fails_after_the_copy_started_waits_for_the_copy() -> None:
    clock = Clock()
    r, _ = race(clock)
    clock.advance(0.05)
    assert r.copy() is not None
    failed = Reply(503)
    r.settle(r.started, failed, None)
    assert r.winner is None  # a 503 is no winner: the copy is still in flight
    ok = Reply(200)
    r.settle(clock(), ok, None)
    assert r.result() is ok
    assert r.discard == [failed]  # the loser's response is closed, not left holding its connection


def test_when_every_attempt_fails_the_last_failure_is_the_result() -> None:
    clock = Clock()
    r, _ = race(clock)
    clock.advance(0.05)
    assert r.copy() is not None
    first = Reply(502)
    r.settle(r.started, first, None)
    r.settle(clock(), None, ConnectionRefusedError("down"))
    with pytest.raises(ConnectionRefusedError):
        r.result()
    assert r.discard == [first]


def test_a_refused_withdrawal_ends_hedging_for_the_call() -> None:
    clock = Clock()
    r, stats = race(clock, max_hedges=3, budget=RetryBudget(percent=0, min_per_second=0, clock=clock))
    clock.advance(0.05)
    assert r.copy() is None
    assert r.wait() is None and stats.counter("budget_exhausted", "orders") == 1


def test_the_hedge_rate_cap_ends_hedging_for_the_call() -> None:
    clock = Clock()
    empty = TokenBucket(1, 1, clock=clock)
    assert empty.try_acquire() == 0.0
    r, stats = race(clock, max_hedges=3, rate=empty)
    assert r.copy() is None and r.wait() is None
    assert stats.counter("hedge_rate_limited", "orders") == 1


# -- through the stack: the drivers close what the race discards ---------------------------------

HEDGED = """
kind: Endpoints
service: api
endpoints: [{address: "127.0.0.1:9001"}, {address: "127.0.0.1:9002"}]
---
kind: Route
service: api
routes:
  - name: hedged
    match: {path: {prefix: /}}
    hedge: {delay: 10ms}
"""


class Tracked(httpx.SyncByteStream):
    def __init__(self) -> None:
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield b"unavailable"

    def close(self) -> None:
        self.closed = True


def test_an_original_that_fails_after_its_hedge_started_is_closed_when_the_hedge_wins(tmp_path: Any) -> None:
    """Its response used to be left open: its connection held, its endpoint's load never ended."""
    path = tmp_path / "rules.yaml"
    path.write_text(HEDGED)
    mesh = meshlib.Mesh("caller", config=str(path))
    route = mesh.snapshot.plans["api"].routes.routes[0]
    assert route.hedge is not None
    hedge_sent = threading.Event()
    body = Tracked()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("x-mesh-attempt") != "2":  # the original
            assert hedge_sent.wait(10)
            return httpx.Response(503, stream=body)
        hedge_sent.set()
        # answer only once the race has taken the original's 503 (it records each outcome's latency)
        wait_until(lambda: len(route.hedge.window._recent) >= 1, what="the original's 503 settled")
        return httpx.Response(200, content=b"ok")

    try:
        with mesh.sync_client(transport=httpx.MockTransport(handler)) as client:
            response = client.get("http://api/")
        assert response.status_code == 200
        assert body.closed
        for endpoint in mesh.snapshot.plans["api"].endpoints:
            assert endpoint.load.outstanding == 0, endpoint.address
    finally:
        mesh.close()
