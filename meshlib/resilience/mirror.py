"""Traffic mirroring: a fire-and-forget copy of some requests to another subset.

The copy is handed to the protocol's wire, which sends it from the Mesh's background loop:
the caller never waits for it and never sees its result.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from meshlib.pipeline import Call, Stage

if TYPE_CHECKING:
    from meshlib.stats import TrafficStats


class MirrorFilter(Stage):
    """Sends a share of requests, as a copy nobody waits for, to the route's `mirror` subset."""

    role = "mirror"
    needs = "mirror"

    def __init__(self, stats: TrafficStats, rng: random.Random | None = None) -> None:
        self.stats = stats
        self._draw = (rng or random.Random()).random

    def enter(self, call: Call) -> None:
        assert call.route is not None
        spec = call.route.mirror
        if spec is None or self._draw() * 100 >= spec.percent:
            return
        endpoint = call.plan.balancer(spec.subset).pick(call.hash_key)
        if endpoint is None:
            self.stats.count("mirror_no_endpoint", call.service)
            return
        if call.wire.mirror(call, endpoint):
            self.stats.count("mirrored", call.service)
