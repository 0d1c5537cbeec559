"""WebSocket handshakes through the ASGI middleware on a real uvicorn server: the same sequence
as an HTTP GET (rate limit, the caller's context, a token kept from the app, counting), but no
slot of the concurrency limit for the connection's life."""

from __future__ import annotations

import json
import threading

import httpx
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

import meshlib
from meshlib import context
from meshlib.asgi import MeshMiddleware
from meshlib.rules import parse_documents
from meshlib.testing import serve
from tests.conftest import wait_until
from tests.http.ws import handshake

HEADERS = {"x-mesh-source": "checkout", "x-mesh-timeout": "5000"}


async def whoami(websocket: WebSocket) -> None:
    await websocket.accept()
    ctx = context.current()
    assert ctx is not None
    seen = {"source": ctx.source, "deadline": ctx.remaining() is not None, "path": ctx.path}
    await websocket.send_text(json.dumps(seen))
    await websocket.close()


def _mesh(*documents: dict) -> meshlib.Mesh:
    mesh = meshlib.Mesh("orders", tracing=False, metrics=False)
    mesh.apply_rules(parse_documents(list(documents)), "1")
    return mesh


def test_the_handshake_runs_in_the_callers_context_and_is_counted() -> None:
    mesh = _mesh()
    app = Starlette(routes=[WebSocketRoute("/ws/x", whoami)])
    with serve(MeshMiddleware(app, mesh=mesh)) as server:
        status, frame = handshake(server.url, HEADERS)
    assert status == 101
    assert json.loads(frame) == {"source": "checkout", "deadline": True, "path": "/ws/x"}
    wait_until(lambda: mesh.stats.edge("in", "checkout").total == 1, what="the connection counted")
    assert mesh.stats.edge("in", "checkout").by_class == {"1xx": 1}
    mesh.close()


def test_the_rate_limit_refuses_handshakes_past_it() -> None:
    limit = {"kind": "RateLimit", "service": "orders", "requests_per_second": 0.01, "burst": 2}
    mesh = _mesh(limit)
    app = Starlette(routes=[WebSocketRoute("/ws/x", whoami)])
    with serve(MeshMiddleware(app, mesh=mesh)) as server:
        answers = [handshake(server.url, HEADERS)[0] for _ in range(4)]
    assert answers == [101, 101, 429, 429]
    assert mesh.stats.counter("rate_limited", "orders") == 2
    mesh.close()


def test_an_open_connection_holds_no_slot_of_the_concurrency_limit_nor_the_load() -> None:
    """A connection may last hours: it takes no slot of the limit, and is no request of the
    server's load (which ORCA reports and prequal probes read)."""
    import asyncio

    release = threading.Event()

    async def held(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("held")
        await asyncio.to_thread(release.wait, 10)  # open until the test has made its requests

    limit = {"kind": "ConcurrencyLimit", "service": "orders", "min_limit": 1, "max_limit": 4}
    mesh = _mesh(limit)
    mesh.load.tracking = True
    app = Starlette(routes=[WebSocketRoute("/ws/x", held)])
    try:
        with serve(MeshMiddleware(app, mesh=mesh)) as server:
            assert handshake(server.url, HEADERS) == (101, b"held")  # the handler still runs
            ((_, _, limiter),) = mesh.resilience.concurrency_limits()
            assert limiter.in_flight == 0 and mesh.load.in_flight == 0
            for _ in range(3):
                assert httpx.get(server.url + "/nothing", headers=HEADERS).status_code == 404
            assert mesh.stats.edge("in", "checkout").by_class == {"4xx": 3}  # the connection: not yet
            release.set()
            wait_until(lambda: mesh.stats.edge("in", "checkout").total == 4, what="the connection counted")
    finally:
        release.set()
    mesh.close()
