"""The gRPC parts together, with real servers: `mesh.grpc_channel` calling `mesh.serve_grpc`
over the mTLS of the real secure control service (identity, authorization, failing closed,
rotation under load), the service graph after gRPC traffic, and one deadline across HTTP and
gRPC hops."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import grpc
import httpx
import pytest

import meshlib
from meshlib import context as mesh_context
from meshlib.endpoint import PROTOCOL_LABEL
from meshlib.errors import DeadlineExceeded
from meshlib.grpc import aio_server_interceptors, server_interceptors
from meshlib.grpc.credentials import channel_security
from meshlib.grpc.serving import GrpcServing
from meshlib.rules import parse_documents
from meshlib.testing import serve
from tests.conftest import wait_until
from tests.grpc import echo_pb2, echo_pb2_grpc
from tests.grpc.echo_servicers import AioEcho, Echo
from tests.grpc.echo_servicers import pong as echo_pong
from tests.grpc.test_aio_channel import eventually
from tests.grpc.test_credentials import mesh_of, renew, serial_of, served_certificate
from tests.security.test_mtls_live import SecureControl

DENIED = "RBAC: access denied: source billing may not POST /meshlib.test.Echo/Unary"


@dataclass
class World:
    control: SecureControl
    orders: meshlib.Mesh
    checkout: meshlib.Mesh
    billing: meshlib.Mesh
    payments: meshlib.Mesh

    def put(self, docs: list[dict[str, Any]]) -> None:
        r = httpx.put(
            f"{self.control.url}/v1/config",
            json=docs,
            headers={"authorization": f"Bearer {self.control.admin}"},
        )
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("grpc-e2e")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MESH_TELEMETRY_INTERVAL", "0.2")  # the graph sees traffic within a fraction of a second
        control = SecureControl(base / "control", lifetime=600)
        meshes = [mesh_of(control, s, base / "cache") for s in ("orders", "checkout", "billing", "payments")]
    world = World(control, *meshes)
    world.put([{"kind": "Authorization", "service": "orders", "allow": [{"from": ["checkout"]}]}])
    try:
        yield world
    finally:
        for mesh in meshes:
            mesh.close()
        control.stop()


def grpc_addresses(mesh: meshlib.Mesh, service: str) -> set[str]:
    plan = mesh.snapshot.grpc_plan(service)
    return {e.address for e in plan.endpoints} if plan is not None else set()


@pytest.fixture
def orders(world: World) -> Iterator[tuple[GrpcServing, Echo]]:
    """orders served by `serve_grpc` (mTLS STRICT, the Mesh's mode), known to checkout and billing."""
    servicer = Echo("orders")
    serving = world.orders.serve_grpc(
        [functools.partial(echo_pb2_grpc.add_EchoServicer_to_server, servicer)], port=0
    )
    try:
        for caller in (world.checkout, world.billing):
            wait_until(
                lambda c=caller: grpc_addresses(c, "orders") == {serving.address},  # type: ignore[misc]
                what="the registered gRPC endpoint in the callers' snapshots",
            )
        yield serving, servicer
    finally:
        serving.stop(grace=1)


def unary(mesh: meshlib.Mesh, service: str, **ping: Any) -> echo_pb2.Pong:
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_channel(service))
    return stub.Unary(echo_pb2.Ping(**ping), timeout=5)


def rpc_error(mesh: meshlib.Mesh, service: str, **ping: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        unary(mesh, service, **ping)
    return info.value


# -- mTLS STRICT through the mesh channel ------------------------------------------------------------


def test_a_mesh_channel_calls_serve_grpc_over_mtls_and_the_server_sees_the_verified_caller(
    world: World, orders: tuple[GrpcServing, Echo]
) -> None:
    serving, servicer = orders
    assert world.orders.mtls == "STRICT" and serving.plaintext_address is None
    pong = unary(world.checkout, "orders", text="hi")
    assert (pong.text, pong.server, pong.caller) == ("hi", "orders", "checkout")
    # under TLS the certificate names the caller: metadata claiming another source changes nothing
    stub = echo_pb2_grpc.EchoStub(world.checkout.grpc_channel("orders"))
    claimed = stub.Unary(echo_pb2.Ping(text="x"), timeout=5, metadata=[("x-mesh-source", "billing")])
    assert claimed.caller == "checkout"
    assert servicer.calls == 2


def test_the_authorization_document_denies_another_service_with_the_reason(
    world: World, orders: tuple[GrpcServing, Echo]
) -> None:
    _, servicer = orders
    error = rpc_error(world.billing, "orders", text="hi")
    assert (error.code(), error.details()) == (grpc.StatusCode.PERMISSION_DENIED, DENIED)
    assert servicer.calls == 0
    assert world.orders.stats.edge("in", "billing").by_class.get("4xx", 0) >= 1


def test_a_mesh_without_identity_fails_closed_against_a_strict_server(
    world: World, orders: tuple[GrpcServing, Echo], tmp_path: Path
) -> None:
    serving, servicer = orders
    with meshlib.Mesh("anonymous", cache_dir=tmp_path) as anonymous:
        assert anonymous.credentials is None
        anonymous.apply_rules(parse_documents([endpoints("orders", [serving.address])]), "1")
        error = rpc_error(anonymous, "orders", text="let me in")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == 0


def test_a_server_with_a_valid_certificate_of_another_service_is_refused_by_the_mesh_channel(
    world: World,
) -> None:
    servicer = Echo("payments")
    adders = [functools.partial(echo_pb2_grpc.add_EchoServicer_to_server, servicer)]
    with world.payments.serve_grpc(adders, port=0, labels={"role": "impostor"}) as payments:
        # an operator's mistake (or an attacker's registration) sends "inventory" to payments' port
        world.put([endpoints("inventory", [payments.address])])
        wait_until(
            lambda: grpc_addresses(world.checkout, "inventory") == {payments.address}, what="inventory"
        )
        error = rpc_error(world.checkout, "inventory", text="secret")
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "Hostname Verification Check failed" in str(error.details())
        assert servicer.calls == 0
        # the same server, called as the service it is, answers: the name alone made the difference
        wait_until(lambda: grpc_addresses(world.checkout, "payments") == {payments.address}, what="payments")
        assert unary(world.checkout, "payments").caller == "checkout"


def endpoints(service: str, addresses: list[str]) -> dict[str, Any]:
    listed = [{"address": a, "labels": {PROTOCOL_LABEL: "grpc"}} for a in addresses]
    return {"kind": "Endpoints", "service": service, "endpoints": listed}


def test_permissive_serves_mesh_callers_on_tls_and_others_on_a_plaintext_port_registering_tls(
    world: World,
) -> None:
    servicer = Echo("orders")
    adders = [functools.partial(echo_pb2_grpc.add_EchoServicer_to_server, servicer)]
    with world.orders.serve_grpc(adders, port=0, mtls="PERMISSIVE", plaintext_port=0) as serving:
        assert serving.plaintext_address is not None and serving.plaintext_address != serving.address
        wait_until(lambda: grpc_addresses(world.checkout, "orders") == {serving.address}, what="the TLS port")
        registry = httpx.get(f"{world.control.url}/v1/registry/orders").json()["orders"]
        assert [i["address"] for i in registry] == [serving.address]  # the plaintext port is never registered
        assert unary(world.checkout, "orders").caller == "checkout"
        # a plaintext caller has no identity (metadata names nobody while the Mesh's mTLS is on),
        # so orders' Authorization document, which allows checkout only, refuses it
        with (
            grpc.insecure_channel(serving.plaintext_address) as channel,
            pytest.raises(grpc.RpcError) as info,
        ):
            echo_pb2_grpc.EchoStub(channel).Unary(
                echo_pb2.Ping(), timeout=5, metadata=[("x-mesh-source", "checkout")]
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "a caller without identity may not POST" in str(info.value.details())
        assert servicer.calls == 1
    with pytest.raises(ValueError, match="plaintext_port is for mtls=PERMISSIVE"):
        world.orders.serve_grpc(adders, port=0, plaintext_port=0)


async def test_serve_grpc_aio_over_mtls_with_a_permissive_plaintext_port(world: World) -> None:
    servicer = AioEcho("orders-aio")
    adders = [functools.partial(echo_pb2_grpc.add_EchoServicer_to_server, servicer)]
    serving = await world.orders.serve_grpc_aio(adders, port=0, mtls="PERMISSIVE", plaintext_port=0)
    try:
        assert serving.plaintext_address is not None
        await asyncio.to_thread(
            wait_until,
            lambda: grpc_addresses(world.checkout, "orders") == {serving.address},
            10,
            "the TLS port",
        )
        stub = echo_pb2_grpc.EchoStub(world.checkout.grpc_aio_channel("orders"))
        pong = await stub.Unary(echo_pb2.Ping(text="aio"), timeout=5)
        assert (pong.server, pong.caller) == ("orders-aio", "checkout")
        async with grpc.aio.insecure_channel(serving.plaintext_address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.Ping(), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # nobody, on the plaintext port
        assert servicer.calls == 1
    finally:
        await serving.stop(grace=0)


# -- rotation under load --------------------------------------------------------------------------


@dataclass
class Load:
    """Unary RPCs in a loop through the mesh channel until stopped."""

    mesh: meshlib.Mesh
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        stub = echo_pb2_grpc.EchoStub(self.mesh.grpc_channel("orders"))
        while not self.stop.is_set():
            try:
                stub.Unary(echo_pb2.Ping(text="load"), timeout=5)
                self.ok += 1
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code()}: {exc.details()}")
            time.sleep(0.002)


def test_certificates_renew_under_load_through_the_mesh_channel_without_a_failed_rpc(world: World) -> None:
    # connections live 300 ms, so handshakes keep happening while the certificates change
    age = [("grpc.max_connection_age_ms", 300), ("grpc.max_connection_age_grace_ms", 5000)]
    server = grpc.server(
        futures.ThreadPoolExecutor(4), interceptors=server_interceptors(world.orders), options=age
    )
    servicer = Echo("orders")
    echo_pb2_grpc.add_EchoServicer_to_server(servicer, server)
    pool = world.checkout.grpc_clients().pool("orders")
    load = Load(world.checkout)
    thread = threading.Thread(target=load.run)
    with world.orders.serve_grpc(server, port=0) as serving:
        wait_until(lambda: grpc_addresses(world.checkout, "orders") == {serving.address}, what="orders")
        thread.start()
        try:
            wait_until(lambda: load.ok >= 20, what="RPCs before the renewal")
            before = channel_security(world.checkout, "orders")
            assert before is not None
            channel = pool.channels()[serving.address]
            opened, closed = pool.opened, pool.closed
            renew(world.orders)
            renew(world.checkout)
            after = channel_security(world.checkout, "orders")
            assert after is not None and after.generation != before.generation
            wait_until(
                lambda: pool.channels()[serving.address] is not channel,
                what="the pool's channel replaced after the renewal",
            )
            ok = load.ok
            wait_until(lambda: load.ok >= ok + 50, what="RPCs after the renewal")
            assert pool.opened > opened  # a new channel, with the new certificate
            wait_until(lambda: pool.closed > closed, what="the old channel drained and closed")
        finally:
            load.stop.set()
            thread.join(10)
    assert load.failures == []
    assert servicer.calls == load.ok


@dataclass
class Seen:
    """One call as the server saw it: the client certificate's serial, the client's address (a
    new one is a new connection) and the caller the mesh named."""

    serial: int | None
    peer: str
    caller: str


class AioOrders(echo_pb2_grpc.EchoServicer):
    """An asyncio servicer that notes each call's client certificate; its server stream sends
    its first message, then the rest once `release` is set (held open across a rotation)."""

    def __init__(self) -> None:
        self.unary: list[Seen] = []
        self.streams: list[Seen] = []
        self.release = asyncio.Event()

    @staticmethod
    def seen(context: grpc.aio.ServicerContext) -> Seen:
        pem = context.auth_context().get("x509_pem_cert")
        serial = serial_of(pem[0]) if pem else None
        inbound = mesh_context.current()
        return Seen(serial, context.peer(), (inbound.source or "") if inbound is not None else "<none>")

    async def Unary(self, request: echo_pb2.Ping, context: grpc.aio.ServicerContext) -> echo_pb2.Pong:
        self.unary.append(self.seen(context))
        return echo_pong(request, context, "orders")

    async def ServerStream(
        self, request: echo_pb2.Ping, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[echo_pb2.Pong]:
        self.streams.append(self.seen(context))
        for i in range(request.count):
            if i == 1:
                await self.release.wait()
            yield echo_pong(request, context, "orders", i)


@dataclass
class AioLoad:
    """Unary RPCs in a loop through the mesh's aio channel until stopped (tasks on the loop)."""

    stub: echo_pb2_grpc.EchoStub
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: bool = False

    async def run(self) -> None:
        while not self.stop:
            try:
                await self.stub.Unary(echo_pb2.Ping(text="load"), timeout=5)
                self.ok += 1
            except grpc.aio.AioRpcError as exc:
                self.failures.append(f"{exc.code()}: {exc.details()}")
            await asyncio.sleep(0.002)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """`wait_until` on a worker thread: the loop goes on serving and calling meanwhile."""
    await asyncio.to_thread(wait_until, predicate, timeout, what)


async def test_certificates_renew_under_load_through_the_aio_channel_with_a_stream_held_across(
    world: World,
) -> None:
    """The asyncio counterpart of the test above, on a `serve_grpc_aio` server whose connections
    live 300 ms: no RPC fails; the server's renewal reaches new connections, the channel of the
    client's old certificate keeps reconnecting to it; the client's renewal opens a channel whose
    connections carry its new certificate; the stream begun before it ends on the old channel,
    which closes only then."""
    age = [("grpc.max_connection_age_ms", 300), ("grpc.max_connection_age_grace_ms", 30000)]
    server = grpc.aio.server(interceptors=aio_server_interceptors(world.orders), options=age)
    servicer = AioOrders()
    echo_pb2_grpc.add_EchoServicer_to_server(servicer, server)
    serving = await world.orders.serve_grpc_aio(server, port=0)
    channel = world.checkout.grpc_aio_channel("orders")
    stub = echo_pb2_grpc.EchoStub(channel)
    pool = channel.pool
    load = AioLoad(stub)
    tasks: list[asyncio.Task[None]] = []
    try:
        await until(lambda: grpc_addresses(world.checkout, "orders") == {serving.address}, "orders")
        tasks = [asyncio.ensure_future(load.run()) for _ in range(3)]
        await until(lambda: load.ok >= 20, "RPCs before the renewal")
        assert world.orders.credentials is not None and world.checkout.credentials is not None
        old_server = serial_of(world.orders.credentials.chain_pem)
        old_client = serial_of(world.checkout.credentials.chain_pem)
        stream = stub.ServerStream(echo_pb2.Ping(text="held", count=5), timeout=30)
        assert (await stream.read()).index == 0  # in flight on the channel of the old certificates
        held = pool.channels()[serving.address]
        opened, closed = pool.opened, pool.closed
        assert (await asyncio.to_thread(served_certificate, serving.port, world.checkout)).serial_number == (
            old_server
        )
        await asyncio.to_thread(renew, world.orders)
        new_server = serial_of(world.orders.credentials.chain_pem)
        assert new_server != old_server
        # the running server hands the renewed certificate to new connections, and the channel
        # of the client's old certificate goes on reconnecting to it
        served = await asyncio.to_thread(served_certificate, serving.port, world.checkout)
        assert served.serial_number == new_server
        before = {s.peer for s in list(servicer.unary)}
        await until(
            lambda: any(s.peer not in before and s.serial == old_client for s in list(servicer.unary)),
            "a connection of the old channel made after the server's renewal",
        )
        assert pool.channels()[serving.address] is held
        await asyncio.to_thread(renew, world.checkout)
        new_client = serial_of(world.checkout.credentials.chain_pem)
        assert new_client != old_client
        await until(lambda: pool.channels()[serving.address] is not held, "the pool's channel replaced")
        assert pool.opened == opened + 1
        # the new channel's connections present the client's renewed certificate
        await until(
            lambda: any(s.serial == new_client for s in list(servicer.unary)),
            "a call with the renewed client certificate",
        )
        ok = load.ok
        await until(lambda: load.ok >= ok + 50, "RPCs after the renewal")
        assert pool.closed == closed  # the old channel drains: the stream is still on it
        servicer.release.set()
        rest = [p.index async for p in stream]
        assert rest == [1, 2, 3, 4] and await stream.code() is grpc.StatusCode.OK
        await until(lambda: pool.closed == closed + 1, "the old channel closed after its stream")
        await eventually(lambda: held.get_state() is grpc.ChannelConnectivity.SHUTDOWN, "the old one shut")
        load.stop = True
        await asyncio.gather(*tasks)
        # deregistered, the endpoint leaves checkout's snapshot on its runtime's thread: the
        # pool closes the new channel there, on the loop it belongs to
        fresh = pool.channels()[serving.address]
        await serving.stop(grace=1)
        await until(lambda: pool.channels() == {}, "the endpoint gone from the pool")
        await eventually(lambda: fresh.get_state() is grpc.ChannelConnectivity.SHUTDOWN, "the new one shut")
    finally:
        load.stop = True
        await asyncio.gather(*tasks)
        servicer.release.set()
        await serving.stop(grace=1)
    assert load.failures == []
    assert len(servicer.unary) == load.ok  # each RPC served once: none failed and was retried
    assert {s.caller for s in servicer.unary} == {"checkout"}
    assert [(s.serial, s.caller) for s in servicer.streams] == [(old_client, "checkout")]
    # every call came with one of the two certificates, the old one only before the new one
    serials = [s.serial for s in servicer.unary]
    assert set(serials) == {old_client, new_client}
    first_new = serials.index(new_client)
    assert old_client not in serials[first_new + 20 :]


# -- the service graph ---------------------------------------------------------------------------


def test_grpc_edges_show_in_the_service_graph_with_their_status_counted(
    world: World, orders: tuple[GrpcServing, Echo]
) -> None:
    http = httpx.Client(base_url=world.control.url, timeout=5)

    def edge() -> dict[str, Any] | None:
        for e in http.get("/v1/graph").json()["edges"]:
            if (e["source"], e["destination"], e["view"]) == ("checkout", "orders", "out") and e["requests"]:
                return e
        return None

    seen: list[dict[str, Any]] = []

    def traffic_shows() -> bool:
        # one success and one UNAVAILABLE (a 5xx to the mesh) per round, until a report carries both
        unary(world.checkout, "orders", text="ok")
        assert rpc_error(world.checkout, "orders", fail="UNAVAILABLE").code() == grpc.StatusCode.UNAVAILABLE
        e = edge()
        # UNAVAILABLE counted as a failure, OK as a success (the window may hold other tests' calls)
        if e is not None and 0 < e["success_rate"] < 1:
            seen.append(e)
        return bool(seen)

    with http:
        wait_until(traffic_shows, 10, "the checkout -> orders gRPC edge in the graph")
    e = seen[0]
    assert e["requests"] >= 2 and e["p50_ms"] is not None
    # the server counted the same codes by the HTTP class they map to
    by_class = world.orders.stats.edge("in", "checkout").by_class
    assert by_class.get("2xx", 0) >= 1 and by_class.get("5xx", 0) >= 1


# -- one deadline across HTTP and gRPC hops ------------------------------------------------------------
#
#   edge (mesh HTTP client, Route timeout) -> gateway (ASGI app + MeshMiddleware)
#     -> gRPC orders (serve_grpc; its servicer calls HTTP) -> payments (ASGI app): what budget is left?


def payments_app() -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        delay = float(parse_qs(scope["query_string"].decode()).get("delay", ["0"])[0])
        if delay:  # answer after `delay`, unless the caller gives up first (then not at all)
            try:
                while (await asyncio.wait_for(receive(), delay))["type"] != "http.disconnect":
                    pass
                return
            except TimeoutError:
                pass
        inbound = mesh_context.current()
        remaining = inbound.remaining() if inbound is not None else None
        await respond(send, 200, {"remaining": remaining})

    return app


class Orders(echo_pb2_grpc.EchoServicer):
    """A gRPC servicer that calls an HTTP service through the mesh (`text` is the delay there)."""

    def __init__(self, mesh: meshlib.Mesh) -> None:
        self.client = mesh.sync_client()

    def Unary(self, request: echo_pb2.Ping, context: grpc.ServicerContext) -> echo_pb2.Pong:
        inbound = mesh_context.current()
        assert inbound is not None
        mine = inbound.remaining() or 0.0
        try:
            r = self.client.get("http://payments/budget", params={"delay": request.text or "0"})
        except DeadlineExceeded as exc:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        return echo_pb2.Pong(deadline=mine, text=json.dumps(r.json()))


def gateway_app(mesh: meshlib.Mesh, codes: list[grpc.StatusCode]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        inbound = mesh_context.current()
        assert inbound is not None
        mine = inbound.remaining()
        stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("orders"))
        delay = parse_qs(scope["query_string"].decode()).get("delay", ["0"])[0]
        try:
            pong = await stub.Unary(echo_pb2.Ping(text=delay))
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())
            status = 504 if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else 502
            await respond(send, status, {"code": exc.code().name})
            return
        codes.append(grpc.StatusCode.OK)
        payments = json.loads(pong.text)["remaining"]
        await respond(send, 200, {"gateway": mine, "orders": pong.deadline, "payments": payments})

    return app


async def respond(send: Any, status: int, body: dict[str, Any]) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


@dataclass
class Hops:
    edge: meshlib.Mesh
    codes: list[grpc.StatusCode]  # what the gateway's gRPC calls ended with
    rules: list[dict[str, Any]]  # the edge's Endpoints of the gateway

    def timeout(self, value: str) -> None:
        """The first hop's deadline: a Route timeout of the edge's calls to the gateway."""
        route = {"kind": "Route", "service": "gateway", "routes": [{"timeout": value}]}
        self.edge.apply_rules(parse_documents([*self.rules, route]), value)


@pytest.fixture
def hops(tmp_path: Path) -> Iterator[Hops]:
    names = ("edge", "gateway", "orders", "payments")
    meshes = {n: meshlib.Mesh(n, cache_dir=tmp_path / n) for n in names}
    codes: list[grpc.StatusCode] = []
    payments = serve(meshes["payments"].asgi(payments_app()))
    meshes["orders"].apply_rules(parse_documents([http_endpoints("payments", payments.address)]), "1")
    adders = [functools.partial(echo_pb2_grpc.add_EchoServicer_to_server, Orders(meshes["orders"]))]
    orders = meshes["orders"].serve_grpc(adders, port=0)
    meshes["gateway"].apply_rules(parse_documents([endpoints("orders", [orders.address])]), "1")
    gateway = serve(meshes["gateway"].asgi(gateway_app(meshes["gateway"], codes)))
    try:
        yield Hops(meshes["edge"], codes, [http_endpoints("gateway", gateway.address)])
    finally:
        gateway.stop()
        orders.stop(grace=0)
        payments.stop()
        for mesh in meshes.values():
            mesh.close()


def http_endpoints(service: str, address: str) -> dict[str, Any]:
    return {"kind": "Endpoints", "service": service, "endpoints": [{"address": address}]}


def test_the_remaining_budget_travels_http_grpc_http_and_shrinks_at_each_hop(hops: Hops) -> None:
    hops.timeout("2s")
    with hops.edge.sync_client() as client:
        r = client.get("http://gateway/quote")
    assert r.status_code == 200, r.text
    left = r.json()
    assert 0 < left["payments"] < left["orders"] < left["gateway"] < 2.0, left
    assert left["payments"] > 1.0  # loopback hops spend milliseconds, not the budget
    assert hops.codes == [grpc.StatusCode.OK]


def test_a_too_short_first_deadline_ends_at_the_first_hop_with_a_504_class_failure_not_a_hang(
    hops: Hops,
) -> None:
    hops.timeout("300ms")
    started = time.monotonic()
    with hops.edge.sync_client() as client:
        try:
            outcome: object = client.get("http://gateway/quote", params={"delay": "3"}).status_code
        except DeadlineExceeded:
            outcome = "deadline exceeded"
    elapsed = time.monotonic() - started
    assert outcome in (504, "deadline exceeded")
    assert elapsed < 1.5  # the deadline, not payments' 3 s
    # the gateway's gRPC call ended with DEADLINE_EXCEEDED, cut by the budget it inherited
    wait_until(lambda: hops.codes == [grpc.StatusCode.DEADLINE_EXCEEDED], what="the gateway's gRPC outcome")
