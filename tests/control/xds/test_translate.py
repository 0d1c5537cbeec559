"""What the rules and the registry become in xDS, and what is left out because gRPC's client
cannot follow it (a field it would refuse would make it NACK the whole resource)."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2

from meshlib.control.xds import translate
from meshlib.control.xds.translate import CLUSTER, ENDPOINTS, LISTENER, ROUTE, Instance
from meshlib.rules import RuleSet


def _built(docs: list[dict[str, Any]], instances: list[Instance] = ()) -> dict[str, dict[str, Any]]:
    return translate.resources(RuleSet().apply(docs), {"orders": list(instances)} if instances else {})


def _routes(built: dict[str, dict[str, Any]]) -> list[Any]:
    return list(built[ROUTE]["orders"].virtual_hosts[0].routes)


def test_a_listener_names_its_route_configuration_on_the_same_stream() -> None:
    built = _built([DEST, {"kind": "Route", "service": "orders", "routes": [{"to": [{"subset": "v1"}]}]}])
    manager = http_connection_manager_pb2.HttpConnectionManager()
    assert built[LISTENER]["orders"].api_listener.api_listener.Unpack(manager)
    assert [f.name for f in manager.http_filters][-1] == "envoy.filters.http.router"  # gRPC needs it last
    assert not manager.HasField("route_config") and manager.rds.route_config_name == "orders"
    assert manager.rds.config_source.HasField("ads")
    assert built[ROUTE]["orders"].name == "orders" and _routes(built)[0].route.cluster == "orders|v1"


DEST = {
    "kind": "Destination",
    "service": "orders",
    "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
}


def test_subsets_are_clusters_and_their_endpoints_match_the_labels() -> None:
    built = _built(
        [DEST],
        [Instance("127.0.0.1:1", {"version": "v1"}, 1), Instance("127.0.0.1:2", {"version": "v2"}, 3)],
    )
    assert set(built[CLUSTER]) == {"orders", "orders|v1", "orders|v2"}
    ports = {
        name: [
            e.endpoint.address.socket_address.port_value for loc in cla.endpoints for e in loc.lb_endpoints
        ]
        for name, cla in built[ENDPOINTS].items()
    }
    assert ports == {"orders": [1, 2], "orders|v1": [1], "orders|v2": [2]}


def test_localities_weigh_what_their_endpoints_weigh_and_names_are_left_out() -> None:
    built = _built(
        [],
        [
            Instance("127.0.0.1:1", {"zone": "a"}, 1),
            Instance("127.0.0.1:2", {"zone": "b"}, 3),
            Instance("[::1]:3", {"zone": "b"}, 2),
            Instance("orders.internal:4", {"zone": "a"}, 5),  # gRPC takes IP addresses only from EDS
        ],
    )
    cla = built[ENDPOINTS]["orders"]
    assert [(loc.locality.zone, loc.load_balancing_weight.value) for loc in cla.endpoints] == [
        ("a", 1),
        ("b", 5),
    ]
    assert cla.endpoints[1].lb_endpoints[1].endpoint.address.socket_address.address == "::1"


def test_weighted_targets_timeout_retries_and_a_header_match() -> None:
    route = {
        "match": {"headers": {"x-canary": {"exact": "true"}, "x-debug": {"present": False}}},
        "to": [{"subset": "v1", "weight": 80}, {"subset": "v2", "weight": 20}, {"weight": 0}],
        "timeout": "1.5s",
        "retries": {
            "attempts": 3,
            "on": ["connect-failure", "unavailable", "429"],
            "backoff": {"base": "0s"},
        },
    }
    routes = _routes(_built([DEST, {"kind": "Route", "service": "orders", "routes": [route]}]))
    first, default = routes
    clusters = [(c.name, c.weight.value) for c in first.route.weighted_clusters.clusters]
    assert clusters == [("orders|v1", 80), ("orders|v2", 20)]  # a weight of 0 is not sent
    assert [(h.name, h.string_match.exact, h.present_match, h.invert_match) for h in first.match.headers] == [
        ("x-canary", "true", False, False),
        ("x-debug", "", True, True),
    ]
    duration = first.route.max_stream_duration.max_stream_duration  # what gRPC reads, not `timeout`
    assert (duration.seconds, duration.nanos) == (1, 500_000_000)
    policy = first.route.retry_policy
    assert policy.retry_on == "unavailable" and policy.num_retries.value == 2  # attempts count the first
    assert policy.retry_back_off.base_interval.ToNanoseconds() == 10_000_000  # never zero
    assert default.match.prefix == "" and default.route.cluster == "orders"  # what no rule matched


def test_rules_grpc_cannot_follow_are_left_out() -> None:
    routes = [
        {"match": {"source": "checkout"}, "to": [{"subset": "v2"}]},
        {"match": {"methods": ["GET"]}, "to": [{"subset": "v2"}]},
        {"redirect": {"authority": "example.com"}},
        {"match": {"path": {"prefix": "/pkg.Orders/"}}, "to": [{"subset": "v1"}]},
    ]
    built = _routes(_built([DEST, {"kind": "Route", "service": "orders", "routes": routes}]))
    assert [(r.match.prefix, r.route.cluster) for r in built] == [
        ("/pkg.Orders/", "orders|v1"),
        ("", "orders"),
    ]


def test_ring_hash_with_a_header_and_the_concurrency_limit() -> None:
    dest = {**DEST, "load_balancer": "ring_hash", "hash_on": "header:X-User", "max_concurrent_requests": 7}
    built = _built([dest])
    cluster = built[CLUSTER]["orders|v1"]
    assert cluster.lb_policy == cluster_pb2.Cluster.RING_HASH
    assert cluster.circuit_breakers.thresholds[0].max_requests.value == 7
    assert _routes(built)[0].route.hash_policy[0].header.header_name == "x-user"
    least = _built([{**DEST, "load_balancer": "prequal"}])[CLUSTER]["orders"]
    assert least.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN and not least.HasField("load_balancing_policy")


def test_least_request_and_weighted_round_robin_fall_back_to_round_robin() -> None:
    for balancer, name in (
        ("least_request", "least_request"),
        ("weighted_round_robin", "client_side_weighted_round_robin"),
    ):
        policy = _built([{**DEST, "load_balancer": balancer}])[CLUSTER]["orders"].load_balancing_policy
        (locality,) = policy.policies
        assert locality.typed_extension_config.name == "wrr_locality"
        inner = wrr_locality_pb2.WrrLocality()
        assert locality.typed_extension_config.typed_config.Unpack(inner)
        names = [p.typed_extension_config.name for p in inner.endpoint_picking_policy.policies]
        assert names == [name, "round_robin"]  # a client without the first takes the second


def test_outlier_detection_is_a_failure_percentage_floor() -> None:
    outliers = {
        "interval": "2s",
        "base_ejection": "10s",
        "success_rate_threshold": 0.9,
        "success_rate_min_requests": 7,
    }
    detection = _built([{**DEST, "outlier_detection": outliers}])[CLUSTER]["orders"].outlier_detection
    assert (
        detection.failure_percentage_threshold.value == 10
        and detection.enforcing_failure_percentage.value == 100
    )
    assert (
        detection.failure_percentage_request_volume.value == 7
        and detection.failure_percentage_minimum_hosts.value == 1
    )
    assert detection.enforcing_success_rate.value == 0  # Envoy's stdev-based ejection is another rule
    assert (detection.interval.seconds, detection.base_ejection_time.seconds) == (2, 10)


def test_a_caller_sees_the_rules_for_it_and_others_do_not() -> None:
    routes = [{"match": {"source": ["checkout"]}, "to": [{"subset": "v2"}]}, {"to": [{"subset": "v1"}]}]
    rules = RuleSet().apply([DEST, {"kind": "Route", "service": "orders", "routes": routes}])
    mine = translate.caller_routes(rules, "checkout")
    assert set(mine) == {"orders"}
    clusters = [r.route.cluster for r in mine["orders"].virtual_hosts[0].routes]
    assert clusters == ["orders|v2", "orders|v1"]
    anyone = _routes(translate.resources(rules, {}))
    assert [r.route.cluster for r in anyone] == ["orders|v1"]
    assert translate.caller_routes(RuleSet().apply([DEST]), "checkout") == {}  # no source: one for all


def test_a_rule_with_a_regex_re2_does_not_take_is_left_out_and_named() -> None:
    routes = [
        {"match": {"headers": {"x-user": {"regex": "(?!bot).*"}}}, "to": [{"subset": "v2"}]},
        {"match": {"path": {"regex": "/pkg\\.Orders/.*"}}, "to": [{"subset": "v1"}]},
    ]
    rules = RuleSet().apply([DEST, {"kind": "Route", "service": "orders", "routes": routes}])
    built = _routes(translate.resources(rules, {}))
    assert [(r.match.safe_regex.regex, r.route.cluster) for r in built] == [
        ("/pkg\\.Orders/.*", "orders|v1"),
        ("", "orders"),
    ]
    (note,) = translate.left_out(rules)["orders"]
    assert note.startswith("Route/orders: routes[0].match.headers.x-user.regex: RE2 does not take a negative")


def test_an_abort_with_a_2xx_or_3xx_status_is_sent_as_unknown() -> None:
    """grpcio reads an HTTP 200 abort as none at all (the call goes through): such a status is
    sent as gRPC's UNKNOWN itself, which a mesh channel fails the call with too."""
    from envoy.extensions.filters.http.fault.v3 import fault_pb2

    def abort(status: int) -> Any:
        rule = {"fault": {"abort": {"status": status}}, "to": [{"subset": "v1"}]}
        (route,) = _routes(_built([DEST, {"kind": "Route", "service": "orders", "routes": [rule]}]))
        fault = fault_pb2.HTTPFault()
        assert route.typed_per_filter_config[translate.FAULT_FILTER].Unpack(fault)
        return fault.abort

    for status in (200, 204, 302):
        sent = abort(status)
        assert sent.WhichOneof("error_type") == "grpc_status" and sent.grpc_status == 2, status
    sent = abort(503)
    assert sent.WhichOneof("error_type") == "http_status" and sent.http_status == 503
