from __future__ import annotations

import random
import threading
from collections import Counter
from itertools import groupby

from meshlib.balancing import RoundRobin
from meshlib.endpoint import Endpoint


def endpoints(*weights: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:80", weight=w) for i, w in enumerate(weights)]


def picks(balancer: RoundRobin, n: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    out = []
    for _ in range(n):
        ep = balancer.pick(exclude=exclude)
        assert ep is not None
        out.append(ep.address)
    return out


def test_equal_weights_rotate_strictly() -> None:
    eps = endpoints(1, 1, 1, 1, 1, 1, 1)
    seq = picks(RoundRobin(eps, rng=random.Random(3)), 7 * 50)
    first = seq[:7]
    assert sorted(first) == sorted(ep.address for ep in eps)
    assert seq == first * 50
    assert set(Counter(seq).values()) == {50}


def test_start_is_random_across_clients() -> None:
    eps = endpoints(*[1] * 10)
    firsts = {RoundRobin(eps, rng=random.Random(seed)).pick() for seed in range(60)}
    assert len(firsts) >= 7


def test_three_to_one_interleaves() -> None:
    a, b = endpoints(3, 1)
    for seed in range(20):
        rr = RoundRobin([a, b], rng=random.Random(seed))
        seq = ["A" if x == a.address else "B" for x in picks(rr, 400)]
        assert seq.count("A") == 300
        assert seq.count("B") == 100
        runs = [(k, len(list(g))) for k, g in groupby(seq)]
        assert max(n for k, n in runs if k == "B") == 1
        assert max(n for k, n in runs if k == "A") <= 3


def test_weighted_schedule_is_smooth_and_exact_per_period() -> None:
    weights = (5, 3, 1, 1)
    eps = endpoints(*weights)
    total = sum(weights)
    for seed in range(20):
        seq = picks(RoundRobin(eps, rng=random.Random(seed)), 50 * total)
        # Every window of one period holds each endpoint exactly `weight` times.
        for start in range(0, len(seq) - total, 7):
            window = Counter(seq[start : start + total])
            assert [window[ep.address] for ep in eps] == list(weights)
        # No endpoint runs ahead of or behind its share by as much as two picks at any point.
        counts: Counter[str] = Counter()
        for m, address in enumerate(seq, start=1):
            counts[address] += 1
            for ep in eps:
                assert abs(counts[ep.address] - m * ep.weight / total) < 2


def test_exclusion_keeps_the_rotation() -> None:
    eps = endpoints(1, 1, 1, 1)
    rr = RoundRobin(eps, rng=random.Random(5))
    order = picks(rr, 4)
    # order[0] is due next; excluding it gives order[1] and order[0] keeps its place.
    assert rr.pick(exclude=frozenset({order[0]})).address == order[1]  # type: ignore[union-attr]
    assert picks(rr, 7) == [order[0], order[2], order[3], *order]


def test_excluded_endpoint_is_never_picked() -> None:
    eps = endpoints(3, 2, 1)
    rr = RoundRobin(eps, rng=random.Random(9))
    seq = picks(rr, 300, exclude=frozenset({eps[0].address}))
    counts = Counter(seq)
    assert eps[0].address not in counts
    assert counts[eps[1].address] == 200
    assert counts[eps[2].address] == 100


def test_long_exclusion_does_not_cause_a_burst() -> None:
    eps = endpoints(1, 1, 1, 1)
    rr = RoundRobin(eps, rng=random.Random(1))
    away = eps[2].address
    during = Counter(picks(rr, 99, exclude=frozenset({away})))
    assert sorted(during.values()) == [33, 33, 33]
    after = picks(rr, 40)
    assert after.count(away) <= 12  # its fair 10, plus at most one slot caught up
    assert max(len(list(g)) for _, g in groupby(after)) <= 2


def test_all_excluded_returns_none_and_keeps_state() -> None:
    eps = endpoints(1, 1, 1)
    rr = RoundRobin(eps, rng=random.Random(2))
    order = picks(rr, 3)
    assert rr.pick(exclude=frozenset(ep.address for ep in eps)) is None
    assert picks(rr, 6) == order * 2


def test_zero_weight_takes_no_traffic_unless_all_are_zero() -> None:
    eps = endpoints(0, 1, 2)
    assert eps[0].address not in picks(RoundRobin(eps, rng=random.Random(1)), 30)
    zeros = endpoints(0, 0)
    assert set(Counter(picks(RoundRobin(zeros, rng=random.Random(1)), 10)).values()) == {5}


def test_concurrent_picks_keep_exact_counts() -> None:
    eps = endpoints(*[1] * 10)
    rr = RoundRobin(eps, rng=random.Random(4))
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def worker() -> None:
        local = Counter(picks(rr, 2500))
        with lock:
            counts.update(local)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(counts.values()) == {1000}
