"""The core client-side stages (route match, endpoint pick with load bookkeeping, stats) and
`client_stack`, which puts them and the resilience filters (`meshlib.resilience`) in order and
says beside each slot why it sits there. `mesh.stack.describe()` prints it.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Container
from functools import partial
from typing import TYPE_CHECKING

from meshlib.balancing.orca import HEADER as LOAD_HEADER
from meshlib.balancing.orca import parse_report
from meshlib.balancing.zones import choose_zone
from meshlib.endpoint import Endpoint, EndpointLoad
from meshlib.errors import CircuitOpenError, NoEndpointsError
from meshlib.pipeline import AsyncService, Call, Filter, Response, Service, Stack, Stage, Wire
from meshlib.resilience.bulkhead import BulkheadFilter
from meshlib.resilience.deadline import AttemptFilter, DeadlineFilter
from meshlib.resilience.egress_limit import EgressLimitFilter
from meshlib.resilience.fault import FaultFilter
from meshlib.resilience.health import HealthFilter
from meshlib.resilience.hedge import HedgeFilter
from meshlib.resilience.mirror import MirrorFilter
from meshlib.resilience.retry import RetryFilter
from meshlib.resilience.state import Exclusion
from meshlib.telemetry.client import AttemptTelemetry, MirrorTelemetry, RequestTelemetry

if TYPE_CHECKING:
    from meshlib.resilience.state import ResilienceState
    from meshlib.stats import TrafficStats
    from meshlib.telemetry import Telemetry


class RouteFilter(Stage):
    """Finds the route, draws the weighted subset once per request, applies the rewrite."""

    role = "route"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = (rng or random.Random()).random

    def enter(self, call: Call) -> None:
        plan = call.plan
        routes = plan.routes
        headers = call.headers
        if routes.reads_headers or plan.hashed:
            headers = call.wire.header_view(headers)
        route = routes.match(call.method, call.path, headers, call.source)
        call.route = route
        call.subset = route.choose(self._random()) if route.split else route.only
        if plan.hashed:
            call.hash_key = plan.hash_key(headers, call.source)
        if route.rewrite is not None:  # the decoded path; httpx's transport rewrites the one it sends
            call.path = route.rewrite_path(call.path)


class RedirectFilter:
    """Answers the request with the route's redirect (status and Location, empty body): no
    endpoint is picked or contacted. The client's `follow_redirects` then goes on as usual."""

    role = "redirect"
    needs = "redirect"

    def __init__(self, stats: TrafficStats) -> None:
        self.stats = stats

    def _answer(self, call: Call) -> Response:
        route = call.route
        assert route is not None and route.redirect is not None  # the stack skips it elsewhere
        response = call.wire.redirect(call, route.redirect)
        self.stats.count("redirects", call.service)
        span = call.span
        if span is not None:
            with contextlib.suppress(Exception):  # telemetry never fails a request
                span.set_attribute("mesh.redirect", call.wire.header(response, "location") or "")
        return response

    def handle(self, call: Call, next: Service) -> Response:
        return self._answer(call)

    async def handle_async(self, call: Call, next: AsyncService) -> Response:
        return self._answer(call)


_NONE_OUT: frozenset[str] = frozenset()  # no endpoint is out: every one counts as healthy


class PickFilter(Stage):
    """Picks the endpoint for each attempt and keeps its load figures.

    Endpoints with an open breaker or ejected as outliers are skipped, within the budget the
    rules allow, unless too few are left (panic mode: then all are used, and counted as
    `panic`); see `ResilienceState.exclusion`. A later attempt also avoids the endpoints this
    request already tried when another exists. Outstanding requests end when the response body
    is closed, not when headers arrive, so a streaming response counts as load for as long as
    it streams.
    """

    role = "pick"

    def __init__(
        self,
        state: ResilienceState,
        explain: Callable[[str], str] | None = None,
        zone: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.state = state
        self._explain = explain  # why a service has no endpoints at all (asked only then)
        self.zone = zone  # the caller's zone, for Destinations with `zone_aware`
        self._rng = rng or random.Random()

    def enter(self, call: Call) -> float:
        """When the attempt started, for the endpoint's latency figures."""
        plan = call.plan
        balancer = plan.balancer(call.subset)
        exclude = self.state.exclusion(plan, call.tried, balancer.endpoints)
        endpoint = None
        if plan.zone_aware is not None:
            endpoint = self._in_zone(call, exclude)
        if endpoint is None:
            endpoint = (
                balancer.pick(call.hash_key) if exclude is None else balancer.pick(call.hash_key, exclude)
            )
        if endpoint is None and call.tried:
            again = self.state.without_tried(exclude)
            endpoint = balancer.pick(call.hash_key) if again is None else balancer.pick(call.hash_key, again)
        if endpoint is None:
            where = f"subset {call.subset!r} of " if call.subset else ""
            if balancer.endpoints:
                raise CircuitOpenError(
                    f"every endpoint of {where}service {call.service!r} has an open breaker or is ejected"
                )
            why = f": {self._explain(call.service)}" if self._explain and not call.plan.endpoints else ""
            raise NoEndpointsError(f"no endpoint available in {where}service {call.service!r}{why}")
        if exclude is None or not isinstance(exclude, Exclusion):  # None: the usual healthy pool
            call.forced = False
        else:
            call.forced = endpoint.address in exclude.forced
            if exclude.panic:
                self.state.stats.count("panic", call.service)
        call.endpoint = endpoint
        call.attempt += 1
        call.tried.append(endpoint.address)
        now = time.monotonic()
        endpoint.load.start(now)
        return now

    def _in_zone(self, call: Call, exclude: Container[str] | None) -> Endpoint | None:
        """The pick within the zone `choose_zone` gives, or None to pick over the whole subset
        (no zone routing, or nothing left to pick in that zone)."""
        spec = call.plan.zone_aware
        assert spec is not None
        pool = call.plan.zones(call.subset)
        if isinstance(exclude, Exclusion):
            if exclude.panic:  # as in Envoy: a pool in panic mode is balanced whole
                return None
            unhealthy = exclude.out
        else:
            unhealthy = _NONE_OUT
        zone = choose_zone(pool, self.zone, unhealthy, spec.min_cluster_size, self._rng)
        if zone is None:
            return None
        balancer = pool.balancers[zone]
        return balancer.pick(call.hash_key) if exclude is None else balancer.pick(call.hash_key, exclude)

    def leave(
        self, call: Call, started: float, response: Response | None, error: BaseException | None
    ) -> None:
        endpoint = call.endpoint
        if endpoint is None:
            return
        load = endpoint.load
        now = time.monotonic()
        load.observe(now - started, now)
        if response is None:
            load.finish()
        else:
            wire = call.wire
            if call.plan.load_reports:  # only a balancer that weighs by them pays for reading them
                if wire.open(response):  # gRPC's trailers come at the end of the stream
                    wire.on_end(response, partial(_take_report, wire, response, load))
                else:
                    _take_report(wire, response, load)
            wire.on_close(response, load.finish)


def _take_report(
    wire: Wire, response: Response, load: EndpointLoad, ended: BaseException | None = None
) -> None:
    """The endpoint's ORCA load report on a response, if it sent one, onto its load."""
    text = wire.header(response, LOAD_HEADER)
    if text:
        report = parse_report(text)
        if report is not None:
            load.take_report(report, time.monotonic())


class StatsFilter(Stage):
    """Counts each request once (all attempts together) on the outbound edge.

    A stream counts when it ends, with the status it ended with and its whole time."""

    role = "stats"

    def __init__(self, stats: TrafficStats) -> None:
        self._stats = stats

    def leave(self, call: Call, state: None, response: Response | None, error: BaseException | None) -> None:
        wire = call.wire
        if response is not None and wire.open(response):  # a stream: its status at its end
            wire.on_end(response, partial(self.leave, call, None, response))
            return
        status = wire.status(response) if response is not None else None
        self._stats.record("out", call.plan.name, call.subset, status, time.monotonic() - call.started)


WHY: dict[str, str] = {  # why each slot of `client_stack` sits where it does, outermost first
    "stats": "outermost: counts each request once, its final status and whole time, refusals included",
    "request-telemetry": "beneath stats, seeing what it sees; its span is attempt 1's, parent of the rest",
    "route": "above every filter that reads the route's policies, and the pick that reads its subset",
    "redirect": "right beneath route, whose rule it answers: no deadline, fault, retry or pick applies",
    "deadline": "beneath route (its timeout), above fault, hedge and retry: they all spend one deadline",
    "fault": "beneath deadline (a delay never outlasts it); above retry (an injected abort is not retried)",
    "mirror-telemetry": "right above mirror: the copy carries the request span's trace context",
    "mirror": "above hedge and retry: one copy per request, never one per attempt",
    "egress-limit": "an External's RateLimit, above bulkhead: a refused call takes no slot, no retry",
    "bulkhead": "above hedge and retry: one slot per request, so retries cannot push past the cap",
    "hedge": "above retry: each copy is a whole try of the request, with retries of its own",
    "retry": "the last per-request slot: all beneath it runs again per attempt; backoff held to deadline",
    "attempt-timeout": "beneath retry: a late attempt fails before the pick; a deadline hit is not retried",
    "pick": "beneath retry: each attempt picks anew, away from endpoints tried; load spans one attempt",
    "attempt-telemetry": "beneath pick, whose endpoint it names: context on the wire; a span from attempt 2",
    "health": "innermost, around the send alone: breaker and outliers judge each attempt, retries too",
}


def client_stack(
    state: ResilienceState,
    rng: random.Random | None = None,
    telemetry: Telemetry | None = None,
    explain: Callable[[str], str] | None = None,
    zone: str | None = None,
) -> Stack:
    """The standard client stack, outermost first: per request down to `retry`, then per attempt
    (`WHY` says why each slot sits where it does). The telemetry slots are there with `telemetry`;
    `explain(service)` says why a service has no endpoints, for the NoEndpointsError; `zone` is
    the caller's zone (zone-aware routing)."""
    stats = state.stats
    filters: list[Filter] = [
        StatsFilter(stats),
        *([RequestTelemetry(telemetry)] if telemetry is not None else []),
        RouteFilter(rng),
        RedirectFilter(stats),
        DeadlineFilter(),
        FaultFilter(stats, rng),
        *([MirrorTelemetry()] if telemetry is not None else []),
        MirrorFilter(stats, rng),
        EgressLimitFilter(state),
        BulkheadFilter(state),
        HedgeFilter(state),
        RetryFilter(state),
        AttemptFilter(),
        PickFilter(state, explain, zone, rng),
        *([AttemptTelemetry(telemetry)] if telemetry is not None else []),
        HealthFilter(state),
    ]
    return Stack(filters, [WHY[f.role] for f in filters])
