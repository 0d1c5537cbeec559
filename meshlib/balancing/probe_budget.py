"""How many prequal probes may go out: the bounds every prober (HTTP, gRPC) keeps.

One probe in flight per endpoint and pool, `max_probe_rate` a second per destination (its
Destination's `prequal.max_probe_rate`), `max_rate` a second and `max_in_flight` at once for the
whole process. What exceeds them is not sent: the pick goes on with what is pooled, or falls
back. IO-free; the probers do the sending and tell `done` when a probe is over.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlib.balancing.prequal import PrequalOptions, ProbePool
    from meshlib.endpoint import Endpoint

MAX_RATE = 1000.0
"""Probes a second from one process, over every destination."""
MAX_IN_FLIGHT = 64
"""Probes outstanding at once from one process."""


class _Bucket:
    """A token bucket: `rate` a second, bursts of a tenth of a second's worth (at least 1)."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, now: float) -> None:
        self.tokens = 1.0
        self.stamp = now

    def take(self, rate: float, now: float) -> bool:
        burst = max(1.0, rate / 10.0)
        tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


class ProbeBudget:
    """The bounds of one prober (a lock held for a few microseconds per pick, never across IO)."""

    def __init__(
        self,
        *,
        max_rate: float = MAX_RATE,
        max_in_flight: int = MAX_IN_FLIGHT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_rate = max_rate
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._overall = _Bucket(clock())
        self._buckets: weakref.WeakKeyDictionary[ProbePool, _Bucket] = weakref.WeakKeyDictionary()

    def admit(self, pool: ProbePool, targets: Sequence[Endpoint], options: PrequalOptions) -> list[Endpoint]:
        """The targets that may be probed now, each counted as sent and pending until `done`."""
        now = self._clock()
        chosen: list[Endpoint] = []
        with self._lock:
            bucket = self._buckets.get(pool)
            if bucket is None:
                bucket = self._buckets[pool] = _Bucket(now)
            for endpoint in targets:
                if endpoint.address in pool.pending or self.in_flight >= self.max_in_flight:
                    continue
                if not bucket.take(options.max_probe_rate, now) or not self._overall.take(self.max_rate, now):
                    break
                pool.pending.add(endpoint.address)
                pool.sent += 1
                self.in_flight += 1
                chosen.append(endpoint)
        return chosen

    def done(self, pool: ProbePool, endpoint: Endpoint) -> None:
        """A probe `admit` let out is over (answered, failed, or never sent)."""
        with self._lock:
            self.in_flight -= 1
        pool.pending.discard(endpoint.address)
