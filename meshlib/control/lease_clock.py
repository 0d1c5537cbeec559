"""What a control service replica knows of its registry's etcd leases: each one's time left.

A lease's time left is etcd's, and a heartbeat may renew it on any replica (a keepalive is no
raft write: no watch event tells the others). So a replica knows it exactly for the leases it
granted or renewed itself (the answer says the TTL it has again), and asks etcd for the others
(LeaseTimeToLive), at most once per lease every FRESH seconds however often the registry is
listed. etcd answers in whole seconds, truncated: the time left is taken as the middle of the
second it names. Thread-safe: the registry's etcd calls run on worker threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

FRESH = 1.0
"""Seconds a lease's time left, once heard, is counted down here before etcd is asked again."""
FORGET = 120.0
"""Seconds after which a lease not heard of again is forgotten (it was revoked, or nobody asks)."""


class LeaseClock:
    """Time left per lease, as last heard, counted down by the local clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heard: dict[int, tuple[float, float]] = {}  # lease -> (seconds left, when heard)
        self._lock = threading.Lock()
        self._pruned = clock()

    def heard(self, lease: int, left: float) -> None:
        """`lease` has `left` seconds now (a grant, a keepalive, an answer of etcd's); 0 or
        less: it has expired."""
        now = self._clock()
        with self._lock:
            self._heard[lease] = (max(0.0, left), now)
            if now - self._pruned > FORGET:
                self._pruned = now
                self._heard = {k: v for k, v in self._heard.items() if now - v[1] <= FORGET}

    def heard_truncated(self, lease: int, seconds: int) -> None:
        """etcd's LeaseTimeToLive said `seconds` (whole, truncated; -1: expired or unknown)."""
        self.heard(lease, seconds + 0.5 if seconds >= 0 else 0.0)

    def left(self, lease: int) -> float | None:
        """Seconds `lease` has left, as last heard and counted down since; None if unknown."""
        with self._lock:
            heard = self._heard.get(lease)
        if heard is None:
            return None
        return max(0.0, heard[0] - (self._clock() - heard[1]))

    def stale(self, leases: Iterable[int]) -> list[int]:
        """Those of `leases` not heard of in the last FRESH seconds, the longest unheard first."""
        now = self._clock()
        with self._lock:
            heard = self._heard
            unheard = [(heard[lease][1] if lease in heard else -1.0, lease) for lease in leases if lease]
        return [lease for at, lease in sorted(unheard) if at < 0 or now - at >= FRESH]
