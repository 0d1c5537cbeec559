"""Weighted round robin on the load the endpoints report themselves (gRPC's gRFC A58).

Each endpoint's weight is `qps / (utilization + eps/qps * error_utilization_penalty)` from its
last ORCA report (`EndpointLoad.report`, read off its responses by the pick stage): what it
serves per unit of load, so an endpoint twice as fast at the same utilization gets twice the
traffic. A weight counts once reports have come for `blackout_period` and is forgotten when
none has come for `weight_expiration_period`. Endpoints without a weight take the mean of the
known ones; with fewer than two known, every endpoint takes its configured weight (round robin).

The weights live on the loads, by address, so a new Snapshot's balancer starts from them at
once. Picks follow an earliest-deadline-first schedule, rebuilt from the weights every
`weight_update_period`.

Not in A58: an endpoint the caller sees answer more than `latency_tolerance` times slower than
the median endpoint has its weight cut by the square of as much. Its latency is the median of
its latest answers' (`EndpointLoad.recent_rtt`), or how long its oldest request still waiting
has waited if longer (`EndpointLoad.waited`): a slowdown shows there before any slow answer
comes. A58's weight is what an endpoint serves per unit of its utilization, which balances
utilization and is blind to latency: an endpoint slowed by something other than its own load
(a slow disk or dependency, a CPU share taken away) keeps its capacity's share, and every
request sent there waits its slow service time. For the same reason a pick passes over an
endpoint holding more than `latency_tolerance` times its weight's share of this caller's
requests in flight (plus one): answers that stopped coming show there at once, where a latency
or a report waits for an answer. Why the square: cut by as much, an endpoint n times slower
would keep a share in 1/n, and so the same part of its callers' time spent waiting, however
slow it got.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Container, Sequence
from heapq import heapify, heappop, heappush, heapreplace
from typing import TYPE_CHECKING

from meshlib.balancing.base import NOTHING
from meshlib.balancing.weighted_random import effective_weights
from meshlib.endpoint import Endpoint, EndpointLoad

if TYPE_CHECKING:
    from meshlib.balancing.orca import LoadReport
    from meshlib.rules.models import WeightedRoundRobinSpec

BLACKOUT_S = 10.0
EXPIRATION_S = 180.0
UPDATE_S = 1.0
PENALTY = 1.0
"""A58's defaults (the rules' `weighted_round_robin` fields)."""
TOLERANCE = 2.0
"""The default `latency_tolerance` (meshlib's own)."""
LATENCY_NOISE_S = 0.005
"""Latency differences this small are the caller's noise (a GC pause, a busy event loop), not
the endpoint's: an endpoint is cut only when slower than the bound by more than this."""
MAX_RATIO = 10.0
"""Reported weights are held within this factor of their median, either way: an endpoint that
reports an utilization near zero does not take all the traffic on one report, and one that
reports itself swamped still gets enough requests to say when it has recovered."""
FLOOR = 1.0 / MAX_RATIO**2
"""The least the latency cut leaves of a weight."""


def report_weight(report: LoadReport, penalty: float = PENALTY) -> float:
    """A58's weight of one report; 0 when it says nothing (no rate, or no utilization)."""
    qps = report.rps_fractional
    utilization = report.utilization
    if qps <= 0.0 or utilization <= 0.0:
        return 0.0
    return qps / (utilization + report.eps / qps * penalty)


def load_weight(
    load: EndpointLoad,
    now: float,
    blackout: float = BLACKOUT_S,
    expiration: float = EXPIRATION_S,
    penalty: float = PENALTY,
) -> float:
    """The weight an endpoint's reports give it now (A58's GetWeight): 0 while its reports are
    younger than the blackout, and once the last is older than the expiration (which also
    starts the blackout over for the reports that come after)."""
    report = load.report
    if report is None or load.reported_since == 0.0:
        return 0.0
    if now - load.reported >= expiration:
        load.reported_since = 0.0
        return 0.0
    if blackout > 0.0 and now - load.reported_since < blackout:
        return 0.0
    return report_weight(report, penalty)


def schedule_weights(reported: Sequence[float], configured: Sequence[float]) -> list[float]:
    """The weights a schedule runs on: the reported ones (within MAX_RATIO of their median),
    their mean for an endpoint without one (A58); the configured ones when fewer than two are
    known (then A58 is round robin)."""
    known = sorted(w for w in reported if w > 0.0)
    if len(known) < 2:
        return [float(w) for w in configured]
    middle = len(known) // 2
    median = known[middle] if len(known) % 2 else (known[middle - 1] + known[middle]) / 2
    low, high = median / MAX_RATIO, median * MAX_RATIO
    held = [min(max(w, low), high) if w > 0.0 else 0.0 for w in reported]
    mean = sum(w for w in held if w > 0.0) / len(known)
    return [w if w > 0.0 else mean for w in held]


def latency_scaled(weights: Sequence[float], latencies: Sequence[float], tolerance: float) -> list[float]:
    """`weights` with each endpoint slower than `tolerance` times the median latency (and
    LATENCY_NOISE_S more) cut by the square of as much (`(tolerance * median / latency) ** 2`, at
    least 1/MAX_RATIO**2: it must still get answers to show it has recovered). The median is the
    lower middle of the known latencies (0: none known), so one slow endpoint of two is still the
    slow one; unchanged with fewer than two known or `tolerance` 0."""
    bound = latency_bound(latencies, tolerance)
    if bound == math.inf:
        return list(weights)
    return [
        w * max((bound / lat) ** 2, FLOOR) if lat > bound + LATENCY_NOISE_S else w
        for w, lat in zip(weights, latencies, strict=True)
    ]


def latency_bound(latencies: Sequence[float], tolerance: float) -> float:
    """`tolerance` times the median of the known latencies (the lower middle); infinite with
    fewer than two known or `tolerance` 0 (no cut)."""
    known = sorted(x for x in latencies if x > 0.0)
    if tolerance <= 0.0 or len(known) < 2:
        return math.inf
    return tolerance * known[(len(known) - 1) // 2]


def seen_latency(load: EndpointLoad, now: float) -> float:
    """The latency the cut takes for an endpoint: its latest answers' median, or how long its
    oldest request still waiting has waited, whichever is longer (the wait is a lower bound on
    its latency now, known before the late answer comes)."""
    return max(load.recent_rtt(), load.waited(now))


class WeightedRoundRobin:
    """Earliest deadline first over weights the endpoints' load reports give (gRFC A58).

    Each endpoint is a job whose period is 1/weight; a pick takes the earliest deadline and
    moves it on by one period. A new schedule starts every endpoint at a random point of its
    first period, so clients built together do not pick in step. An excluded endpoint keeps
    its place, its lag capped at one period (no burst once it is back). Endpoints of configured
    weight 0 take no traffic unless all have it.

    Options: `weighted_round_robin`, the Destination's spec (A58's periods and penalty, and
    the latency tolerance);
    `clock`, the monotonic clock the pick stage stamps reports and requests with (time.monotonic).
    """

    reads_load_reports = True
    """The pick stage reads `endpoint-load-metrics` off responses only for balancers that say so."""

    __slots__ = (
        "_clock",
        "_configured",
        "_due",
        "_heap",
        "_live",
        "_lock",
        "_periods",
        "_random",
        "_recheck",
        "_weighed",
        "_weights",
        "blackout",
        "endpoints",
        "expiration",
        "penalty",
        "tolerance",
        "update",
    )

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        rng: random.Random | None = None,
        weighted_round_robin: WeightedRoundRobinSpec | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        spec = weighted_round_robin
        self.blackout = spec.blackout_period if spec is not None else BLACKOUT_S
        self.expiration = spec.weight_expiration_period if spec is not None else EXPIRATION_S
        self.update = spec.weight_update_period if spec is not None else UPDATE_S
        self.penalty = spec.error_utilization_penalty if spec is not None else PENALTY
        self.tolerance = spec.latency_tolerance if spec is not None else TOLERANCE
        self.endpoints: Sequence[Endpoint] = tuple(endpoints)
        configured = effective_weights(self.endpoints)
        self._live = [ep for ep, w in zip(self.endpoints, configured, strict=True) if w > 0]
        self._configured = [float(w) for w in configured if w > 0]
        self._random = (rng if rng is not None else random.Random()).random
        self._clock = clock
        self._lock = threading.Lock()
        self._weights: list[float] = []
        self._weighed = False  # the weights come from reports (not A58's round robin fallback)
        self._periods: list[float] = []
        self._heap: list[tuple[float, int]] = []
        # per endpoint, a wait of its oldest request longer than this weighs it anew at once (the
        # cut's bound, or twice the latency it is weighed with): a slowdown need not wait for
        # the next update period
        self._recheck: list[float] = []
        self._due = -math.inf  # when the schedule is to be rebuilt: at the first pick

    def pick(self, key: str | None = None, exclude: Container[str] = NOTHING) -> Endpoint | None:
        live = self._live
        if len(live) < 2:  # nothing to schedule
            if live and live[0].address not in exclude:
                return live[0]
            return None
        now = self._clock()
        with self._lock:
            if now >= self._due:
                self._rebuild(now)
            heap = self._heap
            deadline, pos = heap[0]
            ep = live[pos]
            if ep.load.outstanding and ep.load.waited(now) > self._recheck[pos]:
                self._rebuild(now)  # it has slowed down since it was weighed
                heap = self._heap
                deadline, pos = heap[0]
                ep = live[pos]
            if ep.address in exclude:
                return self._pick_excluding(exclude)
            if self._weighed and ep.load.outstanding > 1 and self.tolerance > 0.0:
                piled = self._piled(exclude)
                if ep.address in piled:
                    found = self._pick_excluding(piled)
                    if found is not None:
                        return found  # else all allowed are piled: the schedule as it is
            heapreplace(heap, (deadline + self._periods[pos], pos))
            return ep

    def _piled(self, exclude: Container[str]) -> set[str]:
        """The addresses to pass over: excluded, or holding more than `tolerance` times their
        weight's share of the requests in flight to the others, plus one (lock held)."""
        live, weights = self._live, self._weights
        outstanding = [ep.load.outstanding for ep in live]
        total, weight = sum(outstanding), sum(weights)
        piled = {ep.address for ep in live if ep.address in exclude}
        for ep, out, w in zip(live, outstanding, weights, strict=True):
            others = weight - w
            if others > 0.0 and out > self.tolerance * w * (total - out) / others + 1:
                piled.add(ep.address)
        return piled

    def weights(self) -> dict[str, float]:
        """The weight each endpoint's address has in the schedule now (0: takes no traffic)."""
        with self._lock:
            if self._clock() >= self._due and len(self._live) > 1:
                self._rebuild(self._clock())
            weights = dict(
                zip((ep.address for ep in self._live), self._weights or self._configured, strict=True)
            )
        return {ep.address: weights.get(ep.address, 0.0) for ep in self.endpoints}

    def _rebuild(self, now: float) -> None:
        """A new schedule on the weights as they are now (lock held); the same schedule goes on
        when they have not changed, so equal weights keep a strict rotation."""
        self._due = now + self.update
        reported = [
            load_weight(ep.load, now, self.blackout, self.expiration, self.penalty) for ep in self._live
        ]
        weights = schedule_weights(reported, self._configured)
        self._weighed = sum(1 for w in reported if w > 0.0) >= 2  # else A58's round robin, left plain
        self._recheck = [math.inf] * len(weights)
        if self._weighed:
            latencies = [seen_latency(ep.load, now) for ep in self._live]
            weights = latency_scaled(weights, latencies, self.tolerance)
            bound = latency_bound(latencies, self.tolerance) + LATENCY_NOISE_S
            self._recheck = [max(bound, 2.0 * lat) for lat in latencies]
        if weights == self._weights:
            return
        rand = self._random
        self._weights = weights
        self._periods = [1.0 / w for w in weights]
        start = self._heap[0][0] if self._heap else 0.0  # the new deadlines start where it is
        heap = [(start + rand() * period, pos) for pos, period in enumerate(self._periods)]
        heapify(heap)
        self._heap = heap

    def _pick_excluding(self, exclude: Container[str]) -> Endpoint | None:
        """Pop excluded endpoints until an allowed one is found, then put them back, none more
        than one period behind the schedule's time (lock held)."""
        heap = self._heap
        live = self._live
        periods = self._periods
        skipped = [heappop(heap)]
        while heap:
            deadline, pos = heappop(heap)
            if live[pos].address in exclude:
                skipped.append((deadline, pos))
                continue
            heappush(heap, (deadline + periods[pos], pos))
            for late, spos in skipped:
                heappush(heap, (max(late, deadline - periods[spos]), spos))
            return live[pos]
        heap.extend(skipped)  # everything excluded: popped in order, still a heap
        return None

    def __repr__(self) -> str:
        return f"WeightedRoundRobin({len(self.endpoints)} endpoints)"
