"""A real grpcio xDS client (its own process, `xds:///orders`) follows the rules and the registry
of the control service over ADS: splits, header routes, live changes, endpoints leaving, retries,
fault aborts; and a resource it refuses shows in `/v1/clients` with its reason."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest
from envoy.config.core.v3 import base_pb2 as core_base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from meshlib.cli import main
from meshlib.control.plane import ControlPlane
from meshlib.control.xds import re2
from meshlib.control.xds.translate import CLUSTER, ENDPOINTS, LISTENER, ROUTE
from meshlib.rules import EndpointSpec
from tests.control import Control
from tests.control.process import free_port
from tests.control.xds.conftest import Servers, Unavailable, XdsControl, poll, poll_rows

SUBSETS = {"v1": {"version": "v1"}, "v2": {"version": "v2"}}


def _orders(control: XdsControl, servers: Servers) -> dict[str, str]:
    """orders v1 and v2 servers in the registry; instance ids by name."""
    return {name: control.register("orders", servers.echo(name), {"version": name}) for name in ("v1", "v2")}


def _route(*routes: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"kind": "Destination", "service": "orders", "subsets": SUBSETS},
        {"kind": "Route", "service": "orders", "routes": list(routes)},
    ]


def _split(v1: int, v2: int) -> list[dict[str, Any]]:
    return _route({"to": [{"subset": "v1", "weight": v1}, {"subset": "v2", "weight": v2}]})


def _both(result: tuple[dict[str, int], dict[str, int]]) -> tuple[dict[str, int], dict[str, int]] | None:
    """The result if some calls were answered and some failed."""
    return result if result[0] and result[1] else None


def test_weighted_split_80_20(xds_control, servers, xds_client) -> None:
    _orders(xds_control, servers)
    xds_control.apply(_split(80, 20))
    client = xds_client("orders")
    got, failed = client.calls(1000, wait_for_ready=True)
    assert not failed
    assert got.keys() == {"v1", "v2"}
    assert 0.74 <= got["v1"] / 1000 <= 0.86, got  # 80% +- 6 points: ~5 standard deviations


def test_header_route_before_the_default(xds_control, servers, xds_client) -> None:
    _orders(xds_control, servers)
    xds_control.apply(
        _route(
            {"match": {"headers": {"x-canary": {"exact": "true"}}}, "to": [{"subset": "v2"}]},
            {"to": [{"subset": "v1"}]},
        )
    )
    client = xds_client("orders")
    assert client.calls(50, wait_for_ready=True) == ({"v1": 50}, {})
    assert client.calls(50, metadata={"x-canary": "true"}) == ({"v2": 50}, {})
    assert client.calls(50, metadata={"x-canary": "false"}) == ({"v1": 50}, {})


def test_a_rule_for_some_callers_reaches_those_only(xds_control, servers, xds_client) -> None:
    """`match.source` is the caller's own service, its node cluster in the bootstrap."""
    _orders(xds_control, servers)
    xds_control.apply(
        _route({"match": {"source": "checkout"}, "to": [{"subset": "v2"}]}, {"to": [{"subset": "v1"}]})
    )
    checkout = xds_client("orders", node_id="checkout-1", service="checkout")
    billing = xds_client("orders", node_id="billing-1", service="billing")
    assert checkout.calls(20, wait_for_ready=True) == ({"v2": 20}, {})
    assert billing.calls(20, wait_for_ready=True) == ({"v1": 20}, {})
    xds_control.apply(
        _route({"match": {"source": "billing"}, "to": [{"subset": "v2"}]}, {"to": [{"subset": "v1"}]})
    )
    poll(lambda: billing.calls(10) == ({"v2": 10}, {}), 2.0, "billing moved to v2")
    poll(lambda: checkout.calls(10) == ({"v1": 10}, {}), 2.0, "checkout moved to v1")


def test_a_live_change_of_weights_converges_within_seconds(xds_control, servers, xds_client) -> None:
    _orders(xds_control, servers)
    xds_control.apply(_split(100, 0))
    client = xds_client("orders")
    assert client.calls(20, wait_for_ready=True) == ({"v1": 20}, {})
    started = time.monotonic()
    xds_control.apply(_split(0, 100))
    # pushed: well within a second when idle; 3 s, not 1, for a machine under CI's load
    poll(lambda: client.calls(10) == ({"v2": 10}, {}), 3.0, "every call on v2")
    assert time.monotonic() - started < 3.0


def test_an_endpoint_removed_from_the_registry_stops_getting_calls(xds_control, servers, xds_client) -> None:
    ids = {name: xds_control.register("orders", servers.echo(name), {"version": "v1"}) for name in ("a", "b")}
    client = xds_client("orders")
    assert client.calls(1, wait_for_ready=True)[1] == {}
    # round robin over both, once both connections are up
    poll(lambda: client.calls(40) == ({"a": 20, "b": 20}, {}), 2.0, "both answering")
    xds_control.deregister("orders", ids["b"])
    poll(lambda: client.calls(10) == ({"a": 10}, {}), 2.0, "only a answers")
    assert client.calls(100) == ({"a": 100}, {})


def test_retry_on_unavailable_hides_a_failing_endpoint(xds_control, servers, xds_client) -> None:
    xds_control.register("orders", servers.echo("ok"), {"version": "v1"})
    xds_control.register("orders", servers.start(Unavailable()), {"version": "v1"})
    client = xds_client("orders")
    assert client.calls(1, wait_for_ready=True)
    got, failed = poll(lambda: _both(client.calls(100)), 2.0, "both endpoints called")
    assert failed.keys() == {"UNAVAILABLE"} and 40 <= got["ok"] <= 60, (got, failed)  # no retries yet
    xds_control.apply(
        [
            {
                "kind": "Route",
                "service": "orders",
                "routes": [
                    {
                        "retries": {
                            "attempts": 3,
                            "on": ["unavailable"],
                            "backoff": {"base": "10ms", "max": "20ms"},
                        }
                    }
                ],
            }
        ]
    )
    poll(lambda: client.calls(20) == ({"ok": 20}, {}), 2.0, "every call answered after a retry")
    assert client.calls(100) == ({"ok": 100}, {})


def test_outlier_detection_ejects_a_failing_endpoint(xds_control, servers, xds_client) -> None:
    xds_control.register("orders", servers.echo("ok"), {"version": "v1"})
    xds_control.register("orders", servers.start(Unavailable()), {"version": "v1"})
    outliers = {"interval": "100ms", "success_rate_threshold": 0.5, "success_rate_min_requests": 5}
    xds_control.apply([{"kind": "Destination", "service": "orders", "outlier_detection": outliers}])
    client = xds_client("orders")
    assert client.calls(1, wait_for_ready=True)
    poll(lambda: _both(client.calls(20)), 2.0, "both endpoints called")
    # more than 50% failures over at least 5 calls in an interval: ejected for 30 s
    poll(lambda: client.calls(20) == ({"ok": 20}, {}), 2.0, "the failing endpoint ejected")


def test_least_request_and_weighted_round_robin_clusters_are_taken(xds_control, servers, xds_client) -> None:
    """Sent with round_robin as the fallback: a client without the policy uses that, never NACKs."""
    _orders(xds_control, servers)
    client = xds_client("orders", node_id="checkout-lb")
    assert client.calls(1, wait_for_ready=True)[1] == {}

    def cds() -> dict[str, Any]:
        return next(c for c in xds_control.clients() if c["client"] == "checkout-lb")["xds"]["cds"]

    for balancer in ("least_request", "weighted_round_robin"):
        before = int(cds()["sent"])
        xds_control.apply([{"kind": "Destination", "service": "orders", "load_balancer": balancer}])
        poll(lambda: int(cds()["acked"] or 0) > before, 2.0, f"the {balancer} cluster acked")  # noqa: B023
        assert cds()["nacked"] is None
        poll(lambda: client.calls(40)[0].keys() == {"v1", "v2"}, 2.0, "both answering")


def test_a_fault_abort_fails_calls_without_reaching_a_server(xds_control, servers, xds_client) -> None:
    _orders(xds_control, servers)
    client = xds_client("orders")
    assert client.calls(10, wait_for_ready=True)[1] == {}

    def fault(percent: float) -> list[dict[str, Any]]:
        return _route({"fault": {"abort": {"percent": percent, "status": 503}}, "to": [{"subset": "v1"}]})

    # HTTP 503 is UNAVAILABLE in gRPC's mapping of HTTP statuses
    xds_control.apply(fault(100))
    poll(lambda: client.calls(10) == ({}, {"UNAVAILABLE": 10}), 2.0, "every call aborted")
    xds_control.apply(_route({"to": [{"subset": "v1"}]}))
    poll(lambda: client.calls(10) == ({"v1": 10}, {}), 2.0, "the fault removed")
    # (gRPC 1.85 keeps the old percent when only the percent of a fault changes: docs/xds.md)
    xds_control.apply(fault(50))
    poll(lambda: client.calls(10)[1], 2.0, "some calls aborted")
    got, failed = client.calls(400)
    assert got.keys() == {"v1"} and failed.keys() == {"UNAVAILABLE"}
    assert 0.38 <= failed["UNAVAILABLE"] / 400 <= 0.62, (got, failed)  # 50% +- 12 points: ~5 sigma
    # a 2xx abort (an HTTP 200 would be no abort to grpcio) fails the call with UNKNOWN, as a
    # mesh channel does; removed first, since a change of the percent alone is not taken
    xds_control.apply(_route({"to": [{"subset": "v1"}]}))
    poll(lambda: client.calls(10) == ({"v1": 10}, {}), 2.0, "the fault removed again")
    xds_control.apply(_route({"fault": {"abort": {"status": 200}}, "to": [{"subset": "v1"}]}))
    poll(lambda: client.calls(10) == ({}, {"UNKNOWN": 10}), 2.0, "every call aborted with UNKNOWN")


LOOKAHEAD = {"match": {"path": {"regex": "/(?=meshlib).*"}}, "to": [{"subset": "v2"}]}
"""A Python regex (every echo call's path matches it) that RE2 does not take: sent to a gRPC
client, it makes the client refuse the whole route configuration."""


def test_a_regex_re2_does_not_take_is_refused_at_apply_time(xds_control, servers, xds_client) -> None:
    _orders(xds_control, servers)
    xds_control.apply(_split(100, 0))
    client = xds_client("orders", node_id="checkout-7")
    assert client.calls(10, wait_for_ready=True) == ({"v1": 10}, {})
    for params in ({}, {"dry_run": "true"}):
        r = httpx.put(
            f"{xds_control.url}/v1/config",
            json=_route(LOOKAHEAD, {"to": [{"subset": "v1"}]}),
            headers=xds_control.auth,
            params=params,
        )
        assert r.status_code == 422, r.text
        (problem,) = r.json()["problems"]
        assert problem["document"] == "Route/orders" and problem["field"] == "routes[0].match.path.regex"
        assert problem["reason"].startswith("RE2 does not take a lookahead"), problem
    # a regex RE2 takes goes through, and the client follows it
    xds_control.apply(
        _route({"match": {"path": {"regex": "/meshlib\\.test\\..*"}}, "to": [{"subset": "v2"}]})
    )
    poll(lambda: client.calls(10) == ({"v2": 10}, {}), 2.0, "the regex route followed")
    row = next(c for c in xds_control.clients() if c["client"] == "checkout-7")
    assert row["ok"] is True and row["left_out"] is None
    assert {t: state["nacked"] for t, state in row["xds"].items()} == dict.fromkeys(
        ("cds", "eds", "lds", "rds")
    )


@pytest.fixture
def in_process(tmp_path, servers) -> Iterator[Callable[..., Control]]:
    """Control services in this process (`make(**settings)`, on one data dir), so that a test can
    reach into them; each with orders v1 and v2 in its registry."""
    made: list[Control] = []

    def make(**settings: Any) -> Control:
        control = Control(tmp_path / "control", **settings)
        made.append(control)
        for name in ("v1", "v2"):
            body = {"address": servers.echo(name), "labels": {"version": name}, "ttl": 60}
            assert control.http.post("/v1/registry/orders", json=body).status_code == 201
        return control

    try:
        yield make
    finally:
        for control in made:
            control.stop()


def test_a_rule_in_force_with_such_a_regex_is_left_out_and_shown(
    in_process, xds_clients, caplog, capsys
) -> None:
    """Rules applied before the control service served xDS: the rule RE2 cannot take is left
    out of the routes (its other rules are sent), shown in /v1/clients, warned of once."""
    before = in_process()
    header = {"match": {"headers": {"x-canary": {"exact": "true"}}}, "to": [{"subset": "v2"}]}
    assert before.apply(_route(LOOKAHEAD, header, {"to": [{"subset": "v1"}]})).status_code == 200
    before.stop()
    port = free_port()
    with caplog.at_level(logging.WARNING, logger="meshlib.control.xds"):
        control = in_process(xds_port=port)
        client = xds_clients(f"127.0.0.1:{port}", "orders", node_id="checkout-8")
        assert client.calls(10, wait_for_ready=True) == ({"v1": 10}, {})  # not v2: left out
        assert client.calls(10, metadata={"x-canary": "true"}) == ({"v2": 10}, {})
        rows = control.http.get("/v1/clients").json()
        row = next(r for r in rows if r["client"] == "checkout-8")
        assert row["ok"] is True and row["xds"]["rds"]["acked"] and row["xds"]["rds"]["nacked"] is None
        (note,) = row["left_out"]
        assert note.startswith("Route/orders: routes[0].match.path.regex: RE2 does not take a lookahead"), (
            note
        )
        # another change (once the client has its clusters): the rule is still left out, and not
        # warned of again
        acked = int(row["xds"]["cds"]["acked"])
        destination = {
            "kind": "Destination",
            "service": "orders",
            "subsets": SUBSETS,
            "load_balancer": "ring_hash",
        }
        assert control.apply([destination]).status_code == 200

        def cds_acked() -> bool:
            rows = control.http.get("/v1/clients").json()
            return any(r["client"] == "checkout-8" and int(r["xds"]["cds"]["acked"]) > acked for r in rows)

        poll(cds_acked, 2.0, "the new clusters acked")
        assert control.apply(_route(LOOKAHEAD, header)).status_code == 422  # a new one is refused
        capsys.readouterr()
        assert main(["status", "--control", control.url]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("checkout-8"))
    assert "ok (left out: Route/orders: routes[0].match.path.regex: RE2 does not take" in line, line
    warned = [r for r in caplog.records if "left out of the routes of orders" in r.getMessage()]
    assert len(warned) == 1, warned


def test_a_refused_resource_is_shown_with_its_reason(in_process, xds_clients, monkeypatch, capsys) -> None:
    """What the RE2 check prevents: with it off, the lookahead reaches a real gRPC client, which
    refuses (NACKs) the whole route configuration and keeps the one it had; the NACK and gRPC's reason are
    in /v1/clients and `meshlib status`."""
    port = free_port()
    control = in_process(xds_port=port)
    assert control.apply(_split(100, 0)).status_code == 200
    client = xds_clients(f"127.0.0.1:{port}", "orders", node_id="checkout-7")
    assert client.calls(10, wait_for_ready=True) == ({"v1": 10}, {})
    monkeypatch.setattr(re2, "refusal", lambda pattern: None)  # a check that misses the pattern
    assert control.apply(_route(LOOKAHEAD, {"to": [{"subset": "v1"}]})).status_code == 200

    def refused() -> dict[str, Any] | None:
        rows = [c for c in control.http.get("/v1/clients").json() if c["client"] == "checkout-7"]
        return rows[0] if rows and rows[0]["ok"] is False else None

    row = poll(refused, 2.0, "the NACK in /v1/clients")
    assert row["protocol"] == "xds" and row["service"] == "checkout" and row["connected"] is True
    assert row["error"].startswith("rds: ") and "regex" in row["error"].lower(), row["error"]
    rds = row["xds"]["rds"]
    assert rds["nacked"] is not None and rds["acked"] != rds["nacked"]
    assert row["xds"]["lds"]["nacked"] is None  # the listener only names the route configuration
    assert client.calls(10) == ({"v1": 10}, {})  # the client keeps the routes it had
    capsys.readouterr()
    assert main(["status", "--control", control.url]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("checkout-7"))
    assert "rejected: rds: " in line


def test_ring_hash_keeps_a_header_value_on_one_endpoint(xds_control, servers, xds_client) -> None:
    for name in ("a", "b", "c"):
        xds_control.register("orders", servers.echo(name), {"version": "v1"})
    xds_control.apply(
        [
            {
                "kind": "Destination",
                "service": "orders",
                "load_balancer": "ring_hash",
                "hash_on": "header:x-user",
            }
        ]
    )
    client = xds_client("orders")
    assert client.calls(1, wait_for_ready=True, metadata={"x-user": "warmup"})[1] == {}
    picked = {}
    for user in [f"user-{i}" for i in range(12)]:
        got, failed = poll(lambda: (r := client.calls(10, metadata={"x-user": user}))[0] and r, 2.0, user)  # noqa: B023
        assert len(got) == 1 and not failed, (user, got)  # every call of one user on one endpoint
        picked[user] = next(iter(got))
    assert len(set(picked.values())) > 1, picked  # and users spread over the endpoints (all 12 on
    # one of 3 endpoints: below 1 in 1,000 unless the ring gives one endpoint over half of it)


# -- the stream protocol, against the ADS server alone ----------------------------------------


class _Stream:
    """One ADS stream of a test: requests sent by hand, responses read one at a time."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.requests: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
            self._feed()
        )

    async def _feed(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            yield await self.requests.get()

    async def send(
        self, type_url: str, names: list[str], *, nonce: str = "", version: str = "", error: str = ""
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            node=core_base_pb2.Node(id="n1", cluster="checkout"),
            type_url=type_url,
            resource_names=names,
            response_nonce=nonce,
            version_info=version,
        )
        if error:
            request.error_detail.code, request.error_detail.message = 3, error
        await self.requests.put(request)

    async def read(self) -> discovery_pb2.DiscoveryResponse:
        return await asyncio.wait_for(self.call.read(), 5.0)

    async def read_filled(self, type_url: str, names: list[str]) -> discovery_pb2.DiscoveryResponse:
        """The first response with resources: one built before a registration reached the
        server's snapshot (it is rebuilt off the loop) may come empty, and is ACKed as a
        client does."""
        response = await self.read()
        self.acked_empty: str | None = None  # the version of the last empty one ACKed, if any
        while not response.resources:
            await self.send(type_url, names, nonce=response.nonce, version=response.version_info)
            self.acked_empty = response.version_info
            response = await self.read()
        return response


@pytest.fixture
async def ads(ads_channel) -> AsyncIterator[tuple[ControlPlane, _Stream]]:
    plane, channel = ads_channel
    yield plane, _Stream(channel)


async def _register(plane: ControlPlane, address: str) -> None:
    await plane.register("orders", EndpointSpec(address=address), 60)


async def test_acks_and_stale_nonces_get_no_answer_and_a_change_is_pushed(ads) -> None:
    plane, stream = ads
    await _register(plane, "127.0.0.1:1001")
    await stream.send(ENDPOINTS, ["orders"])
    first = await stream.read_filled(ENDPOINTS, ["orders"])
    assert first.type_url == ENDPOINTS and len(first.resources) == 1 and first.nonce
    await stream.send(ENDPOINTS, ["orders"], nonce=first.nonce, version=first.version_info)  # ACK
    await poll_rows(plane, lambda r: r["xds"]["eds"]["acked"] == first.version_info)
    await stream.send(ENDPOINTS, ["orders", "other"], nonce="stale")  # answers nothing sent: ignored
    await _register(plane, "127.0.0.1:1002")
    pushed = await stream.read()  # the change: had the stale request been taken, its new names
    # would have been answered at once with the version the client had
    assert int(pushed.version_info) > int(first.version_info) and pushed.nonce != first.nonce
    cla = endpoint_pb2.ClusterLoadAssignment()
    assert pushed.resources[0].Unpack(cla) and len(cla.endpoints[0].lb_endpoints) == 2
    row = next(r for r in await plane.client_rows() if r.get("protocol") == "xds")
    assert (row["client"], row["service"], row["xds"]["eds"]["acked"]) == (
        "n1",
        "checkout",
        first.version_info,
    )


async def test_a_route_change_moves_the_route_configuration_on_and_not_the_listener(ads) -> None:
    """RDS is its own resource: the listener names it, and a change of routes is one RDS push,
    with its own version and nonce."""
    plane, stream = ads
    await plane.apply([{"kind": "Destination", "service": "orders", "subsets": SUBSETS}])
    await stream.send(LISTENER, [])
    lds = await stream.read_filled(LISTENER, [])
    await stream.send(LISTENER, [], nonce=lds.nonce, version=lds.version_info)
    await stream.send(ROUTE, ["orders"])
    rds = await stream.read()
    assert rds.type_url == ROUTE and len(rds.resources) == 1 and rds.nonce != lds.nonce
    await stream.send(ROUTE, ["orders"], nonce=rds.nonce, version=rds.version_info)
    await plane.apply(_split(30, 70))
    pushed = await stream.read()
    assert pushed.type_url == ROUTE and int(pushed.version_info) > int(rds.version_info)
    config = route_pb2.RouteConfiguration()
    assert pushed.resources[0].Unpack(config) and config.name == "orders"
    weights = [c.weight.value for c in config.virtual_hosts[0].routes[0].route.weighted_clusters.clusters]
    assert weights == [30, 70]
    await stream.send(ROUTE, ["orders"], nonce=pushed.nonce, version=pushed.version_info)
    row = await poll_rows(plane, lambda r: r["xds"]["rds"]["acked"] == pushed.version_info)
    assert row["xds"]["lds"] == {
        "sent": lds.version_info,
        "acked": lds.version_info,
        "nacked": None,
        "error": None,
    }


async def test_a_nack_is_recorded_and_nothing_is_resent_until_a_change(ads) -> None:
    plane, stream = ads
    await _register(plane, "127.0.0.1:1001")
    await stream.send(CLUSTER, [])  # wildcard: every cluster
    first = await stream.read_filled(CLUSTER, [])
    assert len(first.resources) == 1
    await stream.send(CLUSTER, [], nonce=first.nonce, version="", error="cluster orders: no thanks")
    row = await poll_rows(plane, lambda r: r["ok"] is False)
    assert row["error"] == "cds: cluster orders: no thanks"
    cds = dict(row["xds"]["cds"])
    # None, unless the registration came after a first empty response and its ACK reached the
    # server before the filled one was sent (after that, the ACK's nonce is stale: ignored)
    assert cds.pop("acked") in {None, stream.acked_empty}
    assert cds == {
        "sent": first.version_info,
        "nacked": first.version_info,
        "error": "cluster orders: no thanks",
    }
    await plane.apply([{"kind": "Destination", "service": "orders", "subsets": {"v1": {"version": "v1"}}}])
    pushed = await stream.read()
    assert int(pushed.version_info) > int(first.version_info) and len(pushed.resources) == 2
    await stream.send(CLUSTER, [], nonce=pushed.nonce, version=pushed.version_info)
    row = await poll_rows(plane, lambda r: r["ok"] is True)
    assert row["error"] is None and row["xds"]["cds"]["acked"] == pushed.version_info


async def test_streams_beyond_the_bound_are_refused(ads) -> None:
    _, stream = ads
    await stream.send(CLUSTER, [])
    assert (await stream.read()).type_url == CLUSTER  # the one stream the bound allows is open
    other = _Stream(stream.channel)
    await other.send(CLUSTER, [])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await other.read()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
