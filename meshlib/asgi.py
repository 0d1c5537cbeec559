"""ASGI server middleware (Starlette, FastAPI, any ASGI app).

Pure ASGI rather than Starlette's BaseHTTPMiddleware, so the context variable it sets
(caller, deadline) is visible inside the app and in the calls the app makes.

Order per request: identity (certificate, else header) -> authorization -> rate limit -> app.
Authorization first, so requests that would be refused anyway spend no rate-limit tokens.
Telemetry (the SERVER span, trace context, access log) starts before authorization, so refused
requests are traced and logged too; a Prometheus scrape of `Mesh(metrics_path=...)` is answered
before all of it (docs/observability.md).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from meshlib.context import inbound
from meshlib.inbound import SOURCE, TIMEOUT, context_from, rate_limited_async
from meshlib.security.authorization import PEER_KEY, Authorizer, asgi_caller, peer_var
from meshlib.telemetry import prometheus
from meshlib.telemetry.server import asgi_inbound

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

Scope = dict[str, Any]
_SOURCE = SOURCE.encode()
_MARK = "meshlib.inbound"  # set on the scope by the outermost middleware: a second one passes through
_TIMEOUT = TIMEOUT.encode()
_TRACEPARENT = b"traceparent"


class MeshMiddleware:
    """`app.add_middleware(MeshMiddleware, mesh=mesh)` or `MeshMiddleware(app, mesh=mesh)`."""

    def __init__(self, app: Any, mesh: Mesh) -> None:
        self.app = app
        self.mesh = mesh
        self.authorizer = Authorizer(mesh)
        self.telemetry = mesh.telemetry

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" and _MARK not in scope:
            scope[_MARK] = True
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if scope["type"] == "websocket" and _MARK not in scope:
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http" or _MARK in scope:  # not HTTP, or already meshed further out
            await self.app(scope, receive, send)
            return
        if scope["path"] == self.telemetry.metrics_path:  # a scrape: not traffic, not the app's
            await prometheus.asgi_answer(self.telemetry, scope, send)
            return
        scope[_MARK] = True
        claimed = timeout = traceparent = None
        for name, value in scope["headers"]:
            if name == _SOURCE:
                claimed = value.decode("latin-1")
            elif name == _TIMEOUT:
                timeout = value.decode("latin-1")
            elif name == _TRACEPARENT:
                traceparent = value
        peer, source = asgi_caller(scope, claimed, self.mesh)
        scope[PEER_KEY] = peer
        observed = asgi_inbound(self.telemetry, scope, source, traceparent)
        ctx = context_from(self.mesh.service or "", scope["method"], scope["path"], source, timeout)
        status: int | None = None

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.monotonic()
        reason = self.authorizer.denial(source, scope["method"], scope["path"])
        if reason is not None:
            await _forbidden(send, reason)
            self.mesh.stats.record("in", source or "unknown", None, 403, time.monotonic() - started)
            if observed is not None:
                observed.finish(403)
            return
        retry_after = await rate_limited_async(self.mesh)
        if retry_after is not None:
            await _too_many(send, retry_after)
            self.mesh.stats.record("in", source or "unknown", None, 429, time.monotonic() - started)
            if observed is not None:
                observed.finish(429)
            return
        token = inbound.set(ctx)
        peer_token = peer_var.set(peer) if peer is not None else None
        error: BaseException | None = None
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if peer_token is not None:
                peer_var.reset(peer_token)
            inbound.reset(token)
            self.mesh.stats.record("in", source or "unknown", None, status, time.monotonic() - started)
            if observed is not None:
                observed.finish(status, error, scope.get("route"))

    async def _websocket(self, scope: Scope, receive: Any, send: Any) -> None:
        """A WebSocket handshake is an HTTP GET: the same identity and authorization apply."""
        scope[_MARK] = True
        claimed = next((v.decode("latin-1") for k, v in scope["headers"] if k == _SOURCE), None)
        peer, source = asgi_caller(scope, claimed, self.mesh)
        scope[PEER_KEY] = peer
        reason = self.authorizer.denial(source, "GET", scope["path"])
        if reason is not None:
            await receive()  # websocket.connect
            if "websocket.http.response" in (scope.get("extensions") or {}):
                await _forbidden(send, reason, prefix="websocket.")
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        peer_token = peer_var.set(peer) if peer is not None else None
        try:
            await self.app(scope, receive, send)
        finally:
            if peer_token is not None:
                peer_var.reset(peer_token)

    def _lifespan_send(self, send: Any) -> Any:
        """Register with the control service once the app has started (when the Mesh knows its
        address), deregister once it has shut down."""
        mesh = self.mesh

        async def wrapped(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "lifespan.shutdown.complete" and mesh.link is not None:
                await asyncio.to_thread(mesh.deregister)
            await send(message)
            if (
                kind == "lifespan.startup.complete"
                and mesh.link is not None
                and mesh.address
                and mesh.service
            ):
                mesh.register()

        return wrapped


async def _forbidden(send: Any, reason: str, prefix: str = "") -> None:
    body = reason.encode("utf-8", "replace")
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"x-content-type-options", b"nosniff"),
    ]
    await send({"type": f"{prefix}http.response.start", "status": 403, "headers": headers})
    await send({"type": f"{prefix}http.response.body", "body": body})


async def _too_many(send: Any, retry_after: int) -> None:
    body = b"rate limited"
    headers = [
        (b"content-type", b"text/plain"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after).encode()),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})
