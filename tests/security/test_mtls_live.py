"""Meshes that get their identity from a real control service's CA, under continuous traffic.

The control service is `create_app(..., security=True)` served on 127.0.0.1; certificates live
about three seconds, so a few seconds of traffic cross several renewals.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.control.app import ControlSettings, create_app
from meshlib.control.server_tls import uvicorn_tls_options
from meshlib.security import certificates as certs
from meshlib.security.identity import IdentityError
from meshlib.testing import RunningServer, serve
from tests.conftest import wait_until
from tests.security.test_tls import Seen

LIFETIME = 3.0


class SecureControl:
    """The control service with its CA and join tokens, over http or https."""

    def __init__(self, data: Path, *, https: bool = False, lifetime: float = LIFETIME) -> None:
        self.data = data
        self.app = create_app(ControlSettings(data, security=True, ping=0.5))
        self.plane = self.app.state.control
        self.plane.ca.default_lifetime = dt.timedelta(seconds=lifetime)
        options = uvicorn_tls_options(self.plane) if https else {}
        self.server: RunningServer = serve(self.app, lifespan="on", **options)
        self.scheme = "https" if https else "http"
        self.admin = (data / "admin.token").read_text().strip()
        self.tokens: list[str] = []

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.port}"

    def token(self, service: str) -> str:
        token = self.plane.tokens.create(service, 600)
        self.tokens.append(token)
        return token

    def roots(self) -> int:
        return len(certs.load_pem_chain(self.plane.ca.bundle))

    def stop(self) -> None:
        self.server.stop()


def _roots(mesh: meshlib.Mesh) -> int:
    assert mesh.credentials is not None
    return len(certs.load_pem_chain(mesh.credentials.bundle_pem))


@dataclass
class Pair:
    """An `orders` server and a `checkout` caller, both with CA-issued identities."""

    control: SecureControl
    orders: meshlib.Mesh
    checkout: meshlib.Mesh
    server: RunningServer
    app: Seen

    def close(self) -> None:
        self.checkout.close()
        self.orders.close()
        self.server.stop()


def start_pair(control: SecureControl, cache: Path) -> Pair:
    orders = meshlib.Mesh("orders", control=control.url, token=control.token("orders"), cache_dir=cache)
    app = Seen()
    server = serve(app, **orders.uvicorn_options())
    orders.register(server.address)
    checkout = meshlib.Mesh("checkout", control=control.url, token=control.token("checkout"), cache_dir=cache)
    wait_until(lambda: "orders" in checkout.snapshot.plans, what="checkout to learn orders' endpoint")
    return Pair(control, orders, checkout, server, app)


@dataclass
class Traffic:
    """Requests from checkout to orders on two threads (sync and async) until stopped."""

    pair: Pair
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)  # PEM bodies of every key the meshes used
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, response: httpx.Response | None, error: BaseException | None) -> None:
        with self.lock:
            if error is not None:
                self.failures.append(f"{type(error).__name__}: {error}")
            elif response is not None and response.status_code != 200:
                self.failures.append(f"status {response.status_code}: {response.text[:200]}")
            else:
                self.ok += 1
            for mesh in (self.pair.orders, self.pair.checkout):
                assert mesh.credentials is not None
                self.keys.add(_key_body(mesh.credentials._material.key))

    def sync_loop(self) -> None:
        mesh = self.pair.checkout
        with mesh.sync_client() as kept:
            n = 0
            while not self.stop.is_set():
                n += 1
                try:
                    if n % 4 == 0:  # a new connection now and then: a new handshake
                        with mesh.sync_client() as fresh:
                            self.record(fresh.get("http://orders/new"), None)
                    else:
                        self.record(kept.get("http://orders/kept"), None)
                except Exception as exc:
                    self.record(None, exc)

    def async_loop(self) -> None:
        async def run() -> None:
            mesh = self.pair.checkout
            async with mesh.client() as client:
                while not self.stop.is_set():
                    try:
                        self.record(await client.get("http://orders/async"), None)
                    except Exception as exc:
                        self.record(None, exc)
                    await asyncio.sleep(0.005)

        asyncio.run(run())

    def __enter__(self) -> Traffic:
        self.threads = [threading.Thread(target=self.sync_loop), threading.Thread(target=self.async_loop)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def _key_body(key: Any) -> str:
    return "".join(certs.key_pem(key).decode().splitlines()[1:-1])


# -- renewal under traffic ------------------------------------------------------------------------


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class RenewalRun:
    traffic: Traffic
    renewals: dict[str, int]
    serials: set[int]
    records: list[logging.LogRecord]
    dirs: list[Path]
    started: float


@pytest.fixture(scope="module")
def renewal_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RenewalRun]:
    root = logging.getLogger()
    capture = Capture()
    level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    started = time.time()
    base = tmp_path_factory.mktemp("renewal")
    control = SecureControl(base / "control")
    pair = start_pair(control, base / "cache")
    try:
        with Traffic(pair) as traffic:
            assert pair.orders.enrollment is not None and pair.checkout.enrollment is not None
            wait_until(
                lambda: pair.orders.enrollment.renewals >= 3 and pair.checkout.enrollment.renewals >= 3,  # type: ignore[union-attr]
                timeout=30,
                what="three renewals on each side",
            )
            wait_until(lambda: traffic.ok > 0, what="some traffic")
        renewals = {"orders": pair.orders.enrollment.renewals, "checkout": pair.checkout.enrollment.renewals}
        serials = {r["serial"] for r in pair.app.requests}
        yield RenewalRun(
            traffic, renewals, serials, capture.records, [base, Path(tempfile.gettempdir())], started
        )
    finally:
        root.removeHandler(capture)
        root.setLevel(level)
        pair.close()
        control.stop()


def test_traffic_crosses_three_renewals_without_a_failed_request(renewal_run: RenewalRun) -> None:
    assert renewal_run.renewals["orders"] >= 3 and renewal_run.renewals["checkout"] >= 3
    assert renewal_run.traffic.failures == []
    assert renewal_run.traffic.ok >= 20


def test_new_connections_present_the_renewed_certificates(renewal_run: RenewalRun) -> None:
    assert len(renewal_run.serials) >= 3  # the server saw at least three client certificates


def test_the_private_key_never_touches_disk(renewal_run: RenewalRun) -> None:
    keys = renewal_run.traffic.keys
    assert len(keys) >= 4  # each renewal makes a new key
    for directory in renewal_run.dirs:
        for path in _recent_files(directory, renewal_run.started):
            data = path.read_bytes()
            text = data.decode("latin-1")
            flat = "".join(text.split())
            for key in keys:
                assert key not in flat, f"a mesh private key was written to {path}"


def test_no_key_or_token_in_any_log_record(renewal_run: RenewalRun) -> None:
    control = renewal_run.traffic.pair.control
    secrets = [*control.tokens, control.admin, *renewal_run.traffic.keys]
    assert renewal_run.records, "nothing was logged"
    assert any(r.name == "meshlib.security" for r in renewal_run.records)
    for record in renewal_run.records:
        text = "".join((record.getMessage() + (record.exc_text or "")).split())
        for secret in secrets:
            assert secret not in text, f"a secret in a {record.levelname} record of {record.name}"


def _recent_files(directory: Path, since: float) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(directory, onerror=lambda e: None):
        for name in files:
            path = Path(dirpath) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            if path.is_file() and not path.is_symlink() and st.st_mtime >= since - 1 and st.st_size < 1 << 20:
                try:
                    path.read_bytes()
                except OSError:
                    continue
                yield path


# -- CA rotation ----------------------------------------------------------------------------------


def test_a_ca_rotation_pushed_on_the_watch_stream_keeps_traffic_flowing(tmp_path: Path) -> None:
    control = SecureControl(tmp_path / "control")
    pair = start_pair(control, tmp_path / "cache")
    try:
        old_root = control.plane.ca.root_pem
        with Traffic(pair) as traffic:
            wait_until(lambda: traffic.ok >= 5, what="traffic before the rotation")
            r = httpx.post(
                f"{control.url}/v1/ca/rotate",
                json={"overlap": 2 * LIFETIME},
                headers={"authorization": f"Bearer {control.admin}"},
            )
            assert r.status_code == 200, r.text
            # the new root reaches both processes on the watch stream, next to the old one
            wait_until(lambda: _roots(pair.orders) == 2 and _roots(pair.checkout) == 2, what="two roots")
            new_root = control.plane.ca.root_pem
            assert new_root != old_root
            wait_until(
                lambda: all(_issued_by(m, new_root) for m in (pair.orders, pair.checkout)),
                timeout=15,
                what="certificates from the new root",
            )
            # the old root's overlap ends: the bundle shrinks, again without a restart
            wait_until(
                lambda: _roots(pair.orders) == 1 and _roots(pair.checkout) == 1, timeout=20, what="one root"
            )
            ok_after = traffic.ok
            wait_until(lambda: traffic.ok >= ok_after + 5, what="traffic after the rotation")
        assert traffic.failures == []
    finally:
        pair.close()
        control.stop()


def _issued_by(mesh: meshlib.Mesh, root_pem: bytes) -> bool:
    assert mesh.credentials is not None
    leaf = certs.load_pem_chain(mesh.credentials.chain_pem)[0]
    try:
        leaf.verify_directly_issued_by(certs.load_pem_chain(root_pem)[0])
    except Exception:
        return False
    return True


# -- the control service over https ----------------------------------------------------------------


def test_an_https_control_service_is_verified_against_the_ca(tmp_path: Path) -> None:
    control = SecureControl(tmp_path / "control", https=True, lifetime=600)
    try:
        token = control.token("orders")
        with pytest.raises(IdentityError, match="give its CA"):
            meshlib.Mesh("orders", control=control.url, token=token, cache_dir=tmp_path / "c0")
        stranger = certs.create_ca(certs.DEFAULT_TRUST_DOMAIN)[0]
        with pytest.raises(IdentityError, match="CERTIFICATE_VERIFY_FAILED"):  # not the CA we trust
            meshlib.Mesh("orders", control=control.url, token=token, ca=stranger, cache_dir=tmp_path / "c1")
        bundle = tmp_path / "control" / "ca-bundle.crt"
        with meshlib.Mesh(
            "orders", control=control.url, token=token, ca=bundle, cache_dir=tmp_path / "c2"
        ) as mesh:
            assert mesh.identity == "spiffe://mesh.local/svc/orders"
            assert mesh.wait_for_control(10)  # the watch stream, over TLS with our certificate
            mesh.register("127.0.0.1:1")
            wait_until(lambda: "orders" in control.plane.registry.all(), what="the registration over https")
    finally:
        control.stop()
