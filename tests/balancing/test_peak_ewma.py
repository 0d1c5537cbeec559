from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from meshlib.balancing import PeakEwma
from meshlib.endpoint import Endpoint, LoadBook


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def endpoints(*weights: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:80", weight=w) for i, w in enumerate(weights)]


def share(balancer: PeakEwma, ep: Endpoint, n: int = 4000) -> float:
    counts: Counter[Endpoint | None] = Counter(balancer.pick() for _ in range(n))
    return counts[ep] / n


def test_moves_away_from_a_slow_endpoint_and_comes_back() -> None:
    clock = Clock()
    eps = endpoints(1, 1, 1, 1)
    slow, others = eps[0], eps[1:]
    for ep in others:
        ep.load.observe(0.010, now=clock.now)
    slow.load.observe(0.100, now=clock.now)
    pe = PeakEwma(eps, rng=random.Random(1), clock=clock)
    assert share(pe, slow) < 0.02

    # The others keep answering fast; nothing is heard from the slow one, and its figure
    # decays: still avoided after one decay time, tried again once below the others.
    def tick(seconds: int, rtt_slow: float | None = None) -> None:
        for _ in range(seconds):
            clock.now += 1.0
            for ep in others:
                ep.load.observe(0.010, now=clock.now)
            if rtt_slow is not None:
                slow.load.observe(rtt_slow, now=clock.now)

    tick(10)
    assert share(pe, slow) < 0.02
    tick(20)
    assert share(pe, slow) > 0.3  # it wins every pair it is in: 1/2 of the picks


def test_recovers_when_observed_fast_again() -> None:
    clock = Clock()
    eps = endpoints(1, 1, 1, 1)
    slow, others = eps[0], eps[1:]
    for ep in eps:
        ep.load.observe(0.100 if ep is slow else 0.010, now=clock.now)
    for ep in others:
        ep.load.outstanding = 1  # the others are busy: cost 0.02 each
    pe = PeakEwma(eps, rng=random.Random(2), clock=clock)
    assert share(pe, slow) < 0.02  # 0.1 x 1 against 0.01 x 2

    for _ in range(60):
        clock.now += 1.0
        for ep in eps:
            ep.load.observe(0.010, now=clock.now)
    assert slow.load.latency(clock.now) == pytest.approx(0.010, rel=0.05)
    assert share(pe, slow) == pytest.approx(0.5, abs=0.05)  # now it wins every pair it is in


def test_peak_counts_at_once() -> None:
    clock = Clock()
    a, b = endpoints(1, 1)
    a.load.observe(0.010, now=clock.now)
    b.load.observe(0.020, now=clock.now)
    pe = PeakEwma([a, b], rng=random.Random(3), clock=clock)
    assert {pe.pick() for _ in range(50)} == {a}
    a.load.observe(0.500, now=clock.now)  # one slow answer is enough to move away
    assert {pe.pick() for _ in range(50)} == {b}


def test_unknown_endpoint_with_requests_in_flight_is_penalised() -> None:
    clock = Clock()
    new, known = endpoints(1, 1)
    known.load.observe(0.5, now=clock.now)
    known.load.outstanding = 3  # cost 2.0: slow and busy, but known
    new.load.outstanding = 1  # no answer yet: penalty
    pe = PeakEwma([new, known], rng=random.Random(4), clock=clock)
    assert {pe.pick() for _ in range(50)} == {known}


def test_unknown_idle_endpoint_is_tried() -> None:
    clock = Clock()
    new, known = endpoints(1, 1)
    known.load.observe(0.010, now=clock.now)
    pe = PeakEwma([new, known], rng=random.Random(5), clock=clock)
    assert {pe.pick() for _ in range(50)} == {new}


def test_cost_is_compared_per_unit_of_weight() -> None:
    clock = Clock()
    big, small = endpoints(4, 1)
    big.load.observe(0.030, now=clock.now)  # 0.0075 per unit of weight
    small.load.observe(0.010, now=clock.now)
    pe = PeakEwma([big, small], rng=random.Random(6), clock=clock)
    assert {pe.pick() for _ in range(50)} == {big}


def test_exclusion_and_default_clock() -> None:
    eps = endpoints(1, 1, 1)
    eps[0].load.observe(0.010)
    eps[1].load.observe(1.0)
    eps[2].load.observe(1.0)
    pe = PeakEwma(eps)
    assert {pe.pick(exclude={eps[0].address}) for _ in range(50)} <= {eps[1], eps[2]}
    assert pe.pick(exclude={ep.address for ep in eps[1:]}) is eps[0]


# -- a stall every endpoint shares (meshlib.stalls) -----------------------------------------


class Pool:
    """Four endpoints of one caller (one LoadBook, so one record of common stalls): three answer
    in 2 ms, one is truly slow (20 ms) and, being avoided, has nothing in flight."""

    def __init__(self) -> None:
        self.clock = Clock()
        book = LoadBook()
        self.eps = [Endpoint(f"10.0.0.{i}:80", load=book.get(f"10.0.0.{i}:80")) for i in range(4)]
        self.slow, self.healthy = self.eps[0], self.eps[1:]
        self.pe = PeakEwma(self.eps, rng=random.Random(7), clock=self.clock)
        self.slow.load.observe(0.020, now=self.clock.now)
        self.t0 = self.clock.now
        self.steady(2.0)

    def steady(self, seconds: float, step: float = 0.005) -> None:
        """Every `step`, each healthy endpoint answers a 2 ms request (one after the other)."""
        for _ in range(round(seconds / step)):
            self.clock.now += step
            for k, ep in enumerate(self.healthy):
                ep.load.observe(0.002, now=self.clock.now + k * 1e-4)

    def slow_share(self) -> float:
        return share(self.pe, self.slow)


@pytest.mark.parametrize("stall", [0.040, 1.0])
def test_a_stall_every_busy_endpoint_shared_does_not_turn_traffic_to_the_slow_one(stall: float) -> None:
    pool = Pool()
    assert pool.slow_share() < 0.02
    # The caller (or the machine) stops for `stall`: the request in flight on each healthy
    # endpoint answers only at the end, together with the others; the slow one had none.
    started = pool.clock.now + 0.001
    pool.clock.now = started + stall
    for k, ep in enumerate(pool.healthy):
        ep.load.observe(pool.clock.now + k * 1e-4 - started, now=pool.clock.now + k * 1e-4)
    # Before: each healthy endpoint took the stall as its own peak (stall + 1 ms, above the slow
    # one's 20 ms) and the slow one won every pair it was in (half the picks) until the
    # peaks decayed below 20 ms (6 s for a 40 ms stall, 39 s for 1 s, with the 10 s decay).
    assert pool.slow_share() < 0.02
    for ep in pool.healthy:
        assert ep.load.latency(pool.clock.now) < 0.005
    for _ in range(5):  # and in every second after it
        pool.steady(1.0)
        assert pool.slow_share() < 0.02


def test_servers_frozen_while_the_caller_kept_sending() -> None:
    # As seen in the gRPC benchmark: every server (one process) stops for 140 ms; the caller
    # goes on sending one request every 5 ms, and the answers all come in a burst at the end,
    # oldest first. The slow one had a request in flight too.
    pool = Pool()
    t = pool.clock.now
    sent = [(t + i * 0.005, pool.healthy[i % 3]) for i in range(28)]
    sent.insert(3, (t + 0.012, pool.slow))
    for k, (started, ep) in enumerate(sent):
        now = t + 0.140 + k * 0.0003
        ep.load.observe(now - started, now=now)
    pool.clock.now = t + 0.150
    for ep in pool.healthy:  # what is left: their 2 ms, and the burst's few ms after the stall
        assert ep.load.latency(pool.clock.now) < 0.010
    # the slow one's 20 ms, decaying as before (its answer told nothing: it waited like the rest)
    assert pool.slow.load.latency(pool.clock.now) == pytest.approx(
        0.020 * math.exp(-(pool.clock.now - pool.t0) / 10)
    )
    assert pool.slow_share() < 0.02
    pool.steady(1.0)
    assert pool.slow_share() < 0.02


def test_a_caller_slowed_down_not_frozen_is_a_stall_too() -> None:
    pool = Pool()
    # For half a second the caller runs ten times slower: it still sends a request every 5 ms
    # and reads the answers, but each takes 25 ms instead of 2 (none on time).
    t = pool.clock.now
    for i in range(100):
        pool.clock.now = t + 0.025 + i * 0.005
        pool.healthy[i % 3].load.observe(0.025, now=pool.clock.now)
    assert pool.slow_share() < 0.02
    for ep in pool.healthy:
        assert ep.load.latency(pool.clock.now) < 0.010
    pool.steady(1.0)
    assert pool.slow_share() < 0.02


def test_an_endpoint_slowed_during_a_stall_keeps_what_it_did_not_share() -> None:
    pool = Pool()
    a, b, c = pool.healthy
    t0 = pool.clock.now
    pool.clock.now = t0 + 1.0  # a 1 s stall; a and b answer at its end
    a.load.observe(1.0 - 0.001, now=pool.clock.now)
    b.load.observe(1.0 - 0.001, now=pool.clock.now + 1e-4)
    # c had a request in flight too, and is truly slow from now on: 300 ms more than the stall
    pool.clock.now += 0.300
    c.load.observe(1.300 - 0.001, now=pool.clock.now)
    assert c.load.latency(pool.clock.now) == pytest.approx(0.302, abs=0.001)  # its 2 ms and the 300
    assert a.load.latency(pool.clock.now) < 0.005
    assert share(pool.pe, c) < 0.02  # avoided at once, as a peak should be


def test_one_endpoint_slowing_down_among_jittery_others_is_avoided_at_once() -> None:
    pool = Pool()
    a, b, c = pool.healthy
    t = pool.clock.now
    # a now answers in 20 ms; b and c go on, b a little late now and then (3 ms against 2)
    for i in range(1, 11):
        b.load.observe(0.003 if i % 2 else 0.002, now=t + i * 0.002)
        c.load.observe(0.002, now=t + i * 0.002 + 0.001)
    a.load.observe(0.020, now=t + 0.021)
    pool.clock.now = t + 0.021
    assert a.load.latency(pool.clock.now) > 0.018  # at most b's lateness is taken for shared
    assert share(pool.pe, a) < 0.02


def test_two_slow_endpoints_are_not_a_stall_while_others_keep_answering() -> None:
    pool = Pool()
    a, b, c = pool.healthy
    # a and b become slow (200 ms) at the same time, with requests in flight on both; c and the
    # slow one keep answering on time meanwhile, so the caller was not stalled.
    t0 = pool.clock.now
    for i in range(1, 40):
        c.load.observe(0.002, now=t0 + i * 0.005)
    a.load.observe(0.200, now=t0 + 0.201)
    b.load.observe(0.200, now=t0 + 0.202)
    pool.clock.now = t0 + 0.202
    assert a.load.latency(pool.clock.now) > 0.19
    assert b.load.latency(pool.clock.now) > 0.19
    # picked only when drawn together (1 pair in 6), never against c or the 20 ms one
    assert share(pool.pe, a) + share(pool.pe, b) < 0.2


def test_decay_is_what_the_load_says() -> None:
    clock = Clock()
    fast, slow = endpoints(1, 1)
    slow.load.decay = 1.0  # a Destination's peak_ewma.decay, set on the loads by the Snapshot
    fast.load.observe(0.010, now=clock.now)
    slow.load.observe(0.100, now=clock.now)
    pe = PeakEwma([fast, slow], rng=random.Random(8), clock=clock)
    assert {pe.pick() for _ in range(50)} == {fast}
    clock.now += 3.0  # 100 ms x e^-3 = 5 ms: below the fast one's 10 ms x e^-0.3
    assert slow.load.latency(clock.now) == pytest.approx(0.100 * math.exp(-3.0))
    assert {pe.pick() for _ in range(50)} == {slow}
