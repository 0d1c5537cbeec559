"""ASGI server middleware (Starlette, FastAPI, any ASGI app).

Pure ASGI rather than Starlette's BaseHTTPMiddleware, so the context variable it sets
(caller, deadline) is visible inside the app and in the calls the app makes.

The inbound sequence itself (identity, telemetry, authorization, rate limit, context, stats) is
`meshlib.inbound`'s; this shell reads the scope into its `Request`, asks a Redis-backed rate
limit on a worker thread so the event loop never waits on it, and sends a `Refusal` as the
response. A Prometheus scrape of `Mesh(metrics_path=...)` is answered before all of it
(docs/observability.md), and so is a prequal probe (`meshlib.probing`).

Where no document of the service applies, the load is not counted, no mTLS names callers and
no access log is kept (`Gate.lane`), a plaintext request that needs nothing of telemetry, or
only its unsampled trace context and the in-flight count (`telemetry.server.unsampled`), or a
span (of a new trace sampled ahead, `telemetry.server.sampled`; a child of the caller's trace,
`telemetry.server.child`), is served inline, without a
`Request`: its caller, deadline, trace context, span and counts, what `admit`, `enter` and
`finish` would do for it and nothing else (docs/decisions.md, "The bare request", "The light
request" and "Until sent").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from meshlib import probing
from meshlib.balancing.orca import HEADER
from meshlib.context import InboundContext, inbound
from meshlib.headers import INBOUND, SOURCE, TIMEOUT, TRACEPARENT
from meshlib.inbound import (
    LIGHT,
    MARK,
    Gate,
    Pending,
    Refusal,
    Request,
    parse_timeout_ms,
)
from meshlib.probing import PROBE_PATH
from meshlib.security.authorization import (
    CLAIMED,
    PEER_KEY,
    SECURE_SCHEMES,
    asgi_peer,
    claimed,
)
from meshlib.telemetry import current_span, prometheus
from meshlib.telemetry.server import NO_SPAN, child, refill, sampled, unsampled
from meshlib.telemetry.tracing import ASGI_HEADERS

if TYPE_CHECKING:
    from meshlib.mesh import Mesh
    from meshlib.server_load import ServerLoad

Scope = dict[str, Any]
_WANTED = {name.encode(): name for name in INBOUND}
_monotonic = time.monotonic
_tuple_new = tuple.__new__
_set_inbound, _reset_inbound = inbound.set, inbound.reset
_set_context, _detach = current_span.set_context, current_span.detach
LOAD_HEADER = HEADER.encode()
_CLAIMED_get = CLAIMED.get


class MeshMiddleware:
    """`app.add_middleware(MeshMiddleware, mesh=mesh)` or `MeshMiddleware(app, mesh=mesh)`.

    With a control service and `Mesh(address=...)`, the app's lifespan registers that address
    and deregisters it at shutdown; `register=False` leaves that to whoever runs the server
    (`mesh.serve` registers the address it bound itself)."""

    def __init__(self, app: Any, mesh: Mesh, *, register: bool = True) -> None:
        self.app = app
        self.mesh = mesh
        self.register = register
        self.gate = Gate(mesh)
        self.telemetry = mesh.telemetry

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind != "http" or MARK in scope:
            if kind == "lifespan" and MARK not in scope:
                scope[MARK] = True
                await self.app(scope, receive, self._lifespan_send(send) if self.register else send)
            elif kind == "websocket" and MARK not in scope:
                await self._websocket(scope, receive, send)
            else:  # not HTTP, or already meshed further out
                await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == PROBE_PATH:  # a prequal probe: the mesh's, not the app's, not counted
            await probing.asgi_answer(self.mesh.load, send)
            return
        telemetry = self.telemetry
        if path == telemetry.metrics_path:  # a scrape: not traffic, not the app's
            await prometheus.asgi_answer(telemetry, scope, send)
            return
        now = _monotonic()
        gate = self.gate
        last = gate.last  # `gate.lane(now)`, inline while its last answer holds
        if (
            last[0] is self.mesh._snapshot
            and last[1] is gate.load.tracking
            and last[2] is telemetry.exposed
            and now < last[4]
        ):
            lane = last[3]
        else:
            lane = gate.lane(now)
        found = None
        if lane and not scope.get("extensions") and scope.get("scheme") not in SECURE_SCHEMES:
            found = {}  # the mesh's own headers (`meshlib.headers.INBOUND`), the last of each
            for name, value in scope["headers"]:
                if name in _WANTED:  # most are not: a membership test, cheaper than `get` and a check
                    found[_WANTED[name]] = value.decode("latin-1")
            spanned = None
            source = None  # as `source_of` reads it off plaintext: a claim that could name a service
            if SOURCE in found:
                source = found[SOURCE]
                source = _CLAIMED_get(source) or claimed(source) if source else None
            if lane == LIGHT:
                context = unsampled(telemetry, found)
                if context is None:  # a span to make: a new trace sampled ahead, a caller's trace
                    spanned = (sampled if TRACEPARENT not in found else child)(
                        telemetry, found, scope.get("method", "GET"), path,
                        scope.get("scheme", "http"), source,
                    )  # fmt: skip
                    if spanned is not None:
                        context = NO_SPAN  # the span's own context is current already
            else:
                context = NO_SPAN if TRACEPARENT not in found else None
            if context is not None:  # the light request (docs/decisions.md): `admit`'s work, inline
                scope[MARK] = True
                scope[PEER_KEY] = None
                started = now
                deadline = None
                if TIMEOUT in found:  # as `Request.enter` reads it
                    budget = parse_timeout_ms(found[TIMEOUT])
                    if budget is not None:
                        deadline = started + budget
                mesh = self.mesh
                sent = _Sent()  # no `__init__` of its own: made without a Python frame
                sent.send = send
                sent.status = None
                traced = _set_context(context) if context is not NO_SPAN else None
                if lane == LIGHT:
                    telemetry.inflight.append(None)
                method = scope.get("method", "GET")
                caller = _tuple_new(InboundContext, (mesh.service or "", source, deadline, method, path))
                token = _set_inbound(caller)  # `inbound_context(...)`, inline: one call less
                app = self.app
                failed: BaseException | None = None
                try:
                    await app(scope, receive, sent.respond)
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    _reset_inbound(token)
                    status = sent.status if failed is None or _whole(sent) else None  # cut short: failed
                    mesh.stats.record_in(source or "unknown", status, _monotonic() - started)
                    if lane == LIGHT:
                        telemetry.inflight.pop()
                        if traced is not None:
                            _detach(traced)
                            refill(telemetry)
                        elif spanned is not None:
                            spanned.finish_light(method, status, failed, scope.get("route"))
                return
        request = _request(scope, found)
        try:
            verdict = gate.admit(request)
            while isinstance(verdict, Pending):  # Redis, a JWKS fetch: never on the event loop
                await asyncio.to_thread(verdict.wait)
                verdict = verdict.then()
        except BaseException as exc:  # the mesh's own failure: counted, its span ended, then raised
            request.finish(None, exc)
            raise
        if verdict is not None:
            await _refuse(send, verdict)
            return
        if request.drop:  # a token the app is not to see (`forward: false`)
            dropped = {name.encode() for name in request.drop}
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k not in dropped]
        request.send = send
        request.status = None
        request.load = self.mesh.load if self.mesh.load_reports else None
        app = self.app  # an attribute: `self.app(...)` would first look for a method of that name
        error: BaseException | None = None
        try:
            await app(scope, receive, request.respond)
        except BaseException as exc:
            error = exc
            raise
        finally:
            # a response cut short by a failure is a failed request, whatever its status said
            status = request.status if error is None or _whole(request) else None
            request.finish(status, error, scope.get("route"))

    async def _websocket(self, scope: Scope, receive: Any, send: Any) -> None:
        """A WebSocket handshake is an HTTP GET through the same sequence (identity, end user,
        authorization, rate limit, the caller's context for the connection's life), counted with
        its answer (101 once accepted) and the connection's duration. Not under the concurrency
        limit or the server's load: a connection may last hours."""
        request = _request(scope)
        request.stream = True
        try:
            verdict = self.gate.admit(request)
            while isinstance(verdict, Pending):  # Redis, a JWKS fetch: never on the event loop
                await asyncio.to_thread(verdict.wait)
                verdict = verdict.then()
        except BaseException as exc:
            request.finish(None, exc)
            raise
        if verdict is not None:
            await _refuse_handshake(scope, receive, send, verdict)
            return
        if request.drop:  # a token the app is not to see (`forward: false`)
            dropped = {name.encode() for name in request.drop}
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k not in dropped]
        answer: list[int | None] = [None]

        async def respond(message: dict[str, Any]) -> None:
            kind = message["type"]
            if answer[0] is None:
                if kind == "websocket.accept":
                    answer[0] = 101
                elif kind == "websocket.close":  # closed before accepting: the server's 403
                    answer[0] = 403
                elif kind == "websocket.http.response.start":
                    answer[0] = message["status"]
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, respond)
        except BaseException as exc:
            error = exc
            raise
        finally:
            request.finish(answer[0] if error is None else None, error, scope.get("route"))

    def _lifespan_send(self, send: Any) -> Any:
        """Register with the control service once the app has started (when the Mesh knows its
        address), deregister that address once it has shut down."""
        mesh = self.mesh
        registered: list[str] = []

        async def wrapped(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "lifespan.shutdown.complete":
                # the address registered at startup only: a gRPC endpoint of the same process,
                # or another server's address, stays registered
                for address in registered:
                    await asyncio.to_thread(mesh.deregister, address)
            await send(message)
            if (
                kind == "lifespan.startup.complete"
                and mesh.link is not None
                and mesh.address
                and mesh.service
            ):
                mesh.register(mesh.address)
                registered.append(mesh.address)

        return wrapped


class _Sent:
    """The server's `send` as a bare or light request hands it to the app, seeing the status go
    by, and the last body message (`_whole`)."""

    __slots__ = ("last", "send", "status")
    send: Any
    status: int | None
    last: dict[str, Any]  # the last body message sent, once one was

    def respond(self, message: dict[str, Any]) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        else:
            self.last = message
        send = self.send
        return send(message)


class _Exchange(Request):
    """A `Request` as the ASGI shell runs it: with the server's `send`, which the app is handed
    as `respond`, and the response's status once sent (slots of the one object made per request,
    where a closure over them would be a second)."""

    __slots__ = ("last", "load", "send", "status")
    send: Any
    status: int | None
    last: dict[str, Any]  # the last body message sent, once one was (`_whole`)
    load: ServerLoad | None  # set while responses carry ORCA load reports

    def respond(self, message: dict[str, Any]) -> Awaitable[None]:
        """The server's `send`, seeing the status go by: a plain method returning what `send`
        returns (no coroutine of its own per message)."""
        if message["type"] == "http.response.start":
            self.status = message["status"]
            load = self.load
            if load is not None:  # ORCA's load report (docs/load-reports.md)
                pair = (LOAD_HEADER, load.header().encode("latin-1"))
                message = {**message, "headers": [*message.get("headers", ()), pair]}
        else:
            self.last = message
        send = self.send  # a slot: `self.send(...)` would first look for a method of that name
        return send(message)


def _whole(sent: _Sent | _Exchange) -> bool:
    """Whether the response was sent whole (its last body message), asked only of a request the
    app failed: a failure after that does not undo the response the caller got. Read off the last
    message kept, rather than checked as each one goes by."""
    last = getattr(sent, "last", None)
    return last is not None and last["type"] == "http.response.body" and not last.get("more_body")


def _request(scope: Scope, found: dict[str, str] | None = None) -> _Exchange:
    """The neutral view of an HTTP or WebSocket scope (marked as meshed, its peer recorded);
    `found`: its mesh headers, when already read."""
    scope[MARK] = True
    headers = scope["headers"]
    if found is None:  # as `__call__` reads them
        found = {}
        for name, value in headers:
            if name in _WANTED:
                found[_WANTED[name]] = value.decode("latin-1")
    scheme = scope.get("scheme", "http")
    if scope.get("extensions"):
        peer, secure = asgi_peer(scope)
    else:  # asgi_peer's answer without extensions (no TLS layer said anything), inline
        peer, secure = None, scheme in SECURE_SCHEMES
    scope[PEER_KEY] = peer
    return _Exchange(
        scope.get("method", "GET"), scope["path"], scheme, peer, secure, found, headers, ASGI_HEADERS
    )


async def _refuse_handshake(scope: Scope, receive: Any, send: Any, refusal: Refusal) -> None:
    """The refusal as the handshake's HTTP answer where the server can send one, else a close
    before accept (1008: policy violation)."""
    await receive()  # websocket.connect
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await _refuse(send, refusal, prefix="websocket.")
    else:
        await send({"type": "websocket.close", "code": 1008})


async def _refuse(send: Any, refusal: Refusal, prefix: str = "") -> None:
    headers = [(name.encode(), value.encode("latin-1")) for name, value in refusal.headers]
    await send({"type": f"{prefix}http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": f"{prefix}http.response.body", "body": refusal.body})
