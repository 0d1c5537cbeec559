"""The ASGI shell's bare request: when no document, telemetry, load count or mTLS applies, the
caller, deadline and counts are done inline, and a request gets exactly what the full sequence
(`Gate.admit`, `Request.finish`) gives it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

import meshlib
from meshlib import context
from meshlib.http import asgi
from meshlib.http.asgi import MeshMiddleware
from meshlib.inbound import BARE, LIGHT, MARK
from meshlib.probing import PROBE_PATH
from meshlib.rules import parse_documents
from meshlib.security.authorization import PEER_KEY, current_peer
from meshlib.telemetry import metrics_app
from meshlib.telemetry.providers import RECHECK_S, UNSETTLED, ProviderSource

TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _plain() -> meshlib.Mesh:
    return meshlib.Mesh("orders", tracing=False, metrics=False)


class App:
    """Notes what it saw (the caller's context, the peer, the scope's marks), then answers
    `status`, or raises before or after its response starts."""

    def __init__(self, status: int = 200, fail: str | None = None) -> None:
        self.status = status
        self.fail = fail
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        ctx = context.current()
        assert ctx is not None
        self.seen.append(
            {
                "service": ctx.service,
                "source": ctx.source,
                "remaining": ctx.remaining(),
                "method": ctx.method,
                "path": ctx.path,
                "peer": current_peer(),
                "marked": scope.get(MARK),
                "peer_key": PEER_KEY in scope and scope[PEER_KEY],
            }
        )
        await self.answer(send)

    async def answer(self, send: Any) -> None:
        """`status`, or a failure before or after the response starts."""
        if self.fail == "before":
            raise RuntimeError("before the response")
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        if self.fail == "after":
            raise RuntimeError("after the response")


def _call(
    middleware: MeshMiddleware, headers: list[tuple[bytes, bytes]], **scope: Any
) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    full = {"type": "http", "method": "POST", "path": "/api/x", "scheme": "http", "headers": headers} | scope
    with contextlib.suppress(RuntimeError):  # the app's own failure, passed on by both paths
        asyncio.run(middleware(full, receive, send))
    return sent


def _full(mesh: meshlib.Mesh) -> meshlib.Mesh:
    """The same mesh, sent through the full sequence: counting the server's load is one thing
    that makes a request not bare, and changes nothing else a request gets."""
    mesh.load.tracking = True
    return mesh


CASES = {
    "caller and deadline": [(b"x-mesh-source", b"checkout"), (b"x-mesh-timeout", b"1500")],
    "nothing": [(b"accept", b"*/*")],
    "empty caller": [(b"x-mesh-source", b"")],
    "malformed deadline": [(b"x-mesh-source", b"checkout"), (b"x-mesh-timeout", b"soon")],
    "negative deadline": [(b"x-mesh-timeout", b"-5")],
    "repeated headers": [
        (b"x-mesh-source", b"first"),
        (b"x-mesh-timeout", b"9000"),
        (b"x-mesh-source", b"checkout"),
        (b"x-mesh-timeout", b"1500"),
    ],
    "other mesh headers": [(b"x-mesh-source", b"checkout"), (b"x-mesh-attempt", b"2"), (b"baggage", b"k=v")],
}


@pytest.mark.parametrize("headers", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize(("status", "fail"), [(200, None), (503, None), (200, "before"), (201, "after")])
def test_a_bare_request_gets_what_the_full_sequence_gives(
    headers: list[tuple[bytes, bytes]], status: int, fail: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcomes = []
    for bare in (True, False):
        mesh = _plain() if bare else _full(_plain())
        app = App(status, fail)
        middleware = MeshMiddleware(app, mesh=mesh)
        with monkeypatch.context() as patch:
            if bare:  # the full sequence's first step is never reached
                patch.setattr(asgi, "_request", None)
            assert (middleware.gate.lane() == BARE) is bare
            sent = _call(middleware, list(headers))
        (seen,) = app.seen
        remaining = seen.pop("remaining")
        edges = {key: dict(edge.by_class) for key, edge in mesh.stats.edges().items()}
        outcomes.append((seen, remaining is None, [m["type"] for m in sent], edges))
        if remaining is not None:
            assert 1.0 < remaining <= 1.5
        mesh.close()
    assert outcomes[0] == outcomes[1]
    seen, _, _, edges = outcomes[0]
    assert seen["service"] == "orders" and seen["method"] == "POST" and seen["path"] == "/api/x"
    assert seen["marked"] is True and seen["peer_key"] is None and seen["peer"] is None
    assert sum(n for counts in edges.values() for n in counts.values()) == 1


def test_the_context_is_restored_after_a_bare_request() -> None:
    mesh = _plain()
    middleware = MeshMiddleware(App(), mesh=mesh)
    assert middleware.gate.lane() == BARE

    async def once() -> None:
        sent: list[Any] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"x-mesh-source", b"a")]}
        await middleware(scope, None, send)
        assert context.current() is None
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]

    asyncio.run(once())
    mesh.close()


def test_a_bare_request_is_counted_with_its_status_and_duration() -> None:
    mesh = _plain()
    middleware = MeshMiddleware(App(404), mesh=mesh)
    started = time.monotonic()
    _call(middleware, [(b"x-mesh-source", b"checkout")])
    edge = mesh.stats.edge("in", "checkout")
    assert dict(edge.by_class) == {"4xx": 1}
    assert 0 <= edge.latencies[0] <= time.monotonic() - started
    _call(middleware, [])
    assert dict(mesh.stats.edge("in", "unknown").by_class) == {"4xx": 1}
    mesh.close()


def _not_bare(mesh: meshlib.Mesh) -> None:
    app = App()
    middleware = MeshMiddleware(app, mesh=mesh)
    assert middleware.gate.lane() != BARE
    mesh.close()


def test_a_document_of_the_service_makes_requests_not_bare() -> None:
    mesh = _plain()
    middleware = MeshMiddleware(App(), mesh=mesh)
    assert middleware.gate.lane() == BARE
    limit = {"kind": "RateLimit", "service": "orders", "requests_per_second": 1000, "burst": 1000}
    mesh.apply_rules(parse_documents([limit]), "2")
    assert middleware.gate.lane() != BARE  # decided again for the new rules
    other = {"kind": "RateLimit", "service": "payments", "requests_per_second": 1, "burst": 1}
    mesh.apply_rules(parse_documents([other]), "3")
    assert middleware.gate.lane() == BARE  # another service's document does not apply here
    mesh.close()


def test_metrics_served_later_make_requests_not_bare() -> None:
    mesh = _plain()
    middleware = MeshMiddleware(App(), mesh=mesh)
    assert middleware.gate.lane() == BARE
    metrics_app(mesh)  # a port of its own for /metrics: in-flight requests are counted from now on
    assert middleware.gate.lane() != BARE
    mesh.close()


def test_a_probe_after_bare_requests_sends_the_next_ones_through_the_full_sequence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mesh = _plain()
    middleware = MeshMiddleware(App(), mesh=mesh)
    _call(middleware, [])  # served bare: the answer is kept
    assert middleware.gate.last[3] == BARE
    _call(middleware, [], path=PROBE_PATH)  # the first probe turns counting on
    requests = []
    real = asgi._request
    monkeypatch.setattr(asgi, "_request", lambda s, *found: requests.append(s) or real(s, *found))
    _call(middleware, [])
    assert len(requests) == 1 and mesh.load.latency() is not None  # in full, and counted
    mesh.close()


def test_a_global_provider_set_while_serving_is_taken_up_within_a_recheck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The global tracer provider may be set after the first request: while the mesh has found
    none, the lane's answer holds for `RECHECK_S` only, then the sources are asked again."""
    mesh = meshlib.Mesh("orders", metrics=False)  # the global tracer provider: not set in tests
    traces = mesh.telemetry.traces
    assert traces.settled is UNSETTLED
    gate = MeshMiddleware(App(), mesh=mesh).gate
    assert gate.lane(now=100.0) == BARE
    provider = TracerProvider()  # now "set": what the source finds from here on
    real_get = ProviderSource.get
    monkeypatch.setattr(ProviderSource, "get", lambda s: s._bind(provider) if s is traces else real_get(s))
    assert gate.lane(now=100.0 + RECHECK_S / 2) == BARE  # the answer still holds
    assert gate.lane(now=100.0 + RECHECK_S) == LIGHT  # asked again: traced, some requests dropped
    mesh.close()
    provider.shutdown()


def test_telemetry_load_reports_and_mtls_make_requests_not_bare(tmp_path: Any) -> None:
    provider = TracerProvider()
    _not_bare(meshlib.Mesh("orders", tracing=provider, metrics=False))
    _not_bare(meshlib.Mesh("orders", tracing=False, metrics=False, metrics_path="/metrics"))
    _not_bare(meshlib.Mesh("orders", tracing=False, metrics=False, access_log=str(tmp_path / "access.log")))
    _not_bare(meshlib.Mesh("orders", tracing=False, metrics=False, load_reports=True))
    mesh = _plain()
    mesh.mtls = "PERMISSIVE"  # what a Mesh with credentials says: only certificates name callers
    _not_bare(mesh)
    provider.shutdown()


@pytest.mark.parametrize(
    ("headers", "scope"),
    [
        ([(b"traceparent", TRACEPARENT)], {}),
        ([], {"scheme": "https"}),
        ([], {"extensions": {"tls": {}}}),
    ],
    ids=["traceparent", "https", "tls extension"],
)
def test_a_trace_to_pass_on_or_a_tls_connection_takes_the_full_sequence(
    headers: list[tuple[bytes, bytes]], scope: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    mesh = _plain()
    app = App()
    middleware = MeshMiddleware(app, mesh=mesh)
    assert middleware.gate.lane() == BARE
    requests = []
    real = asgi._request
    monkeypatch.setattr(asgi, "_request", lambda s, *found: requests.append(s) or real(s, *found))
    sent = _call(middleware, [(b"x-mesh-source", b"checkout"), *headers], **scope)
    assert len(requests) == 1 and [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    # over TLS no header names the caller; in plaintext the header does
    assert app.seen[0]["source"] == (None if scope else "checkout")
    mesh.close()
