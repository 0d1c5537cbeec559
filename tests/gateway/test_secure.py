"""A gateway in a secure mesh (the real control service and its CA): outside callers reach a
STRICT service through it, over mTLS with the gateway's own identity, and not directly."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import meshlib
from meshlib.gateway import GatewayServing
from meshlib.testing import RunningServer, serve
from tests.conftest import wait_until
from tests.gateway.conftest import SHOP
from tests.security.test_mtls_live import SecureControl
from tests.security.test_tls import Seen

RULES = [
    {"kind": "Gateway", "service": "edge", "listeners": [{"port": 8080}]},
    {
        "kind": "Route",
        "service": "edge",
        "routes": [{"match": {"hosts": [SHOP]}, "to": [{"service": "orders"}]}],
    },
]


@dataclass
class Secure:
    control: SecureControl
    orders: RunningServer
    gateway: GatewayServing
    edge: meshlib.Mesh


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[Secure]:
    control = SecureControl(tmp_path / "control", lifetime=3600)
    admin = {"Authorization": f"Bearer {control.admin}"}
    assert httpx.put(f"{control.url}/v1/config", json=RULES, headers=admin, timeout=10.0).status_code == 200
    orders = meshlib.Mesh("orders", control=control.url, token=control.token("orders"))
    edge = meshlib.Mesh("edge", control=control.url, token=control.token("edge"))
    server = serve(orders.asgi(Seen()), **orders.uvicorn_options())  # the Mesh's mode: STRICT
    gateway = None
    try:
        orders.register(server.address)
        wait_until(
            lambda: (
                edge.snapshot.rules.gateway("edge") is not None
                and (plan := edge.snapshot.plans.get("orders")) is not None
                and bool(plan.endpoints)
            ),
            what="the gateway to learn its rules and orders' endpoint",
        )
        gateway = edge.serve_gateway(ports={8080: 0})
        yield Secure(control, server, gateway, edge)
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()
        edge.close()
        orders.close()
        control.stop()


def test_a_strict_service_is_reached_through_the_gateway_and_not_directly(secure: Secure) -> None:
    assert secure.edge.mtls == "STRICT"
    r = httpx.get(secure.gateway.url(8080) + "/orders/1", headers={"host": SHOP}, timeout=10.0)
    assert r.status_code == 200, r.text
    seen = r.json()
    # orders saw the gateway's certificate over TLS 1.3: the gateway's own identity
    assert seen["peer"] == "spiffe://mesh.local/svc/edge" and seen["source"] == "edge"
    assert seen["tls_version"] == 0x0304
    r = httpx.get(f"http://{secure.orders.address}/orders/1", timeout=10.0)
    assert r.status_code == 403 and r.headers["x-mesh-error"] == "mtls-required"


def test_the_gateway_registers_under_its_name(secure: Secure) -> None:
    address = secure.gateway.addresses[8080]
    admin = {"Authorization": f"Bearer {secure.control.admin}"}

    def registered() -> bool:
        r = httpx.get(f"{secure.control.url}/v1/registry/edge", headers=admin, timeout=10.0)
        return r.status_code == 200 and address in r.text

    wait_until(registered, what="the gateway's registration")
