"""Incremental xDS (DeltaAggregatedResources) against the ADS server alone. grpcio's xDS client
speaks state of the world only, so these streams are written by hand with the generated stubs:
what changed is all that is sent, removals are named, a reconnecting client's versions spare it
what it holds, and a NACK shows in /v1/clients as for state of the world."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from meshlib.control.plane import ControlPlane
from meshlib.control.xds import translate
from meshlib.control.xds.delta import digest
from meshlib.control.xds.translate import CLUSTER, ENDPOINTS
from meshlib.rules import EndpointSpec, RuleSet
from tests.control.xds.conftest import poll_rows

Response = discovery_pb2.DeltaDiscoveryResponse


class _Delta:
    """One incremental stream: requests sent by hand, responses read one at a time."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.requests: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest] = asyncio.Queue()
        self.removed: set[str] = set()  # every name any response said was removed
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources(
            self._feed()
        )

    async def _feed(self) -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
        while True:
            yield await self.requests.get()

    async def send(
        self,
        type_url: str,
        subscribe: Sequence[str] = (),
        *,
        unsubscribe: Sequence[str] = (),
        nonce: str = "",
        error: str = "",
        initial: dict[str, str] | None = None,
    ) -> None:
        request = discovery_pb2.DeltaDiscoveryRequest(
            node=base_pb2.Node(id="d1", cluster="checkout"),
            type_url=type_url,
            resource_names_subscribe=subscribe,
            resource_names_unsubscribe=unsubscribe,
            initial_resource_versions=initial or {},
            response_nonce=nonce,
        )
        if error:
            request.error_detail.code, request.error_detail.message = 3, error
        await self.requests.put(request)

    async def read(self) -> Response:
        response = await asyncio.wait_for(self.call.read(), 5.0)
        self.removed.update(response.removed_resources)
        return response

    async def until(self, type_url: str, check: Callable[[Response], bool]) -> Response:
        """The first response for which `check` holds, ACKing the others (a response built
        before a change reached the server's resources is a true one, just older)."""
        while True:
            response = await self.read()
            if check(response):
                return response
            await self.send(type_url, nonce=response.nonce)


def _names(response: Response) -> list[str]:
    return [r.name for r in response.resources]


async def _destination(plane: ControlPlane, *subsets: str) -> None:
    await plane.apply(
        [{"kind": "Destination", "service": "orders", "subsets": {s: {"version": s} for s in subsets}}]
    )


async def test_only_what_changed_is_sent_and_removals_are_named(ads_channel) -> None:
    plane, channel = ads_channel
    await _destination(plane, "v1")
    stream = _Delta(channel)
    await stream.send(CLUSTER)  # no name: every cluster (wildcard)
    first = await stream.until(CLUSTER, lambda r: _names(r) == ["orders", "orders|v1"])
    assert first.system_version_info and first.nonce and not first.removed_resources
    versions = {r.name: r.version for r in first.resources}
    cluster = cluster_pb2.Cluster()
    assert first.resources[1].resource.Unpack(cluster) and cluster.name == "orders|v1"
    await stream.send(CLUSTER, nonce=first.nonce)  # ACK

    await _destination(plane, "v1", "v2")
    added = await stream.read()
    assert _names(added) == ["orders|v2"] and not added.removed_resources  # the other two unchanged
    assert int(added.system_version_info) > int(first.system_version_info) and added.nonce != first.nonce
    await stream.send(CLUSTER, nonce=added.nonce)

    await _destination(plane, "v2")
    removed = await stream.read()
    assert _names(removed) == [] and list(removed.removed_resources) == ["orders|v1"]
    await stream.send(CLUSTER, nonce=removed.nonce)
    row = await poll_rows(plane, lambda r: r["xds"]["cds"]["acked"] == removed.system_version_info)
    assert row["ok"] is True and row["client"] == "d1" and versions["orders"]


async def test_subscriptions_a_nack_and_a_reconnect_with_the_versions_held(ads_channel) -> None:
    plane, channel = ads_channel
    await plane.register("orders", EndpointSpec(address="127.0.0.1:1001"), 60)
    stream = _Delta(channel)
    await stream.send(ENDPOINTS, ["orders", "nope"])
    first = await stream.until(ENDPOINTS, lambda r: _names(r) == ["orders"])
    # how delta xDS says "there is no such one" (orders too, if a first response was built before
    # its registration reached the server's resources)
    assert stream.removed - {"orders"} == {"nope"}
    await stream.send(ENDPOINTS, nonce=first.nonce, error="orders: no thanks")  # NACK
    row = await poll_rows(plane, lambda r: r["ok"] is False)
    assert (
        row["error"] == "eds: orders: no thanks" and row["xds"]["eds"]["nacked"] == first.system_version_info
    )
    # a change elsewhere (a new cluster) is pushed; the refused resource is not sent again
    await stream.send(CLUSTER)
    clusters = await stream.until(CLUSTER, lambda r: _names(r) == ["orders"])
    await stream.send(CLUSTER, nonce=clusters.nonce)
    await _destination(plane, "v1")
    assert (await stream.read()).type_url == CLUSTER  # an EDS resend would have come first

    await plane.register("orders", EndpointSpec(address="127.0.0.1:1002"), 60)
    pushed = await stream.read()  # the client kept what it held before the NACK: orders again
    cla = endpoint_pb2.ClusterLoadAssignment()
    assert _names(pushed) == ["orders"] and pushed.resources[0].resource.Unpack(cla)
    assert (
        len(cla.endpoints[0].lb_endpoints) == 2 and pushed.resources[0].version != first.resources[0].version
    )
    await stream.send(ENDPOINTS, nonce=pushed.nonce)
    await poll_rows(plane, lambda r: r["ok"] is True and r["error"] is None)

    # unsubscribed: a change to it is not sent; a subscription to what does not exist yet is
    # answered with its name as removed, and its resource sent once it exists
    await stream.send(ENDPOINTS, ["payments"], unsubscribe=["orders"])
    assert list((await stream.read()).removed_resources) == ["payments"]
    await plane.register("orders", EndpointSpec(address="127.0.0.1:1003"), 60)
    await plane.register("payments", EndpointSpec(address="127.0.0.1:2001"), 60)
    seen = [await stream.read()]
    while "payments" not in _names(seen[-1]):
        await stream.send(seen[-1].type_url, nonce=seen[-1].nonce)
        seen.append(await stream.read())
    assert _names(seen[-1]) == ["payments"] and all(
        "orders" not in _names(r) for r in seen if r.type_url == ENDPOINTS
    )
    held = {"orders": pushed.resources[0].version}
    stream.call.cancel()
    await poll_rows_gone(plane)

    # a reconnect that holds orders at an old version gets it; one that holds the current one not
    again = _Delta(channel)
    await again.send(ENDPOINTS, ["orders"], initial=held)
    current = await again.read()
    assert _names(current) == ["orders"] and current.resources[0].version != held["orders"]
    again.call.cancel()
    await poll_rows_gone(plane)
    last = _Delta(channel)
    await last.send(ENDPOINTS, ["orders"], initial={"orders": current.resources[0].version})
    nothing = await last.read()
    assert _names(nothing) == [] and not nothing.removed_resources and nothing.nonce
    last.call.cancel()


async def poll_rows_gone(plane: ControlPlane) -> None:
    """Until the server has let the ended stream go (it serves one stream at a time here)."""
    for _ in range(500):
        if not [r for r in await plane.client_rows() if r.get("protocol") == "xds"]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the ended stream is still listed")


def test_a_resource_s_version_is_its_content() -> None:
    """Two builds of the same rules give the same versions (a reconnecting client's versions
    mean the same on any replica); a change gives another, to that resource only."""
    dest = {"kind": "Destination", "service": "orders", "subsets": {"v1": {"version": "v1"}}}
    fault = {"fault": {"abort": {"percent": 5, "status": 503}}}  # a map field in the route
    route = {"kind": "Route", "service": "orders", "routes": [{"to": [{"subset": "v1"}], **fault}]}

    def versions(docs: list[dict[str, object]]) -> dict[str, str]:
        built = translate.resources(RuleSet().apply(docs), {})
        found = [
            (f"{t.rsplit('.', 1)[-1]}/{n}", m)
            for t in (CLUSTER, translate.ROUTE)
            for n, m in built[t].items()
        ]
        return {name: digest(translate.packed(message)) for name, message in found}

    assert versions([dest, route]) == versions([dest, route])
    before, after = versions([dest, route]), versions([{**dest, "max_concurrent_requests": 5}, route])
    assert [name for name in before if before[name] != after[name]] == ["Cluster/orders", "Cluster/orders|v1"]
