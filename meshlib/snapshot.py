"""The immutable state one request reads: rules, endpoints, and what is compiled from them.

An update builds a new Snapshot and swaps one reference on the Mesh; a request takes the
reference once and sees one consistent version for all its attempts, without a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from meshlib.balancing import BALANCERS, Balancer, make_balancer
from meshlib.balancing.zones import ZonePool
from meshlib.egress import ExternalTarget, external_targets
from meshlib.endpoint import PROTOCOL_LABEL, Endpoint, LoadBook
from meshlib.routing import RouteTable
from meshlib.rules import RuleSet

if TYPE_CHECKING:
    from meshlib.rules.models import DestinationDoc, EndpointSpec


def _cookie(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return v
    return None


_NO_LABELS: Mapping[str, str] = MappingProxyType({})

GRPC = "grpc"
"""The value of `PROTOCOL_LABEL` that marks a gRPC endpoint."""


class ServicePlan:
    """Everything compiled for calling one service: routes, endpoints, subsets, balancers."""

    def __init__(
        self,
        name: str,
        rules: RuleSet,
        endpoints: Sequence[Endpoint],
        every: Sequence[Endpoint] | None = None,
        external: ExternalTarget | None = None,
        loads: LoadBook | None = None,
        protocol: str = "http",
    ) -> None:
        self.name = name
        self.external = external  # a declared port of an External host; None for a mesh service
        self.destination: DestinationDoc | None = rules.destination(name)
        # a gateway's Route is its table of incoming traffic; an External's RateLimit is kept by
        # its callers (meshlib.resilience.egress_limit), a mesh service's by the service itself
        dest = self.destination
        self.routes = RouteTable(
            rules.route(name) if rules.gateway(name) is None else None,
            (dest.max_concurrent_requests or dest.adaptive_concurrency) if dest is not None else None,
            dest.circuit_breaker if dest is not None else None,
            rules.rate_limit(name) if external is not None else None,
        )
        self.endpoints = tuple(endpoints)  # those this plan's protocol may pick
        # every endpoint of the service, whatever protocol it speaks (health and metrics read them)
        self.every = self.endpoints if every is None else tuple(every)
        self.addresses = frozenset(e.address for e in self.endpoints)
        dest = self.destination
        self.load_balancer = dest.load_balancer if dest else "round_robin"
        # the Destination's spec of its balancer, passed to it (`make_balancer`'s options)
        self.balancer_options: dict[str, Any] = {}
        if dest is not None and dest.weighted_round_robin is not None:
            self.balancer_options["weighted_round_robin"] = dest.weighted_round_robin
        if self.load_balancer == "prequal":  # its pools and prober are the LoadBook's (None: no probes)
            hub = loads.probes if loads is not None else None
            self.balancer_options.update(service=name, hub=hub, protocol=protocol)
            if dest is not None and dest.prequal is not None:
                self.balancer_options["prequal"] = dest.prequal.options()
        # the pick stage reads load reports off responses only for a balancer that weighs by them
        self.load_reports: bool = getattr(BALANCERS.get(self.load_balancer), "reads_load_reports", False)
        self.subsets: Mapping[str, Mapping[str, str]] = MappingProxyType(dict(dest.subsets) if dest else {})
        self._hash_on = self._parse_hash_on(dest.hash_on if dest else None)
        self.hashed = self._hash_on is not None
        self._balancers: dict[str | None, Balancer] = {}
        self.zone_aware = dest.zone_aware if dest else None  # None: the pick never looks at zones
        self._zones: dict[str | None, ZonePool] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _parse_hash_on(spec: str | None) -> tuple[str, str] | None:
        if not spec:
            return None
        kind, _, name = spec.partition(":")
        return kind, name.lower() if kind == "header" else name

    def members(self, subset: str | None) -> tuple[Endpoint, ...]:
        """The endpoints of a subset (None: all of them)."""
        if subset is None:
            return self.endpoints
        selector = self.subsets.get(subset)
        if selector is None:
            return ()
        return tuple(e for e in self.endpoints if e.matches(selector))

    def balancer(self, subset: str | None) -> Balancer:
        """The balancer over one subset, built on first use and kept for this Snapshot."""
        b = self._balancers.get(subset)
        if b is None:
            with self._lock:
                b = self._balancers.get(subset)
                if b is None:
                    b = make_balancer(self.load_balancer, self.members(subset), **self.balancer_options)
                    self._balancers[subset] = b
        return b

    def built(self) -> dict[str | None, Balancer]:
        """The balancers built so far, by subset (metrics read them; they build none)."""
        return dict(self._balancers)

    def zones(self, subset: str | None) -> ZonePool:
        """The subset's endpoints by zone, one balancer each (zone-aware routing only)."""
        z = self._zones.get(subset)
        if z is None:
            with self._lock:
                z = self._zones.get(subset)
                if z is None:
                    kind, options = self.load_balancer, self.balancer_options
                    z = ZonePool(self.members(subset), lambda group: make_balancer(kind, group, **options))
                    self._zones[subset] = z
        return z

    def hash_key(self, headers: Mapping[str, str], source: str | None) -> str | None:
        """The ring-hash key of a request, per the Destination's `hash_on`."""
        spec = self._hash_on
        if spec is None:
            return None
        kind, name = spec
        if kind == "header":
            return headers.get(name)
        if kind == "cookie":
            return _cookie(headers.get("cookie"), name)
        return source


class Snapshot:
    """One consistent version of everything the data plane needs."""

    def __init__(
        self,
        rules: RuleSet,
        *,
        version: str = "0",
        loads: LoadBook | None = None,
        discovered: Mapping[str, Sequence[EndpointSpec]] | None = None,
        revision: int = 0,
        instances: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.rules = rules
        self.version = version
        self.revision = revision  # the control service's revision (rules and endpoints), if any
        self.loads = loads or LoadBook()
        self.discovered: Mapping[str, Sequence[EndpointSpec]] = MappingProxyType(dict(discovered or {}))
        # service -> address -> the registry's instance id: a new id at an address is a new process
        self.instances: Mapping[str, Mapping[str, str]] = MappingProxyType(dict(instances or {}))
        outside = {doc.service for doc in rules.externals()}
        names = (set(rules.services()) | set(self.discovered)) - outside
        # HTTP plans: an endpoint labelled grpc is never picked by an HTTP client. The split is
        # made here, once per Snapshot, so the HTTP pick path pays nothing for it.
        plans: dict[str, ServicePlan] = {}
        for name in sorted(names):
            every = self._endpoints(name)
            http = [e for e in every if e.labels.get(PROTOCOL_LABEL) != GRPC]
            plans[name] = ServicePlan(name, rules, http, every, loads=self.loads)
        self.plans: Mapping[str, ServicePlan] = MappingProxyType(plans)
        # External hosts: a plan per declared port, the External's addresses as its endpoints,
        # the host's Destination and Route documents as for a mesh service
        externals: dict[str, Mapping[int, ServicePlan]] = {}
        for doc in rules.externals():
            ports: dict[int, ServicePlan] = {}
            for port, (target, addresses) in external_targets(doc).items():
                endpoints = [Endpoint(a, _NO_LABELS, 1, self.loads.get(a)) for a in addresses]
                ports[port] = ServicePlan(doc.service, rules, endpoints, external=target)
            externals[doc.service] = MappingProxyType(ports)
        self.externals: Mapping[str, Mapping[int, ServicePlan]] = MappingProxyType(externals)
        self._grpc_plans: dict[str, ServicePlan] = {}
        self._grpc_lock = threading.Lock()

    def _endpoints(self, service: str) -> list[Endpoint]:
        """Static endpoints from the rules, then discovered ones not already listed."""
        specs: list[EndpointSpec] = []
        doc = self.rules.endpoints(service)
        if doc is not None:
            specs.extend(doc.listed)
        seen = {s.address for s in specs}
        specs.extend(s for s in self.discovered.get(service, ()) if s.address not in seen)
        dest = self.rules.destination(service)
        decay = dest.ewma_decay if dest is not None else None
        if decay is None:
            decay = self.loads.decay
        endpoints = []
        for s in specs:
            load = self.loads.get(s.address)
            load.decay = decay  # the Destination's peak_ewma.decay (loads outlive Snapshots)
            endpoints.append(Endpoint(s.address, MappingProxyType(dict(s.labels)), s.weight, load))
        return endpoints

    def plan(self, service: str) -> ServicePlan | None:
        return self.plans.get(service)

    def grpc_plan(self, service: str) -> ServicePlan | None:
        """The plan a gRPC channel picks from: the endpoints labelled grpc, or the unlabelled
        ones when the service has none labelled grpc. Built on first use, kept for this
        Snapshot; the HTTP plan itself when both protocols see the same endpoints."""
        plan = self._grpc_plans.get(service)
        if plan is not None:
            return plan
        http = self.plans.get(service)
        if http is None:
            return None
        every = http.every
        picked = [e for e in every if e.labels.get(PROTOCOL_LABEL) == GRPC] or [
            e for e in every if PROTOCOL_LABEL not in e.labels
        ]
        with self._grpc_lock:
            plan = self._grpc_plans.get(service)
            if plan is None:
                if (
                    len(picked) == len(http.endpoints)
                    and all(a is b for a, b in zip(picked, http.endpoints, strict=True))
                    and http.load_balancer != "prequal"  # whose probes speak the plan's protocol
                ):
                    plan = http
                else:  # its own routes (hedge windows), and prequal's own gRPC probes
                    plan = ServicePlan(service, self.rules, picked, every, loads=self.loads, protocol=GRPC)
                self._grpc_plans[service] = plan
        return plan

    def with_rules(self, rules: RuleSet, version: str) -> Snapshot:
        return Snapshot(
            rules,
            version=version,
            loads=self.loads,
            discovered=self.discovered,
            revision=self.revision,
            instances=self.instances,
        )

    def with_discovered(self, discovered: Mapping[str, Sequence[EndpointSpec]], version: str) -> Snapshot:
        return Snapshot(
            self.rules,
            version=version,
            loads=self.loads,
            discovered=discovered,
            revision=self.revision,
            instances=self.instances,
        )

    def services(self) -> Iterable[str]:
        return self.plans.keys()
