"""Endpoints as the data plane sees them, and the load figures balancers read.

An `Endpoint` is immutable and belongs to one Snapshot. Its `load` (outstanding requests,
peak-EWMA latency) is mutable and keyed by address in a `LoadBook` that outlives Snapshots,
so a rules change does not make the balancers forget what they learned about a slow host.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from meshlib.stalls import Stalls

if TYPE_CHECKING:
    from meshlib.balancing.orca import LoadReport
    from meshlib.balancing.prequal import ProbeHub

DEFAULT_DECAY_S = 10.0
"""Peak-EWMA decay time (Finagle and Linkerd use 10 s)."""

PENALTY_S = 1.0e3
"""Cost of an endpoint with requests in flight but no latency observed yet (Finagle's Penalty)."""

RECENT = 8
"""Answers `EndpointLoad.recent_rtt` is the median of."""

WAITING = 1024
"""Start stamps `EndpointLoad.waited` keeps at most (only the oldest count; a bound, not a need)."""


class EndpointLoad:
    """Outstanding requests, a peak-sensitive moving average of latency, the latest answers'
    latencies (`recent_rtt`) and how long the oldest request still waiting has waited (`waited`)
    for one address.

    Mutated from the request path without a lock: single increments and float stores are
    atomic enough under the GIL, and a lost update only nudges a heuristic. `stalls` is shared
    by every load of one caller (the `LoadBook`), so a wait they all shared is not taken as one
    endpoint's peak (meshlib.stalls); a load made alone has its own and sees no common stall.
    """

    __slots__ = (
        "_ewma",
        "_stamp",
        "decay",
        "outstanding",
        "recent",
        "report",
        "reported",
        "reported_since",
        "stalls",
        "waiting",
    )

    def __init__(self, decay: float = DEFAULT_DECAY_S, stalls: Stalls | None = None) -> None:
        self.outstanding = 0
        self._ewma = 0.0
        # the latest answers' latencies, whose median has neither the peak EWMA's hold on one
        # spike (a first answer's connection setup, a pause) nor its decay while nobody asks
        self.recent: deque[float] = deque(maxlen=RECENT)
        # when the requests still waiting for their answer started, oldest first: an answer takes
        # the oldest stamp off, whichever request it answers (see `waited`)
        self.waiting: deque[float] = deque(maxlen=WAITING)
        self._stamp = time.monotonic()
        self.decay = decay
        self.stalls = stalls if stalls is not None else Stalls()
        # the endpoint's own word on its load (ORCA, meshlib.balancing.orca): the last report
        # that said something (utilization and rate above 0), when it came, and since when they
        # have come without a gap longer than the weight expiration (0.0: not now; gRFC A58's
        # last_updated and non_empty_since; weighted_round_robin resets it when they expire)
        self.report: LoadReport | None = None
        self.reported = 0.0
        self.reported_since = 0.0

    def start(self, now: float | None = None) -> None:
        """A request is sent (`now`: when, on the monotonic clock)."""
        self.outstanding += 1
        self.waiting.append(time.monotonic() if now is None else now)

    def finish(self) -> None:
        if self.outstanding > 0:
            self.outstanding -= 1
        if not self.outstanding:
            self.waiting.clear()  # a stamp whose answer was never observed goes with the last one

    def waited(self, now: float) -> float:
        """How long the oldest request still waiting for its answer has waited, at least (0: none):
        a lower bound on the endpoint's latency now, known before any late answer comes.

        An answer takes off the oldest stamp, not its own request's, so the stamps left are the
        latest starts, as many as the requests waiting; the oldest of them is no older than the
        oldest request waiting (if one of those latest has been answered, an older one has not).
        """
        if not self.outstanding:
            return 0.0
        try:
            return max(now - self.waiting[0], 0.0)
        except IndexError:  # none waiting (or taken off meanwhile by another thread)
            return 0.0

    def observe(self, rtt: float, now: float | None = None) -> None:
        """Fold one round-trip time (seconds) into the average; a peak replaces it at once,
        less the part of the wait that every endpoint shared (a stall of the caller)."""
        if now is None:
            now = time.monotonic()
        try:  # noqa: SIM105 - no context manager per answer
            self.waiting.popleft()
        except IndexError:  # an answer to no stamped request (a test's, or a stamp cleared)
            pass
        stalls = self.stalls
        if rtt > self._ewma > 0.0 or now - rtt < stalls.end:
            own = stalls.judge(self, rtt, now, self._ewma)
            if own < rtt and own <= self._ewma:
                return  # late only by a stall all shared: it says nothing, not even "faster"
            rtt = own
        elif now > stalls.on_time and stalls.pending is not self:
            stalls.on_time = now  # an answer on time: the caller was running
        self.recent.append(rtt)
        td = now - self._stamp
        self._stamp = now
        if rtt > self._ewma:
            self._ewma = rtt
        elif td > 0.0:
            w = math.exp(-td / self.decay)
            self._ewma = self._ewma * w + rtt * (1.0 - w)

    def take_report(self, report: LoadReport, now: float) -> None:
        """A load report came with a response: kept when it says something (A58 ignores a report
        of zero utilization or zero rate: the endpoint's weight would be 0 or undefined)."""
        if report.rps_fractional > 0.0 and report.utilization > 0.0:
            self.report = report
            self.reported = now
            if self.reported_since == 0.0:
                self.reported_since = now

    def unpeak(self, prior: float, value: float) -> None:
        """Take back a peak found to be a common stall: the average goes down to `value` (what
        is left of that answer), never below `prior` (the average before it), never up."""
        value = max(prior, value)
        if value < self._ewma:
            self._ewma = value

    def latency(self, now: float | None = None) -> float:
        """The average as of `now`, decayed towards zero for the time nothing was observed."""
        now = time.monotonic() if now is None else now
        td = max(now - self._stamp, 0.0)
        return self._ewma * math.exp(-td / self.decay)

    def recent_rtt(self) -> float:
        """The median latency of the latest RECENT answers (the upper middle; 0: none yet)."""
        recent = sorted(self.recent)
        return recent[len(recent) // 2] if recent else 0.0

    def cost(self, now: float | None = None) -> float:
        """Peak-EWMA cost: latency x (outstanding + 1), with a penalty while nothing is known."""
        lat = self.latency(now)
        if lat == 0.0 and self.outstanding:
            return PENALTY_S + self.outstanding
        return lat * (self.outstanding + 1)


class LoadBook:
    """Per-address load records shared by every Snapshot of one Mesh."""

    def __init__(self, decay: float = DEFAULT_DECAY_S) -> None:
        self._loads: dict[str, EndpointLoad] = {}
        self.decay = decay  # for a service whose Destination sets no `peak_ewma.decay`
        self.stalls = Stalls()
        from meshlib.balancing.prequal import ProbeHub  # (meshlib.balancing imports this module)

        self.probes: ProbeHub = ProbeHub()  # prequal's probe pools, per service and address set

    def get(self, address: str) -> EndpointLoad:
        load = self._loads.get(address)
        if load is None:
            load = self._loads.setdefault(address, EndpointLoad(self.decay, self.stalls))
        return load


_EMPTY: Mapping[str, str] = MappingProxyType({})

PROTOCOL_LABEL = "meshlib.io/protocol"
"""The label that says which protocol an endpoint speaks: `grpc`, or `http` (also when absent).
A service may have both; an HTTP client never picks a `grpc` endpoint, and a gRPC channel picks
the `grpc` ones (the unlabelled ones when the service has none)."""


@dataclass(frozen=True, slots=True, eq=False)
class Endpoint:
    """One instance of a service: where it is, what it is (labels), how much traffic it takes."""

    address: str  # "host:port"
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    weight: int = 1
    load: EndpointLoad = field(default_factory=EndpointLoad, repr=False)
    host: str = field(init=False, repr=False)  # from `address`, once: read on every request
    port: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        host, _, port = self.address.rpartition(":")
        object.__setattr__(self, "host", host.strip("[]"))
        object.__setattr__(self, "port", int(port))

    def matches(self, selector: Mapping[str, str]) -> bool:
        """True when every label of `selector` is on this endpoint (a subset's membership test)."""
        labels = self.labels
        return all(labels.get(k) == v for k, v in selector.items())
