"""Admission under an adaptive limit: counting, shares of caller classes, samples to the algorithm."""

from __future__ import annotations

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
