"""End users on real servers on 127.0.0.1: uvicorn (ASGI, MeshMiddleware), werkzeug (Flask, WSGI)
and grpcio (sync and asyncio interceptors), with the issuer's JWKS on a real uvicorn server:
valid, invalid and missing tokens, Authorization on users and claims, `current_user()` in the
app, the token kept from the app on request, a key rotation picked up without a restart, and
the refusal counted, traced and logged without the token."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from flask import Flask
from flask import request as flask_request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from werkzeug.serving import make_server

import meshlib
from meshlib.asgi import MeshMiddleware as AsgiMesh
from meshlib.grpc import aio_server_interceptors, server_interceptors
from meshlib.rules import parse_documents
from meshlib.testing import serve
from meshlib.wsgi import MeshMiddleware as WsgiMesh
from tests.conftest import wait_until
from tests.grpc import echo_pb2, echo_pb2_grpc
from tests.http import ws
from tests.security.issuer import ISSUER, JwksServer, jwks_server, request_authentication, rsa_key, token
from tests.telemetry.conftest import Traces

K1, K2 = rsa_key("k1"), rsa_key("k2")
ALLOW = {
    "kind": "Authorization",
    "service": "orders",
    "allow": [
        {"from_users": ["*"], "paths": ["/orders/*"]},
        {"claims": {"group": "admins"}, "paths": ["/admin/*"]},
        {"paths": ["/public/*"]},
    ],
}


def rules(url: str, **rule: Any) -> Any:
    return parse_documents([request_authentication(jwks_uri=url, **rule), ALLOW])


def seen() -> dict[str, Any]:
    user = meshlib.current_user()
    if user is None:
        return {"user": None}
    return {"user": user.principal, "group": user.claims.get("group")}


def starlette_app() -> Starlette:
    async def handler(request: Request) -> JSONResponse:
        return JSONResponse({**seen(), "authorization": request.headers.get("authorization")})

    return Starlette(routes=[Route("/{area}/{item}", handler)])


@contextmanager
def asgi_server(mesh: meshlib.Mesh) -> Iterator[str]:
    app = starlette_app()
    app.add_middleware(AsgiMesh, mesh=mesh)
    with serve(app) as server:
        yield server.url


@contextmanager
def wsgi_server(mesh: meshlib.Mesh) -> Iterator[str]:
    app = Flask("orders")

    @app.route("/<area>/<item>")
    def handler(area: str, item: str) -> Any:
        return {**seen(), "authorization": flask_request.headers.get("authorization")}

    app.wsgi_app = WsgiMesh(app.wsgi_app, mesh=mesh)  # type: ignore[method-assign]
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        thread.join(5)
        srv.server_close()


SERVERS = {"asgi": asgi_server, "wsgi": wsgi_server}


@pytest.fixture(params=sorted(SERVERS))
def server(request: pytest.FixtureRequest) -> Callable[[meshlib.Mesh], Any]:
    return SERVERS[request.param]


@pytest.fixture
def issuer() -> Iterator[JwksServer]:
    with jwks_server(K1) as served:
        yield served


def get(c: httpx.Client, path: str, tok: str | None = None) -> httpx.Response:
    return c.get(path, headers={"authorization": f"Bearer {tok}"} if tok else {})


def test_users_and_claims_decide_and_the_app_sees_its_user(server: Any, issuer: JwksServer) -> None:
    with meshlib.Mesh("orders") as mesh:
        mesh.apply_rules(rules(issuer.url), "1")
        issuer.wait_fetches(1)  # fetched when the rules came in, before any request
        alice = token(K1, group="admins")
        bob = token(K1, sub="bob", group="dev")
        with server(mesh) as url, httpx.Client(base_url=url) as c:
            r = get(c, "/orders/1", alice)
            assert r.status_code == 200
            assert r.json() == {
                "user": f"{ISSUER}/alice",
                "group": "admins",
                "authorization": f"Bearer {alice}",
            }
            assert get(c, "/admin/x", alice).json()["user"] == f"{ISSUER}/alice"
            r = get(c, "/admin/x", bob)
            assert (r.status_code, r.text) == (
                403,
                f"RBAC: access denied: a caller without identity (user {ISSUER}/bob) may not GET /admin/x",
            )
            r = get(c, "/orders/1")
            assert (r.status_code, r.text) == (
                403,
                "RBAC: access denied: a caller without identity may not GET /orders/1; no end-user token",
            )
            r = get(c, "/public/x")  # no token: passes authentication, with no user
            assert r.status_code == 200 and r.json()["user"] is None
        assert mesh.stats.counter("denied", "orders") == 2
        assert issuer.fetches == 1


def test_an_invalid_token_is_401_with_the_reason_and_never_reaches_the_app(
    server: Any, issuer: JwksServer
) -> None:
    with meshlib.Mesh("orders") as mesh:
        mesh.apply_rules(rules(issuer.url), "1")
        expired = token(K1, exp=int(time.time()) - 600)
        with server(mesh) as url, httpx.Client(base_url=url) as c:
            r = get(c, "/public/x", expired)  # even where no token is needed: a bad one is refused
            assert (r.status_code, r.text) == (401, "token has expired")
            assert (
                r.headers["www-authenticate"]
                == 'Bearer error="invalid_token", error_description="token has expired"'
            )
            r = get(c, "/orders/1", token(K1, aud="billing"))
            assert (r.status_code, r.text) == (401, "token audience is not accepted")
            r = get(c, "/orders/1", token(K1, issuer="https://evil.example.com"))
            assert (r.status_code, r.text) == (401, "token issuer is not accepted")
        assert mesh.stats.counter("unauthenticated", "orders") == 3
        assert mesh.stats.edge("in", "unknown").by_class == {"4xx": 3}


def test_forward_false_keeps_the_token_from_the_app(server: Any, issuer: JwksServer) -> None:
    with meshlib.Mesh("orders") as mesh:
        mesh.apply_rules(rules(issuer.url, forward=False), "1")
        with server(mesh) as url, httpx.Client(base_url=url) as c:
            r = get(c, "/orders/1", token(K1))
            assert r.status_code == 200
            assert r.json() == {"user": f"{ISSUER}/alice", "group": None, "authorization": None}


def test_a_rotated_key_is_accepted_without_restart_and_the_removed_one_refused(
    server: Any, issuer: JwksServer
) -> None:
    with meshlib.Mesh("orders") as mesh:
        mesh.apply_rules(rules(issuer.url), "1")
        with server(mesh) as url, httpx.Client(base_url=url) as c:
            assert get(c, "/orders/1", token(K1)).status_code == 200
            issuer.keys = [K2]
            r = get(c, "/orders/1", token(K2))  # an unknown kid: the request waits for a fetch
            assert (r.status_code, r.json()["user"]) == (200, f"{ISSUER}/alice")
            r = get(c, "/orders/1", token(K1))
            assert (r.status_code, r.text) == (401, "token key id is unknown")
        assert issuer.fetches == 2


def test_the_refusal_is_traced_and_logged_without_the_token(
    issuer: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    traces = Traces()
    caplog.set_level(logging.DEBUG, logger="meshlib")
    try:
        with meshlib.Mesh("orders", tracing=traces.provider, access_log=True) as mesh:
            mesh.apply_rules(rules(issuer.url), "1")
            bad = token(K1, nbf=int(time.time()) + 600)
            with asgi_server(mesh) as url, httpx.Client(base_url=url) as c:
                assert get(c, "/orders/1", bad).status_code == 401
            (span,) = traces.wait_for(1)
            assert span.attributes is not None
            assert span.attributes["mesh.refusal"] == "token is not valid yet"
            assert span.attributes["http.response.status_code"] == 401
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "token is not valid yet" in text
        assert bad not in text and bad.split(".")[1] not in text
    finally:
        traces.provider.shutdown()


# --------------------------------------------------------------------------------------------
# gRPC: UNAUTHENTICATED, PERMISSION_DENIED and the user in the servicer


class WhoAmI(echo_pb2_grpc.EchoServicer):
    def Unary(self, request: echo_pb2.Ping, context: Any) -> echo_pb2.Pong:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        return echo_pb2.Pong(text=json.dumps(seen()), metadata=metadata)


class AioWhoAmI(echo_pb2_grpc.EchoServicer):
    async def Unary(self, request: echo_pb2.Ping, context: Any) -> echo_pb2.Pong:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        return echo_pb2.Pong(text=json.dumps(seen()), metadata=metadata)


GRPC_ALLOW = {
    "kind": "Authorization",
    "service": "orders",
    "allow": [{"from_users": [f"{ISSUER}/alice"], "paths": ["/meshlib.test.Echo/*"]}],
}


def grpc_checks(stub: echo_pb2_grpc.EchoStub, issuer: JwksServer, forward: bool) -> None:
    def call(tok: str | None) -> echo_pb2.Pong:
        metadata = (("authorization", f"Bearer {tok}"),) if tok else ()
        return stub.Unary(echo_pb2.Ping(text="hi"), metadata=metadata, timeout=10)

    pong = call(token(K1))
    assert json.loads(pong.text) == {"user": f"{ISSUER}/alice", "group": None}
    # `forward: false`: the servicer does not see the token (the mesh does, and said who it is)
    assert ("authorization" in pong.metadata) is forward
    with pytest.raises(grpc.RpcError) as err:
        call(token(K1, exp=int(time.time()) - 600))
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, "token has expired")
    with pytest.raises(grpc.RpcError) as err:
        call(token(K1, sub="bob"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        call(None)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details().endswith("; no end-user token")
    issuer.keys = [K2]  # a rotation: the call waits for the fetch (off the loop, for asyncio)
    assert json.loads(call(token(K2)).text)["user"] == f"{ISSUER}/alice"


@pytest.mark.parametrize("forward", [True, False])
def test_grpc_sync_server(issuer: JwksServer, forward: bool) -> None:
    with meshlib.Mesh("orders") as mesh:
        authn = request_authentication(jwks_uri=issuer.url, forward=forward)
        mesh.apply_rules(parse_documents([authn, GRPC_ALLOW]), "1")
        server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=server_interceptors(mesh))
        echo_pb2_grpc.add_EchoServicer_to_server(WhoAmI(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                grpc_checks(echo_pb2_grpc.EchoStub(channel), issuer, forward)
        finally:
            server.stop(None).wait()
        assert mesh.stats.counter("unauthenticated", "orders") == 1
        assert mesh.stats.counter("denied", "orders") == 2


@pytest.mark.parametrize("forward", [True, False])
def test_grpc_asyncio_server(issuer: JwksServer, forward: bool) -> None:
    with meshlib.Mesh("orders") as mesh:
        authn = request_authentication(jwks_uri=issuer.url, forward=forward)
        mesh.apply_rules(parse_documents([authn, GRPC_ALLOW]), "1")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        port: list[int] = []
        stop = asyncio.Event()

        async def run() -> None:
            server = grpc.aio.server(interceptors=aio_server_interceptors(mesh))
            echo_pb2_grpc.add_EchoServicer_to_server(AioWhoAmI(), server)
            port.append(server.add_insecure_port("127.0.0.1:0"))
            await server.start()
            ready.set()
            await stop.wait()
            await server.stop(None)

        thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
        thread.start()
        try:
            assert ready.wait(10)
            with grpc.insecure_channel(f"127.0.0.1:{port[0]}") as channel:
                grpc_checks(echo_pb2_grpc.EchoStub(channel), issuer, forward)
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)
            loop.close()
        wait_until(lambda: mesh.stats.counter("denied", "orders") == 2, what="the denials counted")
        assert mesh.stats.counter("unauthenticated", "orders") == 1


# --------------------------------------------------------------------------------------------
# WebSocket handshakes: the same end user, over a raw handshake to uvicorn


def handshake(url: str, tok: str | None) -> tuple[int, bytes]:
    return ws.handshake(url, {"Authorization": f"Bearer {tok}"} if tok else None)


def test_a_websocket_handshake_is_authenticated_too(issuer: JwksServer) -> None:
    async def whoami(websocket: WebSocket) -> None:
        await websocket.accept()
        user = meshlib.current_user()
        await websocket.send_text(user.principal if user else "nobody")
        await websocket.close()

    with meshlib.Mesh("orders") as mesh:
        mesh.apply_rules(parse_documents([request_authentication(jwks_uri=issuer.url), ALLOW_WS]), "1")
        app = Starlette(routes=[WebSocketRoute("/ws/x", whoami)])
        app.add_middleware(AsgiMesh, mesh=mesh)
        with serve(app) as server:
            assert handshake(server.url, token(K1)) == (101, f"{ISSUER}/alice".encode())
            refused = handshake(server.url, token(K1, exp=int(time.time()) - 600))
            assert refused == (401, b""), refused
            assert handshake(server.url, None)[0] == 403  # the rule names users: a token is needed
            issuer.keys = [K2]  # a rotation: the handshake waits for the fetch off the loop
            assert handshake(server.url, token(K2)) == (101, f"{ISSUER}/alice".encode())
        assert mesh.stats.counter("unauthenticated", "orders") == 1
        assert mesh.stats.counter("denied", "orders") == 1


ALLOW_WS = {"kind": "Authorization", "service": "orders", "allow": [{"from_users": ["*"]}]}
