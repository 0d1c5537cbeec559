"""The zone choice of zone-aware routing (Envoy's local share and residual spill), with seeded
random numbers: which zone, and in what proportions, for given healthy endpoints."""

from __future__ import annotations

import random
from collections import Counter

from meshlib.balancing import make_balancer
from meshlib.balancing.zones import ZonePool, choose_zone
from meshlib.endpoint import Endpoint


def pool(**per_zone: int) -> ZonePool:
    """`a=2, b=3` -> endpoints a0, a1, b0, b1, b2 (address = name) in their zones."""
    members = [Endpoint(f"{z}{i}:80", {"zone": z}) for z, n in per_zone.items() for i in range(n)]
    return ZonePool(members, lambda group: make_balancer("round_robin", group))


def shares(p: ZonePool, local: str | None, unhealthy: frozenset[str] = frozenset(), n: int = 4000) -> dict:
    rng = random.Random(7)
    counts = Counter(choose_zone(p, local, unhealthy, 6, rng) for _ in range(n))
    return {z: c / n for z, c in counts.items()}


def test_all_local_while_the_local_zone_has_its_share() -> None:
    assert shares(pool(a=2, b=2, c=2), "a") == {"a": 1.0}
    assert shares(pool(a=3, b=2, c=1), "a") == {"a": 1.0}  # more than its share: still all local
    # one of c's two ejected: a still holds 2 of 5 healthy, above its third
    assert shares(pool(a=2, b=2, c=2), "a", frozenset({"c0:80"})) == {"a": 1.0}


def test_fewer_than_its_share_spills_the_residue_to_zones_with_room() -> None:
    # a has 1 of 6 (share 1/3): half stays local; b (3/6) has room 1/6, c (2/6) none
    got = shares(pool(a=1, b=3, c=2), "a")
    assert set(got) == {"a", "b"}
    assert abs(got["a"] - 0.5) < 0.04
    # one of a's two ejected: 1 of 5 healthy -> 0.6 local, the rest evenly over b and c
    got = shares(pool(a=2, b=2, c=2), "a", frozenset({"a0:80"}))
    assert abs(got["a"] - 0.6) < 0.04
    assert abs(got["b"] - 0.2) < 0.03 and abs(got["c"] - 0.2) < 0.03
    # residual capacity, not size, sets the split: b has 3/8 - 1/3, c 4/8 - 1/3 (4 times b)
    got = shares(pool(a=1, b=3, c=4), "a")
    assert abs(got["a"] - 0.375) < 0.04
    assert abs(got["c"] / got["b"] - 4.0) < 0.8


def test_local_zone_all_ejected_spills_everything() -> None:
    got = shares(pool(a=2, b=2, c=2), "a", frozenset({"a0:80", "a1:80"}))
    assert "a" not in got
    assert abs(got["b"] - 0.5) < 0.04


def test_falls_back_to_the_whole_pool() -> None:
    rng = random.Random(1)
    assert choose_zone(pool(a=2, b=2, c=2), None, frozenset(), 6, rng) is None  # caller has no zone
    assert choose_zone(pool(a=2, b=2, c=1), "a", frozenset(), 6, rng) is None  # smaller than min size
    assert choose_zone(pool(b=3, c=3), "a", frozenset(), 6, rng) is None  # caller's zone not in the pool
    every = [Endpoint(f"a{i}:80", {"zone": "a"}) for i in range(6)] + [Endpoint("x:80")]
    unlabelled = ZonePool(every, lambda group: make_balancer("round_robin", group))
    assert not unlabelled.complete
    assert choose_zone(unlabelled, "a", frozenset(), 6, rng) is None  # an endpoint without a zone
    all_out = frozenset(f"{z}{i}:80" for z in "abc" for i in range(2))
    assert choose_zone(pool(a=2, b=2, c=2), "a", all_out, 6, rng) is None  # nothing healthy


def test_one_balancer_per_zone_over_its_endpoints() -> None:
    p = pool(a=2, b=1)
    assert {z: [e.address for e in b.endpoints] for z, b in p.balancers.items()} == {
        "a": ["a0:80", "a1:80"],
        "b": ["b0:80"],
    }
