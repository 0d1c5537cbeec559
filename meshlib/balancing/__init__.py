"""Load balancers: each picks one endpoint of a set per attempt (see `base.Balancer`).

`REGISTRY` is the one list of balancers: the rules accept exactly its names (the
`load_balancer` field of a Destination) and docs/rules.md lists them with its descriptions
(a test checks). All of them honour endpoint weights (an endpoint with weight 0 takes no
traffic unless all do), skip the addresses in `exclude`, and return None when nothing is left.
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence
from typing import Any

from meshlib.balancing.base import NOTHING, Balancer
from meshlib.balancing.least_request import LeastRequest, PowerOfTwoChoices
from meshlib.balancing.peak_ewma import PeakEwma
from meshlib.balancing.prequal import Prequal
from meshlib.balancing.ring_hash import RingHash
from meshlib.balancing.round_robin import RoundRobin
from meshlib.balancing.weighted_random import Random
from meshlib.balancing.weighted_round_robin import WeightedRoundRobin
from meshlib.endpoint import Endpoint

REGISTRY: tuple[tuple[str, type, str], ...] = (  # name, class, how it picks (in the docs' order)
    ("round_robin", RoundRobin, "cycles through the endpoints in proportion to their weights"),
    ("random", Random, "independent random draws in proportion to the weights"),
    ("least_request", LeastRequest, "the less loaded of two random endpoints (P2C), per weight"),
    ("peak_ewma", PeakEwma, "P2C on a peak-sensitive latency average (as Finagle and Linkerd do)"),
    ("ring_hash", RingHash, "the same key to the same endpoint while the set is stable"),
    (
        "weighted_round_robin",
        WeightedRoundRobin,
        "round robin weighted by the load endpoints report (gRPC A58)",
    ),
    ("prequal", Prequal, "probed requests in flight and latency, hot-cold rule (Google's Prequal)"),
)
BALANCERS: dict[str, type] = {name: cls for name, cls, _ in REGISTRY}


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
    "REGISTRY",
    "Balancer",
    "LeastRequest",
    "PeakEwma",
    "PowerOfTwoChoices",
    "Prequal",
    "Random",
    "RingHash",
    "RoundRobin",
    "WeightedRoundRobin",
    "make_balancer",
]
