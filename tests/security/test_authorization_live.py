"""Authorization on real servers on 127.0.0.1: uvicorn (ASGI) and werkzeug (Flask, WSGI),
over plaintext and TLS, with rules changed while the servers run."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask, jsonify
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from werkzeug.serving import make_server

import meshlib
from meshlib import context
from meshlib.asgi import MeshMiddleware as AsgiMesh
from meshlib.rules import parse_documents
from meshlib.security import certificates
from meshlib.security.authorization import current_peer
from meshlib.testing import serve
from meshlib.wsgi import MeshMiddleware as WsgiMesh
from tests.conftest import wait_until, write_rules


def allow(*rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"kind": "Authorization", "service": "orders", "allow": list(rules)}]


CHECKOUT_READS = allow({"from": "checkout", "methods": ["GET"], "paths": ["/orders/*"]})
BILLING_ONLY = allow({"from": "billing"})


def who(request_peer: Any = None) -> dict[str, Any]:
    ctx = context.current()
    return {"source": ctx.source if ctx else None, "peer": current_peer(), "scope_peer": request_peer}


def starlette_app() -> Starlette:
    async def order(request: Request) -> JSONResponse:
        return JSONResponse(who(request.scope.get("meshlib.peer")))

    return Starlette(routes=[Route("/orders/{id}", order, methods=["GET", "POST"])])


def flask_app() -> Flask:
    app = Flask("orders")

    @app.route("/orders/<oid>", methods=["GET", "POST"])
    def order(oid: str):  # type: ignore[no-untyped-def]
        from flask import request

        return jsonify(who(request.environ.get("meshlib.peer")))

    return app


@contextmanager
def asgi_server(mesh: meshlib.Mesh, **uvicorn: Any) -> Iterator[str]:
    app = starlette_app()
    app.add_middleware(AsgiMesh, mesh=mesh)
    with serve(app, **uvicorn) as server:
        yield server.address


@contextmanager
def wsgi_server(mesh: meshlib.Mesh, ssl_context: ssl.SSLContext | None = None) -> Iterator[str]:
    app = flask_app()
    app.wsgi_app = WsgiMesh(app.wsgi_app, mesh=mesh)  # type: ignore[method-assign]
    srv = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=ssl_context)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        t.join(5)
        srv.server_close()


SERVERS = {"asgi": asgi_server, "wsgi": wsgi_server}
Server = Callable[..., Any]


@pytest.fixture(params=sorted(SERVERS))
def server(request: pytest.FixtureRequest) -> Server:
    return SERVERS[request.param]


def get(c: httpx.Client, source: str | None, method: str = "GET", path: str = "/orders/1") -> httpx.Response:
    headers = {"x-mesh-source": source} if source else {}
    return c.request(method, path, headers=headers)


def test_identities_allowed_pass_and_others_get_403_with_the_reason(server: Server) -> None:
    mesh = meshlib.Mesh("orders")
    mesh.apply_rules(parse_documents(CHECKOUT_READS), "1")
    with server(mesh) as address, httpx.Client(base_url=f"http://{address}") as c:
        ok = get(c, "checkout")
        assert ok.status_code == 200
        assert ok.json() == {"source": "checkout", "peer": None, "scope_peer": None}
        r = get(c, "checkout", "POST")
        assert r.status_code == 403
        assert r.text == "RBAC: access denied: source checkout may not POST /orders/1"
        assert r.headers["content-type"].startswith("text/plain")
        r = get(c, "billing")
        assert (r.status_code, r.text) == (403, "RBAC: access denied: source billing may not GET /orders/1")
        r = get(c, None)
        assert (r.status_code, r.text) == (
            403,
            "RBAC: access denied: a caller without identity may not GET /orders/1",
        )
    assert mesh.stats.counter("denied", "orders") == 3
    mesh.close()


def test_apply_rules_changes_the_verdict_without_restart(server: Server) -> None:
    mesh = meshlib.Mesh("orders")
    with server(mesh) as address, httpx.Client(base_url=f"http://{address}") as c:
        assert get(c, "billing", "DELETE").status_code == 405  # no document: allowed (the app refuses)
        mesh.apply_rules(parse_documents(CHECKOUT_READS), "1")
        assert get(c, "billing").status_code == 403
        assert get(c, "checkout").status_code == 200
        mesh.apply_rules(parse_documents(BILLING_ONLY), "2")
        assert get(c, "billing", "POST").status_code == 200
        assert get(c, "checkout").status_code == 403
        mesh.apply_rules(parse_documents(allow()), "3")  # empty allow list: nobody
        assert get(c, "billing").status_code == 403
        mesh.apply_rules(parse_documents([]), "4")  # document gone: everybody
        assert get(c, None).status_code == 200
    assert mesh.stats.counter("denied", "orders") == 3
    mesh.close()


def test_rules_file_edit_changes_the_verdict_live(server: Server, tmp_path: Path) -> None:
    cfg = write_rules(tmp_path / "mesh.yaml", CHECKOUT_READS)
    mesh = meshlib.Mesh("orders", config=cfg, watch_interval=0.05)
    with server(mesh) as address, httpx.Client(base_url=f"http://{address}") as c:
        assert get(c, "checkout").status_code == 200
        assert get(c, "billing").status_code == 403
        before = mesh.snapshot.version
        write_rules(cfg, BILLING_ONLY)
        wait_until(lambda: mesh.snapshot.version != before, what="the edited rules to be in force")
        assert get(c, "billing").status_code == 200
        assert get(c, "checkout").status_code == 403
    mesh.close()


def test_denied_callers_do_not_spend_the_rate_limit(server: Server) -> None:
    mesh = meshlib.Mesh("orders")
    limit = {"kind": "RateLimit", "service": "orders", "requests_per_second": 0.001, "burst": 2}
    mesh.apply_rules(parse_documents([*CHECKOUT_READS, limit]), "1")
    with server(mesh) as address, httpx.Client(base_url=f"http://{address}") as c:
        assert [get(c, "billing").status_code for _ in range(5)] == [403] * 5
        assert [get(c, "checkout").status_code for _ in range(3)] == [200, 200, 429]
    mesh.close()


# --------------------------------------------------------------------------------------------
# TLS: the certificate names the caller, the header never does


class Pki:
    """A CA and certificates for the default trust domain, written where ssl can load them."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_cert, self.ca_key = certificates.create_ca(certificates.DEFAULT_TRUST_DOMAIN)
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.ca_cert)

    def files(self, service: str) -> tuple[str, str]:
        key = certificates.generate_key()
        cert = certificates.issue(
            self.ca_cert,
            self.ca_key,
            certificates.make_csr(key, service),
            spiffe_id=certificates.spiffe_id(certificates.DEFAULT_TRUST_DOMAIN, service),
            ip_addresses=["127.0.0.1"],
            lifetime=timedelta(hours=1),
        )
        cert_file, key_file = self.dir / f"{service}.pem", self.dir / f"{service}.key"
        cert_file.write_bytes(cert)
        key_file.write_bytes(certificates.key_pem(key))
        return str(cert_file), str(key_file)

    def server_context(self, service: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*self.files(service))
        ctx.load_verify_locations(cafile=str(self.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client(self, address: str, service: str | None) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if service is not None:
            ctx.load_cert_chain(*self.files(service))
        return httpx.Client(base_url=f"https://{address}", verify=ctx)


def spiffe(service: str) -> str:
    return certificates.spiffe_id(certificates.DEFAULT_TRUST_DOMAIN, service)


def test_wsgi_under_mtls_judges_the_certificate_not_the_header(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    mesh = meshlib.Mesh("orders")
    mesh.apply_rules(parse_documents(CHECKOUT_READS), "1")
    with wsgi_server(mesh, ssl_context=pki.server_context("orders")) as address:
        with pki.client(address, "checkout") as c:
            r = get(c, "billing")  # the header lies; the certificate says checkout
            assert r.status_code == 200
            assert r.json() == {
                "source": "checkout",
                "peer": spiffe("checkout"),
                "scope_peer": spiffe("checkout"),
            }
        with pki.client(address, "billing") as c:
            r = get(c, "checkout")  # the header claims an allowed caller: grants nothing
            assert (r.status_code, r.text) == (
                403,
                "RBAC: access denied: source billing may not GET /orders/1",
            )
    assert mesh.stats.counter("denied", "orders") == 1
    mesh.close()


def test_asgi_over_tls_without_peer_certificates_ignores_the_header(tmp_path: Path) -> None:
    """uvicorn's own TLS hands the app no certificate: a TLS caller is then unidentified."""
    pki = Pki(tmp_path)
    cert, key = pki.files("orders")
    mesh = meshlib.Mesh("orders")
    mesh.apply_rules(parse_documents(CHECKOUT_READS), "1")
    tls = {"ssl_certfile": cert, "ssl_keyfile": key, "ssl_ca_certs": str(pki.ca_file)}
    server = asgi_server(mesh, ssl_cert_reqs=ssl.CERT_REQUIRED, **tls)
    with server as address, pki.client(address, "checkout") as c:
        r = get(c, "checkout")
        assert (r.status_code, r.text) == (
            403,
            "RBAC: access denied: a caller without identity may not GET /orders/1",
        )
        mesh.apply_rules(parse_documents(allow({"paths": ["/orders/*"]})), "2")  # no `from`: anyone
        r = get(c, "checkout")
        assert r.status_code == 200
        assert r.json() == {"source": None, "peer": None, "scope_peer": None}
    mesh.close()


def test_asgi_under_mtls_judges_the_certificate_not_the_header(tmp_path: Path) -> None:
    from meshlib.security.uvicorn_tls import mtls_protocol

    pki = Pki(tmp_path)
    ctx = pki.server_context("orders")
    protocol = mtls_protocol(lambda require_cert: ctx, "STRICT", certificates.DEFAULT_TRUST_DOMAIN)
    mesh = meshlib.Mesh("orders")
    mesh.apply_rules(parse_documents(CHECKOUT_READS), "1")
    with asgi_server(mesh, http=protocol) as address:
        with pki.client(address, "checkout") as c:
            r = get(c, "billing")  # the header lies; the certificate says checkout
            assert r.status_code == 200
            assert r.json() == {
                "source": "checkout",
                "peer": spiffe("checkout"),
                "scope_peer": spiffe("checkout"),
            }
        with pki.client(address, "billing") as c:
            r = get(c, "checkout")  # the header claims an allowed caller: grants nothing
            assert (r.status_code, r.text) == (
                403,
                "RBAC: access denied: source billing may not GET /orders/1",
            )
            mesh.apply_rules(parse_documents(BILLING_ONLY), "2")
            assert get(c, "checkout").status_code == 200
    assert mesh.stats.counter("denied", "orders") == 1
    mesh.close()
