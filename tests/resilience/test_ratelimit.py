from __future__ import annotations

import math
import threading

import pytest

from meshlib.resilience.ratelimit import TokenBucket
from meshlib.rules import RateLimitDoc
from tests.clock import Clock


def test_starts_full_then_refuses() -> None:
    bucket = TokenBucket(rate=10, burst=5, clock=Clock())
    assert [bucket.try_acquire() for _ in range(5)] == [0.0] * 5
    assert bucket.try_acquire() > 0
    assert bucket.refused == 1


def test_retry_after_is_the_time_until_the_tokens_are_there() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=100, burst=2, clock=clock)
    assert bucket.try_acquire(2) == 0.0
    wait = bucket.try_acquire()
    assert wait == pytest.approx(0.01)
    clock.advance(0.004)
    assert bucket.try_acquire() == pytest.approx(0.006)  # a refusal takes nothing
    assert bucket.try_acquire(2) == pytest.approx(0.016)
    clock.advance(0.006)  # waiting exactly what was said is enough
    assert bucket.try_acquire() == 0.0
    assert bucket.try_acquire() == pytest.approx(0.01)


def test_waiting_the_retry_after_is_always_enough() -> None:
    clock = Clock(123_456.789)  # a clock reading with few bits left for the fraction
    bucket = TokenBucket(rate=7, burst=1, clock=clock)
    for _ in range(1000):
        wait = bucket.try_acquire()
        if wait:
            clock.advance(wait)
            assert bucket.try_acquire() == 0.0


def test_refill_rate_over_simulated_time() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=100, burst=20, clock=clock)
    admitted = 0
    for _ in range(10_000):  # 10 s in 1 ms steps, taking every token as it comes
        clock.advance(0.001)
        while bucket.try_acquire() == 0.0:
            admitted += 1
    assert abs(admitted - (100 * 10 + 20)) <= 1


def test_refill_stops_at_capacity() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=100, burst=20, clock=clock)
    assert bucket.try_acquire(20) == 0.0
    clock.advance(60)
    assert bucket.available() == 20
    assert bucket.try_acquire(20) == 0.0
    assert bucket.try_acquire() > 0


def test_more_than_the_capacity_is_never_granted() -> None:
    bucket = TokenBucket(rate=100, burst=5, clock=Clock())
    assert bucket.try_acquire(6) == math.inf
    assert bucket.available() == 5


def test_zero_burst_admits_one_at_a_time_at_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2, burst=0, clock=clock)
    assert bucket.capacity == 1
    assert bucket.try_acquire() == 0.0
    assert bucket.try_acquire() == pytest.approx(0.5)
    clock.advance(0.5)
    assert bucket.try_acquire() == 0.0


def test_fractional_and_zero_acquisitions() -> None:
    bucket = TokenBucket(rate=1, burst=1, clock=Clock())
    assert bucket.try_acquire(0) == 0.0
    assert bucket.try_acquire(0.25) == 0.0
    assert bucket.available() == pytest.approx(0.75)
    with pytest.raises(ValueError):
        bucket.try_acquire(-1)


def test_a_clock_going_back_neither_adds_nor_takes() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=1, clock=clock)
    assert bucket.try_acquire() == 0.0
    clock.advance(-5)
    assert bucket.try_acquire() == pytest.approx(0.1)
    clock.advance(5.1)
    assert bucket.try_acquire() == 0.0


def test_from_doc() -> None:
    clock = Clock()
    doc = RateLimitDoc(kind="RateLimit", service="orders", requests_per_second=50, burst=7)
    bucket = TokenBucket.from_doc(doc, clock=clock)
    assert (bucket.rate, bucket.capacity) == (50, 7)
    default_burst = RateLimitDoc(kind="RateLimit", service="orders", requests_per_second=2.5)
    assert TokenBucket.from_doc(default_burst, clock=clock).capacity == 3


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (float("inf"), 1), (float("nan"), 1), (1, -1)])
def test_invalid_arguments(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_threads_share_exactly_the_tokens_there_are() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1, burst=1000, clock=clock)  # the clock stands still
    granted = [0] * 8
    start = threading.Barrier(8)

    def worker(k: int) -> None:
        start.wait()
        for _ in range(500):
            if bucket.try_acquire() == 0.0:
                granted[k] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 1000
    assert bucket.refused == 8 * 500 - 1000
