"""Admission under an adaptive limit: counting, shares of caller classes, samples to the algorithm."""

from __future__ import annotations

import heapq
import itertools
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

from meshlib.resilience.adaptive_concurrency import ConcurrencyLimiter, limit_for
from meshlib.resilience.concurrency_limit import Gradient2Limit, GradientLimit, VegasLimit
from meshlib.rules.models import AdaptiveConcurrencySpec


class Fixed:
    """A limit that stays put and remembers its samples."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.samples: list[tuple[float, int, bool, float]] = []

    def sample(self, rtt: float, in_flight: int, dropped: bool, now: float) -> None:
        self.samples.append((rtt, in_flight, dropped, now))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_excess_is_refused_and_latencies_go_to_the_algorithm() -> None:
    clock = Clock()
    limit = Fixed(2)
    limiter = ConcurrencyLimiter(limit, clock=clock)
    a, b = limiter.try_acquire(), limiter.try_acquire()
    assert a is not None and b is not None
    assert limiter.try_acquire() is None
    assert limiter.rejected == 1 and limiter.in_flight == 2
    clock.now += 0.25
    limiter.release(b, dropped=True)
    assert limit.samples == [(0.25, 2, True, 100.25)]  # b was admitted second: 2 in flight then
    assert limiter.try_acquire() is not None
    limit.limit = 5  # the algorithm raised it
    assert limiter.try_acquire() is not None


def test_classes_below_their_share_are_admitted_past_the_limit() -> None:
    limiter = ConcurrencyLimiter(Fixed(10), {"checkout": 0.3, "batch": 0.1})
    assert limiter.guaranteed("checkout") == 3 and limiter.guaranteed("batch") == 1
    others = [limiter.try_acquire("search") for _ in range(10)]
    assert all(t is not None for t in others)
    assert limiter.try_acquire("search") is None  # no guarantee
    assert limiter.try_acquire(None) is None
    checkout = [limiter.try_acquire("checkout") for _ in range(4)]
    assert [t is not None for t in checkout] == [True, True, True, False]  # its 30% of 10
    assert limiter.try_acquire("batch") is not None
    assert limiter.try_acquire("batch") is None
    assert limiter.partition_in_flight("checkout") == 3
    ticket = checkout[0]
    assert ticket is not None
    limiter.release(ticket)
    assert limiter.partition_in_flight("checkout") == 2
    assert limiter.try_acquire("checkout") is not None


def test_limit_for_builds_the_named_algorithm_with_its_options() -> None:
    g = limit_for(AdaptiveConcurrencySpec.model_validate({"min_limit": 2, "gradient": {"buffer": 50}}))
    assert isinstance(g, GradientLimit) and g.buffer == 0.5 and g.min_limit == 2
    g2 = limit_for(AdaptiveConcurrencySpec.model_validate({"algorithm": "gradient2", "initial_limit": 8}))
    assert isinstance(g2, Gradient2Limit) and g2.limit == 8 and g2.queue_size == 4
    vegas = limit_for(
        AdaptiveConcurrencySpec.model_validate({"algorithm": "vegas", "vegas": {"smoothing": 0.5}})
    )
    assert isinstance(vegas, VegasLimit) and vegas.smoothing == 0.5


# --------------------------------------------------------------------------------------------
# A simulated server of known capacity under twice the load it can serve


SLOTS = 8
SERVICE = 0.1  # the server does 8 requests at a time, 100 ms each: 80 a second
RATE = 2 * SLOTS / SERVICE
SETTLE = 10.0  # seconds of overload before the figures are taken


@dataclass
class Run:
    """What a simulated run showed after it settled."""

    limits: list[int]  # the limit after each request ended
    latencies: list[float]  # of the requests admitted, as their callers saw them
    at_server: float  # requests in the server (in service or queued), averaged over time


def simulate(side: str, transit: float = 0.0, seconds: float = 30.0) -> Run:
    """Open-loop callers at RATE against a FIFO server of SLOTS x SERVICE, `transit` seconds away
    each way, its gradient limit (bench/overload.py's options) on the server's `side` or the
    callers' (events in time order, the clock set by hand: no IO, no sleep)."""
    clock = Clock()
    clock.now = 0.0
    limit = GradientLimit(
        interval=5 * SERVICE, min_rtt_requests=25, min_rtt_concurrency=4, min_limit=2, now=0.0
    )
    limiter = ConcurrencyLimiter(limit, clock=clock)
    events: list[tuple[float, int, str, list[Any]]] = []
    order = itertools.count()

    def at(when: float, kind: str, request: list[Any]) -> None:
        heapq.heappush(events, (when, next(order), kind, request))

    warm = 1.0 / (RATE / 8)  # a quarter of the capacity for 3 s first (minRTT is measured then)
    arrivals = [i * warm for i in range(int(3.0 / warm))]
    arrivals += [3.0 + i / RATE for i in range(int(seconds * RATE))]
    for sent in arrivals:
        at(sent, "send", [sent, None])
    busy, queue = 0, deque[list[Any]]()
    inside, inside_since, inside_area = 0, 3.0 + SETTLE, 0.0
    run = Run([], [], 0.0)
    while events:
        now, _, kind, request = heapq.heappop(events)
        clock.now = now
        if now >= inside_since:  # time-weighted requests in the server
            inside_area += inside * (now - inside_since)
            inside_since = now
        if kind == "send":
            if side == "client" and (ticket := limiter.try_acquire()) is None:
                continue
            if side == "client":
                request[1] = ticket
            at(now + transit, "arrive", request)
        elif kind == "arrive":
            if side == "server" and (ticket := limiter.try_acquire()) is None:
                continue
            if side == "server":
                request[1] = ticket
            inside += 1
            if busy < SLOTS:
                busy += 1
                at(now + SERVICE, "done", request)
            else:
                queue.append(request)
        elif kind == "done":
            inside -= 1
            if queue:
                at(now + SERVICE, "done", queue.popleft())
            else:
                busy -= 1
            if side == "server":
                limiter.release(request[1])
            at(now + transit, "answer", request)
        else:  # the answer is back with its caller
            if side == "client":
                limiter.release(request[1])
            if request[0] >= 3.0 + SETTLE:
                run.latencies.append(now - request[0])
                run.limits.append(limiter.current)
    run.at_server = inside_area / (inside_since - 3.0 - SETTLE)
    return run


def p99(values: list[float]) -> float:
    return sorted(values)[int(0.99 * len(values))]


def test_the_gradient_keeps_a_queue_shorter_than_a_service_time() -> None:
    # on the server's side: a queue of a few (the 25% buffer and sqrt(limit) of headroom, so the
    # server is never idle for want of a request), never the 8 that would make a request wait two
    # service times; so admitted requests' p99 stays under twice the service time
    run = simulate("server")
    assert min(run.limits) >= SLOTS + 2 and max(run.limits) < 2 * SLOTS, sorted(set(run.limits))
    assert p99(run.latencies) < 2 * SERVICE
    assert SLOTS + 2 <= run.at_server < 2 * SLOTS - 1, run.at_server


def test_a_callers_limit_counts_the_requests_on_their_way_too() -> None:
    # on the callers' side, 10 ms away each way: the callers' limit is higher by about the
    # requests in transit (80 a second x 20 ms = 1.6), but the server holds no more than it does
    # under its own limit, and admitted requests wait no longer there
    server = simulate("server")
    client = simulate("client", transit=0.01)
    mean = statistics.fmean
    assert 0.8 <= mean(client.limits) - mean(server.limits) <= 3.0, (mean(client.limits), mean(server.limits))
    assert abs(client.at_server - server.at_server) <= 1.0, (client.at_server, server.at_server)
    assert p99(client.latencies) - 0.02 < 2 * SERVICE
