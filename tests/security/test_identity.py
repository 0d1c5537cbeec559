"""Identity: keys kept off disk, certificates checked, enrolment and renewal against a CA endpoint."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import ssl
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import meshlib
from meshlib.security import certificates as certs
from meshlib.security import tls
from meshlib.security.identity import Enrollment, Identity, IdentityError, control_options, read_anchors
from meshlib.testing import serve
from tests.backend import dead_address
from tests.security.test_tls import PKI, TD

# -- the key stays in memory --------------------------------------------------------------------


def _record_loads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Wrap `SSLContext.load_cert_chain` to see where the key is read from, while it is read."""
    calls: list[dict[str, Any]] = []
    real = ssl.SSLContext.load_cert_chain

    def load(self: ssl.SSLContext, certfile: str, keyfile: str | None = None, password: Any = None) -> None:
        parent = Path(certfile).parent
        calls.append(
            {
                "path": certfile,
                "keyfile": keyfile,
                "mode": stat.S_IMODE(os.stat(certfile).st_mode),
                "dir_mode": stat.S_IMODE(os.stat(parent).st_mode),
                "key_inside": b"PRIVATE KEY" in Path(certfile).read_bytes(),
            }
        )
        real(self, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", load)
    return calls


def test_the_key_reaches_openssl_through_an_anonymous_memory_file(
    monkeypatch: pytest.MonkeyPatch, pki: PKI
) -> None:
    calls = _record_loads(monkeypatch)
    identity = pki.identity("orders")
    identity.server_context(True)
    assert calls, "no certificate was loaded"
    for call in calls:
        assert call["path"].startswith("/proc/self/fd/")
        assert call["key_inside"]
        fd = int(call["path"].rsplit("/", 1)[1])
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        assert "meshlib-tls" not in target  # closed right after loading


def test_without_memfd_the_key_file_is_private_and_removed_at_once(
    monkeypatch: pytest.MonkeyPatch, pki: PKI
) -> None:
    monkeypatch.delattr(os, "memfd_create")
    calls = _record_loads(monkeypatch)
    pki.identity("orders")
    assert calls
    for call in calls:
        assert call["mode"] == 0o600
        assert call["dir_mode"] == 0o700
        assert not Path(call["path"]).exists()
        assert not Path(call["path"]).parent.exists()


def test_no_secret_in_reprs(pki: PKI) -> None:
    identity = pki.identity("orders")
    body = certs.key_pem(identity._material.key).decode().splitlines()[1]
    assert body not in repr(identity)
    enrollment = Enrollment("http://127.0.0.1:1", "orders", "mjt_secret-token")
    assert "mjt_secret-token" not in repr(enrollment)


# -- what an identity accepts ---------------------------------------------------------------------


def test_a_certificate_for_another_key_is_refused(pki: PKI) -> None:
    a, b = pki.identity("orders"), pki.identity("orders")
    with pytest.raises(IdentityError, match="does not belong to this process's key"):
        Identity(a._material.key, b.chain_pem, pki.cert)


def test_a_certificate_without_a_spiffe_id_is_refused(pki: PKI) -> None:
    cert, key = certs.create_ca(TD)  # a CA certificate: no URI SAN
    with pytest.raises(IdentityError, match="exactly one SPIFFE id"):
        Identity.from_pem(cert, key, pki.cert)


def test_from_files(tmp_path: Path, pki: PKI) -> None:
    me = pki.identity("orders")
    (tmp_path / "c.pem").write_bytes(me.chain_pem)
    (tmp_path / "k.pem").write_bytes(certs.key_pem(me._material.key))
    (tmp_path / "b.pem").write_bytes(pki.cert)
    loaded = Identity.from_files(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "b.pem")
    assert loaded.spiffe_id == "spiffe://mesh.local/svc/orders"
    assert loaded.service == "orders"
    with pytest.raises(IdentityError, match="cannot read"):
        Identity.from_files(tmp_path / "missing.pem", tmp_path / "k.pem", tmp_path / "b.pem")


def test_a_junk_bundle_is_ignored(pki: PKI) -> None:
    me = pki.identity("orders")
    assert not me.update_bundle("not a certificate")
    assert me.bundle_pem == pki.cert


def test_mtls_arguments_are_checked(pki: PKI) -> None:
    with pytest.raises(ValueError, match="mtls must be one of"):
        meshlib.Mesh("orders", mtls="sometimes")
    with pytest.raises(ValueError, match="needs credentials="):
        meshlib.Mesh("orders", mtls="STRICT")
    with meshlib.Mesh("orders", credentials=pki.identity("orders"), mtls="disable") as mesh:
        assert mesh.identity is None  # DISABLE: plaintext, whatever credentials were given
        assert mesh.uvicorn_options() == {}


def test_control_options(pki: PKI) -> None:
    assert control_options("http://c:7070", token=None, identity=None) == {}
    assert control_options("http://c:7070", token="t", identity=None) == {
        "headers": {"authorization": "Bearer t"}
    }
    with pytest.raises(IdentityError, match="give its CA"):
        control_options("https://c:7070", token="t", identity=None)
    verify = control_options("https://c:7070", token=None, identity=None, anchors=pki.cert)["verify"]
    assert verify.check_hostname and verify.verify_mode == ssl.CERT_REQUIRED
    assert read_anchors(pki.cert.decode()) == pki.cert


# -- enrolment against a CA endpoint ----------------------------------------------------------------


class FakeCA:
    """`POST /v1/ca/sign` backed by a real CA, failing with 503 on demand."""

    def __init__(self, pki: PKI, lifetime: float = 2.0) -> None:
        self.pki = pki
        self.lifetime = lifetime
        self.fail = 0
        self.calls = 0
        self.tokens: list[str | None] = []
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        with self.lock:
            self.calls += 1
            self.tokens.append(dict(scope["headers"]).get(b"authorization", b"").decode() or None)
            failing = self.fail > 0
            self.fail -= 1 if failing else 0
        if failing:
            return await _answer(send, 503, {"error": "try later"})
        if self.tokens[-1] != "Bearer mjt_good":
            return await _answer(send, 401, {"error": "join token refused: unknown or revoked token"})
        data = json.loads(body)
        chain = certs.issue(
            self.pki.cert,
            self.pki.key,
            data["csr"].encode(),
            spiffe_id=certs.spiffe_id(TD, data["service"]),
            lifetime=dt.timedelta(seconds=self.lifetime),
        )
        await _answer(send, 200, {"certificate": chain.decode(), "bundle": self.pki.cert.decode()})


async def _answer(send: Any, status: int, doc: dict[str, Any]) -> None:
    body = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def test_a_refused_token_fails_mesh_construction_clearly(pki: PKI, tmp_path: Path) -> None:
    ca = FakeCA(pki)
    server = serve(ca)
    try:
        with pytest.raises(IdentityError, match="refused to sign for 'orders': 401 join token refused"):
            meshlib.Mesh("orders", control=server.url, token="mjt_bad", cache_dir=tmp_path)
        assert ca.calls == 1  # a refusal is not retried
    finally:
        server.stop()


def test_an_unreachable_ca_fails_after_the_deadline(pki: PKI) -> None:
    enrollment = Enrollment("http://127.0.0.1:9", "orders", "mjt_good", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(IdentityError, match="unreachable"):
        asyncio.run(enrollment.obtain(time.monotonic() + 0.5))
    assert time.monotonic() - started < 3


def test_renewal_retries_with_jitter_and_never_logs_the_token(
    pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ca = FakeCA(pki, lifetime=2.0)
    server = serve(ca)
    enrollment = Enrollment(server.url, "orders", "mjt_good")

    async def run() -> Identity:
        identity = await enrollment.obtain(time.monotonic() + 5)
        first = identity.not_after
        ca.fail = 3  # the next three signing calls fail
        task = asyncio.create_task(enrollment.renew_forever(identity))
        deadline = time.monotonic() + 10
        while enrollment.renewals < 2:
            assert time.monotonic() < deadline, "no renewal"
            await asyncio.sleep(0.02)
        task.cancel()
        assert identity.not_after > first
        return identity

    try:
        identity = asyncio.run(run())
    finally:
        server.stop()
    assert ca.calls >= 6  # first + 3 failures + 2 renewals
    assert all(t == "Bearer mjt_good" for t in ca.tokens)
    failures = [r for r in caplog.records if "renewing the certificate of orders failed" in r.getMessage()]
    assert len(failures) == 3
    # one warning for the streak, not one per retry (an ERROR instead if it expired meanwhile)
    assert [r.levelno for r in failures].count(logging.WARNING) <= 1
    assert [r.levelno for r in failures].count(logging.DEBUG) >= 2
    key = certs.key_pem(identity._material.key).decode()
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert "mjt_good" not in text
        assert key.splitlines()[1] not in text


def test_an_answer_for_another_identity_is_refused(pki: PKI) -> None:
    ca = FakeCA(pki)
    server = serve(ca)
    try:
        enrollment = Enrollment(server.url, "orders", "mjt_good")
        enrollment.expected = certs.spiffe_id(TD, "payments")  # as if the CA had mixed them up
        with pytest.raises(IdentityError, match=r"the CA issued spiffe://mesh\.local/svc/orders"):
            asyncio.run(enrollment.request())
    finally:
        server.stop()


def test_contexts_are_replaced_never_edited(pki: PKI) -> None:
    me = pki.identity("orders")
    before = (me.client_context, me.control_context, me.server_context(True))
    renewed = pki.identity("orders")
    me.update(renewed._material.key, renewed.chain_pem)
    after = (me.client_context, me.control_context, me.server_context(True))
    assert all(a is not b for a, b in zip(before, after, strict=True))
    assert isinstance(me.client_context.sslobject_class, type)
    assert issubclass(me.client_context.sslobject_class, ssl.SSLObject)
    assert me.client_context.minimum_version >= tls.MIN_VERSION


def test_the_pem_view_is_one_material_and_its_generation_follows_every_change(pki: PKI) -> None:
    me = pki.identity("orders")
    first = me.pem()
    assert first.generation == me.generation
    key: Any = certs.load_key_pem(first.key_pem)
    assert key.public_key() == certs.load_pem_chain(first.chain_pem)[0].public_key()
    assert "PRIVATE" not in repr(first)
    renewed = pki.identity("orders")
    me.update(renewed._material.key, renewed.chain_pem)
    second = me.pem()
    assert second.generation != first.generation and second.chain_pem == renewed.chain_pem
    key = certs.load_key_pem(second.key_pem)
    assert key.public_key() == renewed._material.key.public_key()
    other_root = certs.create_ca(TD)[0]
    assert me.update_bundle(pki.cert + other_root)
    assert me.generation != second.generation and me.pem().bundle_pem == pki.cert + other_root
    assert not me.update_bundle(pki.cert + other_root)  # the same roots: no new generation
    assert me.generation == me.pem().generation


@pytest.fixture(scope="module")
def pki() -> PKI:
    return PKI()


def test_enrollment_asks_the_next_replica_when_one_is_unreachable(pki: PKI) -> None:
    ca = FakeCA(pki)
    server = serve(ca)
    dead = f"http://{dead_address()}"
    enrollment = Enrollment(f"{dead},{server.url}", "orders", "mjt_good", timeout=0.5)
    try:
        identity = asyncio.run(enrollment.obtain(time.monotonic() + 5))
    finally:
        server.stop()
    assert identity.spiffe_id == "spiffe://mesh.local/svc/orders"
    assert enrollment.url == server.url and ca.calls == 1  # renewals go to the replica that answered
