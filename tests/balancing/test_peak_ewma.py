from __future__ import annotations

import random
from collections import Counter

import pytest

from meshlib.balancing import PeakEwma
from meshlib.endpoint import Endpoint


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
