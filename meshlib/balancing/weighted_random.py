"""Weighted random choice, and the weighted draws the other balancers build on.

The module is not called `random` so that it cannot be mistaken for the standard library's.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Container, Sequence

from meshlib.balancing.base import NOTHING
from meshlib.endpoint import Endpoint

RETRIES = 3
"""Redraws after an excluded endpoint before falling back to a draw among the allowed ones."""


def effective_weights(endpoints: Sequence[Endpoint]) -> list[int | float]:
    """Each endpoint's share of traffic: its weight, 0 when not positive.

    When no endpoint has a positive weight they share equally: a misweighted set still serves.
    """
    weights: list[int | float] = [ep.weight if ep.weight > 0 else 0 for ep in endpoints]
    if not any(weights):
        return [1] * len(endpoints)
    return weights


class WeightedTable:
    """The endpoints that may take traffic (positive weight) and their cumulative weights.

    `draw` and `draw_pair` turn uniform numbers in [0, 1) into indexes into `endpoints`, with
    a probability proportional to the weight; a bisect over the cumulative weights, O(log n).
    """

    __slots__ = ("cum", "endpoints", "size", "total", "weights")

    def __init__(self, endpoints: Sequence[Endpoint], weights: Sequence[int | float] | None = None) -> None:
        if weights is None:
            weights = effective_weights(endpoints)
        kept = [(ep, w) for ep, w in zip(endpoints, weights, strict=True) if w > 0]
        self.endpoints: list[Endpoint] = [ep for ep, _ in kept]
        self.weights: list[int | float] = [w for _, w in kept]
        self.cum: list[int | float] = []
        total: int | float = 0
        for w in self.weights:
            total += w
            self.cum.append(total)
        self.total = total
        self.size = len(kept)

    def draw(self, u: float) -> int:
        """The index owning the point `u * total` (requires size >= 1)."""
        i = bisect_right(self.cum, u * self.total)
        return i if i < self.size else self.size - 1

    def draw_pair(self, u: float, v: float) -> tuple[int, int]:
        """Two distinct indexes, drawn by weight without replacement (requires size >= 2)."""
        cum = self.cum
        n = self.size
        a = bisect_right(cum, u * self.total)
        if a >= n:
            a = n - 1
        wa = self.weights[a]
        # Draw over the total without a's interval, then step over that interval.
        r = v * (self.total - wa)
        if r >= cum[a] - wa:
            r += wa
        b = bisect_right(cum, r)
        if b >= n:
            b = n - 1
        if b == a:  # only reachable through float rounding at the very end of the range
            b = a - 1 if a else a + 1
        return a, b

    def without(self, exclude: Container[str]) -> WeightedTable:
        """The table restricted to the endpoints whose address is not in `exclude`."""
        pairs = zip(self.endpoints, self.weights, strict=True)
        kept = [(ep, w) for ep, w in pairs if ep.address not in exclude]
        return WeightedTable([ep for ep, _ in kept], [w for _, w in kept])


class Random:
    """Weighted random: each pick is independent, with a probability proportional to the weight.

    An excluded endpoint is redrawn a few times, then the pick falls back to a weighted draw
    among the endpoints that are not excluded, so exclusions never bias the result.
    """

    __slots__ = ("_random", "_table", "endpoints")

    def __init__(self, endpoints: Sequence[Endpoint], *, rng: random.Random | None = None) -> None:
        self.endpoints: Sequence[Endpoint] = tuple(endpoints)
        self._table = WeightedTable(self.endpoints)
        self._random = (rng if rng is not None else random.Random()).random

    def pick(self, key: str | None = None, exclude: Container[str] = NOTHING) -> Endpoint | None:
        table = self._table
        if not table.size:
            return None
        ep = table.endpoints[table.draw(self._random())]
        if ep.address not in exclude:
            return ep
        return self._pick_excluding(exclude)

    def _pick_excluding(self, exclude: Container[str]) -> Endpoint | None:
        table = self._table
        rand = self._random
        for _ in range(RETRIES):
            ep = table.endpoints[table.draw(rand())]
            if ep.address not in exclude:
                return ep
        allowed = table.without(exclude)
        if not allowed.size:
            return None
        return allowed.endpoints[allowed.draw(rand())]

    def __repr__(self) -> str:
        return f"Random({len(self.endpoints)} endpoints)"
