"""`Mesh.serve` with WSGI apps (Flask) as well as ASGI ones: detection, plaintext, and mTLS with
identities from a real control service's CA, its registry and an Authorization document."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from flask import Flask, jsonify
from starlette.applications import Starlette
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.wrappers import Response

import meshlib
from meshlib import context
from meshlib.http.serving import interface_of
from meshlib.security.authorization import current_peer
from tests.conftest import wait_until
from tests.security.test_mtls_live import SecureControl

# -- detection ---------------------------------------------------------------------------------


class AsyncCallable:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None: ...


class SyncAsgi:
    """A plain callable of three arguments that returns the awaitable (some middleware does)."""

    def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        return AsyncCallable()(scope, receive, send)


async def asgi_function(scope: Any, receive: Any, send: Any) -> None: ...


def wsgi_function(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b""]


@pytest.mark.parametrize(
    ("app", "kind"),
    [
        (Starlette(), "asgi"),
        (FastAPI(), "asgi"),
        (AsyncCallable(), "asgi"),
        (asgi_function, "asgi"),
        (SyncAsgi(), "asgi"),
        (Flask("x"), "wsgi"),
        (Flask("x").wsgi_app, "wsgi"),
        (wsgi_function, "wsgi"),
        (Response("hi"), "wsgi"),
        (DispatcherMiddleware(wsgi_function), "wsgi"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_the_kind_of_app_is_detected(app: Any, kind: str) -> None:
    assert interface_of(app) == kind


@pytest.mark.parametrize(
    "app", [lambda *a: None, Starlette, object()], ids=["unclear", "class", "not-callable"]
)
def test_apps_that_are_neither_or_unclear_are_a_clear_error(app: Any) -> None:
    with pytest.raises(TypeError, match="serve"):
        interface_of(app)


def test_an_unknown_interface_is_refused_before_serving() -> None:
    with meshlib.Mesh("orders") as mesh, pytest.raises(ValueError, match="interface must be one of"):
        mesh.serve(wsgi_function, port=0, interface="asgi2")


# -- serving -----------------------------------------------------------------------------------


CHECKOUT_ONLY = {"kind": "Authorization", "service": "orders", "allow": [{"from": "checkout"}]}
BILLING_DENIED = "RBAC: access denied: source billing may not GET /orders/1"


def orders_app() -> Flask:
    app = Flask("orders")

    @app.route("/orders/<oid>")
    def order(oid: str) -> Any:
        ctx = context.current()
        return jsonify(
            order=oid,
            source=ctx.source if ctx else None,
            deadline=ctx is not None and ctx.deadline is not None,
            peer=current_peer(),
        )

    return app


class _Servers:
    """Every uvicorn.Server made while it is installed, so a test can stop the one `serve` runs."""

    def __init__(self) -> None:
        self.made: list[uvicorn.Server] = []
        outer = self

        class Recorded(uvicorn.Server):
            def __init__(self, config: uvicorn.Config) -> None:
                super().__init__(config)
                outer.made.append(self)

        self.cls = Recorded


@contextmanager
def serving(mesh: meshlib.Mesh, app: Any, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> Iterator[str]:
    """`mesh.serve(app, port=0)` on a thread; yields its address, stops it on exit."""
    servers = _Servers()
    monkeypatch.setattr(uvicorn, "Server", servers.cls)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            mesh.serve(app, port=0, **kwargs)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(lambda: bool(errors) or (mesh.address or "").split(":")[-1] not in ("", "0"), what="serving")
    assert not errors, errors
    try:
        yield str(mesh.address)
    finally:
        servers.made[0].should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "serve() did not return"
    assert not errors, errors


def test_a_flask_app_is_served_with_the_mesh_middleware(monkeypatch: pytest.MonkeyPatch) -> None:
    with meshlib.Mesh("orders") as mesh, serving(mesh, orders_app(), monkeypatch) as address:
        r = httpx.get(
            f"http://{address}/orders/7", headers={"x-mesh-source": "checkout", "x-mesh-timeout": "5000"}
        )
        assert r.status_code == 200, r.text
        assert r.json() == {"order": "7", "source": "checkout", "deadline": True, "peer": None}
        wait_until(lambda: mesh.stats.edge("in", "checkout").total == 1, what="the request counted")


def test_a_flask_app_gets_the_mesh_authorization(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshlib.rules import parse_documents

    with meshlib.Mesh("orders") as mesh, serving(mesh, orders_app(), monkeypatch) as address:
        mesh.apply_rules(
            parse_documents([CHECKOUT_ONLY]),
            "1",
        )
        with httpx.Client(base_url=f"http://{address}") as c:
            assert c.get("/orders/1", headers={"x-mesh-source": "checkout"}).status_code == 200
            r = c.get("/orders/1", headers={"x-mesh-source": "billing"})
            assert (r.status_code, r.text) == (403, BILLING_DENIED)


# -- mTLS with a real control service ----------------------------------------------------------


def _registered(control: SecureControl) -> list[str]:
    r = httpx.get(f"{control.url}/v1/registry/orders")
    assert r.status_code == 200, r.text
    return [e["address"] for e in r.json().get("orders", [])]


def _put_rules(control: SecureControl, docs: list[dict[str, Any]]) -> None:
    r = httpx.put(f"{control.url}/v1/config", json=docs, headers={"authorization": f"Bearer {control.admin}"})
    assert r.status_code == 200, r.text


@pytest.fixture
def control(tmp_path: Path) -> Iterator[SecureControl]:
    c = SecureControl(tmp_path / "control", lifetime=600)
    yield c
    c.stop()


def test_flask_under_mtls_strict_registers_authorizes_by_certificate_and_deregisters(
    control: SecureControl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    _put_rules(control, [CHECKOUT_ONLY])
    orders = meshlib.Mesh("orders", control=control.url, token=control.token("orders"), cache_dir=cache)
    checkout = meshlib.Mesh("checkout", control=control.url, token=control.token("checkout"), cache_dir=cache)
    billing = meshlib.Mesh("billing", control=control.url, token=control.token("billing"), cache_dir=cache)
    try:
        assert orders.mtls == "STRICT"
        with serving(orders, orders_app(), monkeypatch) as address:
            wait_until(lambda: _registered(control) == [address], what="orders registered")
            for caller in (checkout, billing):
                wait_until(lambda c=caller: "orders" in c.snapshot.plans, what="callers learn orders")
            wait_until(lambda: orders.snapshot.rules.authorization("orders") is not None, what="rules")
            with checkout.sync_client() as c:
                # the header claims another caller; the certificate wins
                r = c.get("http://orders/orders/1", headers={"x-mesh-source": "billing"})
            assert r.status_code == 200, r.text
            assert r.json()["source"] == "checkout"
            assert r.json()["peer"] == checkout.identity
            with billing.sync_client() as c:
                r = c.get("http://orders/orders/1", headers={"x-mesh-source": "checkout"})
            assert (r.status_code, r.text) == (403, BILLING_DENIED)
            # STRICT: plaintext gets a clear refusal, whatever it claims
            r = httpx.get(f"http://{address}/orders/1", headers={"x-mesh-source": "checkout"})
            assert (r.status_code, r.headers.get("x-mesh-error")) == (403, "mtls-required")
        assert _registered(control) == [], "serve() deregisters when it stops"
    finally:
        for mesh in (billing, checkout, orders):
            mesh.close()


def test_flask_under_mtls_permissive_serves_both_and_knows_which_is_which(
    control: SecureControl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    orders = meshlib.Mesh(
        "orders", control=control.url, token=control.token("orders"), cache_dir=cache, mtls="PERMISSIVE"
    )
    checkout = meshlib.Mesh("checkout", control=control.url, token=control.token("checkout"), cache_dir=cache)
    try:
        with serving(orders, orders_app(), monkeypatch) as address:
            wait_until(lambda: "orders" in checkout.snapshot.plans, what="checkout learns orders")
            with checkout.sync_client() as c:
                r = c.get("http://orders/orders/2")
            assert r.status_code == 200, r.text
            assert (r.json()["source"], r.json()["peer"]) == ("checkout", checkout.identity)
            # plaintext still served, and a claimed name does not count in a mesh with mTLS
            r = httpx.get(f"http://{address}/orders/2", headers={"x-mesh-source": "checkout"})
            assert r.status_code == 200, r.text
            assert (r.json()["source"], r.json()["peer"]) == (None, None)
    finally:
        checkout.close()
        orders.close()
