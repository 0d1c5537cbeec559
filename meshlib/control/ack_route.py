"""The fast way in for the two requests every subscriber makes: `POST /v1/ack`, sent after
every push, and `GET /v1/watch`, sent by every subscriber of a replica that died to the replica
that takes it over, all at once.

An ASGI middleware placed first inside Starlette's error middleware: an ack or a watch goes
straight to its handler (`handlers.post_ack`, `handlers.watch`: the same checks and answers),
past the exception middleware, the router's match over every route and the request/response
wrapper (which a watch stream would otherwise cross with every event it sends). Everything
else, other methods on these paths included (405), goes the usual way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from meshlib.control.plane import ControlPlane

PATH = "/v1/ack"
WATCH = "/v1/watch"

KEEP_ALIVE = 75.0
"""Seconds the control service keeps an idle connection open (uvicorn's `timeout_keep_alive`;
its default of 5 closed a subscriber's ack connection between pushes, so every ack paid for a
new connection: 1.5 ms of the service's CPU against 0.3 ms on a kept one). Longer than the
subscriber's own `subscriber.KEEPALIVE_EXPIRY`, so the client is the one that lets it go and
never sends on a connection the service is closing."""


class AckFastPath:
    def __init__(self, app: ASGIApp, plane: ControlPlane) -> None:
        from meshlib.control.handlers import _handler, post_ack, watch

        self.app = app
        self._ack = _handler(post_ack, plane)
        self._watch = _handler(watch, plane)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path, method = scope["path"], scope["method"]
            if path == PATH and method == "POST":
                response = await self._ack(Request(scope, receive))
                await response(scope, receive, send)
                return
            if path == WATCH and method in ("GET", "HEAD"):
                response = await self._watch(Request(scope, receive))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
