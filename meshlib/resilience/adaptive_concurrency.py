"""Admission under an adaptive concurrency limit, on either side of a call.

`ConcurrencyLimiter` counts requests in flight against what its `Limit` (an algorithm of
`meshlib.resilience.concurrency_limit`) says now, and tells the algorithm each admitted
request's latency when it ends. The server keeps one per service (the `ConcurrencyLimit`
document, `meshlib.inbound`), a client one per destination (`adaptive_concurrency`, in the
bulkhead's slot); both refuse the excess at once rather than queue it, since a queue is the
latency the limit exists to keep out.

Caller classes (`shares`) follow Netflix's partitioned limiter: a class below its guaranteed
share of the limit is admitted even when the limit is reached; past its share it competes for
what is left with everyone else. Requests of no listed class have no guarantee.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from meshlib.resilience.concurrency_limit import Gradient2Limit, GradientLimit, Limit, VegasLimit

if TYPE_CHECKING:
    from meshlib.rules.models import AdaptiveConcurrencySpec

Clock = Callable[[], float]


class Ticket:
    """One admitted request: when, with how many in flight, in which class."""

    __slots__ = ("in_flight", "partition", "started")

    def __init__(self, started: float, in_flight: int, partition: str | None) -> None:
        self.started = started
        self.in_flight = in_flight
        self.partition = partition


class ConcurrencyLimiter:
    """Requests in flight under `limit.limit`; thread-safe (the WSGI shell runs on threads)."""

    __slots__ = ("_lock", "_partitions", "clock", "in_flight", "limit", "rejected", "shares")

    def __init__(
        self, limit: Limit, shares: Mapping[str, float] | None = None, *, clock: Clock = time.monotonic
    ) -> None:
        self.limit = limit
        self.shares = dict(shares or {})
        self.clock = clock
        self.in_flight = 0
        self.rejected = 0
        self._partitions = dict.fromkeys(self.shares, 0)  # in flight per class
        self._lock = threading.Lock()

    @property
    def current(self) -> int:
        """The limit in force now."""
        return self.limit.limit

    def guaranteed(self, partition: str) -> int:
        """Requests of `partition` admitted whatever the others do: its share of the limit."""
        share = self.shares.get(partition, 0.0)
        return math.ceil(share * self.limit.limit) if share > 0 else 0

    def try_acquire(self, partition: str | None = None) -> Ticket | None:
        """A ticket to hand back to `release`, or None: the request is over the limit."""
        with self._lock:
            known = partition if partition in self._partitions else None
            if self.in_flight >= self.limit.limit and (
                known is None or self._partitions[known] >= self.guaranteed(known)
            ):
                self.rejected += 1
                return None
            self.in_flight += 1
            if known is not None:
                self._partitions[known] += 1
            return Ticket(self.clock(), self.in_flight, known)

    def release(self, ticket: Ticket, dropped: bool = False) -> None:
        """The request is over: its latency (admission to now) goes to the algorithm."""
        now = self.clock()
        with self._lock:
            self.in_flight -= 1
            if ticket.partition is not None:
                self._partitions[ticket.partition] -= 1
            self.limit.sample(now - ticket.started, ticket.in_flight, dropped, now)

    def partition_in_flight(self, partition: str) -> int:
        return self._partitions.get(partition, 0)


def limit_for(
    spec: AdaptiveConcurrencySpec, *, now: float | None = None, rng: Callable[[], float] = random.random
) -> Limit:
    """The algorithm a rules spec names, with its options."""
    start = time.monotonic() if now is None else now
    bounds = {"initial_limit": spec.initial_limit, "min_limit": spec.min_limit, "max_limit": spec.max_limit}
    if spec.algorithm == "gradient2":
        g2 = spec.gradient2
        assert g2 is not None  # the rules fill in the named algorithm's defaults
        return Gradient2Limit(
            **bounds,
            smoothing=g2.smoothing,
            tolerance=g2.tolerance,
            queue_size=g2.queue_size,
            long_window=g2.long_window,
            interval=g2.window,
            min_samples=g2.min_samples,
            now=start,
        )
    if spec.algorithm == "vegas":
        vegas = spec.vegas
        assert vegas is not None
        return VegasLimit(
            **bounds, smoothing=vegas.smoothing, probe_multiplier=vegas.probe_multiplier, rng=rng
        )
    gradient = spec.gradient
    assert gradient is not None
    min_rtt = gradient.min_rtt
    return GradientLimit(
        **bounds,
        interval=gradient.interval,
        percentile=gradient.percentile,
        buffer=gradient.buffer / 100.0,
        min_rtt_interval=min_rtt.interval,
        jitter=min_rtt.jitter / 100.0,
        min_rtt_requests=min_rtt.requests,
        min_rtt_concurrency=min_rtt.concurrency,
        now=start,
        rng=rng,
    )


def limiter_for(
    spec: AdaptiveConcurrencySpec, shares: Mapping[str, float] | None = None
) -> ConcurrencyLimiter:
    return ConcurrencyLimiter(limit_for(spec), shares)
