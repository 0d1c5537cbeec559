"""The limit algorithms against worked examples of their published formulas (figures by hand)."""

from __future__ import annotations

import math

import pytest

from meshlib.resilience.concurrency_limit import (
    ExpAverage,
    Gradient2Limit,
    GradientLimit,
    VegasLimit,
    log10_root,
    percentile,
)

MS = 0.001


def measured(limit: GradientLimit, rtt: float, now: float) -> float:
    """Feed `limit` its minRTT measurement: `min_rtt_requests` requests of `rtt` from `now`."""
    for _ in range(limit.min_rtt_requests):
        now += rtt
        limit.sample(rtt, 1, False, now)
    assert not limit.measuring
    return now


# --------------------------------------------------------------------------------------------
# Envoy's gradient controller


def test_gradient_formula() -> None:
    g = GradientLimit(initial_limit=20, min_limit=3, max_limit=1000)
    g.min_rtt = 10 * MS  # buffer 25%: (10 ms + 2.5 ms) / sampleRTT
    # sampleRTT = minRTT: gradient 1.25, 20 * 1.25 = 25, + sqrt(25) = 30
    assert g.gradient(10 * MS) == pytest.approx(1.25)
    assert g.update(10 * MS) == 30
    # twice slower than tolerated: the gradient's floor 0.5, 10 + sqrt(10) = 13.16 -> 13
    assert g.update(25 * MS) == 13
    # far faster: the gradient's ceiling 2.0, 40 + sqrt(40) = 46.3 -> 46
    assert g.update(1 * MS) == 46
    # the bounds hold
    g.estimate = 900
    assert g.update(1 * MS) == 1000
    g.estimate = 3
    assert g.update(100 * MS) == 3


def test_gradient_measures_min_rtt_pinned_then_recomputes_each_interval() -> None:
    g = GradientLimit(
        initial_limit=20, min_rtt_requests=5, min_rtt_concurrency=2, jitter=0.15, rng=lambda: 0.5
    )
    assert g.measuring and g.limit == 2  # pinned from the start
    now = measured(g, 10 * MS, 0.0)
    assert g.min_rtt == pytest.approx(10 * MS)
    assert g.limit == 20  # the limit it had before
    # the next measurement after the interval plus half the 15% jitter
    assert g.next_measure == pytest.approx(now + 60 * (1 + 0.15 * 0.5))
    # samples within the 100 ms interval wait for it to end; the median of the interval is used
    g.sample(12 * MS, 20, False, now + 0.05)
    g.sample(10 * MS, 20, False, now + 0.06)
    assert g.limit == 20
    g.sample(30 * MS, 20, False, now + 0.1)
    assert g.sample_rtt == pytest.approx(12 * MS)  # the median of 12, 10, 30
    scaled = 20 * (12.5 / 12)
    assert g.limit == int(scaled + math.sqrt(scaled))


def test_the_pinned_limit_never_goes_above_max_limit() -> None:
    """minRTT is measured at `min_rtt_concurrency` (default 3), but never above `max_limit`."""
    g = GradientLimit(initial_limit=1, min_limit=1, max_limit=1)
    assert g.measuring and g.limit == 1
    g = GradientLimit(initial_limit=2, min_limit=1, max_limit=2, min_rtt_concurrency=5)
    assert g.measuring and g.limit == 2


def test_gradient_measures_again_after_its_interval_and_when_stuck_at_the_minimum() -> None:
    g = GradientLimit(initial_limit=10, min_limit=3, min_rtt_requests=3, min_rtt_interval=10.0, jitter=0.0)
    now = measured(g, 10 * MS, 0.0)
    # a sample admitted before the new measurement started does not count towards it
    g.sample(10 * MS, 1, False, now + 10.0)
    assert g.measuring
    g.sample(50 * MS, 5, False, now + 10.01)  # admitted at now + 9.96: before the measurement
    assert g._rtts == []
    now = measured(g, 20 * MS, now + 10.01)
    assert g.min_rtt == pytest.approx(20 * MS)
    # far slower: 10 -> 7 -> 5 -> 4 -> 3 (the minimum); five intervals in a row there: measure at once
    limits = []
    for i in range(1, 9):
        assert not g.measuring
        g.sample(1.0, 3, False, now + 0.1 * i)
        limits.append(g.estimate)
    assert limits == [7, 5, 4, 3, 3, 3, 3, 3]
    assert g.measuring and g.limit == 3


def test_gradient_does_not_grow_while_the_callers_set_the_pace() -> None:
    g = GradientLimit(initial_limit=20, min_rtt_requests=1, jitter=0.0)
    now = measured(g, 10 * MS, 0.0)
    g.sample(10 * MS, 9, False, now + 0.1)  # fewer than half of 20 in flight: no growth
    assert g.limit == 20
    g.sample(10 * MS, 10, False, now + 0.25)  # half: 20 * 1.25 + 5 = 30
    assert g.limit == 30
    g.sample(30 * MS, 1, False, now + 0.35)  # shrinking is never held back: 15 + sqrt(15) = 18.9
    assert g.limit == 18


# --------------------------------------------------------------------------------------------
# Netflix's gradient2


def test_exp_average_warms_up_with_a_plain_mean() -> None:
    avg = ExpAverage(window=9, warmup=2)  # weight 2 / 10
    assert avg.add(10) == 10
    assert avg.add(20) == 15
    assert avg.add(35) == pytest.approx(15 + 0.2 * 20)


def test_gradient2_formula() -> None:
    g = Gradient2Limit(initial_limit=20, queue_size=4, smoothing=0.2, tolerance=1.5)
    # no queue (gradient 1): 20 * 0.8 + (20 + 4) * 0.2 = 20.8
    assert g.update(10 * MS, 20) == pytest.approx(20.8)
    # long = mean(10, 30) = 20 ms; 1.5 * 20 / 30 = 1.0: still no queue, 21.6
    assert g.update(30 * MS, 20) == pytest.approx(21.6)
    # long = mean(10, 30, 80) = 40 ms; gradient 1.5 * 40 / 80 = 0.75:
    # 21.6 * 0.8 + (21.6 * 0.75 + 4) * 0.2 = 21.32
    assert g.update(80 * MS, 20) == pytest.approx(21.32)
    # fewer than half the limit in flight: the application limits itself, the limit stays
    assert g.update(500 * MS, 10) == pytest.approx(21.32)
    assert g.limit == 21


def test_gradient2_gradient_floor_and_long_rtt_catch_up() -> None:
    g = Gradient2Limit(initial_limit=100, min_limit=10, queue_size=0, smoothing=1.0, long_window=600)
    for _ in range(10):
        g.update(10 * MS, 100)  # the warm-up: long = 10 ms
    # far slower: long = 10 + 990 * 2/601 = 13.3 ms, 1.5 * 13.3 / 1000 is under the floor, 0.5
    # (outliers never cut more than half)
    assert g.update(1000 * MS, 100) == pytest.approx(50)
    long = 10 * MS + 990 * MS * 2 / 601
    assert g.long_rtt.value == pytest.approx(long)
    # back to 5 ms: the long average, more than twice that, is cut by a tenth after its update
    g.update(5 * MS, 10)
    assert g.long_rtt.value == pytest.approx((long + (5 * MS - long) * 2 / 601) * 0.9)


def test_gradient2_updates_once_per_window() -> None:
    g = Gradient2Limit(initial_limit=20, interval=0.1, min_samples=3, now=0.0)
    g.sample(10 * MS, 20, False, 0.05)
    g.sample(10 * MS, 20, False, 0.2)  # the interval is over, but only 2 samples
    assert g.estimate == 20
    g.sample(40 * MS, 20, False, 0.21)  # the mean, 20 ms, goes in: the first window, no queue
    assert g.short_rtt == pytest.approx(20 * MS)
    assert g.estimate == pytest.approx(20.8)


# --------------------------------------------------------------------------------------------
# Netflix's Vegas


def test_log10_root() -> None:
    assert [log10_root(n) for n in (1, 9, 10, 99, 100, 999, 1000)] == [1, 1, 1, 1, 2, 2, 3]


def test_vegas_formula() -> None:
    v = VegasLimit(initial_limit=20, max_limit=1000, probe_multiplier=1000, rng=lambda: 0.0)
    assert v.update(10 * MS, 20, False) == 20  # the first sample is the no-load latency
    # no queue (0 <= log10 20 = 1): grow by beta, 6 * 1
    assert v.update(10 * MS, 20, False) == 26
    # queue = ceil(26 * (1 - 10/20)) = 13 > beta 6: shrink by 1
    assert v.update(20 * MS, 26, False) == 25
    # queue = ceil(25 * (1 - 10/12)) = 5, between alpha 3 and beta 6: stay
    assert v.update(12 * MS, 25, False) == 25
    # queue = ceil(25 * (1 - 10/10.5)) = 2 < alpha 3: grow by 1
    assert v.update(10.5 * MS, 25, False) == 26
    # a drop shrinks by log10
    assert v.update(10 * MS, 26, True) == 25
    # fewer than half the limit in flight: stay
    assert v.update(10 * MS, 12, False) == 25
    # a faster sample becomes the no-load latency, nothing else
    assert v.update(5 * MS, 25, False) == 25
    assert v.rtt_noload == pytest.approx(5 * MS)


def test_vegas_smoothing() -> None:
    v = VegasLimit(initial_limit=20, smoothing=0.5, probe_multiplier=1000, rng=lambda: 0.0)
    v.update(10 * MS, 20, False)
    assert v.update(10 * MS, 20, False) == pytest.approx(23)  # halfway to 26


def test_vegas_reprobes_the_no_load_latency() -> None:
    # probe every 0.5 (jitter at its least) * 1 * 20 = 10 samples
    v = VegasLimit(initial_limit=20, probe_multiplier=1, rng=lambda: 0.0)
    v.update(10 * MS, 20, False)
    for _ in range(8):
        v.update(10 * MS, 5, False)  # app-limited: no change
    assert v.rtt_noload == pytest.approx(10 * MS)
    v.update(30 * MS, 5, False)  # the 10th: taken as the no-load latency, although slower
    assert v.rtt_noload == pytest.approx(30 * MS)


def test_percentile_nearest_rank() -> None:
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == 4.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 25) == 1.0
