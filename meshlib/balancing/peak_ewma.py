"""Peak EWMA by the power of two choices (Finagle's and Linkerd's latency-aware balancer)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

from meshlib.balancing.least_request import PowerOfTwoChoices
from meshlib.endpoint import Endpoint


class PeakEwma(PowerOfTwoChoices):
    """Power of two choices on `load.cost() / weight`.

    The cost (see `EndpointLoad.cost`) is the peak-sensitive moving average of latency times
    (requests in flight + 1): a latency spike counts at once, a recovery is learned over the
    decay time, and an endpoint nobody has heard from for a while decays towards zero cost, so
    it is tried again. An endpoint with requests in flight but no latency known yet costs a
    large penalty, so a new or silent endpoint is not flooded before its first answer.
    The decay time is the Destination's `peak_ewma.decay` (set on the loads by the Snapshot),
    and a wait every busy endpoint shared (a stall of the caller) is not counted as anyone's
    peak (meshlib.stalls).

    Options: `clock`, the monotonic clock the costs are read at (time.monotonic; it must be
    the clock the pipeline passes to `EndpointLoad.observe`).
    """

    __slots__ = ("_clock",)

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(endpoints, rng=rng)
        self._clock = clock

    def _choose(self, a: Endpoint, wa: float, b: Endpoint, wb: float) -> Endpoint:
        now = self._clock()
        # cost_a / wa <= cost_b / wb, without dividing
        return a if a.load.cost(now) * wb <= b.load.cost(now) * wa else b
