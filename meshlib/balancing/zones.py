"""Zone-aware routing: which zone an attempt goes to, before the balancer picks within it.

Envoy's semantics (its "zone aware routing"): while the caller's zone holds at least its share
of the pool's healthy endpoints, every attempt stays in it; below that share, the local zone
takes what its healthy endpoints can carry and the residue spills to the other zones in
proportion to their residual capacity (healthy share above their own). The caller's share is
one zone's worth of the zones the pool spans (callers assumed spread evenly over them, as a
topology spread places them), so a healthy, even deployment keeps all traffic local.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence

from meshlib.balancing.base import Balancer
from meshlib.endpoint import Endpoint

ZONE_LABEL = "zone"
"""The endpoint label naming its zone (the Kubernetes provider sets it from EndpointSlices)."""


class ZonePool:
    """One subset's endpoints grouped by zone, each zone with its own balancer.

    `complete` is False when an endpoint has no zone label: zone-aware routing then stands
    aside and the subset's own balancer picks (no zone to prefer is better than a wrong one).
    """

    __slots__ = ("addresses", "balancers", "complete", "counts", "size")

    def __init__(self, members: Sequence[Endpoint], make: Callable[[Sequence[Endpoint]], Balancer]) -> None:
        groups: dict[str, list[Endpoint]] = {}
        self.complete = True
        for e in members:
            zone = e.labels.get(ZONE_LABEL)
            if not zone:
                self.complete = False
                continue
            groups.setdefault(zone, []).append(e)
        self.size = len(members)
        self.addresses: dict[str, tuple[str, ...]] = {
            z: tuple(e.address for e in group) for z, group in groups.items()
        }
        self.counts = {z: len(group) for z, group in groups.items()}  # healthy counts when all are
        self.balancers: dict[str, Balancer] = {z: make(group) for z, group in groups.items()}


def choose_zone(
    pool: ZonePool,
    local: str | None,
    unhealthy: Collection[str],
    min_cluster_size: int,
    rng: random.Random,
) -> str | None:
    """The zone this attempt goes to, or None for the whole subset (no zone routing).

    None when the caller has no zone, the pool lacks zone labels or the caller's zone, it is
    smaller than `min_cluster_size`, or nothing is healthy. `unhealthy` holds the addresses the
    pick excludes for health (ejected, breaker open), not those this request already tried.
    """
    if not local or not pool.complete or pool.size < min_cluster_size:
        return None
    zones = pool.addresses
    if local not in zones:
        return None
    if unhealthy:
        healthy = {z: sum(1 for a in addrs if a not in unhealthy) for z, addrs in zones.items()}
    else:
        healthy = pool.counts
    total = sum(healthy.values())
    if total == 0:
        return None
    share = 1.0 / len(zones)  # the caller's share of the traffic (callers spread evenly)
    local_part = healthy[local] / total
    if local_part >= share:
        return local
    if rng.random() < local_part / share:  # what the local zone can carry stays local
        return local
    residual = [(z, healthy[z] / total - share) for z in zones if z != local]
    residual = [(z, r) for z, r in residual if r > 0]
    room = sum(r for _, r in residual)
    if room <= 0:
        return None
    x = rng.random() * room
    for zone, r in residual:
        x -= r
        if x < 0:
            return zone
    return residual[-1][0]
