from __future__ import annotations

import threading
from typing import Any

import pytest

from meshlib.resilience.outlier import OutlierDefaults, OutlierDetector
from meshlib.resilience.state import DEFAULT_ACCRUAL
from meshlib.rules import OutlierSpec
from tests.clock import Clock

A, B, C, D = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"


class Events:
    def __init__(self) -> None:
        self.ejected: list[tuple[str, float]] = []
        self.returned: list[str] = []

    def on_eject(self, address: str, seconds: float) -> None:
        self.ejected.append((address, seconds))

    def on_return(self, address: str) -> None:
        self.returned.append(address)


def detector(
    clock: Clock, pool: tuple[str, ...] = (A, B, C, D), events: Events | None = None, **spec: Any
) -> OutlierDetector:
    events = events or Events()
    d = OutlierDetector(
        OutlierSpec(**spec), clock=clock, on_eject=events.on_eject, on_return=events.on_return
    )
    d.set_pool(pool)
    return d


def fail(d: OutlierDetector, address: str, times: int, status: int | None = 500) -> None:
    for _ in range(times):
        d.record(address, status, local_failure=status is None)


# --------------------------------------------------------------------------------------------
# Consecutive errors


def test_consecutive_5xx_ejects_at_exactly_the_threshold() -> None:
    clock, events = Clock(), Events()
    d = detector(clock, events=events, consecutive_5xx=5)
    fail(d, A, 4)
    assert not d.ejected(A)
    fail(d, A, 1)
    assert d.ejected(A)
    assert d.ejected_addresses() == {A}
    assert d.ejections_total == 1
    assert events.ejected == [(A, 30.0)]
    assert not d.ejected(B)


def test_a_success_or_a_4xx_resets_the_count() -> None:
    d = detector(Clock(), consecutive_5xx=3)
    fail(d, A, 2)
    d.record(A, 200)
    fail(d, A, 2)
    d.record(A, 404)
    fail(d, A, 2)
    assert not d.ejected(A)
    fail(d, A, 1)
    assert d.ejected(A)


def test_local_failures_count_as_5xx() -> None:
    d = detector(Clock(), consecutive_5xx=3)
    d.record(A, None, local_failure=True)
    d.record(A, 503)
    d.record(A, None, local_failure=True)
    assert d.ejected(A)


def test_counts_are_per_endpoint() -> None:
    d = detector(Clock(), consecutive_5xx=3)
    for _ in range(2):
        d.record(A, 500)
        d.record(B, 500)
    assert d.ejected_addresses() == frozenset()
    d.record(B, 500)
    assert d.ejected_addresses() == {B}


def test_consecutive_gateway_errors() -> None:
    d = detector(Clock(), consecutive_5xx=100, consecutive_gateway_errors=3)
    d.record(A, 502)
    d.record(A, 504)
    d.record(A, 500)  # a 5xx, but not a gateway error: that count starts again
    d.record(A, 503)
    d.record(A, None, local_failure=True)
    assert not d.ejected(A)
    d.record(A, 502)
    assert d.ejected(A)


def test_a_success_resets_the_gateway_count() -> None:
    d = detector(Clock(), consecutive_5xx=100, consecutive_gateway_errors=3)
    fail(d, A, 2, status=503)
    d.record(A, 200)
    fail(d, A, 2, status=503)
    assert not d.ejected(A)
    fail(d, A, 1, status=503)
    assert d.ejected(A)


def test_gateway_rule_off_by_default() -> None:
    d = detector(Clock(), consecutive_5xx=10)
    fail(d, A, 9, status=503)
    assert not d.ejected(A)


# --------------------------------------------------------------------------------------------
# Ejection time and return


def test_returns_by_itself_when_the_time_is_up() -> None:
    clock, events = Clock(), Events()
    d = detector(clock, events=events, consecutive_5xx=2, base_ejection="30s")
    t0 = clock.now
    fail(d, A, 2)
    clock.now = t0 + 29.999
    assert d.ejected(A)
    assert events.returned == []
    clock.now = t0 + 30
    assert not d.ejected(A)
    assert events.returned == [A]
    assert d.ejected_addresses() == frozenset()
    assert not d.ejected(A)
    assert events.returned == [A]  # reported once

    # it starts afresh: one failure is not enough to eject it again
    fail(d, A, 1)
    assert not d.ejected(A)
    fail(d, A, 1)
    assert d.ejected(A)


def test_ejected_takes_an_explicit_time() -> None:
    clock = Clock()
    d = detector(clock, consecutive_5xx=1, base_ejection="30s")
    fail(d, A, 1)
    assert d.ejected(A, now=clock.now + 10)
    assert not d.ejected(A, now=clock.now + 30)


def test_the_return_is_noticed_by_any_call() -> None:
    clock, events = Clock(), Events()
    d = detector(clock, events=events, consecutive_5xx=1, base_ejection="30s")
    fail(d, A, 1)
    clock.advance(31)
    d.record(B, 200)
    assert events.returned == [A]
    clock.advance(31)
    fail(d, A, 1)
    clock.advance(120)
    assert d.ejected_addresses() == frozenset()
    assert events.returned == [A, A]


def test_ejection_time_grows_with_repeat_ejections_up_to_the_cap() -> None:
    clock, events = Clock(), Events()
    d = detector(clock, events=events, consecutive_5xx=1, base_ejection="100s")
    for _ in range(5):
        fail(d, A, 1)
        seconds = events.ejected[-1][1]
        clock.advance(seconds)
        assert not d.ejected(A)
    assert [s for _, s in events.ejected] == [100, 200, 300, 300, 300]  # Envoy's 300 s cap


def test_the_cap_is_never_below_the_base_time() -> None:
    clock, events = Clock(), Events()
    d = detector(clock, events=events, consecutive_5xx=1, base_ejection="10m")
    fail(d, A, 1)
    clock.advance(600)
    fail(d, A, 1)
    assert [s for _, s in events.ejected] == [600, 600]
    assert d.max_ejection == 600


def test_max_ejection_can_be_set() -> None:
    clock, events = Clock(), Events()
    d = OutlierDetector(
        OutlierSpec(consecutive_5xx=1, base_ejection="30s"),
        clock=clock,
        on_eject=events.on_eject,
        max_ejection=45,
    )
    d.set_pool([A, B])
    for _ in range(3):
        fail(d, A, 1)
        clock.advance(events.ejected[-1][1])
    assert [s for _, s in events.ejected] == [30, 45, 45]


def test_the_multiplier_decays_while_the_endpoint_behaves() -> None:
    clock, events = Clock(), Events()
    d = detector(clock, events=events, consecutive_5xx=1, base_ejection="30s", interval="10s")
    fail(d, A, 1)  # 30 s
    clock.advance(30)
    fail(d, A, 1)  # at once: 60 s
    clock.advance(60)
    clock.advance(10)  # one interval in service: the multiplier goes from 2 to 1
    fail(d, A, 1)  # 1 + 1: 60 s
    clock.advance(60 + 25)  # two intervals: from 2 to 0
    fail(d, A, 1)  # 30 s
    assert [s for _, s in events.ejected] == [30, 60, 60, 30]


def test_records_while_ejected_are_ignored() -> None:
    clock = Clock()
    d = detector(clock, consecutive_5xx=3, base_ejection="30s", success_rate_min_requests=10)
    fail(d, A, 3)
    fail(d, A, 50)  # answers to requests that were in flight
    clock.advance(30)
    assert not d.ejected(A)
    fail(d, A, 2)
    assert not d.ejected(A)
    assert d.ejections_total == 1


# --------------------------------------------------------------------------------------------
# max_ejection_percent


def test_at_most_max_ejection_percent_of_the_pool() -> None:
    clock, events = Clock(), Events()
    d = detector(clock, events=events, consecutive_5xx=1, max_ejection_percent=50, base_ejection="30s")
    fail(d, A, 1)
    fail(d, B, 1)
    fail(d, C, 1)
    assert d.ejected_addresses() == {A, B}
    assert not d.ejected(C)
    clock.advance(30)
    assert d.ejected_addresses() == frozenset()
    fail(d, C, 1)  # room again: its next failure ejects it
    assert d.ejected_addresses() == {C}
    assert [a for a, _ in events.ejected] == [A, B, C]


def test_refused_ejection_is_retried_by_the_next_failure() -> None:
    clock = Clock()
    d = detector(clock, pool=(A, B), consecutive_5xx=3, max_ejection_percent=50, base_ejection="30s")
    fail(d, A, 3)
    fail(d, B, 3)
    assert d.ejected_addresses() == {A}
    clock.advance(30)
    fail(d, B, 1)  # still over its threshold (no success in between)
    assert d.ejected_addresses() == {B}


@pytest.mark.parametrize(
    ("pool_size", "percent", "most"),
    [
        (1, 50, 0),
        (2, 50, 1),
        (3, 50, 1),
        (4, 50, 2),
        (5, 50, 2),
        (1, 100, 1),
        (4, 100, 4),
        (10, 0, 0),
        (10, 10, 1),
    ],
)
def test_the_cap_is_the_floor_of_pool_times_percent(pool_size: int, percent: int, most: int) -> None:
    pool = tuple(f"10.0.1.{i}:80" for i in range(pool_size))
    d = detector(Clock(), pool=pool, consecutive_5xx=1, max_ejection_percent=percent)
    for address in pool:
        fail(d, address, 1)
    assert len(d.ejected_addresses()) == most


def test_without_a_pool_every_recorded_address_counts() -> None:
    d = OutlierDetector(OutlierSpec(consecutive_5xx=1, max_ejection_percent=50), clock=Clock())
    fail(d, A, 1)  # a pool of one: not ejected
    assert not d.ejected(A)
    d.record(B, 200)
    fail(d, A, 1)
    assert d.ejected(A)
    assert d.pool_size() == 2


# --------------------------------------------------------------------------------------------
# Success rate


def sr_detector(clock: Clock, events: Events | None = None, **spec: Any) -> OutlierDetector:
    settings: dict[str, Any] = {
        "consecutive_5xx": 5,
        "interval": "10s",
        "success_rate_threshold": 0.8,
        "success_rate_window": "30s",
        "success_rate_min_requests": 100,
    }
    settings.update(spec)
    return detector(clock, events=events, **settings)


def mixed(d: OutlierDetector, address: str, requests: int, failures_per_10: int) -> None:
    """Requests with `failures_per_10` failures in every 10, never more than 3 in a row."""
    for i in range(requests):
        d.record(address, 500 if i % 10 < failures_per_10 else 200)


def test_success_rate_ejection_with_enough_volume() -> None:
    clock, events = Clock(), Events()
    d = sr_detector(clock, events)
    mixed(d, A, 100, 3)  # 70%
    mixed(d, B, 100, 1)  # 90%
    mixed(d, C, 1000, 0)
    assert d.ejected_addresses() == frozenset()  # not before the interval is up
    clock.advance(10)
    assert d.ejected(A)
    assert not d.ejected(B)
    assert events.ejected == [(A, 30.0)]


def test_success_rate_needs_the_minimum_volume() -> None:
    clock = Clock()
    d = sr_detector(clock)
    mixed(d, A, 99, 3)
    clock.advance(10)
    assert not d.ejected(A)
    mixed(d, A, 1, 3)  # the 100th
    clock.advance(10)
    assert d.ejected(A)


def test_a_rate_at_the_threshold_is_not_an_outlier() -> None:
    clock = Clock()
    d = sr_detector(clock)
    mixed(d, A, 100, 2)  # exactly 80%
    clock.advance(10)
    assert not d.ejected(A)


def test_client_errors_are_successes_for_the_rate() -> None:
    clock = Clock()
    d = sr_detector(clock)
    for _ in range(200):
        d.record(A, 404)
    clock.advance(10)
    assert not d.ejected(A)


def test_success_rate_window_expiry() -> None:
    clock = Clock(0.0)  # the window has 10 slots of 3 s: [0, 3), [3, 6), ...
    d = sr_detector(clock, success_rate_window="30s", interval="10s")
    mixed(d, A, 100, 3)
    clock.now = 5
    d.record(B, 200)  # the first evaluation is not due yet (at 10 s)
    clock.now = 30  # the failures have left the window before it runs
    assert not d.ejected(A)

    # Failures spread over the window count together. Evaluations: at 30 s, then at the first
    # call from 40 s on, and so on.
    clock.now = 33
    mixed(d, A, 40, 3)
    clock.now = 42
    mixed(d, A, 40, 3)  # evaluates first: only 40 requests so far
    clock.now = 51
    mixed(d, A, 40, 3)
    clock.now = 52
    assert d.ejected(A)  # 120 requests from 33 s to 51 s, 70% successful


def test_evaluated_at_most_every_interval() -> None:
    clock = Clock(0.0)
    d = sr_detector(clock)
    clock.now = 10
    assert not d.ejected(A)  # evaluates: nothing to find; the next one is due at 20 s
    mixed(d, A, 100, 4)
    clock.now = 19.999
    assert not d.ejected(A)
    clock.now = 20
    assert d.ejected(A)


def test_the_worst_are_ejected_first_within_the_cap() -> None:
    clock = Clock()
    d = sr_detector(clock, max_ejection_percent=25)
    mixed(d, A, 100, 3)
    mixed(d, B, 100, 4)
    clock.advance(10)
    assert d.ejected_addresses() == {B}


def test_an_ejected_endpoint_returns_with_an_empty_window() -> None:
    clock = Clock(0.0)
    d = sr_detector(clock, base_ejection="1s")
    mixed(d, A, 100, 3)
    clock.now = 10
    assert d.ejected(A)
    clock.now = 11
    assert not d.ejected(A)
    mixed(d, A, 40, 0)
    clock.now = 20
    # 140 requests, 30 failures (78%) if the old ones still counted; they do not
    assert not d.ejected(A)


# --------------------------------------------------------------------------------------------
# The pool


def test_set_pool_forgets_addresses_that_left() -> None:
    clock, events = Clock(), Events()
    d = detector(clock, events=events, consecutive_5xx=2)
    fail(d, A, 2)
    fail(d, B, 1)
    assert d.ejected(A)
    d.set_pool([C, D])
    assert not d.ejected(A)
    assert d.ejected_addresses() == frozenset()
    assert events.returned == []  # it left; it did not come back
    fail(d, A, 5)  # no longer an endpoint of this service: ignored
    assert not d.ejected(A)

    d.set_pool([A, B, C, D])  # back, afresh: counts and ejection multiplier
    fail(d, B, 1)
    assert not d.ejected(B)
    fail(d, A, 2)
    assert d.ejected(A)
    assert events.ejected[-1] == (A, 30.0)


def test_a_smaller_pool_keeps_current_ejections() -> None:
    d = detector(Clock(), consecutive_5xx=1, max_ejection_percent=50)
    fail(d, A, 1)
    fail(d, B, 1)
    d.set_pool([A, B, C])
    assert d.ejected_addresses() == {A, B}  # over the cap now, but they end on their own
    fail(d, C, 1)
    assert not d.ejected(C)


# --------------------------------------------------------------------------------------------
# Callbacks and threads


def test_callbacks_may_call_back_into_the_detector() -> None:
    clock = Clock()
    seen: list[frozenset[str]] = []
    d: OutlierDetector

    def on_eject(address: str, seconds: float) -> None:
        seen.append(d.ejected_addresses())

    def on_return(address: str) -> None:
        seen.append(d.ejected_addresses())

    d = OutlierDetector(OutlierSpec(consecutive_5xx=1), clock=clock, on_eject=on_eject, on_return=on_return)
    d.set_pool([A, B])
    fail(d, A, 1)
    clock.advance(30)
    assert not d.ejected(A)
    assert seen == [frozenset({A}), frozenset()]


def test_concurrent_records() -> None:
    clock = Clock()
    events = Events()
    pool = tuple(f"10.0.2.{i}:80" for i in range(20))
    d = detector(clock, pool=pool, events=events, consecutive_5xx=3, max_ejection_percent=50)
    failing = set(pool[:10])
    start = threading.Barrier(8)

    def worker(k: int) -> None:
        start.wait()
        for i in range(2000):
            address = pool[(k + i) % len(pool)]
            d.record(address, 500 if address in failing else 200)
            d.ejected(address)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert d.ejected_addresses() == failing  # the clock stands still: nobody returns
    assert d.ejections_total == len(events.ejected) == 10


# --------------------------------------------------------------------------------------------
# Reinstatement


def test_reinstate_ends_an_ejection_early_and_keeps_the_multiplier() -> None:
    clock, events = Clock(), Events()
    d = detector(clock, events=events, consecutive_5xx=2, base_ejection="30s")
    fail(d, A, 2)
    assert d.ejected(A)
    clock.advance(1)
    d.reinstate(A)  # a request sent anyway (panic, or a breaker's probe) succeeded
    assert not d.ejected(A) and events.returned == [A]
    fail(d, A, 2)  # ejected again at once: the multiplier remembers the first time
    assert events.ejected == [(A, 30.0), (A, 60.0)]
    d.reinstate(B)  # not ejected: nothing to do
    assert events.returned == [A]


def test_reinstate_with_forget_starts_the_endpoint_afresh() -> None:
    clock, events = Clock(), Events()
    d = detector(clock, events=events, consecutive_5xx=2, base_ejection="30s")
    fail(d, A, 2)
    d.reinstate(A, forget=True)  # a new process at the address
    assert not d.ejected(A) and events.returned == []
    fail(d, A, 1)
    assert not d.ejected(A)  # its count started over
    fail(d, A, 1)
    assert events.ejected == [(A, 30.0), (A, 30.0)]  # and its multiplier too


def test_the_default_accrual_is_outlier_specs_defaults_as_plain_data() -> None:
    import dataclasses

    assert dataclasses.asdict(OutlierDefaults()) == dict(OutlierSpec())  # attribute values, not dumped
    assert OutlierDefaults() == DEFAULT_ACCRUAL
