"""The rules in force and the registry as xDS resources for gRPC's proxyless client.

Only what gRPC's xDS client reads is sent (gRFCs A27, A28, A31 fault injection, A42 ring hash,
A44 retries): a field it would reject must not reach it, because a rejected field makes it
NACK the whole resource and keep the previous one. What cannot be expressed is left out, not
approximated in a way that would route differently (docs/xds.md lists each case).

Names: the listener of a service is its name (what `xds:///orders` asks for), and so is its
route configuration (RDS, which the listener names); its clusters are `orders` (every endpoint)
and `orders|v1` (a subset); each cluster's endpoints are the EDS resource of the same name.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, extension_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3 import (
    client_side_weighted_round_robin_pb2 as wrr_pb2,
)
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from meshlib.control.xds import re2
from meshlib.rules import RuleSet
from meshlib.rules.models import DestinationDoc, HeaderMatch, RetrySpec, RouteRule, StringMatch

log = logging.getLogger("meshlib.control.xds")

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPES = (LISTENER, ROUTE, CLUSTER, ENDPOINTS)

FAULT_FILTER = "envoy.filters.http.fault"
ROUTER_FILTER = "envoy.filters.http.router"
# the gRPC status names gRPC's retry policy knows (A44); meshlib's HTTP-only conditions map to
# UNAVAILABLE, the code a gRPC client sees for a refused or reset connection
_GRPC_RETRY_ON = {
    "unavailable": "unavailable",
    "resource-exhausted": "resource-exhausted",
    "deadline-exceeded": "deadline-exceeded",
    "internal": "internal",
    "cancelled": "cancelled",
    "reset": "unavailable",
    "connect-failure": "unavailable",
    "5xx": "unavailable",
    "gateway-error": "unavailable",
}
_MIN_BACKOFF = 0.01  # gRPC refuses a base of zero; calls were seen to stall with a base of 1 ms


@dataclass(frozen=True)
class Instance:
    """One endpoint as EDS sees it."""

    address: str
    labels: Mapping[str, str]
    weight: int


def cluster_name(service: str, subset: str | None) -> str:
    return service if subset is None else f"{service}|{subset}"


def resources(rules: RuleSet, endpoints: Mapping[str, Iterable[Instance]]) -> dict[str, dict[str, Message]]:
    """Every resource, by type URL and name, for the services in the rules or the registry."""
    out: dict[str, dict[str, Message]] = {t: {} for t in TYPES}
    by_service = {service: list(found) for service, found in endpoints.items()}
    services = {d.service for d in rules if d.kind in ("Route", "Destination", "Endpoints")} | set(by_service)
    for service in sorted(services):
        dest = rules.destination(service)
        out[LISTENER][service] = listener(service)
        out[ROUTE][service] = route_configuration(service, rules)
        subsets: dict[str | None, dict[str, str]] = {None: {}}
        if dest is not None:
            subsets.update(dest.subsets)
        static = rules.endpoints(service)
        found = by_service.get(service, [])
        if static is not None and static.endpoints:  # a registered address wins over the same one listed
            listed = {i.address for i in found}
            found = found + [
                Instance(e.address, e.labels, e.weight) for e in static.endpoints if e.address not in listed
            ]
        for subset, selector in subsets.items():
            name = cluster_name(service, subset)
            out[CLUSTER][name] = cluster(name, dest)
            chosen = [i for i in found if all(i.labels.get(k) == v for k, v in selector.items())]
            out[ENDPOINTS][name] = load_assignment(name, chosen)
    return out


def packed(message: Message) -> any_pb2.Any:
    """`message` in an Any, its bytes serialized deterministically (map entries in key order):
    equal resources have equal bytes, which delta xDS versions by."""
    wrapped = any_pb2.Any()
    wrapped.Pack(message, deterministic=True)
    return wrapped


# -- LDS / RDS ---------------------------------------------------------------------------------


def caller_routes(rules: RuleSet, caller: str) -> dict[str, route_pb2.RouteConfiguration]:
    """The route configurations `caller` sees differently from a caller of no name: those of
    the services whose Route has rules for some callers only (`match.source`); same names, so
    the listeners are shared. The caller is the client's node cluster, its own service as its
    bootstrap says (meshlib's own processes route on the name they give themselves too:
    `source` picks routes, Authorization decides who may call)."""
    return {
        doc.service: route_configuration(doc.service, rules, caller)
        for doc in rules
        if doc.kind == "Route" and any(r.match.source for r in doc.routes)
    }


def listener(service: str) -> listener_pb2.Listener:
    """An API listener: the HTTP connection manager, whose routes are the RDS resource of the
    same name (over the same ADS stream)."""
    manager = hcm_pb2.HttpConnectionManager(
        rds=hcm_pb2.Rds(
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            ),
            route_config_name=service,
        ),
        http_filters=[
            hcm_pb2.HttpFilter(name=FAULT_FILTER, typed_config=packed(fault_pb2.HTTPFault())),
            hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=packed(router_pb2.Router())),
        ],
    )
    return listener_pb2.Listener(
        name=service, api_listener=api_listener_pb2.ApiListener(api_listener=packed(manager))
    )


def route_configuration(
    service: str, rules: RuleSet, caller: str | None = None
) -> route_pb2.RouteConfiguration:
    doc = rules.route(service)
    dest = rules.destination(service)
    routes: list[route_components_pb2.Route] = []
    for rule in doc.routes if doc is not None else ():
        built = route(service, rule, dest, caller)
        if built is not None:
            routes.append(built)
    if doc is None or all(r.match != route_components_pb2.RouteMatch(prefix="") for r in routes):
        # meshlib sends what no rule matched to every endpoint of the service
        routes.append(
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix=""),
                route=_action(service, dest, cluster=cluster_name(service, None)),
            )
        )
    host = route_components_pb2.VirtualHost(name=service, domains=["*"], routes=routes)
    return route_pb2.RouteConfiguration(name=service, virtual_hosts=[host])


def route(
    service: str, rule: RouteRule, dest: DestinationDoc | None, caller: str | None = None
) -> route_components_pb2.Route | None:
    """One rule as a gRPC route, or None when gRPC cannot follow it (a redirect, a rule for other
    callers or methods only, no target with weight, a regex RE2 refuses)."""
    m = rule.match
    if m.source and caller not in m.source:
        return None
    if _re2_refused(rule):  # refused at apply time; this is one loaded from the store
        return None
    if rule.redirect is not None or m.hosts or (m.methods and "POST" not in m.methods):
        log.debug("xds: a rule of %s is left out (redirect, source, hosts or methods)", service)
        return None
    targets = [t for t in rule.to if t.weight > 0 and (t.service is None or t.service == service)]
    if not targets:
        return None
    match = _path_match(m.path)
    match.headers.extend(_header(name, h) for name, h in m.headers.items())
    if len(targets) == 1:
        action = _action(service, dest, cluster=cluster_name(service, targets[0].subset))
    else:
        weighted = route_components_pb2.WeightedCluster(
            clusters=[
                route_components_pb2.WeightedCluster.ClusterWeight(
                    name=cluster_name(service, t.subset), weight=wrappers_pb2.UInt32Value(value=t.weight)
                )
                for t in targets
            ]
        )
        action = _action(service, dest, weighted=weighted)
    if rule.timeout is not None:  # gRPC reads max_stream_duration, not `timeout` (A31)
        action.max_stream_duration.max_stream_duration.CopyFrom(_duration(rule.timeout))
    if rule.retries is not None:
        policy = _retry_policy(rule.retries)
        if policy is not None:
            action.retry_policy.CopyFrom(policy)
    built = route_components_pb2.Route(match=match, route=action, name=rule.name or "")
    if rule.fault is not None:
        built.typed_per_filter_config[FAULT_FILTER].CopyFrom(packed(_fault(rule)))
    return built


def _re2_refused(rule: RouteRule) -> bool:
    patterns = [h.regex for h in rule.match.headers.values() if h.regex is not None]
    if rule.match.path is not None and rule.match.path.regex is not None:
        patterns.append(rule.match.path.regex)
    return any(re2.refusal(p) is not None for p in patterns)


def left_out(rules: RuleSet) -> dict[str, list[str]]:
    """Per service, the rules its routes leave out because RE2 refuses one of their regexes
    ("routes[0].match.path.regex: RE2 does not take ..."): shown with its xDS clients."""
    out: dict[str, list[str]] = {}
    for doc in rules:
        if doc.kind == "Route":
            for _, where, pattern in re2.route_regexes(doc):
                reason = re2.refusal(pattern)
                if reason is not None:
                    out.setdefault(doc.service, []).append(f"Route/{doc.service}: {where}: {reason}")
    return out


def _action(
    service: str,
    dest: DestinationDoc | None,
    *,
    cluster: str | None = None,
    weighted: route_components_pb2.WeightedCluster | None = None,
) -> route_components_pb2.RouteAction:
    action = route_components_pb2.RouteAction()
    if weighted is not None:
        action.weighted_clusters.CopyFrom(weighted)
    else:
        action.cluster = cluster or service
    if dest is not None and dest.load_balancer == "ring_hash" and dest.hash_on:
        source, _, name = dest.hash_on.partition(":")
        if source == "header":  # gRPC hashes on headers only (A42); a cookie hash gets a random one
            action.hash_policy.append(
                route_components_pb2.RouteAction.HashPolicy(
                    header=route_components_pb2.RouteAction.HashPolicy.Header(header_name=name.lower())
                )
            )
    return action


def _path_match(path: StringMatch | None) -> route_components_pb2.RouteMatch:
    if path is None:
        return route_components_pb2.RouteMatch(prefix="")
    if path.exact is not None:
        return route_components_pb2.RouteMatch(path=path.exact)
    if path.prefix is not None:
        return route_components_pb2.RouteMatch(prefix=path.prefix)
    assert path.regex is not None
    return route_components_pb2.RouteMatch(safe_regex=regex_pb2.RegexMatcher(regex=path.regex))


def _header(name: str, h: HeaderMatch) -> route_components_pb2.HeaderMatcher:
    out = route_components_pb2.HeaderMatcher(name=name)
    if h.present is not None:
        out.present_match = True
        out.invert_match = not h.present
    elif h.exact is not None:
        out.string_match.CopyFrom(string_pb2.StringMatcher(exact=h.exact))
    elif h.prefix is not None:
        out.string_match.CopyFrom(string_pb2.StringMatcher(prefix=h.prefix))
    else:
        out.string_match.CopyFrom(string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=h.regex)))
    return out


def _retry_policy(spec: RetrySpec) -> route_components_pb2.RetryPolicy | None:
    codes = sorted({_GRPC_RETRY_ON[c] for c in spec.on if c in _GRPC_RETRY_ON})
    if not codes or spec.attempts < 2:
        return None
    base = max(spec.backoff.base, _MIN_BACKOFF)
    return route_components_pb2.RetryPolicy(
        retry_on=",".join(codes),
        num_retries=wrappers_pb2.UInt32Value(value=spec.attempts - 1),
        retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
            base_interval=_duration(base), max_interval=_duration(max(spec.backoff.max, base))
        ),
    )


_UNKNOWN = 2  # grpc.StatusCode.UNKNOWN's number (grpc itself is not imported here)


def _fault(rule: RouteRule) -> fault_pb2.HTTPFault:
    assert rule.fault is not None
    out = fault_pb2.HTTPFault()
    if rule.fault.abort is not None:
        status = rule.fault.abort.status
        if status < 400:  # grpcio reads an HTTP 200 as no abort at all: UNKNOWN, as a mesh channel fails
            out.abort.grpc_status = _UNKNOWN
        else:
            out.abort.http_status = status  # gRPC turns it into a status code
        out.abort.percentage.CopyFrom(_per_million(rule.fault.abort.percent))
    if rule.fault.delay is not None:
        out.delay.CopyFrom(
            common_fault_pb2.FaultDelay(
                fixed_delay=_duration(rule.fault.delay.duration),
                percentage=_per_million(rule.fault.delay.percent),
            )
        )
    return out


def _per_million(percent: float) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(
        numerator=round(percent * 10_000), denominator=percent_pb2.FractionalPercent.MILLION
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


# -- CDS / EDS ---------------------------------------------------------------------------------


def cluster(name: str, dest: DestinationDoc | None) -> cluster_pb2.Cluster:
    """An EDS cluster; ring_hash when the Destination asks for it, round_robin otherwise (the other
    balancers have no counterpart every gRPC client has)."""
    out = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            ),
            service_name=name,
        ),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )
    if dest is None:
        return out
    if dest.load_balancer == "ring_hash":
        out.lb_policy = cluster_pb2.Cluster.RING_HASH
    elif dest.load_balancer in ("least_request", "weighted_round_robin"):
        out.load_balancing_policy.CopyFrom(_policy_with_fallback(dest))
    if dest.outlier_detection is not None:
        out.outlier_detection.CopyFrom(_outlier_detection(dest))
    if dest.max_concurrent_requests is not None:
        out.circuit_breakers.CopyFrom(
            circuit_breaker_pb2.CircuitBreakers(
                thresholds=[
                    circuit_breaker_pb2.CircuitBreakers.Thresholds(
                        priority=base_pb2.DEFAULT,
                        max_requests=wrappers_pb2.UInt32Value(value=dest.max_concurrent_requests),
                    )
                ]
            )
        )
    return out


def _policy_with_fallback(dest: DestinationDoc) -> cluster_pb2.LoadBalancingPolicy:
    """least_request (A48) or weighted_round_robin (A58, weighing by the servers' ORCA reports),
    with round_robin after it: a client takes the first policy of the list it has (A52), so
    one without it falls back instead of refusing the cluster. Inside each locality, as gRPC's
    own translation of an lb_policy does (wrr_locality)."""
    if dest.load_balancer == "least_request":
        preferred = _extension("least_request", least_request_pb2.LeastRequest())
    else:
        spec = dest.weighted_round_robin
        options = wrr_pb2.ClientSideWeightedRoundRobin()
        if spec is not None:
            options.blackout_period.CopyFrom(_duration(spec.blackout_period))
            options.weight_expiration_period.CopyFrom(_duration(spec.weight_expiration_period))
            options.weight_update_period.CopyFrom(_duration(spec.weight_update_period))
            options.error_utilization_penalty.value = spec.error_utilization_penalty
        preferred = _extension("client_side_weighted_round_robin", options)
    endpoints = cluster_pb2.LoadBalancingPolicy(
        policies=[preferred, _extension("round_robin", round_robin_pb2.RoundRobin())]
    )
    locality = wrr_locality_pb2.WrrLocality(endpoint_picking_policy=endpoints)
    return cluster_pb2.LoadBalancingPolicy(policies=[_extension("wrr_locality", locality)])


def _extension(name: str, config: Message) -> cluster_pb2.LoadBalancingPolicy.Policy:
    return cluster_pb2.LoadBalancingPolicy.Policy(
        typed_extension_config=extension_pb2.TypedExtensionConfig(name=name, typed_config=packed(config))
    )


def _outlier_detection(dest: DestinationDoc) -> outlier_detection_pb2.OutlierDetection:
    """meshlib's success-rate floor as gRPC's failure-percentage ejection (A50), which judges each
    endpoint against a fixed threshold as meshlib does; Envoy's success-rate ejection compares
    endpoints with each other (standard deviations) and is left off, as are the consecutive-error
    counts gRPC does not implement."""
    spec = dest.outlier_detection
    assert spec is not None
    return outlier_detection_pb2.OutlierDetection(
        interval=_duration(spec.interval),
        base_ejection_time=_duration(spec.base_ejection),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=spec.max_ejection_percent),
        enforcing_success_rate=wrappers_pb2.UInt32Value(value=0),
        failure_percentage_threshold=wrappers_pb2.UInt32Value(
            value=min(100, round((1 - spec.success_rate_threshold) * 100))
        ),
        enforcing_failure_percentage=wrappers_pb2.UInt32Value(value=100),
        failure_percentage_minimum_hosts=wrappers_pb2.UInt32Value(value=1),
        failure_percentage_request_volume=wrappers_pb2.UInt32Value(value=spec.success_rate_min_requests),
    )


def load_assignment(name: str, instances: Iterable[Instance]) -> endpoint_pb2.ClusterLoadAssignment:
    """The endpoints grouped by locality (their `region`/`zone` labels). A locality's weight is
    the sum of its endpoints' weights: gRPC splits traffic across localities by those weights
    (round_robin ignores the weights of the endpoints inside one)."""
    localities: dict[tuple[str, str], list[endpoint_components_pb2.LbEndpoint]] = {}
    weights: dict[tuple[str, str], int] = {}
    for inst in instances:
        socket = _socket_address(inst.address)
        if socket is None:
            log.debug("xds: %s is not an IP address; gRPC cannot use it from EDS", inst.address)
            continue
        key = (inst.labels.get("region", ""), inst.labels.get("zone", ""))
        localities.setdefault(key, []).append(
            endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(address=address_pb2.Address(socket_address=socket)),
                health_status=health_check_pb2.HEALTHY,
                load_balancing_weight=wrappers_pb2.UInt32Value(value=inst.weight),
            )
        )
        weights[key] = weights.get(key, 0) + inst.weight
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region=region, zone=zone),
                lb_endpoints=found,
                load_balancing_weight=wrappers_pb2.UInt32Value(value=weights[(region, zone)]),
            )
            for (region, zone), found in sorted(localities.items())
        ],
    )


def _socket_address(address: str) -> address_pb2.SocketAddress | None:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return address_pb2.SocketAddress(address=host, port_value=int(port))
