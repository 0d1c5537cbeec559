"""An edge service in a secure mesh: outside callers (browsers, plain httpx, no client certificate)
reach it, while its own calls to mesh services and mesh-to-mesh calls stay mutual TLS.

A real control service with its CA on 127.0.0.1; `orders` serves STRICT, `gateway` serves its
public port PERMISSIVE (`uvicorn_options(mtls=...)`, what `serve(..., mtls=...)` uses) and calls
`orders` through its mesh client.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.security import certificates as certs
from meshlib.testing import RunningServer, serve
from tests.conftest import wait_until
from tests.security.test_mtls_live import SecureControl
from tests.security.test_tls import Seen

GATEWAY = "spiffe://mesh.local/svc/gateway"


def gateway_app(mesh: meshlib.Mesh) -> Any:
    """Answers with what `orders` saw of the gateway's call to it."""
    client = mesh.client(timeout=10.0)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        r = await client.get("http://orders/orders/1")
        body = r.content
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": r.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[tuple[RunningServer, RunningServer, meshlib.Mesh]]:
    control = SecureControl(tmp_path / "control", lifetime=3600)
    orders = meshlib.Mesh("orders", control=control.url, token=control.token("orders"))
    gateway = meshlib.Mesh("gateway", control=control.url, token=control.token("gateway"))
    servers: list[RunningServer] = []
    try:
        servers.append(serve(orders.asgi(Seen()), **orders.uvicorn_options()))  # the Mesh's mode: STRICT
        orders.register(servers[0].address)
        wait_until(lambda: "orders" in gateway.snapshot.plans, what="gateway to learn orders' endpoint")
        edge_options = gateway.uvicorn_options(mtls="PERMISSIVE")  # this server only
        servers.append(serve(gateway.asgi(gateway_app(gateway)), **edge_options))
        yield servers[0], servers[1], gateway
    finally:
        for server in servers:
            server.stop()
        gateway.close()
        orders.close()
        control.stop()


def test_outside_callers_reach_the_edge_while_its_mesh_calls_stay_mtls(edge) -> None:
    orders, gateway, mesh = edge
    assert mesh.mtls == "STRICT"  # the Mesh's own mode is unchanged

    # a non-mesh client, plaintext: served; the gateway's call to orders went over mTLS as gateway
    r = httpx.get(f"http://{gateway.address}/", timeout=10.0)
    assert r.status_code == 200, r.text
    seen = r.json()
    assert seen["peer"] == GATEWAY and seen["service"] == "gateway" and seen["tls_version"] == 0x0304

    # a non-mesh client over TLS without a client certificate (it trusts the mesh CA, as an
    # internal load balancer would): served too
    assert mesh.credentials is not None
    trust = ssl.create_default_context(cadata=mesh.credentials.bundle_pem.decode())
    trust.check_hostname = False  # the mesh certificate names a SPIFFE id, not a host
    r = httpx.get(f"https://{gateway.address}/", verify=trust, timeout=10.0)
    assert r.status_code == 200 and json.loads(r.text)["peer"] == GATEWAY

    # orders itself stays STRICT: the same outside client is refused there
    r = httpx.get(f"http://{orders.address}/orders/1", timeout=10.0)
    assert r.status_code == 403 and r.headers["x-mesh-error"] == "mtls-required"


def test_a_server_mode_per_call_is_checked(tmp_path: Path) -> None:
    plain = meshlib.Mesh("gateway")
    try:
        with pytest.raises(ValueError, match="needs an identity"):
            plain.uvicorn_options(mtls="PERMISSIVE")
        with pytest.raises(ValueError, match="mtls must be one of"):
            plain.uvicorn_options(mtls="LOOSE")
        assert plain.uvicorn_options(mtls="DISABLE") == {}
    finally:
        plain.close()


def test_an_edge_port_with_its_own_certificate_and_mtls_calls_behind_it(edge, tmp_path: Path) -> None:
    """`mtls="DISABLE"` for one server leaves TLS to uvicorn's `ssl_*` arguments (a public
    certificate); the Mesh keeps its identity for the calls it makes."""
    _, _, mesh = edge
    public_cert, public_key = certs.create_ca("public.example")  # stands for a web PKI certificate
    (tmp_path / "public.crt").write_bytes(public_cert)
    (tmp_path / "public.key").write_bytes(public_key)
    options = mesh.uvicorn_options(mtls="DISABLE")
    assert options == {} and mesh.credentials is not None
    app = mesh.asgi(gateway_app(mesh))
    tls = {"ssl_certfile": str(tmp_path / "public.crt"), "ssl_keyfile": str(tmp_path / "public.key")}
    with serve(app, **tls, **options) as public:
        browser = ssl.create_default_context(cadata=public_cert.decode())
        browser.check_hostname = False
        r = httpx.get(f"https://{public.address}/", verify=browser, timeout=10.0)
        assert r.status_code == 200 and r.json()["peer"] == GATEWAY  # and on to orders over mTLS
