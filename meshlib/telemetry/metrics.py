"""Metrics on the OpenTelemetry API, read from the counters the mesh keeps anyway.

Every figure already exists in the Mesh's `TrafficStats` (requests per edge and status class,
the duration histogram of each, retries, ejections, breaker changes, ...) and in its endpoints'
load records (requests in flight). The instruments here are all observable: the SDK reads those
counters when it collects, and the request path makes no SDK call for metrics at all. The
durations go out as two observable counters over the in-process histogram (the API has no
observable histogram, and an SDK `Histogram.record` per request costs more than the rest of the
mesh's path): `mesh.request.duration.sum` and `mesh.request.duration.buckets`, one series per
upper bound `mesh.le`, cumulative as Prometheus' `_bucket` series are (docs/decisions.md).

The same families, under Prometheus names, are what `meshlib.telemetry.prometheus` renders, so
a dashboard reads the same figures whichever way they are exported.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from meshlib.stats import DURATION_BUCKETS, EdgeStats
from meshlib.telemetry.providers import METRICS, ProviderSource
from meshlib.telemetry.trace_facts import SCOPE, instrumentation_version

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation

    from meshlib.telemetry.hub import Telemetry


@dataclass(frozen=True, slots=True, eq=False)
class Family:
    """A set of `TrafficStats.counters` names exported as one counter.

    `subject` names the label that carries the counter's subject (a service or an address);
    `names` maps each counter name to the fixed labels that tell its series apart.
    """

    otel: str
    prom: str
    help: str
    subject: str
    names: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


FAMILIES: tuple[Family, ...] = (
    Family("mesh.retries", "mesh_retries_total", "Retries sent (attempts after the first).", "destination",
           {"retries": {}}),
    Family("mesh.hedges", "mesh_hedges_total", "Hedged copies sent.", "destination", {"hedges": {}}),
    Family("mesh.retry_budget.exhausted", "mesh_retry_budget_exhausted_total",
           "Retries and hedges not sent because the retry budget was spent.", "destination",
           {"budget_exhausted": {}}),
    Family("mesh.retry.deadline", "mesh_retry_deadline_total",
           "Retries not sent because they could not finish before the deadline.", "destination",
           {"retry_deadline": {}}),
    Family("mesh.breaker.transitions", "mesh_breaker_transitions_total",
           "Circuit breaker state changes, by the state entered.", "endpoint",
           {"breaker_open": {"state": "open"}, "breaker_half_open": {"state": "half_open"},
            "breaker_closed": {"state": "closed"}}),
    Family("mesh.ejections", "mesh_ejections_total", "Endpoints ejected as outliers.", "destination",
           {"ejections": {}}),
    Family("mesh.panic", "mesh_panic_total",
           "Endpoint picks in panic mode (too few usable endpoints: all of them used).", "destination",
           {"panic": {}}),
    Family("mesh.rate_limited", "mesh_rate_limited_total",
           "Inbound requests refused by this service's rate limit (429).", "destination",
           {"rate_limited": {}}),
    Family("mesh.denied", "mesh_denied_total", "Inbound requests refused by authorization (403).",
           "destination", {"denied": {}}),
    Family("mesh.unauthenticated", "mesh_unauthenticated_total",
           "Inbound requests refused for an invalid end-user token (401).", "destination",
           {"unauthenticated": {}}),
    Family("mesh.bulkhead.rejected", "mesh_bulkhead_rejected_total",
           "Requests refused by the destination's max_concurrent_requests.", "destination",
           {"bulkhead_rejected": {}}),
    Family("mesh.concurrency.limited", "mesh_concurrency_limited_total",
           "Requests refused by an adaptive concurrency limit (inbound: 503; outbound: failed fast).",
           "destination", {"concurrency_limited": {}}),
    Family("mesh.faults", "mesh_faults_injected_total", "Faults injected by a route's fault rule.",
           "destination", {"fault_delays": {"kind": "delay"}, "fault_aborts": {"kind": "abort"}}),
    Family("mesh.mirrors", "mesh_mirrors_total", "Mirrored copies, by outcome.", "destination",
           {"mirrored": {"outcome": "sent"}, "mirror_skipped": {"outcome": "skipped"},
            "mirror_no_endpoint": {"outcome": "no_endpoint"}}),
    Family("mesh.redirects", "mesh_redirects_total",
           "Requests answered with a redirect by a route's redirect rule (no endpoint contacted).",
           "destination", {"redirects": {}}),
    Family("mesh.outbound.blocked", "mesh_outbound_blocked_total",
           "Calls refused by the outbound policy registry_only, by host.", "host",
           {"outbound_blocked": {}}),
    Family("mesh.prequal.probes", "mesh_prequal_probes_total",
           "Prequal probes sent, and those that failed (timeout, error, refusal).", "destination",
           {"probes_sent": {"outcome": "sent"}, "probes_failed": {"outcome": "failed"}}),
)  # fmt: skip

OTHER = Family(
    "mesh.events",
    "mesh_events_total",
    "Other mesh decisions, by name (counters without a family).",
    "subject",
)
KNOWN: Mapping[str, Family] = {name: fam for fam in FAMILIES for name in fam.names}

EDGE_LABELS = ("direction", "source", "destination", "subset")

LE = (*(repr(float(b)) for b in DURATION_BUCKETS), "+Inf")
"""The upper bounds of the duration buckets as label values (Prometheus' `le`)."""


def edge_labels(own: str, key: tuple[str, str, str]) -> tuple[str, str, str, str]:
    """(direction, source, destination, subset) of a `TrafficStats` edge seen by service `own`."""
    direction, peer, subset = key
    if direction == "out":
        return direction, own, peer, subset
    return direction, peer, own, subset


def decisions(telemetry: Telemetry) -> Iterator[tuple[Family, dict[str, str], int]]:
    """Every decision counter of a Mesh as (family, labels, value); `service` is the Mesh's own."""
    own = telemetry.service
    for (name, subject), value in sorted(dict(telemetry.stats.counters).items()):
        fam = KNOWN.get(name)
        if fam is None:
            yield OTHER, {"service": own, "event": name, "subject": subject}, value
        else:
            yield fam, {"service": own, fam.subject: subject, **fam.names[name]}, value


def active(telemetry: Telemetry) -> Iterator[tuple[dict[str, str], int]]:
    """Requests in flight: outbound per endpoint (from the load records the balancers use),
    inbound for the whole service."""
    own = telemetry.service
    for plan in list(telemetry.snapshot.plans.values()):
        for endpoint in plan.every:
            labels = {
                "direction": "out",
                "source": own,
                "destination": plan.name,
                "endpoint": endpoint.address,
            }
            yield labels, endpoint.load.outstanding
    yield {"direction": "in", "source": "", "destination": own, "endpoint": ""}, telemetry.active_in


def limits(telemetry: Telemetry) -> Iterator[tuple[dict[str, str], int]]:
    """The adaptive concurrency limits in force: inbound (a ConcurrencyLimit document) for the
    service, outbound per destination (its `adaptive_concurrency`)."""
    own = telemetry.service
    for direction, service, limiter in telemetry.mesh.resilience.concurrency_limits():
        source, destination = (own, service) if direction == "out" else ("", service)
        yield {"direction": direction, "source": source, "destination": destination}, limiter.current


def probe_pools(telemetry: Telemetry) -> Iterator[tuple[dict[str, str], int]]:
    """Prequal's pooled probe answers per destination (its subsets' pools together)."""
    sizes: dict[str, int] = {}
    for pool in telemetry.snapshot.loads.probes.pools():
        sizes[pool.service] = sizes.get(pool.service, 0) + len(pool)
    own = telemetry.service
    for service, size in sorted(sizes.items()):
        yield {"source": own, "destination": service}, size


def balancer_weights(telemetry: Telemetry) -> Iterator[tuple[dict[str, str], float]]:
    """Each endpoint's weight in the balancers that weigh endpoints by what they learn
    (weighted_round_robin: by their load reports), for the balancers built so far."""
    own = telemetry.service
    for plan in list(telemetry.snapshot.plans.values()):
        for subset, balancer in plan.built().items():
            weights = getattr(balancer, "weights", None)
            if weights is None:
                continue
            for address, weight in weights().items():
                labels = {
                    "source": own,
                    "destination": plan.name,
                    "subset": subset or "",
                    "endpoint": address,
                }
                yield labels, weight


def _otel(labels: Mapping[str, str]) -> dict[str, str]:
    return {f"mesh.{k}": v for k, v in labels.items()}


class Instruments:
    """The mesh's instruments on one MeterProvider, reading every Mesh that uses it."""

    def __init__(self, meter: Meter) -> None:
        self._watched: weakref.WeakSet[Telemetry] = weakref.WeakSet()
        meter.create_observable_counter(
            "mesh.request.duration.sum",
            callbacks=[self._duration_sums],
            unit="s",
            description="Summed request durations per edge and status class, to response headers.",
        )
        meter.create_observable_counter(
            "mesh.request.duration.buckets",
            callbacks=[self._duration_buckets],
            unit="{request}",
            description="Requests per edge and status class that took at most `mesh.le` seconds "
            "(cumulative; +Inf counts them all).",
        )
        meter.create_observable_counter(
            "mesh.requests",
            callbacks=[self._requests],
            unit="{request}",
            description="Requests per edge and status class (outbound: all attempts count once).",
        )
        meter.create_observable_up_down_counter(
            "mesh.requests.active",
            callbacks=[partial(self._gauge, active)],
            unit="{request}",
            description="Requests in flight: outbound per endpoint, inbound per service.",
        )
        meter.create_observable_gauge(
            "mesh.concurrency.limit",
            callbacks=[partial(self._gauge, limits)],
            unit="{request}",
            description="The adaptive concurrency limit in force: inbound per service, outbound per "
            "destination.",
        )
        meter.create_observable_gauge(
            "mesh.prequal.pool",
            callbacks=[partial(self._gauge, probe_pools)],
            unit="{probe}",
            description="Prequal probe answers pooled per destination.",
        )
        meter.create_observable_gauge(
            "mesh.balancer.weight",
            callbacks=[partial(self._gauge, balancer_weights)],
            unit="1",
            description="Each endpoint's weight in a balancer weighing by load reports.",
        )
        for fam in (*FAMILIES, OTHER):
            meter.create_observable_counter(
                fam.otel, callbacks=[partial(self._decisions, fam)], unit="1", description=fam.help
            )

    def watch(self, telemetry: Telemetry) -> None:
        self._watched.add(telemetry)

    def unwatch(self, telemetry: Telemetry) -> None:
        self._watched.discard(telemetry)

    def _live(self) -> list[Telemetry]:
        return list(self._watched)

    def _requests(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation  # loaded: an SDK is collecting

        for labels, edge in self._edges():
            for cls, n in dict(edge.by_class).items():
                yield Observation(n, duration_attributes(*labels, cls))

    def _edges(self) -> Iterator[tuple[tuple[str, str, str, str], EdgeStats]]:
        for t in self._live():
            own = t.service
            for key, edge in t.stats.edges().items():
                yield edge_labels(own, key), edge

    def _duration_sums(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation  # loaded: an SDK is collecting

        for labels, edge in self._edges():
            for cls, total in dict(edge.sums).items():
                yield Observation(total, duration_attributes(*labels, cls))

    def _duration_buckets(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation  # loaded: an SDK is collecting

        for labels, edge in self._edges():
            for cls, slots in dict(edge.buckets).items():
                base = duration_attributes(*labels, cls)
                running = 0
                for le, n in zip(LE, list(slots), strict=True):
                    running += n
                    yield Observation(running, {**base, "mesh.le": le})

    def _gauge(
        self, read: Callable[[Telemetry], Iterable[tuple[dict[str, str], float]]], options: CallbackOptions
    ) -> Iterable[Observation]:
        """One gauge's observations: `read`'s figures of every live Telemetry, labelled for OTel."""
        from opentelemetry.metrics import Observation  # loaded: an SDK is collecting

        for t in self._live():
            for labels, n in read(t):
                yield Observation(n, _otel(labels))

    def _decisions(self, family: Family, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation  # loaded: an SDK is collecting

        for t in self._live():
            for fam, labels, n in decisions(t):
                if fam is family:
                    yield Observation(n, _otel(labels))


_by_provider: weakref.WeakKeyDictionary[Any, Instruments] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def instruments_for(provider: MeterProvider) -> Instruments:
    """The instruments on `provider`, created once: an SDK meter hands back the first instrument
    of a name (and keeps only its callbacks), so every Mesh on a provider shares one set."""
    with _lock:
        found = _by_provider.get(provider)
        if found is None:
            found = _by_provider[provider] = Instruments(provider.get_meter(SCOPE, instrumentation_version()))
        return found


def meter_source(option: Any, telemetry: Telemetry) -> ProviderSource:
    """`Mesh(metrics=...)`: a MeterProvider, True/None (the global one) or False (none)."""

    def bind(provider: MeterProvider) -> Instruments:
        found = instruments_for(provider)
        found.watch(telemetry)
        return found

    return ProviderSource(option, METRICS, bind)


def duration_attributes(
    direction: str, source: str, destination: str, subset: str, status_class: str
) -> dict[str, str]:
    return {
        "mesh.direction": direction,
        "mesh.source": source,
        "mesh.destination": destination,
        "mesh.subset": subset,
        "mesh.status_class": status_class,
    }
