"""LeaseClock: a lease's time left as last heard, counted down; what is stale is asked again."""

from __future__ import annotations

from meshlib.control.lease_clock import FORGET, FRESH, LeaseClock


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_time_left_counts_down_from_what_was_heard() -> None:
    clock = Clock()
    leases = LeaseClock(clock)
    assert leases.left(7) is None
    leases.heard(7, 10.0)  # a grant or a keepalive: exact
    clock.now += 2.5
    assert leases.left(7) == 7.5
    clock.now += 20
    assert leases.left(7) == 0.0  # never below zero
    leases.heard_truncated(8, 4)  # etcd said 4: somewhere in [4, 5)
    assert leases.left(8) == 4.5
    leases.heard_truncated(9, -1)  # expired or revoked
    assert leases.left(9) == 0.0


def test_stale_leases_are_the_unknown_and_the_not_heard_lately_longest_first() -> None:
    clock = Clock()
    leases = LeaseClock(clock)
    leases.heard(1, 10.0)
    clock.now += FRESH / 2
    leases.heard(2, 10.0)
    assert leases.stale([1, 2, 3, 0]) == [3]  # unknown; 0 is no lease
    clock.now += FRESH / 2
    assert leases.stale([2, 1, 3]) == [3, 1]  # 1 is a FRESH old now; 2 is not yet
    clock.now += FRESH
    assert leases.stale([2, 1]) == [1, 2]


def test_leases_not_heard_of_for_long_are_forgotten() -> None:
    clock = Clock()
    leases = LeaseClock(clock)
    leases.heard(1, 10.0)
    clock.now += FORGET + 1
    leases.heard(2, 10.0)  # the first look after FORGET prunes
    assert leases.left(1) is None and leases.left(2) == 10.0
