"""With security on, an identity speaks only for its own service's clients: a client id is bound
to the service that first used it (watch, ack, telemetry), registry instances to the service
they were registered for, and only the admin token may act for anyone."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshlib.control.binding import ClientBindings, ClientTaken
from meshlib.control.registration import Registration
from meshlib.security import certificates as c
from tests.control import wait_for
from tests.control.test_security_api import _CHAINS, ORDERS, SecureControl, _inject, bearer

FAILING_EDGE = {"dir": "out", "peer": "orders", "counts": {"5xx": 100}, "lat": [[8, 100]]}


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureControl]:
    s = SecureControl(tmp_path / "data")
    yield s
    s.stop()


def clients(secure: SecureControl) -> dict[str, dict[str, Any]]:
    return {r["client"]: r for r in secure.http.get("/v1/clients").json()}


def edges(secure: SecureControl) -> list[tuple[str, str, float | None]]:
    graph = secure.http.get("/v1/graph").json()
    return [(e["source"], e["destination"], e["success_rate"]) for e in graph["edges"]]


def watch_status(http: httpx.Client, params: dict[str, str], headers: dict[str, str]) -> int:
    with http.stream("GET", "/v1/watch", params=params, headers=headers) as r:
        if r.status_code == 200:
            assert next(r.iter_lines()).startswith("id: ")
        return r.status_code


def test_a_token_cannot_ack_or_report_for_a_client_of_another_service(secure: SecureControl) -> None:
    http = secure.http
    payments, orders = bearer(secure.token("payments")), bearer(secure.token("orders"))
    ack = {"client": "pay-1", "revision": 0, "version": 0, "ok": True}
    assert http.post("/v1/ack", json={**ack, "service": "payments"}, headers=payments).status_code == 204
    report = {"client": "pay-1", "service": "payments", "interval": 5.0, "edges": []}
    assert http.post("/v1/telemetry", json=report, headers=payments).status_code == 204

    # orders' token, naming no service (or naming its own): the client id is payments'
    forged_ack = {"client": "pay-1", "version": 999, "ok": False, "error": "forged"}
    forged_report = {"client": "pay-1", "interval": 5.0, "edges": [FAILING_EDGE]}
    for extra in ({}, {"service": "orders"}):
        r = http.post("/v1/ack", json={**forged_ack, **extra}, headers=orders)
        assert r.status_code == 403 and "belongs to service 'payments'" in r.json()["error"]
        r = http.post("/v1/telemetry", json={**forged_report, **extra}, headers=orders)
        assert r.status_code == 403 and "belongs to service 'payments'" in r.json()["error"]
    assert watch_status(http, {"client": "pay-1"}, orders) == 403
    assert watch_status(http, {"client": "pay-1", "service": "orders"}, orders) == 403
    row = clients(secure)["pay-1"]
    assert (row["service"], row["version"], row["ok"], row["error"]) == ("payments", 0, True, None)
    assert edges(secure) == []

    # payments' own token goes on working, watch included
    assert watch_status(http, {"client": "pay-1"}, payments) == 200
    assert http.post("/v1/ack", json={**ack, "version": 1}, headers=payments).status_code == 204
    assert clients(secure)["pay-1"]["version"] == 1

    # a new client id of orders is bound to orders, and its report is orders' (no service named)
    assert (
        http.post("/v1/telemetry", json={**forged_report, "client": "ord-1"}, headers=orders).status_code
        == 204
    )
    assert edges(secure) == [("orders", "orders", 0.0)]
    r = http.post("/v1/ack", json={**ack, "client": "ord-1"}, headers=payments)
    assert r.status_code == 403 and "belongs to service 'orders'" in r.json()["error"]

    # the admin token may act for anyone
    r = http.post("/v1/ack", json={**forged_ack, "service": "payments"}, headers=secure.admin)
    assert r.status_code == 204
    assert clients(secure)["pay-1"]["version"] == 999


def test_a_certificate_is_bound_like_a_token(tmp_path: Path) -> None:
    s = SecureControl(tmp_path / "data", tls=False, wrap=_inject)
    try:
        ca = s.plane.ca
        assert ca is not None
        ca_key = (tmp_path / "data" / "ca.key").read_bytes()
        key = c.generate_key()
        leaf = c.issue(
            ca.bundle, ca_key, c.make_csr(key, "orders"), spiffe_id=ORDERS, lifetime=timedelta(hours=1)
        )
        _CHAINS.update(orders=[leaf.decode()])
        payments = bearer(s.token("payments"))
        ack = {"client": "pay-1", "revision": 0, "version": 0}
        assert s.http.post("/v1/ack", json=ack, headers=payments).status_code == 204
        r = s.http.post("/v1/ack", json={**ack, "version": 999}, headers={"x-test-chain": "orders"})
        assert r.status_code == 403
        assert (
            s.http.post(
                "/v1/ack", json={**ack, "client": "ord-1"}, headers={"x-test-chain": "orders"}
            ).status_code
            == 204
        )
        assert {r["client"]: r["service"] for r in s.plane.hub.clients()} == {
            "pay-1": "payments",
            "ord-1": "orders",
        }
    finally:
        _CHAINS.clear()
        s.stop()


def test_a_token_cannot_heartbeat_or_deregister_another_services_instance(secure: SecureControl) -> None:
    http = secure.http
    payments, orders = bearer(secure.token("payments")), bearer(secure.token("orders"))
    r = http.post("/v1/registry/payments", json={"address": "127.0.0.1:9001", "ttl": 60}, headers=payments)
    assert r.status_code == 201
    instance = r.json()["id"]
    for method in ("PUT", "DELETE"):
        assert http.request(method, f"/v1/registry/payments/{instance}", headers=orders).status_code == 403
        # under its own service's path, the id names nothing of orders
        assert http.request(method, f"/v1/registry/orders/{instance}", headers=orders).status_code == 404
    # nor by registering the same address under its own name: that is another instance
    r = http.post("/v1/registry/orders", json={"address": "127.0.0.1:9001"}, headers=orders)
    assert r.status_code == 201 and r.json()["id"] != instance
    listed = http.get("/v1/registry/payments").json()["payments"]
    assert [(i["id"], i["expires_in"] > 50) for i in listed] == [(instance, True)]
    assert http.put(f"/v1/registry/payments/{instance}", headers=payments).status_code == 200
    assert http.delete(f"/v1/registry/payments/{instance}", headers=secure.admin).status_code == 204


def test_bindings_are_per_service_and_bounded() -> None:
    class Caller:
        def __init__(self, service: str | None) -> None:
            self.service = service
            self.admin = service is None

    orders, payments, admin = Caller("orders"), Caller("payments"), Caller(None)
    book = ClientBindings(per_service=3)
    assert book.claim(None, "x", None) is None and len(book) == 0  # security off: no binding
    assert book.claim(payments, "pay-1", None) == "payments"
    for n in range(10):  # orders fills its own share over and over...
        assert book.claim(orders, f"ord-{n}", "orders") == "orders"
    assert len(book) == 4
    with pytest.raises(ClientTaken):  # ...and never pushes out payments' binding
        book.claim(orders, "pay-1", None)
    assert book.claim(orders, "ord-0", None) == "orders"  # pushed out of orders' share: free again
    assert book.claim(admin, "pay-1", None) == "payments"  # the admin acts for the bound service
    assert book.claim(admin, "pay-1", "orders") == "orders"  # or any it names...
    assert book.owner("pay-1") == "payments"  # ...without moving the binding
    assert book.claim(admin, "new", "payments") == "payments" and book.owner("new") == "payments"


async def test_a_refused_registration_is_one_warning(
    secure: SecureControl, caplog: pytest.LogCaptureFixture
) -> None:
    """A token of another service: the registration is refused (403) on every try, and the
    process is told once, as a warning naming the reason, not once per retry."""
    payments = secure.token("payments")
    seen: list[int] = []

    class Counting(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport(verify=secure.trust)

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await self.inner.handle_async_request(request)
            seen.append(response.status_code)
            return response

    http = httpx.AsyncClient(transport=Counting(), headers=bearer(payments))
    reg = Registration(secure.url, "orders", "127.0.0.1:9001", ttl=1.0, http=http)
    with caplog.at_level(logging.INFO, logger="meshlib.control"):
        task = asyncio.create_task(reg.run())
        try:
            await wait_for(lambda: len(seen) >= 3, what="three refused registrations")
        finally:
            reg.stop()
            await asyncio.wait_for(task, 10)
            await http.aclose()
    assert set(seen) == {403} and not reg.registered.is_set()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "403" in warnings[0] and "orders" in warnings[0]
