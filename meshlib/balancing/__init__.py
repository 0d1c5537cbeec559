"""Load balancers: each picks one endpoint of a set per attempt (see `base.Balancer`).

| name            | class          | how it picks                                                   |
|-----------------|----------------|----------------------------------------------------------------|
| `round_robin`   | RoundRobin     | smooth weighted rotation (earliest deadline first)             |
| `random`        | Random         | independent weighted random draws                              |
| `least_request` | LeastRequest   | two random choices, fewer requests in flight per weight wins   |
| `peak_ewma`     | PeakEwma       | two random choices, lower peak-EWMA latency cost per weight wins |
| `ring_hash`     | RingHash       | consistent hashing of the request's key on a ring              |

All of them honour endpoint weights (an endpoint with weight 0 takes no traffic unless all do),
skip the addresses in `exclude`, and return None when nothing is left to pick.
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence
from typing import Any

from meshlib.balancing.base import NOTHING, Balancer
from meshlib.balancing.least_request import LeastRequest, PowerOfTwoChoices
from meshlib.balancing.peak_ewma import PeakEwma
from meshlib.balancing.ring_hash import RingHash
from meshlib.balancing.round_robin import RoundRobin
from meshlib.balancing.weighted_random import Random
from meshlib.endpoint import Endpoint

BALANCERS: dict[str, type] = {
    "round_robin": RoundRobin,
    "random": Random,
    "least_request": LeastRequest,
    "peak_ewma": PeakEwma,
    "ring_hash": RingHash,
}


def make_balancer(
    name: str, endpoints: Sequence[Endpoint], *, rng: _random.Random | None = None, **options: Any
) -> Balancer:
    """Build the balancer called `name` over `endpoints`; `options` go to its constructor."""
    try:
        cls = BALANCERS[name]
    except KeyError:
        known = ", ".join(sorted(BALANCERS))
        raise ValueError(f"unknown load balancer {name!r}; expected one of: {known}") from None
    balancer: Balancer = cls(endpoints, rng=rng, **options)
    return balancer


__all__ = [
    "BALANCERS",
    "NOTHING",
    "Balancer",
    "LeastRequest",
    "PeakEwma",
    "PowerOfTwoChoices",
    "Random",
    "RingHash",
    "RoundRobin",
    "make_balancer",
]
