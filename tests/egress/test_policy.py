"""The outbound policy: registry_only refuses hosts that are neither mesh services nor
Externals, before any connection; allow_any (the default) passes them through as before."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

import meshlib
from meshlib.rules import RuleSet
from meshlib.telemetry.metrics import decisions
from meshlib.testing import RunningServer, serve
from tests.conftest import Fleet
from tests.egress.servers import Recorder


@pytest.fixture
def outside() -> Iterator[tuple[Recorder, RunningServer]]:
    app = Recorder()
    with serve(app) as server:
        yield app, server


def docs(outside: RunningServer, mesh_backend: RunningServer) -> RuleSet:
    return RuleSet(
        [
            {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": mesh_backend.address}]},
            {"kind": "External", "service": "api.partner.example", "ports": [{"port": 80}],
             "endpoints": [outside.address]},
        ]
    )  # fmt: skip


def test_registry_only_refuses_an_undeclared_host_without_connecting(
    outside: tuple[Recorder, RunningServer],
) -> None:
    app, server = outside
    with meshlib.Mesh("checkout", outbound="registry_only") as mesh, mesh.sync_client() as client:
        with pytest.raises(meshlib.OutboundBlocked) as exc:
            client.get(f"{server.url}/secret")
        assert mesh.stats.counter("outbound_blocked", "127.0.0.1") == 1
        exported = [(f.prom, labels, n) for f, labels, n in decisions(mesh.telemetry)]
        assert exported == [("mesh_outbound_blocked_total", {"service": "checkout", "host": "127.0.0.1"}, 1)]
    assert isinstance(exc.value, meshlib.MeshError) and isinstance(exc.value, httpx.TransportError)
    message = str(exc.value)
    assert "'127.0.0.1' is neither a mesh service nor an External host" in message
    assert f"kind: External, service: 127.0.0.1, ports: [{{port: {server.port}}}]" in message
    assert app.seen == []  # nothing reached the server


async def test_registry_only_allows_externals_and_mesh_services(
    outside: tuple[Recorder, RunningServer], fleet: Fleet
) -> None:
    app, server = outside
    backend, mesh_server = fleet.start("orders")
    async with meshlib.Mesh("checkout", outbound="REGISTRY_ONLY") as mesh:
        assert mesh.outbound == "registry_only"
        mesh.apply_rules(docs(server, mesh_server), "t1")
        async with mesh.client() as client:
            assert (await client.get("http://api.partner.example/quote")).text == "/quote"
            assert (await client.get("http://orders/whoami")).json()["name"] == "orders"
            with pytest.raises(
                meshlib.OutboundBlocked,
                match=r"port 8080 of External 'api\.partner\.example' is not declared \(ports: 80\); "
                r"add \{port: 8080\} to the ports of External/api\.partner\.example",
            ):
                await client.get("http://api.partner.example:8080/quote")
            with pytest.raises(meshlib.OutboundBlocked, match=r"'elsewhere\.example'"):
                await client.get("http://elsewhere.example/")
        assert mesh.stats.counter("outbound_blocked", "elsewhere.example") == 1
    assert [s["path"] for s in app.seen] == ["/quote"]
    assert backend.hits == 1


def test_allow_any_passes_undeclared_hosts_through(outside: tuple[Recorder, RunningServer]) -> None:
    app, server = outside
    with meshlib.Mesh("checkout") as mesh, mesh.sync_client() as client:
        assert mesh.outbound == "allow_any"
        assert client.get(f"{server.url}/open").text == "/open"
        assert mesh.stats.counters == {}
    assert [s["path"] for s in app.seen] == ["/open"]
    assert "x-mesh-source" not in app.seen[0]["headers"]


def test_the_policy_comes_from_the_environment_and_an_argument_wins(
    monkeypatch: pytest.MonkeyPatch, outside: tuple[Recorder, RunningServer]
) -> None:
    app, server = outside
    monkeypatch.setenv("MESH_OUTBOUND", "registry_only")
    with meshlib.Mesh() as mesh, mesh.sync_client() as client, pytest.raises(meshlib.OutboundBlocked):
        client.get(server.url)
    with meshlib.Mesh(outbound="allow_any") as mesh, mesh.sync_client() as client:
        assert client.get(server.url).status_code == 200
    monkeypatch.setenv("MESH_OUTBOUND", "deny_all")
    with pytest.raises(ValueError, match=r"outbound= or \$MESH_OUTBOUND: .*allow_any or registry_only"):
        meshlib.Mesh()
    assert len(app.seen) == 1


def test_single_label_hosts_keep_their_no_endpoints_error_under_registry_only() -> None:
    with (
        meshlib.Mesh(outbound="registry_only") as mesh,
        mesh.sync_client() as client,
        pytest.raises(meshlib.NoEndpointsError) as exc,
    ):
        client.get("http://inventory/")
    assert not isinstance(exc.value, meshlib.OutboundBlocked)
