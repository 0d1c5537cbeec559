"""mTLS for grpcio from the mesh identity: real grpcio servers with `server_credentials`, plain
`grpc.secure_channel` clients with `channel_security`, certificates from the real control
service's CA. Failures must be closed: no RPC reaches the servicer."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509

import meshlib
from meshlib.grpc import aio_server_interceptors
from meshlib.grpc.credentials import ChannelSecurity, channel_security, server_credentials
from meshlib.security import certificates as certs
from meshlib.security import tls
from meshlib.security.identity import Identity
from tests.conftest import wait_until
from tests.grpc import echo_pb2, echo_pb2_grpc
from tests.security.test_mtls_live import SecureControl

CHECKOUT = "spiffe://mesh.local/svc/checkout"


@dataclass
class Call:
    caller: str  # the peer's SPIFFE id ("" without one)
    serial: int | None  # the serial of the peer's certificate
    peer: str  # the client's address: a new one is a new connection
    text: str


@dataclass
class Servicer(echo_pb2_grpc.EchoServicer):
    name: str
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Unary(self, request: echo_pb2.Ping, context: grpc.ServicerContext) -> echo_pb2.Pong:
        auth = context.auth_context()
        caller = b"".join(auth.get("peer_spiffe_id", [])).decode()
        pem = auth.get("x509_pem_cert")
        serial = certs.load_pem_chain(pem[0])[0].serial_number if pem else None
        with self.lock:
            self.calls.append(Call(caller, serial, context.peer(), request.text))
        return echo_pb2.Pong(text=request.text, server=self.name, caller=caller)


@dataclass
class Server:
    server: grpc.Server
    port: int
    servicer: Servicer
    plain_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(None)


def start(
    credentials: grpc.ServerCredentials,
    name: str,
    *,
    plaintext: bool = False,
    options: tuple[tuple[str, int], ...] = (),
) -> Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
    servicer = Servicer(name)
    echo_pb2_grpc.add_EchoServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    plain = server.add_insecure_port("127.0.0.1:0") if plaintext else None
    server.start()
    return Server(server, port, servicer, plain)


def unary(
    address: str, credentials: grpc.ChannelCredentials | None, options: tuple = (), text: str = "hi"
) -> echo_pb2.Pong:
    if credentials is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, credentials, options=options)
    with channel:
        return echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.Ping(text=text), timeout=5)


def refused(address: str, credentials: grpc.ChannelCredentials, options: tuple = ()) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        unary(address, credentials, options)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    return info.value


def secured(mesh: meshlib.Mesh, service: str) -> ChannelSecurity:
    security = channel_security(mesh, service)
    assert security is not None
    return security


def serial_of(chain_pem: bytes) -> int:
    return certs.load_pem_chain(chain_pem)[0].serial_number


def mesh_of(control: SecureControl, service: str, cache: Path) -> meshlib.Mesh:
    return meshlib.Mesh(service, control=control.url, token=control.token(service), cache_dir=cache)


@dataclass
class World:
    control: SecureControl
    orders: meshlib.Mesh
    payments: meshlib.Mesh
    checkout: meshlib.Mesh


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("grpc-mtls")
    control = SecureControl(base / "control", lifetime=600)
    meshes = [mesh_of(control, s, base / "cache") for s in ("orders", "payments", "checkout")]
    try:
        yield World(control, *meshes)
    finally:
        for mesh in meshes:
            mesh.close()
        control.stop()


@pytest.fixture
def orders_server(world: World) -> Iterator[Server]:
    server = start(server_credentials(world.orders, "STRICT"), "orders")
    yield server
    server.stop()


# -- the name the client checks --------------------------------------------------------------------


def test_every_workload_leaf_names_its_service_once_as_uri_and_once_as_dns(world: World) -> None:
    assert world.orders.credentials is not None
    leaf = certs.load_pem_chain(world.orders.credentials.chain_pem)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://mesh.local/svc/orders"]
    assert san.get_values_for_type(x509.DNSName) == ["orders.svc.meshlib.invalid"]


# -- success -----------------------------------------------------------------------------------


def test_a_mesh_client_calls_a_strict_server_and_the_server_sees_its_spiffe_id(
    world: World, orders_server: Server
) -> None:
    security = secured(world.checkout, "orders")
    pong = unary(orders_server.address, security.credentials, security.options)
    assert (pong.server, pong.caller) == ("orders", CHECKOUT)
    assert world.checkout.credentials is not None
    assert orders_server.servicer.calls[-1].serial == serial_of(world.checkout.credentials.chain_pem)


def test_no_identity_means_no_channel_security_and_no_server_credentials(tmp_path: Path) -> None:
    with meshlib.Mesh("plain", cache_dir=tmp_path) as plain:
        assert channel_security(plain, "orders") is None
        with pytest.raises(ValueError, match="needs an identity"):
            server_credentials(plain, "STRICT")


def test_modes_other_than_strict_and_permissive_are_refused(world: World) -> None:
    with pytest.raises(ValueError, match="not 'DISABLE'"):
        server_credentials(world.orders, "DISABLE")


# -- failing closed --------------------------------------------------------------------------------


def test_a_client_without_a_certificate_is_refused_by_a_strict_server(
    world: World, orders_server: Server
) -> None:
    assert world.checkout.credentials is not None
    anonymous = grpc.ssl_channel_credentials(root_certificates=world.checkout.credentials.bundle_pem)
    refused(orders_server.address, anonymous, secured(world.checkout, "orders").options)
    assert orders_server.servicer.calls == []


def _foreign(service: str) -> tuple[bytes, bytes]:
    """A key and a certificate for `service`, SPIFFE id and DNS name alike, from another CA."""
    ca_cert, ca_key = certs.create_ca(certs.DEFAULT_TRUST_DOMAIN)
    key = certs.generate_key()
    chain = certs.issue(
        ca_cert,
        ca_key,
        certs.make_csr(key, service),
        spiffe_id=certs.spiffe_id(certs.DEFAULT_TRUST_DOMAIN, service),
        dns_names=[certs.service_dns_name(service)],
        lifetime=timedelta(hours=1),
    )
    return certs.key_pem(key), chain


def test_a_client_certificate_from_another_ca_is_refused(world: World, orders_server: Server) -> None:
    assert world.checkout.credentials is not None
    key, chain = _foreign("checkout")
    impostor = grpc.ssl_channel_credentials(
        root_certificates=world.checkout.credentials.bundle_pem, private_key=key, certificate_chain=chain
    )
    refused(orders_server.address, impostor, secured(world.checkout, "orders").options)
    assert orders_server.servicer.calls == []


def test_a_server_certificate_from_another_ca_is_refused_by_the_client(world: World) -> None:
    key, chain = _foreign("orders")
    server = start(grpc.ssl_server_credentials([(key, chain)]), "impostor")
    try:
        security = secured(world.checkout, "orders")
        error = refused(server.address, security.credentials, security.options)
        assert "CERTIFICATE_VERIFY_FAILED" in str(error.details())
        assert server.servicer.calls == []
    finally:
        server.stop()


def test_a_valid_mesh_server_of_another_service_is_refused(world: World) -> None:
    server = start(server_credentials(world.payments, "STRICT"), "payments")
    try:
        to_orders = secured(world.checkout, "orders")
        error = refused(server.address, to_orders.credentials, to_orders.options)
        assert server.servicer.calls == []
        assert "Hostname Verification Check failed" in str(error.details())
        # the same server, called as the service it is, answers: the name alone made the difference
        to_payments = secured(world.checkout, "payments")
        assert unary(server.address, to_payments.credentials, to_payments.options).caller == CHECKOUT
    finally:
        server.stop()


def test_a_certificate_without_the_service_name_is_served_with_a_warning_and_refused_by_clients(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca_cert, ca_key = certs.create_ca(certs.DEFAULT_TRUST_DOMAIN)  # an operator's PKI: SPIFFE id only
    key = certs.generate_key()
    chain = certs.issue(
        ca_cert,
        ca_key,
        certs.make_csr(key, "orders"),
        spiffe_id=certs.spiffe_id(certs.DEFAULT_TRUST_DOMAIN, "orders"),
        lifetime=timedelta(hours=1),
    )
    own = Identity.from_pem(chain, certs.key_pem(key), ca_cert)
    with meshlib.Mesh("orders", credentials=own, cache_dir=tmp_path) as orders:
        with caplog.at_level(logging.WARNING, logger="meshlib.grpc"):
            server = start(server_credentials(orders, "STRICT"), "orders")
        try:
            assert "does not name orders.svc.meshlib.invalid" in caplog.text
            client = meshlib.Mesh("checkout", credentials=_identity_from(ca_cert, ca_key, "checkout"))
            with client:
                security = secured(client, "orders")
                error = refused(server.address, security.credentials, security.options)
            assert "Hostname Verification Check failed" in str(error.details())
            assert server.servicer.calls == []
        finally:
            server.stop()


def _identity_from(ca_cert: bytes, ca_key: bytes, service: str) -> Identity:
    key = certs.generate_key()
    chain = certs.issue(
        ca_cert,
        ca_key,
        certs.make_csr(key, service),
        spiffe_id=certs.spiffe_id(certs.DEFAULT_TRUST_DOMAIN, service),
        dns_names=[certs.service_dns_name(service)],
        lifetime=timedelta(hours=1),
    )
    return Identity.from_pem(chain, certs.key_pem(key), ca_cert)


def test_a_service_named_like_another_services_dns_name_cannot_pass_for_it(
    world: World, tmp_path: Path
) -> None:
    # its leaf's CN is "orders.svc.meshlib.invalid"; its DNS SAN is a hash: the CN must not count
    lookalike = mesh_of(world.control, "orders.svc.meshlib.invalid", tmp_path)
    server = start(server_credentials(lookalike, "STRICT"), "lookalike")
    try:
        assert lookalike.credentials is not None
        leaf = certs.load_pem_chain(lookalike.credentials.chain_pem)[0]
        cn = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert cn == "orders.svc.meshlib.invalid"
        to_orders = secured(world.checkout, "orders")
        refused(server.address, to_orders.credentials, to_orders.options)
        assert server.servicer.calls == []
    finally:
        server.stop()
        lookalike.close()


# -- PERMISSIVE --------------------------------------------------------------------------------------


def test_permissive_verifies_tls_callers_and_leaves_plaintext_to_a_port_without_identity(
    world: World,
) -> None:
    server = start(server_credentials(world.orders, "PERMISSIVE"), "orders", plaintext=True)
    try:
        security = secured(world.checkout, "orders")
        assert unary(server.address, security.credentials, security.options).caller == CHECKOUT
        assert server.plain_port is not None
        assert unary(f"127.0.0.1:{server.plain_port}", None).caller == ""
        assert world.checkout.credentials is not None
        anonymous = grpc.ssl_channel_credentials(root_certificates=world.checkout.credentials.bundle_pem)
        refused(server.address, anonymous, security.options)  # a TLS caller always has an identity
        assert [c.caller for c in server.servicer.calls] == [CHECKOUT, ""]
    finally:
        server.stop()


# -- rotation ----------------------------------------------------------------------------------------


def renew(mesh: meshlib.Mesh) -> None:
    """What the renewal loop does at half-life, now: a new key and certificate from the CA."""
    assert mesh.enrollment is not None and mesh.credentials is not None
    key, chain, bundle = mesh.runtime.submit(mesh.enrollment.request(mesh.credentials)).result(10)
    mesh.credentials.update(key, chain, bundle)


def served_certificate(port: int, client: meshlib.Mesh) -> x509.Certificate:
    """The certificate a new connection to the server gets, seen by a plain TLS handshake."""
    assert client.credentials is not None
    pem = client.credentials.pem()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=pem.bundle_pem.decode("ascii"))
    ctx.set_alpn_protocols(["h2"])
    tls.load_chain(ctx, pem.chain_pem, pem.key_pem)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@dataclass
class Load:
    """Unary RPCs in a loop on one channel until stopped (a pool's channel, without the pool)."""

    address: str
    security: ChannelSecurity
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with grpc.secure_channel(
            self.address, self.security.credentials, options=self.security.options
        ) as ch:
            stub = echo_pb2_grpc.EchoStub(ch)
            while not self.stop.is_set():
                try:
                    stub.Unary(echo_pb2.Ping(text="load"), timeout=5)
                    self.ok += 1
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code()}: {exc.details()}")
                time.sleep(0.002)


def test_certificates_rotate_under_load_without_a_failed_rpc(tmp_path: Path) -> None:
    control = SecureControl(tmp_path / "control", lifetime=600)
    orders = mesh_of(control, "orders", tmp_path / "cache")
    checkout = mesh_of(control, "checkout", tmp_path / "cache")
    assert orders.credentials is not None and checkout.credentials is not None
    # connections live 300 ms: the one channel reconnects, and so handshakes, all the time
    age = (("grpc.max_connection_age_ms", 300), ("grpc.max_connection_age_grace_ms", 5000))
    server = start(server_credentials(orders, "STRICT"), "orders", options=age)
    load = Load(server.address, secured(checkout, "orders"))
    thread = threading.Thread(target=load.run)
    thread.start()
    try:
        wait_until(lambda: load.ok >= 20, what="RPCs before the rotation")
        old_server = serial_of(orders.credentials.chain_pem)
        assert served_certificate(server.port, checkout).serial_number == old_server
        renew(orders)
        renew(checkout)
        new_server, new_client = (
            serial_of(orders.credentials.chain_pem),
            serial_of(checkout.credentials.chain_pem),
        )
        assert new_server != old_server
        # the running server hands the renewed certificate to new connections
        assert served_certificate(server.port, checkout).serial_number == new_server
        # the loop's channel reconnected after the rotation (a client address not seen before)
        with server.servicer.lock:
            before = {c.peer for c in server.servicer.calls}
        wait_until(
            lambda: any(c.peer not in before for c in list(server.servicer.calls)),
            what="a connection of the loop's channel made after the rotation",
        )
        ok = load.ok
        wait_until(lambda: load.ok >= ok + 20, what="RPCs after the rotation")
        # the client's rotation: the generation moved, and a channel made now presents the new certificate
        fresh = secured(checkout, "orders")
        assert fresh.generation != load.security.generation
        assert secured(checkout, "orders") is fresh  # the same until the identity changes again
        unary(server.address, fresh.credentials, fresh.options, text="fresh")
        assert [c.serial for c in server.servicer.calls if c.text == "fresh"] == [new_client]
    finally:
        load.stop.set()
        thread.join(10)
        server.stop()
        checkout.close()
        orders.close()
        control.stop()
    assert load.failures == []
    assert all(c.caller == CHECKOUT for c in server.servicer.calls)


def test_a_ca_rotation_reaches_a_running_server_and_new_channels(tmp_path: Path) -> None:
    control = SecureControl(tmp_path / "control", lifetime=600)
    orders = mesh_of(control, "orders", tmp_path / "cache")
    checkout = mesh_of(control, "checkout", tmp_path / "cache")
    server = start(server_credentials(orders, "STRICT"), "orders")
    try:
        assert orders.wait_for_control(10) and checkout.wait_for_control(10)
        before = secured(checkout, "orders")
        r = httpx.post(
            f"{control.url}/v1/ca/rotate",
            json={"overlap": 60},
            headers={"authorization": f"Bearer {control.admin}"},
        )
        assert r.status_code == 200, r.text
        new_root = certs.load_pem_chain(control.plane.ca.root_pem)[0]
        wait_until(
            lambda: all(len(certs.load_pem_chain(m.credentials.bundle_pem)) == 2 for m in (orders, checkout)),  # type: ignore[union-attr]
            what="the new bundle on both sides",
        )
        renew(orders)
        renew(checkout)
        after = secured(checkout, "orders")
        assert after.generation != before.generation
        # both certificates now chain to the new root: the server accepts the client's because its
        # credentials follow the bundle, and the client trusts the server's through the new channel
        assert unary(server.address, after.credentials, after.options).caller == CHECKOUT
        assert served_certificate(server.port, checkout).issuer == new_root.subject
        assert checkout.credentials is not None
        assert server.servicer.calls[-1].serial == serial_of(checkout.credentials.chain_pem)
        # a channel made before the rotation trusts the old root alone: it cannot verify the server now
        refused(server.address, before.credentials, before.options)
    finally:
        server.stop()
        checkout.close()
        orders.close()
        control.stop()


# -- grpc.aio -------------------------------------------------------------------------------------------


class AioServicer(echo_pb2_grpc.EchoServicer):
    async def Unary(self, request: echo_pb2.Ping, context: grpc.aio.ServicerContext) -> echo_pb2.Pong:
        caller = b"".join(context.auth_context().get("peer_spiffe_id", [])).decode()
        return echo_pb2.Pong(text=request.text, server="orders", caller=caller)


def test_the_same_credentials_serve_an_aio_server_and_follow_a_renewal(tmp_path: Path) -> None:
    control = SecureControl(tmp_path / "control", lifetime=600)
    orders = mesh_of(control, "orders", tmp_path / "cache")
    checkout = mesh_of(control, "checkout", tmp_path / "cache")

    async def main() -> list[str]:
        server = grpc.aio.server()
        echo_pb2_grpc.add_EchoServicer_to_server(AioServicer(), server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(orders, "STRICT"))
        await server.start()
        callers = []
        try:
            for _ in range(2):  # before and after the server's renewal, on new channels
                sec = secured(checkout, "orders")
                async with grpc.aio.secure_channel(
                    f"127.0.0.1:{port}", sec.credentials, options=sec.options
                ) as ch:
                    pong = await echo_pb2_grpc.EchoStub(ch).Unary(echo_pb2.Ping(text="aio"), timeout=5)
                callers.append(pong.caller)
                assert orders.credentials is not None
                served = await asyncio.to_thread(served_certificate, port, checkout)
                assert served.serial_number == serial_of(orders.credentials.chain_pem)
                await asyncio.to_thread(renew, orders)
        finally:
            await server.stop(None)
        return callers

    try:
        assert asyncio.run(main()) == [CHECKOUT, CHECKOUT]
    finally:
        checkout.close()
        orders.close()
        control.stop()


@dataclass
class AioSeen(echo_pb2_grpc.EchoServicer):
    """The asyncio `Servicer`: notes each call's caller, certificate serial and address."""

    calls: list[Call] = field(default_factory=list)

    async def Unary(self, request: echo_pb2.Ping, context: grpc.aio.ServicerContext) -> echo_pb2.Pong:
        auth = context.auth_context()
        caller = b"".join(auth.get("peer_spiffe_id", [])).decode()
        pem = auth.get("x509_pem_cert")
        self.calls.append(Call(caller, serial_of(pem[0]) if pem else None, context.peer(), request.text))
        return echo_pb2.Pong(text=request.text, server="orders", caller=caller)


def grpc_addresses(mesh: meshlib.Mesh, service: str) -> list[str]:
    plan = mesh.snapshot.grpc_plan(service)
    return [e.address for e in plan.endpoints] if plan is not None else []


async def aio_unary(address: str, security: ChannelSecurity, text: str) -> echo_pb2.Pong:
    async with grpc.aio.secure_channel(address, security.credentials, options=security.options) as ch:
        return await echo_pb2_grpc.EchoStub(ch).Unary(echo_pb2.Ping(text=text), timeout=5)


async def aio_refused(call: Awaitable[echo_pb2.Pong]) -> None:
    """The call fails closed: UNAVAILABLE, as the client could not verify the server."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value.details())


async def test_a_ca_rotation_reaches_a_running_aio_server_and_new_aio_channels(tmp_path: Path) -> None:
    """`test_a_ca_rotation_reaches_a_running_server_and_new_channels` for grpc.aio, through the
    mesh's aio channel too (its pool leaves the channel of the old root for one of the new), and
    with an aio channel opened before the rotation: once its connection ends, it cannot make
    another (it trusts the old root alone)."""
    control = SecureControl(tmp_path / "control", lifetime=600)
    orders = mesh_of(control, "orders", tmp_path / "cache")
    checkout = mesh_of(control, "checkout", tmp_path / "cache")
    # the server closes a connection idle for 300 ms: a channel must handshake again to go on
    server = grpc.aio.server(
        interceptors=aio_server_interceptors(orders), options=[("grpc.max_connection_idle_ms", 300)]
    )
    servicer = AioSeen()
    echo_pb2_grpc.add_EchoServicer_to_server(servicer, server)
    serving = await orders.serve_grpc_aio(server, port=0)
    mesh_stub = echo_pb2_grpc.EchoStub(checkout.grpc_aio_channel("orders"))
    before = secured(checkout, "orders")
    opened_before = grpc.aio.secure_channel(serving.address, before.credentials, options=before.options)
    try:
        assert await asyncio.to_thread(lambda: orders.wait_for_control(10) and checkout.wait_for_control(10))
        await asyncio.to_thread(
            wait_until,
            lambda: grpc_addresses(checkout, "orders") == [serving.address],
            10,
            "orders' endpoint at checkout",
        )
        assert (await mesh_stub.Unary(echo_pb2.Ping(text="mesh-before"), timeout=5)).caller == CHECKOUT
        pool = checkout.grpc_clients().aio_pool("orders")
        first = pool.channels()[serving.address]
        old_stub = echo_pb2_grpc.EchoStub(opened_before)
        assert (await old_stub.Unary(echo_pb2.Ping(text="old-before"), timeout=5)).caller == CHECKOUT
        r = await asyncio.to_thread(
            httpx.post,
            f"{control.url}/v1/ca/rotate",
            json={"overlap": 60},
            headers={"authorization": f"Bearer {control.admin}"},
        )
        assert r.status_code == 200, r.text
        new_root = certs.load_pem_chain(control.plane.ca.root_pem)[0]
        await asyncio.to_thread(
            wait_until,
            lambda: all(len(certs.load_pem_chain(m.credentials.bundle_pem)) == 2 for m in (orders, checkout)),  # type: ignore[union-attr]
            10,
            "the new bundle on both sides",
        )
        await asyncio.to_thread(renew, orders)
        await asyncio.to_thread(renew, checkout)
        after = secured(checkout, "orders")
        assert after.generation != before.generation and checkout.credentials is not None
        new_client = serial_of(checkout.credentials.chain_pem)
        # both certificates chain to the new root now: the running server takes the client's,
        # and a new aio channel trusts the server's
        assert (await aio_unary(serving.address, after, "after")).caller == CHECKOUT
        served = await asyncio.to_thread(served_certificate, serving.port, checkout)
        assert served.issuer == new_root.subject
        # the mesh's aio channel: a new pooled channel, the old one closed (it had no RPC left)
        assert (await mesh_stub.Unary(echo_pb2.Ping(text="mesh-after"), timeout=5)).caller == CHECKOUT
        assert pool.channels()[serving.address] is not first and pool.closed == 1
        assert first.get_state() is grpc.ChannelConnectivity.SHUTDOWN
        assert [(c.text, c.serial) for c in servicer.calls[-2:]] == [
            ("after", new_client),
            ("mesh-after", new_client),
        ]
        # channels that trust the old root alone fail closed, and nothing reaches the servicer:
        # one made now with the credentials of before, and the one opened before, once the
        # server has closed its idle connection
        calls = len(servicer.calls)
        await aio_refused(aio_unary(serving.address, before, "before"))
        if opened_before.get_state() is grpc.ChannelConnectivity.READY:
            await asyncio.wait_for(opened_before.wait_for_state_change(grpc.ChannelConnectivity.READY), 10)
        await aio_refused(old_stub.Unary(echo_pb2.Ping(text="old-after"), timeout=5))
        assert len(servicer.calls) == calls
        assert [c.text for c in servicer.calls if c.text.startswith("old")] == ["old-before"]
    finally:
        await opened_before.close()
        await serving.stop(grace=0)
        await asyncio.to_thread(checkout.close)
        await asyncio.to_thread(orders.close)
        control.stop()
