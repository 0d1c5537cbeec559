from __future__ import annotations

import random
from collections import Counter

import pytest

from meshlib.balancing import RingHash
from meshlib.balancing.ring_hash import hash64
from meshlib.endpoint import Endpoint

KEYS = [f"user-{i}" for i in range(1000)]


def endpoints(*weights: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:80", weight=w) for i, w in enumerate(weights)]


def mapping(ring: RingHash, keys: list[str], exclude: frozenset[str] = frozenset()) -> dict[str, str]:
    out = {}
    for key in keys:
        ep = ring.pick(key, exclude)
        assert ep is not None
        out[key] = ep.address
    return out


def test_hash_is_stable_across_processes() -> None:
    # Fixed values: the ring must not depend on PYTHONHASHSEED, the process or the platform.
    assert hash64("10.0.0.1:80#0") == 2081222398732711032
    assert hash64("user-42") == 0x6FA0CA4D7BE6EFA6
    assert 0 <= hash64("") < 2**64


def test_same_key_same_endpoint() -> None:
    eps = endpoints(1, 1, 1, 1, 1)
    ring = RingHash(eps, rng=random.Random(1))
    first = mapping(ring, KEYS)
    assert mapping(ring, KEYS) == first
    assert len(set(first.values())) == 5


def test_same_mapping_after_a_rebuild_in_any_order() -> None:
    eps = endpoints(1, 2, 1, 3, 1)
    before = mapping(RingHash(eps, rng=random.Random(1)), KEYS)
    rebuilt = [Endpoint(ep.address, weight=ep.weight) for ep in eps]
    random.Random(2).shuffle(rebuilt)
    assert mapping(RingHash(rebuilt, rng=random.Random(3)), KEYS) == before


@pytest.mark.parametrize("leaving", range(5))
def test_removing_one_endpoint_moves_only_its_keys(leaving: int) -> None:
    keys = [f"session-{i}" for i in range(5000)]
    eps = endpoints(1, 1, 1, 1, 1)
    before = mapping(RingHash(eps), keys)
    gone = eps[leaving].address
    after = mapping(RingHash([ep for ep in eps if ep.address != gone]), keys)
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == gone}
    assert 0.12 < len(moved) / len(keys) < 0.28


def test_adding_an_endpoint_moves_keys_only_to_it() -> None:
    keys = [f"session-{i}" for i in range(5000)]
    eps = endpoints(1, 1, 1, 1, 1, 1)
    before = mapping(RingHash(eps[:5]), keys)
    after = mapping(RingHash(eps), keys)
    moved = {k for k in keys if before[k] != after[k]}
    assert {after[k] for k in moved} == {eps[5].address}
    assert 0.10 < len(moved) / len(keys) < 0.24


def test_keys_spread_evenly_over_equal_weights() -> None:
    eps = endpoints(1, 1, 1, 1, 1)
    counts = Counter(mapping(RingHash(eps), [f"k{i}" for i in range(20_000)]).values())
    for ep in eps:
        assert counts[ep.address] / 20_000 == pytest.approx(0.2, abs=0.04)


def test_weight_skews_the_key_share() -> None:
    light, heavy = endpoints(1, 3)
    ring = RingHash([light, heavy])
    assert ring.ring_size == 400
    counts = Counter(mapping(ring, [f"k{i}" for i in range(20_000)]).values())
    assert counts[heavy.address] / 20_000 == pytest.approx(0.75, abs=0.05)


def test_exclusion_walks_to_where_the_key_would_go_without_the_endpoint() -> None:
    eps = endpoints(1, 1, 1, 1)
    ring = RingHash(eps)
    for ep in eps:
        without = mapping(RingHash([e for e in eps if e is not ep]), KEYS)
        excluded = mapping(ring, KEYS, exclude=frozenset({ep.address}))
        assert excluded == without
    two = frozenset({eps[0].address, eps[1].address})
    assert set(mapping(ring, KEYS, exclude=two).values()) == {eps[2].address, eps[3].address}


def test_all_excluded_returns_none() -> None:
    eps = endpoints(1, 1, 1)
    ring = RingHash(eps)
    everything = frozenset(ep.address for ep in eps)
    assert all(ring.pick(key, everything) is None for key in KEYS[:50])
    assert ring.pick(None, everything) is None


def test_no_key_picks_by_weight() -> None:
    light, heavy = endpoints(1, 3)
    ring = RingHash([light, heavy], rng=random.Random(8))
    counts = Counter(ring.pick() for _ in range(20_000))
    assert counts[heavy] / 20_000 == pytest.approx(0.75, abs=0.025)
    assert {ring.pick(None, {heavy.address}) for _ in range(20)} == {light}


def test_options() -> None:
    eps = endpoints(1, 2)
    assert RingHash(eps, vnodes_per_weight=10).ring_size == 30
    assert RingHash(eps, vnodes_per_weight=100, max_ring_size=100).ring_size <= 100
    with pytest.raises(ValueError, match="vnodes_per_weight"):
        RingHash(eps, vnodes_per_weight=0)
    with pytest.raises(ValueError, match="max_ring_size"):
        RingHash(eps, max_ring_size=0)


def test_capped_ring_keeps_a_point_per_endpoint_and_its_mapping_stable() -> None:
    eps = endpoints(*[1] * 50)
    ring = RingHash(eps, max_ring_size=64)
    assert ring.ring_size == 50
    assert mapping(ring, KEYS) == mapping(RingHash(eps, max_ring_size=64), KEYS)


def test_odd_keys_do_not_crash() -> None:
    ring = RingHash(endpoints(1, 1))
    for key in ("", "\udcff", "é" * 1000, "\x00"):
        assert ring.pick(key) is not None
