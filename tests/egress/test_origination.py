"""TLS origination to an External host: the app calls http://host/, the mesh speaks HTTPS to a
real server with its own CA, with the right SNI, and fails closed when the peer does not verify."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.errors import MeshError
from meshlib.rules import RuleSet
from tests.egress.servers import CA, TLSServer, tls_server

HOST = "payments.example"


@pytest.fixture
def ca() -> CA:
    return CA()


@pytest.fixture
def server(ca: CA, tmp_path: Path) -> Iterator[TLSServer]:
    with tls_server(ca, tmp_path, HOST, "api.payments.example") as s:
        yield s


def external(address: str, **tls: Any) -> dict[str, Any]:
    return {
        "kind": "External",
        "service": HOST,
        "ports": [{"port": 80, "tls": {"origination": True, **tls}}],
        "endpoints": [address],
    }


@pytest.fixture
def mesh() -> Iterator[meshlib.Mesh]:
    m = meshlib.Mesh("checkout")
    yield m
    m.close()


def test_plain_http_call_leaves_as_https_with_the_host_as_sni(
    mesh: meshlib.Mesh, server: TLSServer, ca: CA
) -> None:
    mesh.apply_rules(RuleSet([external(server.address, ca=ca.pem)]), "t1")
    with mesh.sync_client() as client:
        r = client.get(f"http://{HOST}/charge?amount=7")
    assert r.status_code == 200 and r.text == "/charge"
    assert server.snis == [HOST]
    [seen] = server.app.seen
    assert seen["scheme"] == "https" and seen["query"] == "amount=7"
    assert seen["headers"]["host"] == HOST
    assert "x-mesh-source" not in seen["headers"]  # the caller's mesh name stays inside the mesh


async def test_async_client_with_a_ca_file_and_an_sni_of_its_own(
    mesh: meshlib.Mesh, server: TLSServer, ca: CA, tmp_path: Path
) -> None:
    (tmp_path / "ca.pem").write_text(ca.pem)
    mesh.apply_rules(
        RuleSet([external(server.address, ca=str(tmp_path / "ca.pem"), sni="api.payments.example")]), "t1"
    )
    async with mesh.client() as client:
        first = await client.get(f"http://{HOST}/a")
        second = await client.get(f"http://{HOST}/b")
    assert (first.status_code, second.status_code) == (200, 200)
    assert server.snis == ["api.payments.example"]  # one handshake: the connection is reused
    assert [s["path"] for s in server.app.seen] == ["/a", "/b"]


def test_a_server_the_ca_does_not_vouch_for_fails_closed(mesh: meshlib.Mesh, server: TLSServer) -> None:
    other = CA("another CA")
    mesh.apply_rules(RuleSet([external(server.address, ca=other.pem)]), "t1")
    with mesh.sync_client() as client, pytest.raises(httpx.ConnectError) as exc:
        client.get(f"http://{HOST}/charge")
    message = str(exc.value)
    assert "TLS origination to payments.example" in message
    assert "SNI payments.example" in message and "failed verification" in message
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert server.app.seen == []  # no request reached the app


def test_system_cas_do_not_vouch_for_a_private_ca(mesh: meshlib.Mesh, server: TLSServer) -> None:
    mesh.apply_rules(RuleSet([external(server.address)]), "t1")
    with mesh.sync_client() as client, pytest.raises(httpx.ConnectError, match="the system's CAs"):
        client.get(f"http://{HOST}/charge")
    assert server.app.seen == []


def test_a_wrong_sni_fails_the_name_check(mesh: meshlib.Mesh, server: TLSServer, ca: CA) -> None:
    mesh.apply_rules(RuleSet([external(server.address, ca=ca.pem, sni="elsewhere.example")]), "t1")
    with mesh.sync_client() as client, pytest.raises(httpx.ConnectError, match=r"SNI elsewhere\.example"):
        client.get(f"http://{HOST}/charge")
    assert server.snis == ["elsewhere.example"] and server.app.seen == []


def test_an_unreadable_ca_refuses_every_call_before_connecting(
    mesh: meshlib.Mesh, server: TLSServer, tmp_path: Path
) -> None:
    mesh.apply_rules(RuleSet([external(server.address, ca=str(tmp_path / "missing.pem"))]), "t1")
    with mesh.sync_client() as client, pytest.raises(meshlib.OriginationError) as exc:
        client.get(f"http://{HOST}/charge")
    assert isinstance(exc.value, MeshError)
    assert "missing.pem" in str(exc.value) and "fails closed" in str(exc.value)
    assert server.snis == []  # not even a handshake


def test_the_mesh_identity_is_never_presented_to_an_external(
    server: TLSServer, ca: CA, tmp_path: Path
) -> None:
    """With mTLS on, a call to an External still goes out with no client certificate and no
    SPIFFE check of the server (which has none)."""
    from tests.security.test_tls import PKI

    identity = PKI().identity("checkout")
    with meshlib.Mesh("checkout", credentials=identity) as mesh:
        mesh.apply_rules(RuleSet([external(server.address, ca=ca.pem)]), "t1")
        with mesh.sync_client() as client:
            r = client.get(f"http://{HOST}/charge")
        assert r.status_code == 200
        transport = client._transport._inner  # type: ignore[attr-defined]
        assert transport.meshes == {}  # the per-service mTLS pools were never used
    [seen] = server.app.seen
    assert "x-mesh-source" not in seen["headers"]


def test_the_apps_own_tls_keeps_the_host_as_sni_at_a_fixed_address(
    mesh: meshlib.Mesh, server: TLSServer, ca: CA
) -> None:
    """A port without `tls`: the app speaks https itself (its client's `verify=`), and the mesh
    sends it to the External's address with the host, not the address, as SNI."""
    doc = {"kind": "External", "service": HOST, "ports": [{"port": 443}], "endpoints": [server.address]}
    mesh.apply_rules(RuleSet([doc]), "t1")
    trust = ssl.create_default_context(cadata=ca.pem)
    with mesh.sync_client(verify=trust) as client:
        assert client.get(f"https://{HOST}/own").text == "/own"
    assert server.snis == [HOST]
    assert mesh.stats.edge("out", HOST).by_class == {"2xx": 1}


def test_the_clients_limits_shape_the_originating_transport(
    mesh: meshlib.Mesh, server: TLSServer, ca: CA
) -> None:
    mesh.apply_rules(RuleSet([external(server.address, ca=ca.pem)]), "t1")
    with mesh.sync_client(limits=httpx.Limits(max_connections=3)) as client:
        assert client.get(f"http://{HOST}/x").status_code == 200
        [originating] = client._transport._origin_transports.values()  # type: ignore[attr-defined]
        assert originating._pool._max_connections == 3


def test_a_refused_certificate_is_not_retried(mesh: meshlib.Mesh, server: TLSServer) -> None:
    route = {
        "kind": "Route",
        "service": HOST,
        "routes": [{"retries": {"attempts": 3, "on": ["connect-failure"]}}],
    }
    mesh.apply_rules(RuleSet([external(server.address, ca=CA("another CA").pem), route]), "t1")
    with mesh.sync_client() as client, pytest.raises(httpx.ConnectError, match="failed verification"):
        client.get(f"http://{HOST}/charge")
    assert len(server.snis) == 1  # one handshake: a certificate does not heal on a retry
    assert mesh.stats.counter("retries", HOST) == 0
