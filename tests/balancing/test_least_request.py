from __future__ import annotations

import random
from collections import Counter

import pytest

from meshlib.balancing import LeastRequest
from meshlib.endpoint import Endpoint


def endpoints(*weights: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:80", weight=w) for i, w in enumerate(weights)]


def shares(balancer: LeastRequest, n: int, exclude: frozenset[str] = frozenset()) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(n):
        ep = balancer.pick(exclude=exclude)
        assert ep is not None
        counts[ep.address] += 1
    return counts


def test_busy_endpoint_gets_clearly_less() -> None:
    eps = endpoints(1, 1, 1, 1)
    eps[0].load.outstanding = 20
    eps[1].load.outstanding = 1
    counts = shares(LeastRequest(eps, rng=random.Random(1)), 10_000)
    assert counts[eps[0].address] / 10_000 < 0.02
    # the one with a single request in flight wins only against the busy one
    assert counts[eps[1].address] / 10_000 == pytest.approx(1 / 6, abs=0.03)
    assert counts[eps[2].address] / 10_000 == pytest.approx(5 / 12, abs=0.03)


def test_equal_load_follows_weights() -> None:
    a, b = endpoints(1, 3)
    counts = shares(LeastRequest([a, b], rng=random.Random(2)), 20_000)
    assert counts[a.address] / 20_000 == pytest.approx(0.25, abs=0.025)


def test_load_is_compared_per_unit_of_weight() -> None:
    big, small = endpoints(4, 1)
    big.load.outstanding = 3  # 0.75 per unit of weight
    small.load.outstanding = 1  # 1.0
    lr = LeastRequest([big, small], rng=random.Random(3))
    assert {lr.pick() for _ in range(100)} == {big}
    big.load.outstanding = 5  # 1.25
    assert {lr.pick() for _ in range(100)} == {small}


def test_candidates_are_drawn_among_the_non_excluded() -> None:
    eps = endpoints(1, 1, 1)
    eps[0].load.outstanding = 10
    lr = LeastRequest(eps, rng=random.Random(4))
    # the pair can only be {0, 2}: 2 always wins
    assert {lr.pick(exclude={eps[1].address}) for _ in range(200)} == {eps[2]}
    # a single candidate is returned, however loaded
    assert {lr.pick(exclude={eps[1].address, eps[2].address}) for _ in range(20)} == {eps[0]}


def test_single_endpoint_is_returned_however_loaded() -> None:
    (only,) = endpoints(1)
    only.load.outstanding = 100
    lr = LeastRequest([only], rng=random.Random(5))
    assert lr.pick() is only
    assert lr.pick(exclude={only.address}) is None


def test_stuck_endpoint_is_starved_in_a_closed_loop() -> None:
    """Requests finish at once on three endpoints and never on the fourth."""
    eps = endpoints(1, 1, 1, 1)
    stuck = eps[3]
    lr = LeastRequest(eps, rng=random.Random(6))
    counts: Counter[str] = Counter()
    for _ in range(4000):
        ep = lr.pick()
        assert ep is not None
        counts[ep.address] += 1
        ep.load.start()
        if ep is not stuck:
            ep.load.finish()
    assert counts[stuck.address] <= 5
