"""Renewal against the real control service over https on 127.0.0.1: with the join token alone
once the certificate is expired or no longer trusted, backing off once it is of no use, and the
join token required for every signing, so that revoking it (or its expiry) ends the chain."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.control.app import ControlSettings, create_app
from meshlib.control.server_tls import uvicorn_tls_options
from meshlib.security import certificates as certs
from meshlib.security import tls
from meshlib.security.identity import RETRY_CAP, Enrollment, Identity, read_anchors
from meshlib.testing import RunningServer, serve
from tests.conftest import wait_until
from tests.security.test_tls import Seen


class Control:
    """The control service with security on, served over TLS from its CA; `stop` then `start`
    bring it back on the same port with the same data dir (CA, tokens)."""

    def __init__(
        self, data: Path, *, lifetime: float = 3600.0, tls_on: bool = True, wrap: Any = None
    ) -> None:
        self.data = data
        self.lifetime = lifetime
        self.tls_on = tls_on
        self.wrap = wrap
        self.port = 0
        self.server: RunningServer | None = None
        self.start()
        self.admin = {"authorization": f"Bearer {(data / 'admin.token').read_text().strip()}"}

    def start(self) -> None:
        self.app = create_app(ControlSettings(self.data, security=True, ping=0.5))
        self.plane = self.app.state.control
        self.plane.ca.default_lifetime = dt.timedelta(seconds=self.lifetime)
        options = uvicorn_tls_options(self.plane) if self.tls_on else {}
        app = self.wrap(self.app) if self.wrap else self.app
        self.server = serve(app, lifespan="on", port=self.port, **options)
        self.port = self.server.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_on else 'http'}://127.0.0.1:{self.port}"

    @property
    def bundle_file(self) -> Path:
        return self.data / "ca-bundle.crt"

    def client(self, chain: bytes | None = None, key: Any = None) -> httpx.Client:
        """A client of the control service, presenting `chain` (and its key) when given."""
        verify: Any = True
        if self.tls_on:
            bundle = self.plane.ca.bundle
            verify = (
                tls.control_context(bundle, chain, certs.key_pem(key))
                if chain
                else tls.control_context(bundle)
            )
        return httpx.Client(base_url=self.url, verify=verify, timeout=10.0)

    def token(self, service: str, ttl: float | None = 600) -> tuple[str, str]:
        """A new join token and its id."""
        with self.client() as http:
            r = http.post("/v1/tokens", json={"service": service, "ttl": ttl}, headers=self.admin)
        assert r.status_code == 201, r.text
        return r.json()["token"], r.json()["id"]

    def revoke(self, token_id: str) -> None:
        with self.client() as http:
            assert http.delete(f"/v1/tokens/{token_id}", headers=self.admin).status_code == 204

    def rotate(self, overlap: float) -> None:
        with self.client() as http:
            r = http.post("/v1/ca/rotate", json={"overlap": overlap}, headers=self.admin)
        assert r.status_code == 200, r.text

    def mesh(self, service: str, cache: Path, token: str | None = None) -> meshlib.Mesh:
        token = token or self.token(service)[0]
        return meshlib.Mesh(service, control=self.url, token=token, ca=self.bundle_file, cache_dir=cache)


def sign(
    http: httpx.Client, service: str, token: str | None, key: Any = None, **extra: Any
) -> httpx.Response:
    key = key or certs.generate_key()
    body = {"csr": certs.make_csr(key, service).decode(), "service": service, **extra}
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return http.post("/v1/ca/sign", json=body, headers=headers)


def leaf(chain_pem: bytes | str) -> Any:
    return certs.load_pem_chain(chain_pem)[0]


def issued_by(chain_pem: bytes, root_pem: bytes) -> bool:
    try:
        leaf(chain_pem).verify_directly_issued_by(certs.load_pem_chain(root_pem)[0])
    except Exception:
        return False
    return True


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    c = Control(tmp_path / "control")
    yield c
    c.stop()


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Every record of the meshlib.security logger, DEBUG and up."""
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger = logging.getLogger("meshlib.security")
    handler, level = Keep(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield seen
    logger.removeHandler(handler)
    logger.setLevel(level)


def renewal_failures(records: list[logging.LogRecord], service: str = "orders") -> list[logging.LogRecord]:
    return [r for r in records if f"renewing the certificate of {service} failed" in r.getMessage()]


# -- 1. renewal with the join token alone ------------------------------------------------------


def test_a_certificate_that_expired_while_the_control_service_was_down_is_renewed(tmp_path: Path) -> None:
    control = Control(tmp_path / "control", lifetime=2.0)
    orders = control.mesh("orders", tmp_path / "cache")
    try:
        assert orders.credentials is not None and orders.enrollment is not None
        control.stop()
        wait_until(lambda: time.time() > orders.credentials.not_after + 0.2, what="the certificate to expire")  # type: ignore[union-attr]
        # the expired certificate is no longer shown to the control service, by the renewal or
        # by the watch link (which shares the context): they show the join token alone
        wait_until(lambda: not orders.credentials.presents_to_control, what="the certificate withdrawn")  # type: ignore[union-attr]
        renewals = orders.enrollment.renewals
        control.start()
        wait_until(
            lambda: orders.enrollment.renewals > renewals and orders.credentials.usable(),  # type: ignore[union-attr]
            timeout=15,
            what="a renewal once the control service is back",
        )
        assert orders.credentials.presents_to_control
        # the watch link is back too: an endpoint registered now reaches the process
        with control.client() as http:
            r = http.post("/v1/registry/payments", json={"address": "127.0.0.1:9"}, headers=control.admin)
            assert r.status_code == 201, r.text
        wait_until(lambda: "payments" in orders.snapshot.plans, timeout=15, what="the watch to reconnect")
    finally:
        orders.close()
        control.stop()


def test_a_rotation_without_overlap_renews_every_process_at_once_with_its_join_token(tmp_path: Path) -> None:
    control = Control(tmp_path / "control", lifetime=3600.0)  # no renewal on schedule during the test
    orders = control.mesh("orders", tmp_path / "cache")
    app = Seen()
    server = serve(app, **orders.uvicorn_options())
    checkout = control.mesh("checkout", tmp_path / "cache")
    try:
        orders.register(server.address)
        wait_until(lambda: "orders" in checkout.snapshot.plans, what="checkout to learn orders' endpoint")
        with checkout.sync_client() as http:
            assert http.get("http://orders/before").status_code == 200
        control.rotate(overlap=0)
        new_root = control.plane.ca.root_pem
        meshes = (orders, checkout)
        wait_until(
            lambda: all(issued_by(m.credentials.chain_pem, new_root) for m in meshes),  # type: ignore[union-attr]
            timeout=15,
            what="certificates of the new root",
        )
        assert all(m.credentials.usable() and m.credentials.presents_to_control for m in meshes)  # type: ignore[union-attr]
        with checkout.sync_client() as http:  # mTLS on the new root, both ways
            r = http.get("http://orders/after", headers={"connection": "close"})
        assert r.status_code == 200 and app.requests[-1]["source"] == "checkout"
    finally:
        checkout.close()
        orders.close()
        server.stop()
        control.stop()


def test_a_certificate_the_control_service_refuses_is_left_out_of_a_second_try(
    control: Control, records: list[logging.LogRecord]
) -> None:
    """A process that trusts the new root (its anchors) but was not told that its certificate's
    root is gone: the handshake refuses the certificate, the token alone gets a new one."""
    token, _ = control.token("orders")
    old_root = control.plane.ca.root_pem
    enrollment = Enrollment(control.url, "orders", token, anchors=old_root)

    async def run() -> Identity:
        identity = await enrollment.obtain(time.monotonic() + 10)
        control.rotate(overlap=0)
        identity.update_bundle(old_root + control.plane.ca.root_pem)  # still trusts its own root
        assert identity.usable() and identity.presents_to_control
        identity.update(*await enrollment.request(identity))
        return identity

    identity = asyncio.run(run())
    assert issued_by(identity.chain_pem, control.plane.ca.root_pem) and identity.usable()
    assert identity.bundle_pem == control.plane.ca.bundle
    assert any("refused the certificate of orders" in r.getMessage() for r in records)


# -- 2. backing off once the certificate is of no use -----------------------------------------


class Schedule:
    """An injected clock and sleep for `Enrollment`: each sleep is recorded and moves the clock
    on; after `stop_after` sleeps the renewal loop is cancelled."""

    def __init__(self, start: float, stop_after: int) -> None:
        self.now = start
        self.pauses: list[float] = []
        self.stop_after = stop_after
        self.task: asyncio.Task[None] | None = None

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds
        if len(self.pauses) >= self.stop_after and self.task is not None:
            self.task.cancel()
        await asyncio.sleep(0)


def test_an_expired_certificate_is_retried_with_exponential_backoff_and_two_warnings(
    control: Control, records: list[logging.LogRecord]
) -> None:
    token, _ = control.token("orders")
    anchors = read_anchors(control.bundle_file)
    schedule = Schedule(time.time(), stop_after=100)
    enrollment = Enrollment(
        control.url, "orders", token, anchors=anchors, clock=schedule.clock, sleep=schedule.sleep
    )

    async def run() -> None:
        identity = await enrollment.obtain(time.monotonic() + 10)
        control.stop()  # every attempt from now on fails at once (connection refused)
        schedule.now = identity.not_after - 100  # 100 s of validity left, then none
        schedule.task = asyncio.current_task()
        with pytest.raises(asyncio.CancelledError):
            await enrollment.renew_forever(identity)

    asyncio.run(run())
    pauses = schedule.pauses
    assert len(pauses) == 100
    assert 45 <= pauses[0] <= 55  # on schedule: half of the 100 s left
    # retries while valid: at most a quarter of what is left, so that a few fit before the end
    expired_at = next(i for i in range(len(pauses)) if sum(pauses[: i + 1]) >= 100)
    for i in range(1, expired_at + 1):
        assert pauses[i] <= max(0.05, (100 - sum(pauses[:i])) / 4)
    # once expired: from 0.1 s doubling (each pause between half and all of its step) up to the cap,
    # not ~20 attempts a second forever
    late = pauses[expired_at + 1 :]
    assert len(late) >= 15
    for n, pause in enumerate(late):
        step = min(RETRY_CAP, 0.1 * 2**n)
        assert step / 2 <= pause <= step, (n, pause)
    assert all(p >= RETRY_CAP / 2 for p in late[10:])
    # a WARNING when the streak starts, one more when the certificate expires, the rest DEBUG
    failures = renewal_failures(records)
    assert len(failures) == len(pauses) - 1
    warnings = [r for r in failures if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(r.levelno == logging.DEBUG for r in failures if r not in warnings)
    assert failures[0] is warnings[0] and "of validity left" in warnings[0].getMessage()
    assert "EXPIRED" in warnings[1].getMessage()
    assert not any(r.levelno >= logging.ERROR for r in records)
    for record in records:
        assert token not in record.getMessage()


# -- 3. the join token on every signing -----------------------------------------------------------


def test_a_certificate_alone_cannot_renew_itself(control: Control) -> None:
    token, _ = control.token("orders")
    key = certs.generate_key()
    with control.client() as http:
        first = sign(http, "orders", token, key, lifetime=60)
    assert first.status_code == 200, first.text
    chain = first.json()["certificate"].encode()
    with control.client(chain, key) as mtls:
        alone = sign(mtls, "orders", None, lifetime=30 * 86400)  # a short certificate for a long one
        assert alone.status_code == 401
        assert "join token" in alone.json()["error"]
        assert alone.headers["www-authenticate"].startswith("Bearer")
        both = sign(mtls, "orders", token)  # the certificate in addition to the token
        assert both.status_code == 200, both.text
        # the certificate is checked in addition, never instead: another service's is refused
        other, _ = control.token("payments")
        assert sign(mtls, "payments", other).status_code == 403


def test_revoking_the_join_token_ends_the_chain_of_renewals(control: Control) -> None:
    token, token_id = control.token("orders")
    key = certs.generate_key()
    with control.client() as http:
        chain = sign(http, "orders", token, key).json()["certificate"].encode()
    with control.client(chain, key) as mtls:
        assert sign(mtls, "orders", token).status_code == 200
        control.revoke(token_id)
        for with_token in (token, None):
            r = sign(mtls, "orders", with_token)
            assert r.status_code == 401, r.text
        # the certificate itself still proves the service elsewhere until it expires
        r = mtls.post("/v1/registry/orders", json={"address": "127.0.0.1:9"})
        assert r.status_code == 201


def test_an_expired_join_token_ends_the_chain_and_no_certificate_outlives_it(control: Control) -> None:
    token, _ = control.token("orders", ttl=5)
    (info,) = control.plane.tokens.list()
    assert info.expires is not None
    key = certs.generate_key()
    with control.client() as http:
        first = sign(http, "orders", token, key, lifetime=30 * 86400)
    assert first.status_code == 200, first.text
    chain = first.json()["certificate"].encode()
    # capped at the token's expiry, not 30 days (nor the CA's default of an hour)
    assert leaf(chain).not_valid_after_utc.timestamp() <= info.expires
    assert first.json()["expires"] <= info.expires
    with control.client(chain, key) as mtls:
        renewed = sign(mtls, "orders", token, lifetime=30 * 86400)
        assert renewed.status_code == 200
        assert renewed.json()["expires"] <= info.expires
        wait_until(lambda: time.time() >= info.expires, what="the token to expire")
        for with_token in (token, None):
            assert sign(mtls, "orders", with_token).status_code == 401


def test_a_certificate_that_does_not_verify_is_refused_even_with_a_token(tmp_path: Path) -> None:
    """Whatever the TLS layer let through: a shim puts a chosen chain in the TLS extension."""
    chains: dict[str, list[str]] = {}

    def inject(app: Any) -> Any:
        async def shim(scope: dict[str, Any], receive: Any, send: Any) -> None:
            name = dict(scope.get("headers") or []).get(b"x-test-chain", b"").decode()
            if scope["type"] == "http" and name:
                scope["extensions"] = {
                    **(scope.get("extensions") or {}),
                    "tls": {"client_cert_chain": chains[name]},
                }
            await app(scope, receive, send)

        return shim

    control = Control(tmp_path / "control", tls_on=False, wrap=inject)
    try:
        ca_key = (tmp_path / "control" / "ca.key").read_bytes()
        other_pem, other_key = certs.create_ca("mesh.local")

        def issue(issuer: bytes, issuer_key: bytes, service: str) -> str:
            csr = certs.make_csr(certs.generate_key(), service)
            life = dt.timedelta(hours=1)
            sid = certs.spiffe_id("mesh.local", service)
            return certs.issue(issuer, issuer_key, csr, spiffe_id=sid, lifetime=life).decode()

        bundle = control.plane.ca.bundle
        chains.update(
            orders=[issue(bundle, ca_key, "orders")],
            payments=[issue(bundle, ca_key, "payments")],
            stranger=[issue(other_pem, other_key, "orders")],
        )
        token, _ = control.token("orders")
        with control.client() as http:

            def status(chain: str | None) -> int:
                headers = {"authorization": f"Bearer {token}", **({"x-test-chain": chain} if chain else {})}
                body = {"csr": certs.make_csr(certs.generate_key(), "orders").decode(), "service": "orders"}
                return http.post("/v1/ca/sign", json=body, headers=headers).status_code

            assert status(None) == 200
            assert status("orders") == 200
            assert status("payments") == 403
            assert status("stranger") == 401
            r = http.post(
                "/v1/ca/sign",
                json={"csr": certs.make_csr(certs.generate_key(), "orders").decode(), "service": "orders"},
                headers={"x-test-chain": "orders"},
            )
            assert r.status_code == 401  # the certificate alone
    finally:
        control.stop()


def test_a_process_whose_token_is_revoked_stops_renewing_and_says_why(
    tmp_path: Path, records: list[logging.LogRecord]
) -> None:
    control = Control(tmp_path / "control", lifetime=2.0)
    token, token_id = control.token("orders")
    orders = control.mesh("orders", tmp_path / "cache", token=token)
    try:
        assert orders.enrollment is not None and orders.credentials is not None
        control.revoke(token_id)
        wait_until(lambda: orders.enrollment.failures >= 3, what="renewals refused")  # type: ignore[union-attr]
        assert orders.enrollment.renewals == 0
        refused = renewal_failures(records)
        assert refused[0].levelno == logging.WARNING
        assert "401 join token refused: unknown or revoked token" in refused[0].getMessage()
        assert [r.levelno for r in refused].count(logging.WARNING) <= 2  # the streak, and the expiry
    finally:
        orders.close()
        control.stop()
