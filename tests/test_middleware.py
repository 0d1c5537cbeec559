"""Server middleware: ASGI (Starlette under uvicorn) and WSGI (Flask under werkzeug's server)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

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
from meshlib.testing import serve
from meshlib.wsgi import MeshMiddleware as WsgiMesh
from tests.conftest import Fleet, wait_until, write_rules


def _ctx() -> dict:
    ctx = context.current()
    assert ctx is not None
    remaining = ctx.remaining()
    return {"service": ctx.service, "source": ctx.source, "remaining": remaining}


@pytest.fixture
def downstream(fleet: Fleet, tmp_path: Path) -> tuple[Path, object]:
    backend, server = fleet.start("payments")
    cfg = write_rules(
        tmp_path / "mesh.yaml",
        [{"kind": "Endpoints", "service": "payments", "endpoints": [{"address": server.address}]}],
    )
    return cfg, backend


def test_asgi_middleware_sets_context_counts_and_calls_inherit(downstream) -> None:
    cfg, payments = downstream
    mesh = meshlib.Mesh("orders", config=cfg)

    async def info(request: Request) -> JSONResponse:
        async with mesh.client() as client:
            r = await client.get("http://payments/charge")
        return JSONResponse(_ctx() | {"downstream": r.json()["name"]})

    boom = Route("/boom", lambda r: JSONResponse({}, status_code=503))
    app = Starlette(routes=[Route("/info", info), boom])
    app.add_middleware(AsgiMesh, mesh=mesh)
    with serve(app) as server, httpx.Client(base_url=server.url) as c:
        # 3 s: the handler makes a client and calls payments within it, on a loaded machine too
        body = c.get("/info", headers={"x-mesh-source": "checkout", "x-mesh-timeout": "3000"}).json()
        assert c.get("/boom", headers={"x-mesh-source": "checkout"}).status_code == 503
        assert c.get("/info").status_code == 200
    mesh.close()
    assert body["service"] == "orders" and body["source"] == "checkout"
    assert 0 < body["remaining"] <= 3.0
    assert body["downstream"] == "payments"
    assert payments.seen[0]["headers"]["x-mesh-source"] == "orders"
    edge = mesh.stats.edge("in", "checkout")
    assert edge.by_class == {"2xx": 1, "5xx": 1}
    assert mesh.stats.edge("in", "unknown").total == 1


def test_asgi_middleware_ignores_malformed_timeout(fleet: Fleet) -> None:
    mesh = meshlib.Mesh("orders")
    app = Starlette(routes=[Route("/ctx", lambda r: JSONResponse(_ctx()))])
    with serve(mesh.asgi(app)) as server, httpx.Client(base_url=server.url) as c:
        for bad in ("abc", "-5", "nan", ""):
            r = c.get("/ctx", headers={"x-mesh-timeout": bad})
            assert r.status_code == 200 and r.json()["remaining"] is None
    mesh.close()


@pytest.fixture
def flask_server(downstream) -> Iterator[tuple[str, meshlib.Mesh, object]]:
    cfg, payments = downstream
    mesh = meshlib.Mesh("orders", config=cfg)
    app = Flask("orders")

    @app.get("/info")
    def info():  # type: ignore[no-untyped-def]
        with mesh.sync_client() as client:
            name = client.get("http://payments/charge").json()["name"]
        return jsonify(_ctx() | {"downstream": name})

    @app.get("/boom")
    def boom():  # type: ignore[no-untyped-def]
        return "no", 500

    app.wsgi_app = WsgiMesh(app.wsgi_app, mesh=mesh)  # type: ignore[method-assign]
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}", mesh, payments
    srv.shutdown()
    mesh.close()


def test_wsgi_middleware_sets_context_counts_and_calls_inherit(flask_server) -> None:
    url, mesh, payments = flask_server
    with httpx.Client(base_url=url) as c:
        # 3 s: the handler makes a client and calls payments within it (800 ms was little for that
        # on a loaded machine)
        body = c.get("/info", headers={"x-mesh-source": "checkout", "x-mesh-timeout": "3000"}).json()
        assert c.get("/boom", headers={"x-mesh-source": "checkout"}).status_code == 500
    assert body["service"] == "orders" and body["source"] == "checkout" and 0 < body["remaining"] <= 3.0
    assert body["downstream"] == "payments"
    assert payments.seen[0]["headers"]["x-mesh-source"] == "orders"
    # the server counts a request when it closes the body, just after the client has it
    wait_until(lambda: mesh.stats.edge("in", "checkout").total == 2, what="both requests counted")
    assert mesh.stats.edge("in", "checkout").by_class == {"2xx": 1, "5xx": 1}
    assert context.current() is None  # nothing leaks out of the request


def test_middleware_applied_twice_counts_each_request_once() -> None:
    mesh = meshlib.Mesh("orders")
    app = Starlette(routes=[Route("/ctx", lambda r: JSONResponse(_ctx()))])
    app.add_middleware(AsgiMesh, mesh=mesh)  # as users write it, then served by mesh.asgi()/serve()
    with serve(mesh.asgi(app)) as server, httpx.Client(base_url=server.url) as c:
        for _ in range(3):
            assert c.get("/ctx", headers={"x-mesh-source": "checkout"}).json()["source"] == "checkout"
    mesh.close()
    assert mesh.stats.edge("in", "checkout").total == 3


def test_wsgi_middleware_applied_twice_counts_each_request_once() -> None:
    mesh = meshlib.Mesh("orders")
    app = Flask("twice")
    app.get("/ok")(lambda: "ok")
    app.wsgi_app = WsgiMesh(WsgiMesh(app.wsgi_app, mesh=mesh), mesh=mesh)  # type: ignore[method-assign]
    with app.test_client() as c:
        for _ in range(3):
            body = c.get("/ok", headers={"x-mesh-source": "checkout"})
            assert body.status_code == 200
            body.close()
    mesh.close()
    assert mesh.stats.edge("in", "checkout").total == 3


AUTHORIZATION = {"kind": "Authorization", "service": "orders", "allow": [{"paths": ["/*"]}]}


def _broken_admission(monkeypatch: pytest.MonkeyPatch) -> meshlib.Mesh:
    """A mesh whose admission step fails inside (as a defect of the mesh would): the request is
    refused by the server, and still counted, its in-flight count given back."""
    from meshlib import inbound
    from meshlib.rules import parse_documents

    def fail(*args: object, **kwargs: object) -> str | None:
        raise RuntimeError("a defect in the authorization step")

    monkeypatch.setattr(inbound, "counted_denial", fail)
    mesh = meshlib.Mesh("orders", metrics_path="/metrics")
    mesh.apply_rules(parse_documents([AUTHORIZATION]), "1")
    return mesh


def _assert_counted_and_released(mesh: meshlib.Mesh) -> None:
    wait_until(lambda: mesh.stats.edge("in", "checkout").total == 2, what="both requests counted")
    assert mesh.stats.edge("in", "checkout").by_class == {"error": 2}
    assert mesh.telemetry.active_in == 0  # nothing left in flight


def test_asgi_a_failure_while_admitting_is_counted_and_released(monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = _broken_admission(monkeypatch)
    app = Starlette(routes=[Route("/ok", lambda r: JSONResponse({}))])
    with serve(AsgiMesh(app, mesh=mesh)) as server, httpx.Client(base_url=server.url) as c:
        for _ in range(2):
            assert c.get("/ok", headers={"x-mesh-source": "checkout"}).status_code == 500
        assert 'mesh_requests_active{direction="in"' in c.get("/metrics").text
    _assert_counted_and_released(mesh)
    mesh.close()


def test_wsgi_a_failure_while_admitting_is_counted_and_released(monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = _broken_admission(monkeypatch)
    app = Flask("broken")
    app.get("/ok")(lambda: "ok")
    app.wsgi_app = WsgiMesh(app.wsgi_app, mesh=mesh)  # type: ignore[method-assign]
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{srv.server_port}") as c:
            for _ in range(2):
                assert c.get("/ok", headers={"x-mesh-source": "checkout"}).status_code == 500
    finally:
        srv.shutdown()
    _assert_counted_and_released(mesh)
    mesh.close()


CLAIMS = {
    "checkout": "checkout",
    "a" * 254: None,  # longer than a service name may be
    "x" * 8000: None,
    "Checkout": None,
    "check out": None,
    "checkout;x": None,
    "-checkout": None,
    "": None,
}


def _claims_seen(get: object) -> dict[str, str | None]:
    return {claim: get(claim) for claim in CLAIMS}  # type: ignore[operator]


@pytest.mark.parametrize("documents", [[], [AUTHORIZATION]], ids=["inline", "full sequence"])
def test_asgi_a_claimed_source_that_cannot_name_a_service_is_none(documents: list[dict]) -> None:
    """A plaintext `x-mesh-source` that no rule could name is no caller: not in the context, not
    an edge of its own in the counters or /metrics."""
    from meshlib.rules import parse_documents

    mesh = meshlib.Mesh("orders", tracing=False, metrics_path="/metrics")
    mesh.apply_rules(parse_documents(documents), "1")
    app = Starlette(routes=[Route("/ctx", lambda r: JSONResponse(_ctx()))])
    with serve(AsgiMesh(app, mesh=mesh)) as server, httpx.Client(base_url=server.url) as c:
        seen = _claims_seen(lambda claim: c.get("/ctx", headers={"x-mesh-source": claim}).json()["source"])
        scrape = c.get("/metrics").text
    assert seen == CLAIMS
    peers = {peer for direction, peer, _ in mesh.stats.edges() if direction == "in"}
    assert peers == {"checkout", "unknown"}
    assert "x" * 300 not in scrape and "a" * 254 not in scrape
    mesh.close()


def test_wsgi_a_claimed_source_that_cannot_name_a_service_is_none() -> None:
    mesh = meshlib.Mesh("orders", tracing=False, metrics=False)
    app = Flask("claims")
    app.get("/ctx")(lambda: jsonify(_ctx()))
    app.wsgi_app = WsgiMesh(app.wsgi_app, mesh=mesh)  # type: ignore[method-assign]
    with app.test_client() as c:

        def source(claim: str) -> str | None:
            response = c.get("/ctx", headers={"x-mesh-source": claim})
            response.close()  # the request is counted when the server closes its body
            return response.json["source"]  # type: ignore[index]

        seen = _claims_seen(source)
    assert seen == CLAIMS
    assert {peer for _, peer, _ in mesh.stats.edges()} == {"checkout", "unknown"}
    mesh.close()


def _cut_short() -> Iterator[bytes]:
    yield b"first chunk\n"
    raise RuntimeError("the body fails after its first chunk")


@pytest.mark.parametrize("documents", [[], [AUTHORIZATION]], ids=["inline", "full sequence"])
def test_asgi_a_response_cut_short_is_a_failure_a_failure_after_it_is_not(documents: list[dict]) -> None:
    """A body that fails half-sent is a failed request whatever its status said; a background
    task failing once the response is whole leaves the request the success the caller saw."""
    from starlette.background import BackgroundTask
    from starlette.responses import StreamingResponse

    from meshlib.rules import parse_documents

    def fail() -> None:
        raise RuntimeError("the background task fails after the response")

    mesh = meshlib.Mesh("orders", tracing=False, metrics=False)
    mesh.apply_rules(parse_documents(documents), "1")
    app = Starlette(
        routes=[
            Route("/stream", lambda r: StreamingResponse(_cut_short())),
            Route("/background", lambda r: JSONResponse({"ok": True}, background=BackgroundTask(fail))),
        ]
    )
    headers = {"x-mesh-source": "checkout"}
    with serve(AsgiMesh(app, mesh=mesh)) as server, httpx.Client(base_url=server.url) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            c.get("/stream", headers=headers)
        assert c.get("/background", headers=headers).json() == {"ok": True}
        wait_until(lambda: mesh.stats.edge("in", "checkout").total == 2, what="both requests counted")
    assert mesh.stats.edge("in", "checkout").by_class == {"error": 1, "2xx": 1}
    mesh.close()


def test_wsgi_a_body_cut_short_is_a_failure() -> None:
    from flask import Response

    mesh = meshlib.Mesh("orders", tracing=False, metrics=False)
    app = Flask("cut")
    app.add_url_rule("/stream", "stream", lambda: Response(_cut_short()))
    app.add_url_rule("/ok", "ok", lambda: "ok")
    app.wsgi_app = WsgiMesh(app.wsgi_app, mesh=mesh)  # type: ignore[method-assign]
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    headers = {"x-mesh-source": "checkout"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{srv.server_port}") as c:
            with pytest.raises(httpx.RemoteProtocolError):
                c.get("/stream", headers=headers)
            assert c.get("/ok", headers=headers).text == "ok"
            wait_until(lambda: mesh.stats.edge("in", "checkout").total == 2, what="both requests counted")
    finally:
        srv.shutdown()
    assert mesh.stats.edge("in", "checkout").by_class == {"error": 1, "2xx": 1}
    mesh.close()
