"""The mutable side of resilience, kept per Mesh across Snapshots.

Policies are configured by the rules (in the Snapshot) but remember things (a breaker's
failures, an endpoint's ejections, a budget's balance): those memories live here, keyed by
service or address, and are rebuilt only when their spec changes.

Which endpoints a pick may use is decided here too (`exclusion`), from breakers and ejections
together: they share one budget (`max_ejection_percent` of the service's endpoints, from its
`outlier_detection` or the default accrual's 50%; the endpoints that went out first stay out,
the others are used anyway), and a subset with fewer usable endpoints than the Destination's
`panic_threshold` percent uses all of them (Envoy's panic mode). An endpoint that comes back in
discovery, or that a new process registered (its instance id changed), starts afresh (`observe`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Container, Sequence
from typing import TYPE_CHECKING, Any

from meshlib.resilience.adaptive_concurrency import ConcurrencyLimiter, limiter_for
from meshlib.resilience.breaker import CLOSED, BreakerBook
from meshlib.resilience.budget import RetryBudget
from meshlib.resilience.bulkhead import Bulkhead
from meshlib.resilience.outlier import OutlierDefaults, OutlierDetector
from meshlib.resilience.ratelimit import TokenBucket

if TYPE_CHECKING:
    from meshlib.endpoint import Endpoint
    from meshlib.resilience.global_ratelimit import GlobalTokenBucket
    from meshlib.rules import AdaptiveConcurrencySpec, BudgetSpec, OutlierSpec, RateLimitDoc
    from meshlib.snapshot import ServicePlan, Snapshot
    from meshlib.stats import TrafficStats


log = logging.getLogger("meshlib.server")

DEFAULT_ACCRUAL = OutlierDefaults()
"""Failure accrual for services whose Destination sets no `outlier_detection` (see `accrual`)."""

_NONE: frozenset[str] = frozenset()


class _Keyed:
    """Objects built from a spec, rebuilt when the spec for their key changes."""

    def __init__(self, build: Callable[[Any], Any]) -> None:
        self._build = build
        self._items: dict[Any, tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, spec: Any) -> Any:
        item = self._items.get(key)
        if item is not None and item[0] == spec:
            return item[1]
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] != spec:
                item = (spec, self._build(spec))
                self._items[key] = item
        return item[1]

    def items(self) -> list[tuple[Any, tuple[Any, Any]]]:
        return list(self._items.items())

    def peek(self, key: Any) -> Any:
        item = self._items.get(key)
        return item[1] if item is not None else None


class ResilienceState:
    def __init__(
        self,
        stats: TrafficStats,
        *,
        redis: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.stats = stats
        self.redis = redis  # URL of the Redis that `scope: global` rate limits share
        self._redis_client: Any = None
        self.clock = clock  # of the breakers and detectors (tests drive it by hand)
        self.breakers = BreakerBook(on_change=self._breaker_changed, clock=clock, jitter=jitter)
        self._budgets = _Keyed(RetryBudget.from_spec)
        self._bulkheads = _Keyed(Bulkhead)
        self._limiters = _Keyed(self._build_limiter)
        self._concurrency = _Keyed(self._build_concurrency)
        self._detectors: dict[str, OutlierDetector] = {}
        self.accruals: dict[str, OutlierDetector] = {}  # default failure accrual, by service
        self._accrual_pools: dict[str, int] = {}
        self._pools: dict[str, int] = {}  # service -> id of the plan whose endpoints the detector knows
        self._seen: dict[str, dict[str, str | None]] = {}  # service -> address -> instance id
        self._lock = threading.Lock()
        self._observe_lock = threading.Lock()

    def _breaker_changed(self, address: str, old: str, new: str) -> None:
        self.stats.count(f"breaker_{new.replace('-', '_')}", address)

    def budget(self, service: str, spec: BudgetSpec) -> RetryBudget:
        """One budget per service and budget spec: routes that ask for the same budget share it,
        a route with a budget of its own keeps it."""
        return self._budgets.get((service, spec), spec)

    def bulkhead(self, service: str, limit: int) -> Bulkhead:
        return self._bulkheads.get(service, limit)

    def concurrency(self, direction: str, service: str, spec: AdaptiveConcurrencySpec) -> ConcurrencyLimiter:
        """The adaptive concurrency limiter of a service's inbound requests (`direction` "in", a
        ConcurrencyLimit document) or of the calls to a destination ("out", its
        `adaptive_concurrency`); its figures outlive snapshots while the spec stays the same."""
        return self._concurrency.get((direction, service), spec)

    def concurrency_limits(self) -> list[tuple[str, str, ConcurrencyLimiter]]:
        """(direction, service, limiter) of every adaptive concurrency limit in use."""
        return [(key[0], key[1], item[1]) for key, item in self._concurrency.items()]

    def _build_concurrency(self, spec: AdaptiveConcurrencySpec) -> ConcurrencyLimiter:
        return limiter_for(spec, getattr(spec, "partitions", None))

    def limiter(self, doc: RateLimitDoc) -> TokenBucket | GlobalTokenBucket:
        return self._limiters.get(doc.service, doc)

    def _build_limiter(self, doc: RateLimitDoc) -> TokenBucket | GlobalTokenBucket:
        # built once per document (rebuilt when it changes): nothing here runs per request
        if doc.scope == "global":
            if self.redis:
                # imported here: redis-py is an optional extra, and slow to import
                from meshlib.resilience.global_ratelimit import GlobalTokenBucket, redis_client

                if self._redis_client is None:
                    self._redis_client = redis_client(self.redis)
                return GlobalTokenBucket.from_doc(self._redis_client, doc, stats=self.stats)
            log.warning(
                "RateLimit/%s has scope: global but the mesh has no redis= (MESH_REDIS): "
                "enforcing it per process",
                doc.service,
            )
        return TokenBucket.from_doc(doc)

    def close(self) -> None:
        """Close the Redis connections of global rate limits, if any."""
        client, self._redis_client = self._redis_client, None
        if client is not None:
            client.close()

    def detector(self, service: str, spec: OutlierSpec) -> OutlierDetector:
        d = self._detectors.get(service)
        if d is None or d.spec != spec:
            with self._lock:
                d = self._detectors.get(service)
                if d is None or d.spec != spec:
                    d = OutlierDetector(
                        spec,
                        clock=self.clock,
                        on_eject=lambda addr, secs: self.stats.count("ejections", service),
                    )
                    self._detectors[service] = d
                    self._pools.pop(service, None)
        return d

    def accrual(self, plan: ServicePlan, create: bool = False) -> OutlierDetector | None:
        """The default failure accrual of a service without `outlier_detection`.

        Connection failures alone feed it (the endpoint is not there; a 5xx is the
        application's answer and stays the rules' business), with Envoy's default thresholds:
        5 in a row eject an endpoint for 30 s and more, never more than half the pool. It is
        created by the first connection failure, so a healthy service pays a dict lookup.
        """
        d = self.accruals.get(plan.name)
        if d is None and create:
            with self._lock:
                d = self.accruals.get(plan.name)
                if d is None:
                    name = plan.name
                    d = OutlierDetector(
                        DEFAULT_ACCRUAL,
                        clock=self.clock,
                        on_eject=lambda addr, secs: self.stats.count("ejections", name),
                    )
                    self.accruals[name] = d
        if d is not None and self._accrual_pools.get(plan.name) != id(plan):
            d.set_pool(e.address for e in plan.endpoints)
            self._accrual_pools[plan.name] = id(plan)
        return d

    def exclusion(
        self, plan: ServicePlan, tried: list[str], members: Sequence[Endpoint] = ()
    ) -> Container[str] | None:
        """What the balancer over `members` (a subset's endpoints) must skip for this service,
        or None when nothing needs checking.

        While every breaker is closed and nothing is ejected, that is two truth tests. Otherwise
        it costs one pass over the tripped and ejected addresses and the subset's endpoints
        (a degraded pool pays a few microseconds per pick, a healthy one nothing).
        """
        dest = plan.destination
        if dest is None or dest.outlier_detection is None:
            detector = self.accrual(plan) if self.accruals else None
        else:
            detector = self.detector(plan.name, dest.outlier_detection)
            if self._pools.get(plan.name) != id(plan):
                detector.set_pool(e.address for e in plan.endpoints)
                self._pools[plan.name] = id(plan)
        breakers = self.breakers if dest is not None and dest.circuit_breaker is not None else None
        ejected = detector.ejected_addresses() if detector is not None else _NONE
        tripped = breakers.tripped if breakers is not None else _NONE
        if ejected or tripped:
            out = self._health(plan, tried, members, breakers, ejected, tripped)
            if out is not None:
                return out
        return frozenset(tried) if tried else None

    def _health(
        self,
        plan: ServicePlan,
        tried: list[str],
        members: Sequence[Endpoint],
        breakers: BreakerBook | None,
        ejected: frozenset[str],
        tripped: frozenset[str],
    ) -> Exclusion | None:
        pool = plan.addresses
        out: set[str] = set()
        for address in ejected:
            if address not in pool:
                continue
            breaker = breakers.peek(address) if breakers is not None else None
            if breaker is not None and breaker.state is not CLOSED and breaker.available():
                continue  # its breaker's probe is due: the probe goes, and its success ends the ejection
            out.add(address)
        waiting = []
        for address in tripped:
            if address in pool and address not in out:
                breaker = breakers.peek(address) if breakers is not None else None
                if breaker is not None and not breaker.available():
                    waiting.append((breaker.opened_at or 0.0, address))
        forced: set[str] = set()
        if waiting:
            # one budget for breakers and ejections: the first ones out stay out, the rest go
            dest = plan.destination
            spec = dest.outlier_detection if dest is not None and dest.outlier_detection else DEFAULT_ACCRUAL
            room = len(pool) * spec.max_ejection_percent // 100 - len(out)
            waiting.sort()
            for _, address in waiting:
                if room > 0:
                    out.add(address)
                    room -= 1
                else:
                    forced.add(address)
        panic = False
        threshold = plan.destination.panic_threshold if plan.destination is not None else 50
        if out and threshold and members:
            down = [e.address for e in members if e.address in out]
            if (len(members) - len(down)) * 100 < len(members) * threshold:
                panic = True  # too few left to carry the load: use them all (Envoy's panic mode)
                forced.update(down)
                out = set()
        if not out and not forced:
            return None
        return Exclusion(tried, frozenset(out), frozenset(forced), panic)

    def without_tried(self, exclusion: Container[str] | None) -> Container[str] | None:
        """The same exclusion but letting already-tried endpoints be picked again."""
        if isinstance(exclusion, Exclusion):
            return Exclusion([], exclusion.out, exclusion.forced, exclusion.panic)
        return None

    def observe(self, snapshot: Snapshot) -> None:
        """Called with each new Snapshot: an endpoint that was not in the previous one (back in
        discovery), or whose instance id changed (a new process registered at its address),
        gets a closed breaker and no ejection at once, rather than after its backoff."""
        with self._observe_lock:
            seen = self._seen
            now: dict[str, dict[str, str | None]] = {}
            for name, plan in snapshot.plans.items():
                ids = snapshot.instances.get(name) or {}
                current = {e.address: ids.get(e.address) for e in plan.every}
                before = seen.get(name)
                if before is not None:
                    for address, instance in current.items():
                        if address not in before or before[address] != instance:
                            self._renew(name, address)
                now[name] = current
            for name in seen.keys() - now.keys():
                now[name] = {}  # the service is gone; an endpoint of it that comes back is new
            self._seen = now

    def _renew(self, service: str, address: str) -> None:
        log.debug("%s at %s is new: closing its breaker and ending its ejection", service, address)
        self.breakers.reset(address)
        for detector in (self._detectors.get(service), self.accruals.get(service)):
            if detector is not None:
                detector.reinstate(address, forget=True)


class Exclusion:
    """Addresses a pick skips (already tried, breaker open, or ejected, within the budget) and
    those it may use although their breaker is open or they are ejected (`forced`: over the
    budget, or the subset is in panic mode); such a pick is let through as a trial."""

    __slots__ = ("forced", "out", "panic", "tried")

    def __init__(self, tried: list[str], out: frozenset[str], forced: frozenset[str], panic: bool) -> None:
        self.tried = tried
        self.out = out
        self.forced = forced
        self.panic = panic

    def __contains__(self, address: object) -> bool:
        return address in self.out or address in self.tried
