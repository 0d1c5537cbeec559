"""gRPC channels to External hosts against real grpcio servers on 127.0.0.1: a plaintext server
as a fixed-endpoint External, a TLS one with a certificate from a test CA for origination (and
a wrong name refused), the outbound policy, the External's Route and RateLimit, sync and aio."""

from __future__ import annotations

import concurrent.futures
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

import meshlib
from meshlib.grpc.egress import split_target
from meshlib.headers import SOURCE
from meshlib.rules import RuleSet
from tests.egress.servers import CA
from tests.grpc import echo_pb2, echo_pb2_grpc
from tests.grpc.echo_fleet import EchoFleet, Knobs, SyncEcho, echo_fleet

__all__ = ["echo_fleet"]

HOST = "payments.example"
Ping = echo_pb2.Ping
FAST_RETRY = {"attempts": 3, "on": ["unavailable"], "backoff": {"base": "1ms", "max": "2ms"}}


def external(*addresses: str, port: int = 50051, origination: bool = False, **tls: Any) -> dict[str, Any]:
    """An External at `addresses`; with `tls` settings (or `origination`), TLS originated."""
    spec: dict[str, Any] = {"port": port}
    if tls or origination:
        spec["tls"] = {"origination": True, **tls}
    return {"kind": "External", "service": HOST, "ports": [spec], "endpoints": list(addresses)}


def route(**rule: Any) -> dict[str, Any]:
    return {"kind": "Route", "service": HOST, "routes": [rule]}


@pytest.fixture
def mesh() -> Iterator[meshlib.Mesh]:
    m = meshlib.Mesh("checkout")
    yield m
    m.close()


@pytest.fixture
def ca() -> CA:
    return CA()


@pytest.fixture
def tls_echo(ca: CA) -> Iterator[Any]:
    """Start TLS Echo servers with a certificate from `ca` for the names given: (knobs, address)."""
    servers: list[grpc.Server] = []

    def start(*names: str) -> tuple[Knobs, str]:
        cert, key = ca.issue(*names)
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
        knobs = Knobs("tls")
        echo_pb2_grpc.add_EchoServicer_to_server(SyncEcho(knobs), server)
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
        server.start()
        servers.append(server)
        return knobs, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None).wait(5)


def test_targets_split_as_grpc_writes_them() -> None:
    assert split_target("Payments.Example:443") == ("payments.example", 443)
    assert split_target("payments.example") == ("payments.example", None)
    assert split_target("[::1]:50051") == ("::1", 50051)
    assert split_target("::1") == ("::1", None)
    assert split_target("echo") == ("echo", None)


def test_a_plaintext_external_at_a_fixed_address(mesh: meshlib.Mesh, echo_fleet: EchoFleet) -> None:
    knobs, address = echo_fleet.start("outside")
    mesh.apply_rules(RuleSet([external(address)]), "t1")
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_channel(f"{HOST}:50051"))
    pong = stub.Unary(Ping(text="hi"), timeout=5)
    assert (pong.text, pong.server) == ("hi", "outside")
    assert SOURCE not in pong.metadata  # the caller's mesh name stays inside the mesh
    assert mesh.stats.edge("out", HOST).by_class == {"2xx": 1}
    # a target without a port: the External's only port
    bare = echo_pb2_grpc.EchoStub(mesh.grpc_channel(HOST))
    assert bare.Unary(Ping(text="x"), timeout=5).server == "outside"
    assert knobs.total() == 2
    # a port the External does not declare is not the External's, and a mesh channel sends
    # nowhere undeclared (not blocked: the policy is allow_any)
    with pytest.raises(grpc.RpcError) as undeclared:
        echo_pb2_grpc.EchoStub(mesh.grpc_channel(f"{HOST}:8080")).Unary(Ping(text="x"), timeout=5)
    error: Any = undeclared.value
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert error.details().startswith(f"port 8080 of External '{HOST}' is not declared (ports: 50051)")
    assert mesh.stats.counter("outbound_blocked", HOST) == 0 and knobs.total() == 2


def test_the_mesh_identity_is_never_presented_to_an_external(echo_fleet: EchoFleet) -> None:
    """With mTLS on, a channel to a plaintext External still speaks plaintext (the mesh's TLS
    would fail against this server), and a mesh service's pool is not used."""
    from tests.security.test_tls import PKI

    _, address = echo_fleet.start("outside")
    with meshlib.Mesh("checkout", credentials=PKI().identity("checkout")) as mesh:
        mesh.apply_rules(RuleSet([external(address)]), "t1")
        pong = echo_pb2_grpc.EchoStub(mesh.grpc_channel(f"{HOST}:50051")).Unary(Ping(text="x"), timeout=5)
        assert pong.server == "outside" and SOURCE not in pong.metadata
        assert mesh.grpc_clients().pool(f"{HOST}:50051").opened == 1


async def test_the_aio_channel_reaches_an_external_too(mesh: meshlib.Mesh, echo_fleet: EchoFleet) -> None:
    _, address = echo_fleet.start("outside", aio=True)
    mesh.apply_rules(RuleSet([external(address)]), "t1")
    async with mesh.grpc_aio_channel(f"{HOST}:50051") as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        pong = await stub.Unary(Ping(text="hi"), timeout=5)
        streamed = [p.index async for p in stub.ServerStream(Ping(count=3), timeout=5)]
    assert pong.server == "outside" and SOURCE not in pong.metadata
    assert streamed == [0, 1, 2]
    assert mesh.stats.edge("out", HOST).by_class == {"2xx": 2}


def test_an_external_without_endpoints_is_resolved_by_dns(mesh: meshlib.Mesh, echo_fleet: EchoFleet) -> None:
    _, address = echo_fleet.start("by-name")
    port = int(address.rpartition(":")[2])
    doc = {"kind": "External", "service": "localhost", "ports": [{"port": port}]}
    mesh.apply_rules(RuleSet([doc]), "t1")
    pong = echo_pb2_grpc.EchoStub(mesh.grpc_channel(f"localhost:{port}")).Unary(Ping(text="x"), timeout=5)
    assert pong.server == "by-name"
    assert set(mesh.grpc_clients().pool(f"localhost:{port}").channels()) == {f"localhost:{port}"}


def test_tls_origination_verifies_the_external_with_its_ca(
    mesh: meshlib.Mesh, tls_echo: Any, ca: CA, tmp_path: Path
) -> None:
    knobs, address = tls_echo(HOST)
    (tmp_path / "ca.pem").write_text(ca.pem)
    mesh.apply_rules(RuleSet([external(address, port=80, ca=str(tmp_path / "ca.pem"))]), "t1")
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_channel(HOST))
    assert [stub.Unary(Ping(text=t), timeout=5).text for t in ("a", "b")] == ["a", "b"]
    assert knobs.total() == 2
    assert SOURCE not in knobs.metadata[0]
    assert mesh.grpc_clients().pool(f"{HOST}:80").opened == 1  # one channel, kept for both calls


async def test_tls_origination_on_the_aio_channel_with_an_sni_of_its_own(
    mesh: meshlib.Mesh, tls_echo: Any, ca: CA
) -> None:
    knobs, address = tls_echo("api.payments.example")  # a certificate for the SNI, not the host
    mesh.apply_rules(RuleSet([external(address, port=443, ca=ca.pem, sni="api.payments.example")]), "t1")
    async with mesh.grpc_aio_channel(f"{HOST}:443") as channel:
        pong = await echo_pb2_grpc.EchoStub(channel).Unary(Ping(text="hi"), timeout=5)
    assert pong.text == "hi" and knobs.total() == 1


@pytest.mark.parametrize("trust", ["another CA", "the right CA, a wrong name"])
def test_a_certificate_that_does_not_verify_fails_closed_and_is_not_retried(
    mesh: meshlib.Mesh, tls_echo: Any, ca: CA, trust: str
) -> None:
    if trust == "another CA":
        knobs, address = tls_echo(HOST)
        roots = CA("another CA").pem
    else:
        knobs, address = tls_echo("elsewhere.example")
        roots = ca.pem
    mesh.apply_rules(RuleSet([external(address, port=80, ca=roots), route(retries=FAST_RETRY)]), "t1")
    with pytest.raises(grpc.RpcError) as refused:
        echo_pb2_grpc.EchoStub(mesh.grpc_channel(HOST)).Unary(Ping(text="x"), timeout=5)
    error: Any = refused.value
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    details = error.details()
    assert f"TLS origination to {HOST} at {address} (SNI {HOST})" in details
    assert "failed verification against the External's ca" in details
    assert knobs.total() == 0  # nothing reached the servicer
    assert mesh.stats.counter("retries", HOST) == 0  # a certificate does not heal on a retry


def test_a_new_ca_opens_new_channels(mesh: meshlib.Mesh, tls_echo: Any, ca: CA) -> None:
    """The channel that failed its handshake (and sits in grpc's reconnect backoff) is not the
    one the corrected rules use: a new `ca` is a new generation of the pool."""
    knobs, address = tls_echo(HOST)
    mesh.apply_rules(RuleSet([external(address, port=80, ca=CA("another CA").pem)]), "t1")
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_channel(HOST))
    with pytest.raises(grpc.RpcError, match="failed verification"):
        stub.Unary(Ping(text="x"), timeout=5)
    mesh.apply_rules(RuleSet([external(address, port=80, ca=ca.pem)]), "t2")
    assert stub.Unary(Ping(text="y"), timeout=5).text == "y"
    pool = mesh.grpc_clients().pool(f"{HOST}:80")
    assert (pool.opened, pool.closed, knobs.total()) == (2, 1, 1)


async def test_a_new_ca_opens_new_aio_channels(mesh: meshlib.Mesh, tls_echo: Any, ca: CA) -> None:
    """`test_a_new_ca_opens_new_channels` on the aio channel: the refused channel is closed."""
    knobs, address = tls_echo(HOST)
    mesh.apply_rules(RuleSet([external(address, port=80, ca=CA("another CA").pem)]), "t1")
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel(HOST))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Unary(Ping(text="x"), timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "failed verification" in (refused.value.details() or "")
    pool = mesh.grpc_clients().aio_pool(f"{HOST}:80")
    first = pool.channels()[address]
    mesh.apply_rules(RuleSet([external(address, port=80, ca=ca.pem)]), "t2")
    assert (await stub.Unary(Ping(text="y"), timeout=5)).text == "y"
    assert (pool.opened, pool.closed, knobs.total()) == (2, 1, 1)
    assert first.get_state() is grpc.ChannelConnectivity.SHUTDOWN


def test_the_system_cas_do_not_vouch_for_a_private_ca(mesh: meshlib.Mesh, tls_echo: Any) -> None:
    knobs, address = tls_echo(HOST)
    mesh.apply_rules(RuleSet([external(address, port=80, origination=True)]), "t1")
    with pytest.raises(grpc.RpcError) as refused:
        echo_pb2_grpc.EchoStub(mesh.grpc_channel(HOST)).Unary(Ping(text="x"), timeout=5)
    error: Any = refused.value
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "failed verification against the system's CAs" in error.details()
    assert knobs.total() == 0


async def test_a_wrong_name_is_refused_on_the_aio_channel(mesh: meshlib.Mesh, tls_echo: Any, ca: CA) -> None:
    knobs, address = tls_echo("elsewhere.example")
    mesh.apply_rules(RuleSet([external(address, port=80, ca=ca.pem), route(retries=FAST_RETRY)]), "t1")
    async with mesh.grpc_aio_channel(HOST) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await echo_pb2_grpc.EchoStub(channel).Unary(Ping(text="x"), timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "failed verification" in (refused.value.details() or "")
    assert knobs.total() == 0 and mesh.stats.counter("retries", HOST) == 0


def test_an_unreadable_ca_refuses_every_call_before_connecting(
    mesh: meshlib.Mesh, tls_echo: Any, tmp_path: Path
) -> None:
    _, address = tls_echo(HOST)
    mesh.apply_rules(RuleSet([external(address, port=80, ca=str(tmp_path / "missing.pem"))]), "t1")
    with pytest.raises(grpc.RpcError) as refused:
        echo_pb2_grpc.EchoStub(mesh.grpc_channel(HOST)).Unary(Ping(text="x"), timeout=5)
    error: Any = refused.value
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "missing.pem" in error.details() and "fails closed" in error.details()
    assert mesh.grpc_clients().pool(f"{HOST}:80").opened == 0  # no channel, no connection


def test_the_externals_route_retries_on_another_endpoint(mesh: meshlib.Mesh, echo_fleet: EchoFleet) -> None:
    broken, bad = echo_fleet.start("broken")
    broken.fail = grpc.StatusCode.UNAVAILABLE
    good, ok = echo_fleet.start("good")
    mesh.apply_rules(RuleSet([external(bad, ok), route(retries=FAST_RETRY)]), "t1")
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_channel(f"{HOST}:50051"))
    assert {stub.Unary(Ping(text=str(i)), timeout=5).server for i in range(4)} == {"good"}
    assert good.total() == 4 and broken.total() >= 1  # round robin sent some first tries there
    assert mesh.stats.counter("retries", HOST) == broken.total()
    # without the retry policy, the broken endpoint's UNAVAILABLE reaches the caller
    mesh.apply_rules(RuleSet([external(bad, ok)]), "t2")
    codes = set()
    for _ in range(4):
        try:
            stub.Unary(Ping(text="x"), timeout=5)
            codes.add(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.add(exc.code())  # type: ignore[attr-defined]
    assert codes == {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}


async def test_the_externals_route_timeout_holds_on_the_aio_channel(
    mesh: meshlib.Mesh, echo_fleet: EchoFleet
) -> None:
    knobs, address = echo_fleet.start("slow", aio=True)
    knobs.delay = 2.0
    mesh.apply_rules(RuleSet([external(address), route(timeout="100ms")]), "t1")
    async with mesh.grpc_aio_channel(f"{HOST}:50051") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await echo_pb2_grpc.EchoStub(channel).Unary(Ping(text="x"))
    assert cut.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_the_externals_rate_limit_is_kept_by_the_caller(mesh: meshlib.Mesh, echo_fleet: EchoFleet) -> None:
    knobs, address = echo_fleet.start("limited")
    limit = {"kind": "RateLimit", "service": HOST, "requests_per_second": 0.5, "burst": 1}
    mesh.apply_rules(RuleSet([external(address), limit]), "t1")
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_channel(f"{HOST}:50051"))
    assert stub.Unary(Ping(text="x"), timeout=5).server == "limited"
    with pytest.raises(grpc.RpcError) as refused:
        stub.Unary(Ping(text="y"), timeout=5)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert knobs.total() == 1  # the refused call never left
    assert mesh.stats.counter("egress_rate_limited", HOST) == 1


def test_registry_only_blocks_an_undeclared_host_as_the_mesh_refuses_others(echo_fleet: EchoFleet) -> None:
    knobs, address = echo_fleet.start("outside")
    with meshlib.Mesh("checkout", outbound="registry_only") as mesh:
        mesh.apply_rules(RuleSet([external(address)]), "t1")
        stub = echo_pb2_grpc.EchoStub(mesh.grpc_channel(f"{HOST}:50051"))
        assert stub.Unary(Ping(text="x"), timeout=5).server == "outside"  # declared: through
        why = {
            address: "'127.0.0.1' is neither a mesh service nor an External host; declare it with an "
            f"External document (kind: External, service: 127.0.0.1, ports: [{{port: {address[10:]}}}])",
            "api.elsewhere.example:443": "'api.elsewhere.example' is neither a mesh service nor an External",
            f"{HOST}:8080": f"port 8080 of External '{HOST}' is not declared (ports: 50051); "
            f"add {{port: 8080}} to the ports of External/{HOST}",
        }
        for target, said in why.items():
            with pytest.raises(grpc.RpcError) as blocked:
                echo_pb2_grpc.EchoStub(mesh.grpc_channel(target)).Unary(Ping(text="x"), timeout=5)
            error: Any = blocked.value
            assert error.code() is grpc.StatusCode.UNAVAILABLE
            assert error.details().startswith(f"outbound policy registry_only: {said}"), error.details()
        assert mesh.stats.counter("outbound_blocked", "127.0.0.1") == 1
        assert mesh.stats.counter("outbound_blocked", "api.elsewhere.example") == 1
        assert mesh.stats.counter("outbound_blocked", HOST) == 1  # an undeclared port of it
        # a single-label name is a mesh service, not the outside: its NoEndpointsError stays
        with pytest.raises(grpc.RpcError) as unknown:
            echo_pb2_grpc.EchoStub(mesh.grpc_channel("inventory")).Unary(Ping(text="x"), timeout=5)
        refused: Any = unknown.value
        assert refused.code() is grpc.StatusCode.UNAVAILABLE
        assert refused.details().lower().startswith("no endpoints for service 'inventory'")
        assert mesh.stats.counter("outbound_blocked", "inventory") == 0
    assert knobs.total() == 1


async def test_registry_only_blocks_on_the_aio_channel(echo_fleet: EchoFleet) -> None:
    with meshlib.Mesh("checkout", outbound="registry_only") as mesh:
        async with mesh.grpc_aio_channel("api.elsewhere.example:443") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as blocked:
                await echo_pb2_grpc.EchoStub(channel).Unary(Ping(text="x"), timeout=5)
        assert blocked.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "'api.elsewhere.example' is neither a mesh service nor an External host" in (
            blocked.value.details() or ""
        )
        assert mesh.stats.counter("outbound_blocked", "api.elsewhere.example") == 1


def test_an_externals_channels_close_when_it_leaves_the_rules(
    mesh: meshlib.Mesh, echo_fleet: EchoFleet
) -> None:
    _, address = echo_fleet.start("outside")
    mesh.apply_rules(RuleSet([external(address)]), "t1")
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_channel(f"{HOST}:50051"))
    stub.Unary(Ping(text="x"), timeout=5)
    pool = mesh.grpc_clients().pool(f"{HOST}:50051")
    mesh.apply_rules(RuleSet([external(address), route(timeout="5s")]), "t2")
    stub.Unary(Ping(text="y"), timeout=5)
    assert (pool.opened, pool.closed) == (1, 0)  # kept across a rules update that keeps it
    mesh.apply_rules(RuleSet([]), "t3")
    assert pool.closed == 1 and pool.channels() == {}


def test_the_egress_docs_grpc_example_runs_as_documented() -> None:
    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "egress.md").read_text(encoding="utf-8")
    section = text[text.index("## gRPC channels") :]
    code = re.findall(r"```python\n(.*?)```", section, re.DOTALL)[0]
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["hi from outside", "UNAVAILABLE outbound policy registry_only"]
