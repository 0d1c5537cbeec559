"""The gateway's proxy: an incoming request, matched against the gateway's Route, sent on to a
mesh service through the Mesh's own async client, with both bodies streamed.

It runs inside the inbound sequence (`Mesh.asgi`), under the gateway's own service name, so
that the gateway's Authorization and RateLimit documents apply and the caller's trace context
and deadline are the context of the call it makes. The call goes through the client stack
like any other (the target service's Route and Destination: weights, header routes, retries,
breakers; mTLS with the gateway's identity in a secure mesh); the gateway adds the route's
`timeout`, as the deadline of the whole call, by narrowing the inbound context.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import httpx

from meshlib.context import InboundContext, inbound
from meshlib.errors import BulkheadFullError, DeadlineExceeded, NoEndpointsError
from meshlib.gateway import forwarding, paths
from meshlib.gateway.hosts import host_of
from meshlib.gateway.table import GatewayTable
from meshlib.raw_path import prefix_end

if TYPE_CHECKING:
    from meshlib.gateway.table import GatewayRoute
    from meshlib.mesh import Mesh
    from meshlib.snapshot import Snapshot

log = logging.getLogger("meshlib.gateway")

BUFFERED_BODY_BYTES = 64 * 1024
"""A request body of at most this many bytes (by its Content-Length) is read whole before the
call, so that the target's retries may send it again; a larger one, or one of unknown length,
streams through and is never retried (the retry filter's own rule for a body it cannot replay)."""

Scope = dict[str, Any]


class _Headers:
    """A case-insensitive `get` over an ASGI header list, for route matching."""

    __slots__ = ("_items",)

    def __init__(self, items: list[tuple[bytes, bytes]]) -> None:
        self._items = items

    def get(self, name: str, default: Any = None) -> Any:
        key = name.encode("latin-1")
        found = [v for k, v in self._items if k.lower() == key]
        return b", ".join(found).decode("latin-1") if found else default


class Proxy:
    """The ASGI app of a gateway's routed listeners (not the redirect-only ones)."""

    def __init__(self, mesh: Mesh, service: str, client: httpx.AsyncClient) -> None:
        self.mesh = mesh
        self.service = service
        self.client = client
        self._table: tuple[Snapshot | None, GatewayTable, int] = (None, GatewayTable(None), 0)

    def table(self) -> tuple[GatewayTable, int]:
        """The compiled table and trusted hops of the Snapshot in force (compiled once per Snapshot)."""
        snapshot = self.mesh.snapshot
        cached = self._table
        if cached[0] is not snapshot:
            rules = snapshot.rules
            gateway = rules.gateway(self.service)
            hops = gateway.trusted_hops if gateway is not None else 0
            table = GatewayTable(rules.route(self.service))
            cached = self._table = (snapshot, table, hops)
            # targets found only by the process default discovery provider are looked up there
            self.mesh.discovery.want(*{s for route in table.routes for s in route.services})
        return cached[1], cached[2]

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = scope.get("raw_path") or scope["path"].encode("utf-8")
        clean = paths.normalized(raw)
        if clean is not raw:  # dot-segments: the route matches, and the call sends, the path resolved
            if clean is None:
                await answer(send, 400, "a dot-segment in an encoded path\n")
                return
            scope["raw_path"] = clean
            scope["path"] = unquote(clean.decode("latin-1"))
        table, hops = self.table()
        headers = scope["headers"]
        view = _Headers(headers)
        authority = view.get("host") or ""
        host = host_of(authority)
        route = table.match(host, scope["method"], scope["path"], view)
        if route is None:
            await answer(send, 404, f"no route for {host or 'this host'}{scope['path']}\n")
            return
        scope["route"] = route.name  # telemetry names the route, as a client's does
        if route.redirect is not None:
            await self._redirect(scope, send, route, authority)
            return
        service = route.choose(random.random())
        if service not in self.mesh.snapshot.plans:  # never out by DNS: a gateway calls mesh services
            log.info("gateway route %s: no rules, registration or discovery for %s", route.name, service)
            await answer(send, 503, f"{service}: no endpoint available\n")
            return
        await self._forward(scope, receive, send, route, service, hops)

    async def _redirect(self, scope: Scope, send: Any, route: GatewayRoute, authority: str) -> None:
        """A rule with `redirect:` answers 3xx with the Location `meshlib.redirects` makes."""
        from meshlib.redirects import location

        spec = route.redirect
        path = (scope.get("raw_path") or scope["path"].encode("utf-8")).decode("latin-1")  # as sent
        prefix = route.match.prefix
        if prefix is not None:  # the part of the path as sent that reads as the prefix
            cut = prefix_end(path, prefix)
            prefix = path[:cut] if cut is not None else prefix
        where = location(
            spec,
            scheme=scope.get("scheme", "http"),
            authority=authority,
            path=path,
            query=scope.get("query_string", b"").decode("latin-1"),
            matched_prefix=prefix,
        )
        await answer(send, int(spec.code), "", location=where)

    async def _forward(
        self, scope: Scope, receive: Any, send: Any, route: GatewayRoute, service: str, hops: int
    ) -> None:
        client = scope.get("client")
        headers = forwarding.inward(
            scope["headers"],
            client=client[0] if client else None,
            scheme=scope.get("scheme", "http"),
            trusted_hops=hops,
        )
        url = httpx.URL(scheme="http", host=service, raw_path=_target(scope, route))
        chunked = any(k.lower() == b"transfer-encoding" for k, _ in scope["headers"])
        content = await _body(headers, chunked, receive)
        request = self.client.build_request(scope["method"], url, headers=headers, content=content)
        token = _narrowed(route.timeout)
        try:
            response = await self.client.send(request, stream=True)
        # short reasons to the outside (the full one, which may name addresses, goes to the log)
        except (NoEndpointsError, BulkheadFullError) as exc:  # none, every breaker open, or full
            log.info("gateway call to %s refused: %s", service, exc)
            await answer(send, 503, f"{service}: no endpoint available\n")
            return
        except (DeadlineExceeded, httpx.TimeoutException) as exc:
            log.info("gateway call to %s timed out: %s", service, exc)
            await answer(send, 504, f"{service}: deadline exceeded\n")
            return
        except httpx.TransportError as exc:
            log.info("gateway call to %s failed: %s", service, exc)
            await answer(send, 502, f"{service}: {type(exc).__name__}\n")
            return
        finally:
            if token is not None:
                inbound.reset(token)
        try:
            out = forwarding.outward(response.headers.raw)
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


def _target(scope: Scope, route: GatewayRoute) -> bytes:
    """The path and query to send: the raw (still encoded) path, rewritten if the rule says so."""
    raw = scope.get("raw_path") or scope["path"].encode("utf-8")
    if route.rewrite is not None:
        prefix = route.match.prefix or ""
        sent = raw.decode("latin-1")
        cut = prefix_end(sent, prefix)
        if cut is not None:  # the prefix as sent replaced, the rest as the caller encoded it
            raw = route.rewrite_path(prefix + sent[cut:]).encode("latin-1")
        else:  # not read from the path as sent (cannot happen for the path the route matched)
            raw = quote(route.rewrite_path(scope["path"]), safe="/%:@!$&'()*+,;=~-._").encode("ascii")
    query = scope.get("query_string") or b""
    return raw + b"?" + query if query else raw


def _narrowed(timeout: float | None) -> Any:
    """The route's timeout as the deadline of the call (never later than the caller's own)."""
    if timeout is None:
        return None
    ctx = inbound.get()
    deadline = time.monotonic() + timeout
    if ctx is None:
        return inbound.set(InboundContext("", None, deadline))
    if ctx.deadline is not None and ctx.deadline <= deadline:
        return None
    return inbound.set(dataclasses.replace(ctx, deadline=deadline))


async def _body(
    headers: list[tuple[bytes, bytes]], chunked: bool, receive: Any
) -> bytes | AsyncIterator[bytes] | None:
    """The request body to send: None without one, bytes when small and of known length,
    else a stream that passes each chunk on as it arrives (`chunked`: the caller sent one
    without a length)."""
    length = next((v for k, v in headers if k == b"content-length"), None)
    if length is None and not chunked:
        return None
    if length is not None and length.isdigit() and int(length) <= BUFFERED_BODY_BYTES:
        if int(length) == 0:
            return b""
        parts = []
        more = True
        while more:
            message = await receive()
            parts.append(message.get("body", b""))
            more = message.get("more_body", False)
        return b"".join(parts)
    return _stream(receive)


async def _stream(receive: Any) -> AsyncIterator[bytes]:
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        if chunk:
            yield chunk


async def answer(send: Any, status: int, text: str, *, location: str | None = None) -> None:
    """A short plain-text answer of the gateway's own (no route, no endpoints, a redirect)."""
    body = text.encode("utf-8", "replace")
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"x-content-type-options", b"nosniff"),  # the text may quote the request's host
    ]
    if location is not None:
        headers.append((b"location", location.encode("latin-1", "replace")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
