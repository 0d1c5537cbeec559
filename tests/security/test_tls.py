"""mTLS handshakes on 127.0.0.1 between real uvicorn servers and httpx clients (no control service).

Each test drives a real handshake; certificates come from a throwaway CA made per test module.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes

import meshlib
from meshlib.resilience.classify import Failure, refused_by_tls
from meshlib.security import certificates as certs
from meshlib.security.identity import Identity
from meshlib.security.peer import peer_identity, peer_service
from meshlib.security.uvicorn_tls import TLSH11Protocol, mtls_protocol
from meshlib.testing import RunningServer, serve
from tests.http.ws import handshake

TD = certs.DEFAULT_TRUST_DOMAIN

# -- helpers (also used by the other security test modules) -------------------------------------


class PKI:
    """A CA of the default trust domain, and identities it signs."""

    def __init__(self) -> None:
        self.cert, self.key = certs.create_ca(TD)

    def identity(
        self, service: str, *, lifetime: dt.timedelta = dt.timedelta(hours=1), bundle: bytes | None = None
    ) -> Identity:
        key = certs.generate_key()
        chain = certs.issue(
            self.cert,
            self.key,
            certs.make_csr(key, service),
            spiffe_id=certs.spiffe_id(TD, service),
            lifetime=lifetime,
        )
        return Identity(key, chain, bundle if bundle is not None else self.cert, trust_domain=TD)

    def expired_identity(self, service: str) -> Identity:
        """A certificate that expired an hour ago (`issue` only makes current ones)."""
        key = certs.generate_key()
        ca = certs.load_pem_chain(self.cert)[0]
        now = dt.datetime.now(dt.UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, service)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=2))
            .not_valid_after(now - dt.timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(certs.spiffe_id(TD, service))]),
                critical=False,
            )
            .sign(certs.load_key_pem(self.key), hashes.SHA256())  # type: ignore[arg-type]
        )
        return Identity(key, certs.cert_pem(leaf), self.cert, trust_domain=TD)


class Seen:
    """An ASGI app that records what each request saw of the TLS layer, and echoes it."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return
        ext = scope.get("extensions") or {}
        tls = ext.get("tls")
        seen = {
            "peer": peer_identity(scope),
            "service": peer_service(scope),
            "source": dict(scope["headers"]).get(b"x-mesh-source", b"").decode() or None,
            "tls_version": tls["tls_version"] if tls else None,
            "cipher_suite": tls["cipher_suite"] if tls else None,
            "server_cert": tls["server_cert"] if tls else "absent",
            "chain": tls["client_cert_chain"] if tls else None,
            "serial": _serial(tls["client_cert_chain"]) if tls and tls["client_cert_chain"] else None,
        }
        with self.lock:
            self.requests.append(seen)
        body = json.dumps(seen).encode()
        if scope["type"] == "websocket":  # the same, as the first frame once accepted
            await receive()
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": body.decode()})
            await send({"type": "websocket.close"})
            return
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _serial(chain: list[str]) -> int:
    return x509.load_pem_x509_certificate(chain[0].encode()).serial_number


def counting(protocol: type) -> tuple[type, list[int]]:
    """`protocol` with a count of the TCP connections it accepted."""
    accepted: list[int] = []

    class Counting(protocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            if self.transport is None and getattr(self, "_raw", None) is None:
                accepted.append(1)
            super().connection_made(transport)

    return Counting, accepted


def mtls_server(identity: Identity, app: Any, mode: str = "STRICT") -> tuple[RunningServer, list[int]]:
    protocol, accepted = counting(mtls_protocol(identity.server_context, mode, TD))
    return serve(app, http=protocol), accepted


def get(
    identity: Identity | None, server: RunningServer, service: str = "orders", **kw: Any
) -> httpx.Response:
    """One request on a new connection, over mTLS to `service` (None: no client certificate)."""
    verify = identity.client_context if identity is not None else False
    with httpx.Client(verify=verify) as client:
        return client.get(f"https://{server.address}/x", extensions={"sni_hostname": service}, **kw)


def mesh_rules(tmp_path: Path, service: str, address: str, retries: bool = True) -> Path:
    docs: list[dict[str, Any]] = [
        {"kind": "Endpoints", "service": service, "endpoints": [{"address": address}]}
    ]
    if retries:
        on = ["5xx", "reset", "connect-failure"]
        docs.append({"kind": "Route", "service": service, "routes": [{"retries": {"attempts": 3, "on": on}}]})
    path = tmp_path / f"{service}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki() -> PKI:
    return PKI()


@pytest.fixture(scope="module")
def orders(pki: PKI) -> Identity:
    return pki.identity("orders")


@pytest.fixture(scope="module")
def checkout(pki: PKI) -> Identity:
    return pki.identity("checkout")


@pytest.fixture
def app() -> Seen:
    return Seen()


@pytest.fixture
def strict(orders: Identity, app: Seen) -> Iterator[tuple[RunningServer, list[int]]]:
    server, accepted = mtls_server(orders, app)
    yield server, accepted
    server.stop()


# -- STRICT ---------------------------------------------------------------------------------------


def test_the_app_sees_the_verified_peer(strict: tuple[RunningServer, list[int]], checkout: Identity) -> None:
    server, _ = strict
    r = get(checkout, server, headers={"x-mesh-source": "admin"})
    assert r.status_code == 200
    seen = r.json()
    assert seen["peer"] == "spiffe://mesh.local/svc/checkout"
    assert seen["service"] == "checkout"
    assert seen["source"] == "checkout"  # the certificate wins over the claimed header
    assert seen["tls_version"] == 0x0304
    assert seen["cipher_suite"] in (0x1301, 0x1302, 0x1303)
    assert seen["server_cert"] is None
    assert seen["serial"] == certs.load_pem_chain(checkout.chain_pem)[0].serial_number


def test_plaintext_to_strict_is_refused_with_a_clear_answer(
    strict: tuple[RunningServer, list[int]], app: Seen
) -> None:
    server, _ = strict
    r = httpx.get(f"http://{server.address}/x")
    assert r.status_code == 403
    assert r.headers["x-mesh-error"] == "mtls-required"
    assert "mutual TLS" in r.text
    assert app.requests == []  # never reached the app


def test_a_plaintext_websocket_to_strict_is_refused_before_the_app(
    strict: tuple[RunningServer, list[int]], app: Seen
) -> None:
    """uvicorn makes the WebSocket protocol with the server's app, not the connection's: the
    refusal must hold for an upgrade too."""
    server, _ = strict
    status, _ = handshake(server.url, {"x-mesh-source": "checkout"})
    assert status == 403
    assert app.requests == []


def test_a_websocket_over_mtls_sees_the_verified_peer(
    strict: tuple[RunningServer, list[int]], checkout: Identity, app: Seen
) -> None:
    server, _ = strict
    status, frame = handshake(
        server.url, {"x-mesh-source": "admin"}, tls=checkout.client_context, sni="orders"
    )
    assert status == 101
    seen = json.loads(frame)
    assert seen["peer"] == "spiffe://mesh.local/svc/checkout"
    assert seen["source"] == "checkout"  # the certificate wins over the claimed header
    assert seen["tls_version"] == 0x0304


def test_tls_without_a_client_certificate_is_refused(
    strict: tuple[RunningServer, list[int]], app: Seen
) -> None:
    server, _ = strict
    with pytest.raises(httpx.TransportError) as info:
        get(None, server)
    assert "CERTIFICATE_REQUIRED" in str(info.value)  # the server's alert, not a bare disconnect
    assert refused_by_tls(info.value)
    assert app.requests == []


@pytest.mark.parametrize("kind", ["other CA", "expired"])
def test_a_bad_client_certificate_is_refused_at_the_handshake(
    strict: tuple[RunningServer, list[int]], app: Seen, pki: PKI, kind: str
) -> None:
    server, _ = strict
    if kind == "other CA":
        who = PKI().identity("checkout", bundle=pki.cert)  # trusts the server, is not trusted by it
        alert = "UNKNOWN_CA"
    else:
        who = pki.expired_identity("checkout")
        alert = "CERTIFICATE_EXPIRED"
    with pytest.raises(httpx.ConnectError, match=alert) as info:
        get(who, server)
    assert refused_by_tls(info.value)
    assert app.requests == []


def test_the_client_refuses_a_server_of_another_service(
    strict: tuple[RunningServer, list[int]], app: Seen, checkout: Identity
) -> None:
    server, _ = strict
    with pytest.raises(httpx.ConnectError) as info:
        get(checkout, server, service="payments")
    assert str(info.value) == (
        "server identity mismatch: expected spiffe://mesh.local/svc/payments, "
        "the server presented spiffe://mesh.local/svc/orders"
    )
    assert refused_by_tls(info.value)
    assert app.requests == []  # the request was never sent


def test_the_client_refuses_a_server_it_cannot_verify(app: Seen, checkout: Identity) -> None:
    stranger = PKI().identity("orders")  # the right name, from a CA the client does not trust
    server, _ = mtls_server(stranger, app)
    try:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED") as info:
            get(checkout, server)
        assert refused_by_tls(info.value)
    finally:
        server.stop()


# -- through the mesh -----------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{"http": "h11"}, {"ssl_certfile": "server.pem"}], ids=["http", "ssl"])
def test_serve_refuses_options_that_would_replace_its_mtls(
    orders: Identity, app: Seen, options: dict[str, str]
) -> None:
    """mTLS fails closed: a protocol or TLS option of the caller's would serve plaintext, or
    TLS without the mesh's checks, under a ready line saying STRICT."""
    with meshlib.Mesh("orders", credentials=orders) as mesh:
        assert mesh.mtls == "STRICT"
        with pytest.raises(ValueError, match="serves mTLS itself"):
            mesh.serve(app, port=0, **options)  # type: ignore[arg-type]
        assert mesh.address is None  # nothing was started


def test_mesh_clients_speak_mtls_to_mesh_endpoints(
    strict: tuple[RunningServer, list[int]], checkout: Identity, tmp_path: Path
) -> None:
    server, _ = strict
    with meshlib.Mesh(
        "checkout", config=mesh_rules(tmp_path, "orders", server.address), credentials=checkout
    ) as mesh:
        assert mesh.identity == "spiffe://mesh.local/svc/checkout"
        assert mesh.mtls == "STRICT"
        with mesh.sync_client() as client:
            r = client.get("http://orders/x")
            assert r.status_code == 200
            assert str(r.url) == "http://orders/x"  # the caller's URL; the peer proves mTLS
            assert r.json()["peer"] == mesh.identity
            split = client._transport._inner  # type: ignore[attr-defined]
            assert [type(t).__name__ for t in split.meshes.values()] == ["H1Transport"]  # the default

        async def call() -> httpx.Response:
            async with mesh.client() as client:
                return await client.get("http://orders/x")

        assert asyncio.run(call()).json()["peer"] == mesh.identity


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_server_of_another_service_is_a_clear_failure_that_is_not_retried(
    strict: tuple[RunningServer, list[int]], app: Seen, checkout: Identity, tmp_path: Path, flavour: str
) -> None:
    server, accepted = strict
    rules = mesh_rules(tmp_path, "payments", server.address)  # payments' endpoint is an orders server
    with meshlib.Mesh("checkout", config=rules, credentials=checkout) as mesh:
        with pytest.raises(httpx.ConnectError, match="server identity mismatch") as info:
            if flavour == "sync":
                with mesh.sync_client() as client:
                    client.get("http://payments/x")
            else:

                async def call() -> None:
                    async with mesh.client() as client:
                        await client.get("http://payments/x")

                asyncio.run(call())
        assert mesh.http_wire.failure_kind(info.value) is Failure.REFUSED
    assert len(accepted) == 1  # attempts: 3 with connect-failure retries, yet one connection
    assert app.requests == []


def test_hosts_outside_the_mesh_keep_their_own_tls(checkout: Identity, tmp_path: Path, pki: PKI) -> None:
    """A passthrough https request is not checked against the mesh bundle nor a SPIFFE id."""
    outside = PKI()
    site = outside.identity("site")
    server = serve(Seen(), ssl_context_factory=lambda config, default: site.server_context(False))
    try:
        trust = ssl.create_default_context(cadata=outside.cert.decode())
        trust.check_hostname = False
        with meshlib.Mesh("checkout", credentials=checkout) as mesh, mesh.sync_client(verify=trust) as client:
            r = client.get(f"https://{server.address}/x")
            assert r.status_code == 200
            assert r.json()["peer"] is None
    finally:
        server.stop()


# -- PERMISSIVE -----------------------------------------------------------------------------------


def test_permissive_serves_plaintext_and_mtls_on_one_port(
    orders: Identity, checkout: Identity, app: Seen
) -> None:
    server, _ = mtls_server(orders, app, mode="PERMISSIVE")
    try:
        plain = httpx.get(f"http://{server.address}/x", headers={"x-mesh-source": "checkout"})
        assert plain.status_code == 200
        assert plain.json()["peer"] is None  # no identity without a certificate...
        assert plain.json()["server_cert"] == "absent"  # ...and no TLS extension
        assert plain.json()["source"] == "checkout"  # a plaintext claim stays a claim

        secure = get(checkout, server)
        assert secure.status_code == 200
        assert secure.json()["peer"] == "spiffe://mesh.local/svc/checkout"

        anonymous = get(None, server)  # TLS without a client certificate is allowed too
        assert anonymous.json()["peer"] is None
        assert anonymous.json()["tls_version"] == 0x0304
    finally:
        server.stop()


# -- uvicorn terminating TLS itself ---------------------------------------------------------------


def test_tls_extension_when_uvicorn_terminates_tls(orders: Identity, checkout: Identity, app: Seen) -> None:
    protocol = type("Proto", (TLSH11Protocol,), {"trust_domain": TD})
    server = serve(
        app, http=protocol, ssl_context_factory=lambda config, default: orders.server_context(True)
    )
    try:
        seen = get(checkout, server).json()
        assert seen["peer"] == "spiffe://mesh.local/svc/checkout"
        assert seen["service"] == "checkout"
        assert len(seen["chain"]) >= 1
        assert certs.spiffe_id_of_pem(seen["chain"][0]) == seen["peer"]
    finally:
        server.stop()


# -- changes without a restart --------------------------------------------------------------------


def test_a_renewed_certificate_serves_new_connections_and_old_ones_keep_working(
    pki: PKI, app: Seen, orders: Identity
) -> None:
    server, _ = mtls_server(orders, app)
    me = pki.identity("checkout")
    handed_out = me.client_context  # what an httpx transport holds on to
    first = certs.load_pem_chain(me.chain_pem)[0].serial_number
    try:
        with httpx.Client(verify=handed_out) as kept:
            assert (
                kept.get(f"https://{server.address}/x", extensions={"sni_hostname": "orders"}).json()[
                    "serial"
                ]
                == first
            )
            renewed = pki.identity("checkout")
            me.update(renewed._material.key, renewed.chain_pem)
            second = certs.load_pem_chain(me.chain_pem)[0].serial_number
            # the open connection is reused as it is; a new connection shows the new certificate
            assert (
                kept.get(f"https://{server.address}/x", extensions={"sni_hostname": "orders"}).json()[
                    "serial"
                ]
                == first
            )
            with httpx.Client(verify=handed_out) as fresh:
                got = fresh.get(f"https://{server.address}/x", extensions={"sni_hostname": "orders"}).json()
            assert got["serial"] == second
    finally:
        server.stop()


def test_bundle_changes_apply_to_contexts_already_handed_out(pki: PKI, app: Seen) -> None:
    rotated = PKI()
    server, _ = mtls_server(rotated.identity("orders", bundle=pki.cert + rotated.cert), app)
    me = pki.identity("checkout")
    handed_out = me.client_context  # an httpx transport would hold on to this one
    try:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            _get_with(handed_out, server)
        assert me.update_bundle(pki.cert + rotated.cert)
        assert not me.update_bundle(pki.cert + rotated.cert)  # no change, nothing rebuilt
        assert _get_with(handed_out, server).json()["peer"] == "spiffe://mesh.local/svc/checkout"
        assert me.update_bundle(pki.cert)  # the rotated root removed again
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            _get_with(handed_out, server)
    finally:
        server.stop()


def test_a_server_stops_accepting_a_root_removed_from_its_bundle(pki: PKI, app: Seen) -> None:
    old = PKI()
    orders = pki.identity("orders", bundle=pki.cert + old.cert)
    client = old.identity("checkout", bundle=pki.cert + old.cert)
    server, _ = mtls_server(orders, app)
    try:
        assert get(client, server).status_code == 200
        orders.update_bundle(pki.cert)
        with pytest.raises(httpx.ConnectError, match="UNKNOWN_CA"):
            get(client, server)
    finally:
        server.stop()


def _get_with(ctx: ssl.SSLContext, server: RunningServer) -> httpx.Response:
    with httpx.Client(verify=ctx) as client:
        return client.get(f"https://{server.address}/x", extensions={"sni_hostname": "orders"})


# -- classification -------------------------------------------------------------------------------


def test_only_certificate_failures_count_as_refusals() -> None:
    assert not refused_by_tls(httpx.ConnectError("connection refused"))
    eof = httpx.ReadError("eof")
    eof.__cause__ = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    assert not refused_by_tls(eof)  # may be a crash or a restart: transient
    wrapped = httpx.ConnectError("x")
    wrapped.__cause__ = Exception(ssl.SSLCertVerificationError(1, "certificate verify failed"))
    assert refused_by_tls(wrapped)  # httpcore's shape: the SSL error is the first argument


# -- one pool per destination service -------------------------------------------------------------
# httpcore pools connections by address, and the SPIFFE id is checked once per connection,
# against the service it was opened for: two services at one address (a shared port, an address
# reused after a move) must not share a pool, or a request to payments could ride a connection
# that only ever proved it was orders.


def same_address(tmp_path: Path, address: str) -> Path:
    """`orders` and `payments` both listed at the one address, where only orders serves."""
    docs = [
        {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": address}]},
        {"kind": "Endpoints", "service": "payments", "endpoints": [{"address": address}]},
    ]
    path = tmp_path / "same-address.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_pooled_connection_to_orders_does_not_serve_payments(
    strict: tuple[RunningServer, list[int]], app: Seen, checkout: Identity, tmp_path: Path, flavour: str
) -> None:
    server, accepted = strict
    with meshlib.Mesh(
        "checkout", config=same_address(tmp_path, server.address), credentials=checkout
    ) as mesh:

        async def both() -> tuple[int, BaseException | None]:
            async with mesh.client() as client:
                ok = (await client.get("http://orders/x")).status_code
                try:
                    await client.get("http://payments/x")
                except httpx.ConnectError as exc:
                    return ok, exc
                return ok, None

        if flavour == "async":
            status, error = asyncio.run(both())
        else:
            with mesh.sync_client() as client:
                status = client.get("http://orders/x").status_code
                try:
                    client.get("http://payments/x")
                    error = None
                except httpx.ConnectError as exc:
                    error = exc
        assert status == 200
        assert error is not None and "server identity mismatch" in str(error)
        assert len(app.requests) == 1  # only orders' request reached the server
        assert len(accepted) == 2  # payments opened a connection of its own, and it was refused
