"""Least request by the power of two choices, and the two-choice skeleton peak EWMA shares."""

from __future__ import annotations

import random
from collections.abc import Container, Sequence

from meshlib.balancing.base import NOTHING
from meshlib.balancing.weighted_random import RETRIES, WeightedTable
from meshlib.endpoint import Endpoint


class PowerOfTwoChoices:
    """Draw two distinct endpoints by weight and keep the less loaded one.

    Subclasses say what "less loaded" means in `_choose`. Two random choices avoid both the
    herd behaviour of always taking the global minimum from stale figures and an O(n) scan
    (Mitzenmacher; Finagle's and Linkerd's balancers).

    With exclusions the two candidates are drawn among the endpoints that are not excluded;
    with a single candidate it is returned as it is.
    """

    __slots__ = ("_random", "_table", "endpoints")

    def __init__(self, endpoints: Sequence[Endpoint], *, rng: random.Random | None = None) -> None:
        self.endpoints: Sequence[Endpoint] = tuple(endpoints)
        self._table = WeightedTable(self.endpoints)
        self._random = (rng if rng is not None else random.Random()).random

    def _choose(self, a: Endpoint, wa: float, b: Endpoint, wb: float) -> Endpoint:
        raise NotImplementedError

    def pick(self, key: str | None = None, exclude: Container[str] = NOTHING) -> Endpoint | None:
        table = self._table
        if table.size < 2:
            if table.size and table.endpoints[0].address not in exclude:
                return table.endpoints[0]
            return None
        rand = self._random
        i, j = table.draw_pair(rand(), rand())
        a = table.endpoints[i]
        b = table.endpoints[j]
        if a.address in exclude or b.address in exclude:
            return self._pick_excluding(exclude)
        return self._choose(a, table.weights[i], b, table.weights[j])

    def _pick_excluding(self, exclude: Container[str]) -> Endpoint | None:
        table = self._table
        rand = self._random
        for _ in range(RETRIES):
            i, j = table.draw_pair(rand(), rand())
            a = table.endpoints[i]
            b = table.endpoints[j]
            if a.address not in exclude and b.address not in exclude:
                return self._choose(a, table.weights[i], b, table.weights[j])
        allowed = table.without(exclude)
        if allowed.size < 2:
            return allowed.endpoints[0] if allowed.size else None
        i, j = allowed.draw_pair(rand(), rand())
        endpoints, weights = allowed.endpoints, allowed.weights
        return self._choose(endpoints[i], weights[i], endpoints[j], weights[j])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.endpoints)} endpoints)"


class LeastRequest(PowerOfTwoChoices):
    """Power of two choices on requests in flight per unit of weight (`load.outstanding / weight`).

    An endpoint with twice the weight is considered as loaded as another with half its
    requests in flight. Ties go to the first candidate drawn, which is itself random.
    """

    __slots__ = ()

    def _choose(self, a: Endpoint, wa: float, b: Endpoint, wb: float) -> Endpoint:
        # outstanding_a / wa <= outstanding_b / wb, without dividing
        return a if a.load.outstanding * wb <= b.load.outstanding * wa else b
