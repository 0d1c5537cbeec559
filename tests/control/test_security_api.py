"""The control service with security on, over real TLS on 127.0.0.1: the CA and join-token
endpoints, the caller checks on watch/ack/registry/telemetry, the bundle on the watch stream
(and rotations pushed), client-certificate renewal, the CLI, and no secret in any log."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from httpx_sse import aconnect_sse

from meshlib.cli import main
from meshlib.control import ControlPlane, ControlSettings, create_app
from meshlib.control.server_tls import uvicorn_tls_options
from meshlib.security import certificates as c
from meshlib.testing import RunningServer, serve
from tests.control import ErrorRecords, wait_for
from tests.control.test_hostile import BAD_BODIES, refused

ORDERS = "spiffe://mesh.local/svc/orders"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def trusting(bundle: bytes | str, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=bundle.decode() if isinstance(bundle, bytes) else bundle)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


class SecureControl:
    """A control service with security on, over TLS from its own CA (or plain HTTP, `tls=False`)."""

    def __init__(
        self, data_dir: Path, *, tls: bool = True, wrap: Callable[[Any], Any] | None = None, **options: Any
    ) -> None:
        self.data_dir = data_dir
        self.app = create_app(ControlSettings(data_dir, security=True, ping=0.2, **options))
        self.plane: ControlPlane = self.app.state.control
        config = uvicorn_tls_options(self.plane) if tls else {}
        self.server: RunningServer = serve(wrap(self.app) if wrap else self.app, lifespan="on", **config)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.port}"
        self.trust = trusting((data_dir / "ca-bundle.crt").read_bytes()) if tls else None
        self.http = httpx.Client(base_url=self.url, verify=self.trust or True, timeout=10.0)
        self.admin_token = (data_dir / "admin.token").read_text().strip()
        self.admin = bearer(self.admin_token)

    def token(self, service: str, ttl: float | None = None) -> str:
        r = self.http.post("/v1/tokens", json={"service": service, "ttl": ttl}, headers=self.admin)
        assert r.status_code == 201, r.text
        return r.json()["token"]

    def sign(
        self,
        service: str,
        token: str | None,
        key: Any = None,
        client: httpx.Client | None = None,
        **extra: Any,
    ) -> httpx.Response:
        key = key or c.generate_key()
        body = {"csr": c.make_csr(key, service).decode(), "service": service, **extra}
        headers = bearer(token) if token else {}
        return (client or self.http).post("/v1/ca/sign", json=body, headers=headers)

    def stop(self) -> None:
        self.http.close()
        self.server.stop()


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureControl]:
    s = SecureControl(tmp_path / "data")
    yield s
    s.stop()


@pytest.fixture
def errors() -> Iterator[list[logging.LogRecord]]:
    handler = ErrorRecords()
    loggers = [logging.getLogger(n) for n in ("meshlib", "uvicorn.error", "uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.records
    for logger in loggers:
        logger.removeHandler(handler)


def chain_verifies(chain_pem: str | bytes, bundle_pem: str | bytes) -> list[str]:
    """The leaf's URI SANs once its chain is verified against the bundle (raises otherwise)."""
    chain = c.load_pem_chain(chain_pem)
    verifier = PolicyBuilder().store(Store(c.load_pem_chain(bundle_pem))).build_client_verifier()
    result = verifier.verify(chain[0], chain[1:])
    return [s.value for s in result.subjects if isinstance(s, x509.UniformResourceIdentifier)]


# --------------------------------------------------------------------------------------------
# Signing


def test_sign_with_a_join_token(secure: SecureControl) -> None:
    token = secure.token("orders")
    key = c.generate_key()
    r = secure.sign("orders", token, key, lifetime=600)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"certificate", "bundle", "spiffe_id", "expires"}
    assert body["spiffe_id"] == ORDERS == c.spiffe_id_of_pem(body["certificate"])
    assert chain_verifies(body["certificate"], body["bundle"]) == [ORDERS]
    leaf = c.load_pem_chain(body["certificate"])[0]
    assert leaf.public_key() == key.public_key()
    assert body["expires"] == int(leaf.not_valid_after_utc.timestamp())
    assert time.time() + 590 < body["expires"] <= time.time() + 601
    assert body["bundle"] == secure.http.get("/v1/ca/bundle").json()["bundle"]
    assert body["bundle"] == (secure.data_dir / "ca-bundle.crt").read_text()
    # default lifetime: 24 h; asking for more than the cap gets the cap (30 days)
    default = secure.sign("orders", token).json()["expires"]
    assert time.time() + 86_000 < default <= time.time() + 86_401
    capped = secure.sign("orders", token, lifetime=10**8).json()["expires"]
    assert capped <= time.time() + 30 * 86400 + 1


def test_sign_refusals(secure: SecureControl) -> None:
    orders = secure.token("orders")
    r = secure.sign("payments", orders)
    assert refused(r, 403) and "orders" in r.json()["error"]
    r = secure.sign("orders", None)
    assert refused(r, 401) and r.headers["www-authenticate"].startswith("Bearer")
    for header in (
        bearer("mjt_" + "x" * 43),
        bearer(orders + "x"),
        {"Authorization": f"Basic {orders}"},
        {"Authorization": orders},
        bearer(secure.admin_token),  # the admin token is not a join token
    ):
        key = c.generate_key()
        body = {"csr": c.make_csr(key, "orders").decode(), "service": "orders"}
        refused(secure.http.post("/v1/ca/sign", json=body, headers=header), 401)
    # a revoked token no longer works
    (info,) = secure.http.get("/v1/tokens", headers=secure.admin).json()
    assert secure.http.delete(f"/v1/tokens/{info['id']}", headers=secure.admin).status_code == 204
    refused(secure.sign("orders", orders), 401)


def _tampered_csr() -> str:
    key = c.generate_key()
    csr = x509.load_pem_x509_csr(c.make_csr(key, "orders"))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


def test_sign_bad_csrs_and_bodies_are_4xx(secure: SecureControl, errors: list) -> None:
    token = secure.token("orders")
    good = c.make_csr(c.generate_key(), "orders").decode()
    root = secure.plane.ca.bundle.decode()  # type: ignore[union-attr]
    bodies_422 = [
        {"csr": "junk", "service": "orders"},
        {"csr": _tampered_csr(), "service": "orders"},
        {"csr": root, "service": "orders"},  # a certificate, not a CSR
        {
            "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "service": "orders",
        },
        {"csr": good.replace("A", "B", 5), "service": "orders"},
        {"csr": "\x00" * 100, "service": "orders"},
        {"csr": "x" * 70_000, "service": "orders"},
        {"csr": good, "service": "BAD NAME"},
        {"csr": good, "service": ""},
        {"csr": good, "service": None},
        {"csr": good, "service": ["orders"]},
        {"csr": good},
        {"service": "orders"},
        {"csr": 5, "service": "orders"},
        {"csr": good, "service": "orders", "lifetime": 0},
        {"csr": good, "service": "orders", "lifetime": 0.5},
        {"csr": good, "service": "orders", "lifetime": -1},
        {"csr": good, "service": "orders", "lifetime": "60"},
        {"csr": good, "service": "orders", "lifetime": True},
        {"csr": good, "service": "orders", "lifetime": 1e308},
        {"csr": good, "service": "orders", "extra": 1},
        {},
        [],
        "csr",
    ]
    for body in bodies_422:
        r = secure.http.post("/v1/ca/sign", json=body, headers=bearer(token))
        assert refused(r, 422), body
    problems = secure.http.post("/v1/ca/sign", json=bodies_422[1], headers=bearer(token)).json()["problems"]
    assert problems[0]["field"] == "csr" and "signature" in problems[0]["reason"]
    for name, raw, content_type in BAD_BODIES:
        r = secure.http.post(
            "/v1/ca/sign", content=raw, headers={**bearer(token), "content-type": content_type}
        )
        assert refused(r), name
        # without a token, nothing is read: 401 whatever the body
        r = secure.http.post("/v1/ca/sign", content=raw, headers={"content-type": content_type})
        assert refused(r, 401), name
    refused(secure.http.post("/v1/ca/sign", content=b"x" * (2 << 20), headers=bearer(token)), 413)
    refused(secure.http.get("/v1/ca/sign"), 405)
    assert errors == []
    assert secure.http.get("/healthz").status_code == 200


# --------------------------------------------------------------------------------------------
# Admin endpoints


def test_admin_endpoints_need_the_admin_token(secure: SecureControl, errors: list) -> None:
    join = secure.token("orders")
    (info,) = secure.http.get("/v1/tokens", headers=secure.admin).json()
    calls = [
        ("POST", "/v1/tokens", {"service": "orders"}),
        ("GET", "/v1/tokens", None),
        ("DELETE", f"/v1/tokens/{info['id']}", None),
        ("POST", "/v1/ca/rotate", {"overlap": 60}),
    ]
    for method, path, body in calls:
        for headers in ({}, bearer("wrong"), bearer(join), {"Authorization": secure.admin_token}):
            refused(secure.http.request(method, path, json=body, headers=headers), 401)
    assert len(secure.plane.tokens) == 1 and secure.plane.ca.generation == 0  # type: ignore[union-attr,arg-type]
    assert errors == []


def test_token_endpoints(secure: SecureControl) -> None:
    r = secure.http.post("/v1/tokens", json={"service": "orders", "ttl": 3600}, headers=secure.admin)
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    created = r.json()
    assert set(created) == {"token", "id", "service", "created", "expires"}
    assert created["expires"] == pytest.approx(created["created"] + 3600)
    forever = secure.http.post("/v1/tokens", json={"service": "payments"}, headers=secure.admin).json()
    assert forever["expires"] is None
    r = secure.http.get("/v1/tokens", headers=secure.admin)
    listed = r.json()
    assert [t["service"] for t in listed] == ["orders", "payments"]
    assert all(set(t) == {"id", "service", "created", "expires"} for t in listed)
    assert created["token"] not in r.text and forever["token"] not in r.text
    for bad in (
        {"service": "BAD"},
        {"service": "orders", "ttl": 0},
        {"service": "orders", "ttl": "1h"},
        {"service": "orders", "ttl": -5},
        {"service": "orders", "extra": 1},
        {},
        ["orders"],
    ):
        refused(secure.http.post("/v1/tokens", json=bad, headers=secure.admin), 422)
    assert secure.http.delete(f"/v1/tokens/{created['id']}", headers=secure.admin).status_code == 204
    refused(secure.http.delete(f"/v1/tokens/{created['id']}", headers=secure.admin), 404)
    for bad_id in ("x", "0" * 15, "G" * 16, "%00", created["token"]):
        refused(secure.http.delete(f"/v1/tokens/{bad_id}", headers=secure.admin), 400)
    assert [t["service"] for t in secure.http.get("/v1/tokens", headers=secure.admin).json()] == ["payments"]
    refused(secure.sign("orders", created["token"]), 401)


def test_security_off_is_as_before(tmp_path: Path) -> None:
    app = create_app(ControlSettings(tmp_path, ping=0.2))
    plane: ControlPlane = app.state.control
    assert plane.ca is None and plane.tokens is None
    server = serve(app, lifespan="on")
    admin = bearer((tmp_path / "admin.token").read_text().strip())
    try:
        with httpx.Client(base_url=server.url, timeout=10.0) as http:
            csr = c.make_csr(c.generate_key(), "orders").decode()
            refused(http.post("/v1/ca/sign", json={"csr": csr, "service": "orders"}), 404)
            refused(http.get("/v1/ca/bundle"), 404)
            refused(http.post("/v1/ca/rotate", headers=admin), 404)
            refused(http.post("/v1/tokens", json={"service": "orders"}, headers=admin), 404)
            refused(http.get("/v1/tokens", headers=admin), 404)
            assert http.post("/v1/registry/orders", json={"address": "127.0.0.1:1"}).status_code == 201
            assert http.post("/v1/ack", json={"client": "c"}).status_code == 204
        assert "bundle" not in json.loads(plane.snapshot_event().wire.decode().split("data: ", 1)[1])
        assert not (tmp_path / "ca.key").exists() and not (tmp_path / "tokens.json").exists()
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# watch, ack, registry, telemetry


def test_mesh_endpoints_need_a_token_when_secure(secure: SecureControl, errors: list) -> None:
    http = secure.http
    registered = http.post("/v1/registry/orders", json={"address": "127.0.0.1:8001"}, headers=secure.admin)
    assert registered.status_code == 201  # the operator may register for any service
    instance = registered.json()["id"]

    def calls(service: str) -> list[tuple[str, str, Any]]:
        return [
            ("POST", f"/v1/registry/{service}", {"address": "127.0.0.1:8002"}),
            ("PUT", f"/v1/registry/{service}/{instance}", {"ttl": 20}),
            ("POST", "/v1/ack", {"client": "c1", "service": service, "revision": 0, "version": 0}),
            ("POST", "/v1/telemetry", {"client": "c1", "service": service}),
            ("DELETE", f"/v1/registry/{service}/{instance}", None),
        ]

    def watch(headers: dict[str, str], service: str = "orders") -> int:
        with http.stream(
            "GET", "/v1/watch", params={"client": "w", "service": service}, headers=headers
        ) as r:
            if r.status_code == 200:
                assert next(r.iter_lines()).startswith("id: ")
            return r.status_code

    payments = secure.token("payments")
    orders = secure.token("orders")
    for headers in ({}, bearer("mjt_nope"), {"Authorization": "Basic x"}):
        for method, path, body in calls("orders"):
            refused(http.request(method, path, json=body, headers=headers), 401)
        assert watch(headers) == 401
    for method, path, body in calls("orders"):
        refused(http.request(method, path, json=body, headers=bearer(payments)), 403)
    assert watch(bearer(payments)) == 403
    assert len(secure.plane.registry) == 1 and secure.plane.hub.clients() == []
    # with the service's own token, every call goes through
    answers = [http.request(m, p, json=b, headers=bearer(orders)).status_code for m, p, b in calls("orders")]
    assert answers == [201, 200, 204, 204, 204]
    assert watch(bearer(orders)) == 200
    assert watch(bearer(orders), service="") == 400  # still validated
    with http.stream("GET", "/v1/watch", params={"client": "w2"}, headers=bearer(orders)) as r:
        assert r.status_code == 200  # no service named: the token's
        assert next(r.iter_lines()).startswith("id: ")  # the stream is open: the hub knows w2
    assert {c["client"]: c["service"] for c in secure.plane.hub.clients()} == {
        "c1": "orders",
        "w": "orders",
        "w2": "orders",
    }
    # reading the registry stays public
    assert http.get("/v1/registry/orders").status_code == 200
    assert errors == []


# --------------------------------------------------------------------------------------------
# The bundle on the watch stream


async def test_the_bundle_is_on_the_watch_stream_and_rotations_are_pushed(secure: SecureControl) -> None:
    token = secure.token("orders")
    ca = secure.plane.ca
    assert ca is not None
    old_bundle = ca.bundle.decode()
    events: list[tuple[str, dict[str, Any]]] = []

    async def read() -> None:
        async with (
            httpx.AsyncClient(verify=secure.trust, timeout=httpx.Timeout(10.0, read=None)) as http,
            aconnect_sse(
                http,
                "GET",
                f"{secure.url}/v1/watch",
                params={"client": "w", "service": "orders"},
                headers=bearer(token),
            ) as source,
        ):
            assert source.response.status_code == 200
            async for sse in source.aiter_sse():
                events.append((sse.event, json.loads(sse.data)))

    task = asyncio.create_task(read())
    try:
        snapshot = await wait_for(lambda: [d for k, d in events if k == "snapshot"], what="the snapshot")
        assert snapshot[0]["bundle"] == old_bundle
        assert {"epoch", "revision", "version", "documents", "endpoints"} <= set(snapshot[0])
        async with httpx.AsyncClient(base_url=secure.url, verify=secure.trust, timeout=10.0) as admin:
            r = await admin.post("/v1/ca/rotate", json={"overlap": 1.5}, headers=secure.admin)
            assert r.status_code == 200, r.text
        new_root = (secure.data_dir / "ca.crt").read_text()
        pushed = await wait_for(lambda: [d for k, d in events if k == "bundle"], what="a bundle event")
        assert pushed[0]["bundle"] == new_root + old_bundle == r.json()["bundle"]
        assert pushed[0]["revision"] == snapshot[0]["revision"] + 1
        # when the overlap ends, the old root leaves the bundle and that is pushed too
        ended = await wait_for(
            lambda: [d for k, d in events if k == "bundle" and d["bundle"] == new_root],
            what="the overlap's end",
        )
        assert ended[0]["revision"] == pushed[0]["revision"] + 1
        assert (secure.data_dir / "ca-bundle.crt").read_text() == new_root
        assert (
            json.loads(secure.plane.snapshot_event().wire.decode().split("data: ", 1)[1])["bundle"]
            == new_root
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_an_operator_ca_cannot_be_rotated_through_the_api(tmp_path: Path) -> None:
    root_pem, root_key = c.create_ca("corp")
    (tmp_path / "root.crt").write_bytes(root_pem)
    (tmp_path / "root.key").write_bytes(root_key)
    s = SecureControl(tmp_path / "data", ca_cert=tmp_path / "root.crt", ca_key=tmp_path / "root.key")
    try:
        assert s.http.get("/v1/ca/bundle").json()["bundle"] == root_pem.decode()
        refused(s.http.post("/v1/ca/rotate", headers=s.admin), 409)
        body = s.sign("orders", s.token("orders")).json()
        assert chain_verifies(body["certificate"], root_pem) == [ORDERS]
    finally:
        s.stop()


# --------------------------------------------------------------------------------------------
# TLS


def _server_identity(port: int, ctx: ssl.SSLContext) -> tuple[str | None, x509.Certificate]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return c.spiffe_id_of_der(der), x509.load_der_x509_certificate(der)


def test_tls_verifies_against_the_bundle_and_follows_rotations(secure: SecureControl) -> None:
    port = secure.server.port
    assert httpx.get(f"{secure.url}/healthz", verify=secure.trust).status_code == 200
    assert httpx.get(f"https://localhost:{port}/healthz", verify=secure.trust).status_code == 200
    spiffe, cert = _server_identity(port, secure.trust)  # type: ignore[arg-type]
    assert spiffe == "spiffe://mesh.local/control"
    other, _ = c.create_ca("mesh.local")
    for ctx in (trusting(other), ssl.create_default_context()):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{secure.url}/healthz", verify=ctx)
    # after a rotation, new connections get a certificate of the new root, without a restart
    assert secure.http.post("/v1/ca/rotate", json={"overlap": 0}, headers=secure.admin).status_code == 200
    new_root = (secure.data_dir / "ca.crt").read_bytes()
    spiffe, renewed = _server_identity(port, trusting(new_root))
    assert spiffe == "spiffe://mesh.local/control" and renewed.serial_number != cert.serial_number
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{secure.url}/healthz", verify=secure.trust)  # trusts only the old root


def _write_credentials(tmp_path: Path, name: str, chain: str | bytes, key: Any) -> tuple[Path, Path]:
    cert_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_file.write_bytes(chain.encode() if isinstance(chain, str) else chain)
    key_file.write_bytes(c.key_pem(key))
    key_file.chmod(0o600)
    return cert_file, key_file


def test_renewal_with_the_token_and_the_current_certificate(secure: SecureControl, tmp_path: Path) -> None:
    key = c.generate_key()
    token = secure.token("orders")
    body = secure.sign("orders", token, key, lifetime=3600).json()
    creds = _write_credentials(tmp_path, "orders", body["certificate"], key)
    with httpx.Client(base_url=secure.url, verify=trusting(body["bundle"], creds), timeout=10.0) as mtls:
        refused(secure.sign("orders", None, client=mtls), 401)  # a certificate alone cannot renew itself
        renewed = secure.sign("orders", token, client=mtls)  # the token, and the certificate as well
        assert renewed.status_code == 200, renewed.text
        assert c.spiffe_id_of_pem(renewed.json()["certificate"]) == ORDERS
        refused(secure.sign("payments", secure.token("payments"), client=mtls), 403)
        r = mtls.post("/v1/registry/orders", json={"address": "127.0.0.1:8003"})
        assert r.status_code == 201
        refused(mtls.post("/v1/registry/payments", json={"address": "127.0.0.1:8003"}), 403)
    # a certificate of another CA is refused in the handshake
    other_pem, other_key = c.create_ca("mesh.local")
    stranger_key = c.generate_key()
    stranger = c.issue(
        other_pem,
        other_key,
        c.make_csr(stranger_key, "orders"),
        spiffe_id=ORDERS,
        lifetime=timedelta(hours=1),
    )
    creds = _write_credentials(tmp_path, "stranger", stranger, stranger_key)
    with (
        httpx.Client(base_url=secure.url, verify=trusting(body["bundle"], creds), timeout=10.0) as http,
        pytest.raises(httpx.TransportError),
    ):
        secure.sign("orders", None, client=http)


# Certificate checks in the handler, whatever the TLS layer let through: a shim puts a chain
# chosen by the test into the ASGI TLS extension of requests on a plain HTTP port.

_CHAINS: dict[str, list[Any]] = {}


def _inject(app: Any) -> Any:
    async def shim(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            name = dict(scope["headers"]).get(b"x-test-chain", b"").decode()
            if name:
                scope["extensions"] = {
                    **(scope.get("extensions") or {}),
                    "tls": {"client_cert_chain": _CHAINS[name]},
                }
        await app(scope, receive, send)

    return shim


def _expired_leaf(ca_pem: bytes, ca_key_pem: bytes) -> str:
    ca = c.load_pem_chain(ca_pem)[0]
    key = c.generate_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orders")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=2))
        .not_valid_after(now - timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ORDERS)]), critical=False)
        .sign(c.load_key_pem(ca_key_pem), hashes.SHA256())  # type: ignore[arg-type]
    )
    return c.cert_pem(cert).decode()


def test_certificate_checks_in_the_handler(tmp_path: Path, errors: list) -> None:
    s = SecureControl(tmp_path / "data", tls=False, wrap=_inject)
    try:
        ca = s.plane.ca
        assert ca is not None
        ca_key = (tmp_path / "data" / "ca.key").read_bytes()
        other_pem, other_key = c.create_ca("mesh.local")
        sid = ORDERS

        def leaf(issuer: bytes, issuer_key: bytes, spiffe: str = sid) -> str:
            return c.issue(
                issuer,
                issuer_key,
                c.make_csr(c.generate_key(), "x"),
                spiffe_id=spiffe,
                lifetime=timedelta(hours=1),
            ).decode()

        _CHAINS.update(
            good=[leaf(ca.bundle, ca_key)],
            stranger=[leaf(other_pem, other_key)],
            stranger_with_its_root=[leaf(other_pem, other_key), other_pem.decode()],
            expired=[_expired_leaf(ca.bundle, ca_key)],
            control=[ca.server_credentials().cert_pem.decode()],
            other_domain=[leaf(ca.bundle, ca_key, "spiffe://elsewhere/svc/orders")],
            junk=["junk", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"],
            not_strings=[5, None],  # type: ignore[list-item]
            empty=[],
        )

        tokens = {service: s.token(service) for service in ("orders", "payments")}

        def sign(chain: str, service: str = "orders", token: bool = True) -> int:
            key = c.generate_key()
            body = {"csr": c.make_csr(key, service).decode(), "service": service}
            headers = {"x-test-chain": chain, **(bearer(tokens[service]) if token else {})}
            return s.http.post("/v1/ca/sign", json=body, headers=headers).status_code

        assert sign("good") == 200
        assert sign("good", token=False) == 401  # a certificate alone never signs
        assert sign("good", "payments") == 403
        for name in (
            "stranger",
            "stranger_with_its_root",
            "expired",
            "control",
            "other_domain",
            "junk",
        ):
            assert sign(name) == 401, name  # presented and failed: never ignored, even with a token
        for name in ("not_strings", "empty"):
            assert sign(name) == 200, name  # no certificate at all: the token alone
            assert sign(name, token=False) == 401, name
        # a certificate issued before a rotation works during the overlap only
        assert s.http.post("/v1/ca/rotate", json={"overlap": 3600}, headers=s.admin).status_code == 200
        assert sign("good") == 200
        assert s.http.post("/v1/ca/rotate", json={"overlap": 0}, headers=s.admin).status_code == 200
        assert sign("good") == 401
        assert errors == []
    finally:
        _CHAINS.clear()
        s.stop()


# --------------------------------------------------------------------------------------------
# The CLI


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_token_and_ca_commands(
    secure: SecureControl, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = ["--control", secure.url, "--data", str(secure.data_dir)]
    code, out, err = run(capsys, "token", "create", "--service", "orders", "--ttl", "1h", *where)
    assert code == 0, err
    token = out.strip()
    assert out == token + "\n" and token.startswith("mjt_")  # stdout: the token alone
    assert token not in err and "orders" in err
    assert secure.sign("orders", token).status_code == 200
    code, out, err = run(capsys, "token", "list", *where)
    assert code == 0 and "orders" in out and token not in out + err
    (listed,) = secure.http.get("/v1/tokens", headers=secure.admin).json()
    assert listed["expires"] == pytest.approx(listed["created"] + 3600)
    code, out, _ = run(capsys, "ca", "bundle", *where)
    assert code == 0 and out == secure.plane.ca.bundle.decode()  # type: ignore[union-attr]
    code, _, err = run(capsys, "ca", "rotate", "--overlap", "30m", *where)
    assert code == 0, err
    assert secure.plane.ca.generation == 1 and secure.plane.ca.next_change() == pytest.approx(
        time.time() + 1800, abs=5
    )  # type: ignore[union-attr]
    code, _, err = run(capsys, "token", "revoke", listed["id"], *where)
    assert code == 0 and secure.sign("orders", token).status_code == 401
    # --ca / $MESH_CA, and a clear error when the service cannot be verified
    other, _ = c.create_ca("mesh.local")
    (tmp_path / "other.crt").write_bytes(other)
    code, _, err = run(capsys, "token", "list", *where, "--ca", str(tmp_path / "other.crt"))
    assert code == 1 and "cannot reach the control service" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run(capsys, "token", "list", *where, "--ca", str(secure.data_dir / "ca-bundle.crt"))
    assert code == 0
    code, _, err = run(
        capsys,
        "token",
        "list",
        "--control",
        secure.url,
        "--data",
        str(tmp_path / "nowhere"),
        "--token",
        secure.admin_token,
    )
    assert code == 1 and "CA bundle" in err
    code, _, err = run(capsys, "token", "create", "--service", "orders", "--ttl", "soon", *where)
    assert code == 2
    code, _, err = run(capsys, "control", "--ca-cert", "x.crt", "--data", str(tmp_path / "d"))
    assert code == 1 and "--secure" in err


# --------------------------------------------------------------------------------------------
# Secrets stay out of logs


async def _watch_once(secure: SecureControl, token: str) -> None:
    async with (
        httpx.AsyncClient(verify=secure.trust, timeout=10.0) as http,
        aconnect_sse(
            http, "GET", f"{secure.url}/v1/watch", params={"client": "w"}, headers=bearer(token)
        ) as source,
    ):
        async for sse in source.aiter_sse():
            assert sse.event == "snapshot"
            return


def test_no_token_or_key_in_any_log_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG, logger="meshlib")
    s = SecureControl(tmp_path / "data")
    secrets_seen: list[str] = [s.admin_token]
    try:
        orders = s.token("orders")
        secrets_seen.append(orders)
        where = ["--control", s.url, "--data", str(s.data_dir)]
        code, out, _ = run(capsys, "token", "create", "--service", "payments", *where)
        assert code == 0
        secrets_seen.append(out.strip())
        key = c.generate_key()
        secrets_seen.append(c.key_pem(key).decode())
        body = s.sign("orders", orders, key).json()
        refused(s.sign("payments", orders), 403)
        refused(s.sign("orders", orders + "x"), 401)
        refused(s.http.get("/v1/tokens", headers=bearer(orders)), 401)
        creds = _write_credentials(tmp_path, "orders", body["certificate"], key)
        with httpx.Client(base_url=s.url, verify=trusting(body["bundle"], creds), timeout=10.0) as mtls:
            assert s.sign("orders", orders, client=mtls).status_code == 200
        assert (
            s.http.post(
                "/v1/registry/orders", json={"address": "127.0.0.1:9"}, headers=bearer(orders)
            ).status_code
            == 201
        )
        asyncio.run(_watch_once(s, orders))
        assert s.http.post("/v1/ca/rotate", json={"overlap": 60}, headers=s.admin).status_code == 200
        assert s.sign("orders", orders).status_code == 200
        (first, *_) = s.http.get("/v1/tokens", headers=s.admin).json()
        assert s.http.delete(f"/v1/tokens/{first['id']}", headers=s.admin).status_code == 204
    finally:
        s.stop()
    for name in ("ca.key", "control.key"):
        secrets_seen.append((tmp_path / "data" / name).read_text())
    key_bodies = [
        line
        for secret in secrets_seen
        for line in secret.splitlines()
        if len(line) > 20 and "PRIVATE" not in line
    ]
    messages = []
    for record in caplog.records:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        messages.append(text)
    assert any("join token" in m for m in messages)  # the log was captured, at DEBUG and up
    assert any("signed a certificate" in m for m in messages)
    for text in messages:
        assert "PRIVATE KEY" not in text
        for secret in [*secrets_seen, *key_bodies]:
            assert secret.strip() not in text
        assert "mjt_" not in text
