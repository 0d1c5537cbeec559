"""The core client-side stages: route match, endpoint pick with load bookkeeping, stats.

The resilience filters (deadline, retry, breaker, ...) live in `meshlib.resilience` and are
placed between these by `client_stack`.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

from meshlib.errors import NoEndpointsError
from meshlib.pipeline import Call, Response, Stack, Stage

if TYPE_CHECKING:
    from meshlib.stats import TrafficStats


class RouteFilter(Stage):
    """Finds the route, draws the weighted subset once per request, applies the rewrite."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = (rng or random.Random()).random

    def enter(self, call: Call) -> None:
        plan = call.plan
        route = plan.routes.match(call.method, call.path, call.headers, call.source)
        call.route = route
        call.subset = route.choose(self._random())
        call.hash_key = plan.hash_key(call.headers, call.source)
        if route.rewrite is not None:
            call.path = route.rewrite_path(call.path)


class PickFilter(Stage):
    """Picks the endpoint for each attempt and keeps its load figures.

    A later attempt avoids the endpoints this request already tried when another exists.
    Outstanding requests end when the response body is closed, not when headers arrive,
    so a streaming response counts as load for as long as it streams.
    """

    def enter(self, call: Call) -> None:
        balancer = call.plan.balancer(call.subset)
        tried = call.tried
        endpoint = balancer.pick(call.hash_key, frozenset(tried)) if tried else balancer.pick(call.hash_key)
        if endpoint is None and tried:
            endpoint = balancer.pick(call.hash_key)
        if endpoint is None:
            where = f"subset {call.subset!r} of " if call.subset else ""
            raise NoEndpointsError(f"no endpoint available in {where}service {call.service!r}")
        call.endpoint = endpoint
        call.attempt += 1
        tried.append(endpoint.address)
        endpoint.load.start()
        call.attempt_started = time.monotonic()

    def leave(self, call: Call, response: Response | None, error: BaseException | None) -> None:
        endpoint = call.endpoint
        if endpoint is None:
            return
        load = endpoint.load
        now = time.monotonic()
        load.observe(now - call.attempt_started, now)
        if response is None:
            load.finish()
        else:
            call.wire.on_close(response, load.finish)


class StatsFilter(Stage):
    """Counts each request once (all attempts together) on the outbound edge."""

    def __init__(self, stats: TrafficStats) -> None:
        self._stats = stats

    def leave(self, call: Call, response: Response | None, error: BaseException | None) -> None:
        status = call.wire.status(response) if response is not None else None
        self._stats.record("out", call.service, call.subset, status, time.monotonic() - call.started)


def client_stack(stats: TrafficStats, rng: random.Random | None = None) -> Stack:
    """The standard client stack, outermost first."""
    return Stack([StatsFilter(stats), RouteFilter(rng), PickFilter()])
