"""The mutable side of resilience, kept per Mesh across Snapshots.

Policies are configured by the rules (in the Snapshot) but remember things (a breaker's
failures, an endpoint's ejections, a budget's balance): those memories live here, keyed by
service or address, and are rebuilt only when their spec changes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Container
from typing import TYPE_CHECKING, Any

from meshlib.resilience.breaker import BreakerBook
from meshlib.resilience.budget import RetryBudget
from meshlib.resilience.bulkhead import Bulkhead
from meshlib.resilience.outlier import OutlierDetector
from meshlib.resilience.ratelimit import TokenBucket
from meshlib.rules import OutlierSpec

if TYPE_CHECKING:
    from meshlib.resilience.global_ratelimit import GlobalTokenBucket
    from meshlib.rules import BudgetSpec, RateLimitDoc
    from meshlib.snapshot import ServicePlan
    from meshlib.stats import TrafficStats


log = logging.getLogger("meshlib.server")

DEFAULT_ACCRUAL = OutlierSpec()
"""Failure accrual for services whose Destination sets no `outlier_detection` (see `accrual`)."""


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

    def peek(self, key: Any) -> Any:
        item = self._items.get(key)
        return item[1] if item is not None else None


class ResilienceState:
    def __init__(self, stats: TrafficStats, *, redis: str | None = None) -> None:
        self.stats = stats
        self.redis = redis  # URL of the Redis that `scope: global` rate limits share
        self._redis_client: Any = None
        self.breakers = BreakerBook(on_change=self._breaker_changed)
        self._budgets = _Keyed(RetryBudget.from_spec)
        self._bulkheads = _Keyed(Bulkhead)
        self._limiters = _Keyed(self._build_limiter)
        self._detectors: dict[str, OutlierDetector] = {}
        self.accruals: dict[str, OutlierDetector] = {}  # default failure accrual, by service
        self._accrual_pools: dict[str, int] = {}
        self._pools: dict[str, int] = {}  # service -> id of the plan whose endpoints the detector knows
        self._lock = threading.Lock()

    def _breaker_changed(self, address: str, old: str, new: str) -> None:
        self.stats.count(f"breaker_{new.replace('-', '_')}", address)

    def budget(self, service: str, spec: BudgetSpec) -> RetryBudget:
        """One budget per service and budget spec: routes that ask for the same budget share it,
        a route with a budget of its own keeps it."""
        return self._budgets.get((service, spec), spec)

    def bulkhead(self, service: str, limit: int) -> Bulkhead:
        return self._bulkheads.get(service, limit)

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
                        DEFAULT_ACCRUAL, on_eject=lambda addr, secs: self.stats.count("ejections", name)
                    )
                    self.accruals[name] = d
        if d is not None and self._accrual_pools.get(plan.name) != id(plan):
            d.set_pool(e.address for e in plan.endpoints)
            self._accrual_pools[plan.name] = id(plan)
        return d

    def exclusion(self, plan: ServicePlan, tried: list[str]) -> Container[str] | None:
        """What the balancer must skip for this service, or None when nothing needs checking."""
        dest = plan.destination
        if dest is None or dest.outlier_detection is None:
            detector = self.accrual(plan) if self.accruals else None
            if detector is None and (dest is None or dest.circuit_breaker is None):
                return frozenset(tried) if tried else None
        else:
            detector = self.detector(plan.name, dest.outlier_detection)
            if self._pools.get(plan.name) != id(plan):
                detector.set_pool(e.address for e in plan.endpoints)
                self._pools[plan.name] = id(plan)
        breakers = self.breakers if dest is not None and dest.circuit_breaker else None
        return _Unavailable(tried, breakers, detector)

    def without_tried(self, exclusion: Container[str] | None) -> Container[str] | None:
        """The same exclusion but letting already-tried endpoints be picked again."""
        if isinstance(exclusion, _Unavailable):
            return _Unavailable([], exclusion.breakers, exclusion.detector)
        return None


class _Unavailable:
    """Addresses already tried, with an open breaker, or ejected as outliers."""

    __slots__ = ("breakers", "detector", "tried")

    def __init__(
        self, tried: list[str], breakers: BreakerBook | None, detector: OutlierDetector | None
    ) -> None:
        self.tried = tried
        self.breakers = breakers
        self.detector = detector

    def __contains__(self, address: object) -> bool:
        if address in self.tried:
            return True
        if self.breakers is not None:
            breaker = self.breakers.peek(address)  # type: ignore[arg-type]
            if breaker is not None and not breaker.available():
                return True
        return self.detector is not None and self.detector.ejected(address)  # type: ignore[arg-type]
