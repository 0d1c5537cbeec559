"""Smooth weighted round robin, earliest deadline first (as Envoy's EDF scheduler)."""

from __future__ import annotations

import random
import threading
from collections.abc import Container, Sequence
from heapq import heapify, heappop, heappush, heapreplace

from meshlib.balancing.base import NOTHING
from meshlib.balancing.weighted_random import effective_weights
from meshlib.endpoint import Endpoint


class RoundRobin:
    """Weighted round robin that interleaves instead of bursting.

    Each endpoint has a deadline on a virtual clock; a pick takes the earliest one and moves
    that endpoint's deadline on by 1/weight. With weights 3:1 the order is A A B A A A B A ...;
    with equal weights it is a strict rotation. Equal deadlines are broken by a fixed order, so
    the schedule is periodic: every run of sum(weights) consecutive picks holds each endpoint
    exactly `weight` times.

    Deadlines are kept as `j / weight` with an integer `j` (the endpoint's slot number), never
    accumulated, so equal deadlines compare equal however long the balancer lives.

    The schedule starts at a random point (a random virtual time and a random rotation of the
    tie order), so that many clients built at once do not all start on the same endpoint.

    An excluded endpoint is skipped without losing its place: its deadline stays as it was, and
    it is picked as soon as it is no longer excluded. Its lag is capped at one slot, so an
    endpoint that was excluded for a long while gets at most one extra pick, not a burst.
    """

    __slots__ = ("_endpoints", "_heap", "_lock", "_weights", "endpoints")

    def __init__(self, endpoints: Sequence[Endpoint], *, rng: random.Random | None = None) -> None:
        self.endpoints: Sequence[Endpoint] = tuple(endpoints)
        rng = rng if rng is not None else random.Random()
        weights = effective_weights(self.endpoints)
        live = [i for i, w in enumerate(weights) if w > 0]
        if live:
            offset = rng.randrange(len(live))
            live = live[offset:] + live[:offset]
        # Position in these lists is the tie order.
        self._endpoints = [self.endpoints[i] for i in live]
        self._weights = [weights[i] for i in live]
        t = rng.random()
        heap: list[tuple[float, int, int]] = []
        for pos, w in enumerate(self._weights):
            # The state of the schedule once every deadline up to time t has been served.
            j = int(t * w) + 1
            heap.append((j / w, pos, j))
        heapify(heap)
        self._heap = heap
        self._lock = threading.Lock()

    def pick(self, key: str | None = None, exclude: Container[str] = NOTHING) -> Endpoint | None:
        if len(self._endpoints) == 1:  # one endpoint (a small subset): no schedule to keep
            ep = self._endpoints[0]
            return None if ep.address in exclude else ep
        with self._lock:
            heap = self._heap
            if not heap:
                return None
            _, pos, j = heap[0]
            ep = self._endpoints[pos]
            if ep.address in exclude:
                return self._pick_excluding(exclude)
            j += 1
            heapreplace(heap, (j / self._weights[pos], pos, j))
            return ep

    def _pick_excluding(self, exclude: Container[str]) -> Endpoint | None:
        """Pop excluded endpoints until an allowed one is found, then put them back (lock held)."""
        heap = self._heap
        endpoints = self._endpoints
        weights = self._weights
        skipped = [heappop(heap)]
        while heap:
            entry = heappop(heap)
            if endpoints[entry[1]].address in exclude:
                skipped.append(entry)
                continue
            _, pos, j = entry
            w = weights[pos]
            heappush(heap, ((j + 1) / w, pos, j + 1))
            # The virtual time is now j / w; keep every skipped deadline within one slot of it.
            for item in skipped:
                _, spos, sj = item
                sw = weights[spos]
                floor_j = int(-((-j * sw) // w)) - 1  # ceil(now * sw) - 1
                heappush(heap, item if sj >= floor_j else (floor_j / sw, spos, floor_j))
            return endpoints[pos]
        # Everything is excluded: popped in order, so the list is a valid heap as it stands.
        heap.extend(skipped)
        return None

    def __repr__(self) -> str:
        return f"RoundRobin({len(self.endpoints)} endpoints)"
