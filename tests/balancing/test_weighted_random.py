from __future__ import annotations

import random
from collections import Counter

import pytest

from meshlib.balancing import Random
from meshlib.balancing.weighted_random import WeightedTable
from meshlib.endpoint import Endpoint


def endpoints(*weights: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:80", weight=w) for i, w in enumerate(weights)]


def shares(balancer: Random, n: int, exclude: frozenset[str] = frozenset()) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(n):
        ep = balancer.pick(exclude=exclude)
        assert ep is not None
        counts[ep.address] += 1
    return counts


def test_weights_give_proportions() -> None:
    a, b = endpoints(1, 3)
    counts = shares(Random([a, b], rng=random.Random(11)), 20_000)
    assert counts[a.address] / 20_000 == pytest.approx(0.25, abs=0.025)
    assert counts[b.address] / 20_000 == pytest.approx(0.75, abs=0.025)


def test_same_seed_same_sequence() -> None:
    eps = endpoints(1, 2, 3, 4)
    one = Random(eps, rng=random.Random(7))
    two = Random(eps, rng=random.Random(7))
    assert [one.pick() for _ in range(100)] == [two.pick() for _ in range(100)]


def test_exclusion_keeps_the_others_proportions() -> None:
    eps = endpoints(1, 2, 5)
    counts = shares(Random(eps, rng=random.Random(3)), 20_000, exclude=frozenset({eps[2].address}))
    assert eps[2].address not in counts
    assert counts[eps[0].address] / 20_000 == pytest.approx(1 / 3, abs=0.025)


def test_exclusion_of_the_heavy_endpoints_falls_back_to_the_light_one() -> None:
    eps = endpoints(1000, 1000, 1)
    rnd = Random(eps, rng=random.Random(1))
    exclude = frozenset({eps[0].address, eps[1].address})
    assert {rnd.pick(exclude=exclude) for _ in range(50)} == {eps[2]}


def test_zero_weight_is_never_picked() -> None:
    eps = endpoints(0, 1, 1)
    assert eps[0].address not in shares(Random(eps, rng=random.Random(1)), 2000)
    # ... even when it is the only one left
    assert Random(eps, rng=random.Random(1)).pick(exclude={eps[1].address, eps[2].address}) is None


def test_all_zero_weights_share_equally() -> None:
    eps = endpoints(0, 0)
    counts = shares(Random(eps, rng=random.Random(1)), 10_000)
    assert counts[eps[0].address] / 10_000 == pytest.approx(0.5, abs=0.025)


def test_draw_pair_samples_two_distinct_without_replacement() -> None:
    weights = [1, 2, 3, 4]
    table = WeightedTable(endpoints(*weights))
    rng = random.Random(5)
    n = 60_000
    counts = Counter(table.draw_pair(rng.random(), rng.random()) for _ in range(n))
    assert all(a != b for a, b in counts)
    total = sum(weights)
    for (a, b), seen in counts.items():
        expected = weights[a] / total * weights[b] / (total - weights[a])
        assert seen / n == pytest.approx(expected, abs=0.01)


def test_draw_pair_at_the_edges_of_the_unit_interval() -> None:
    table = WeightedTable(endpoints(1, 1, 1))
    below_one = 1.0 - 2**-53
    for u in (0.0, 0.5, below_one):
        for v in (0.0, 0.5, below_one):
            a, b = table.draw_pair(u, v)
            assert a != b
            assert 0 <= a < 3
            assert 0 <= b < 3
