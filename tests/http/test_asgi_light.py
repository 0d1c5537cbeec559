"""The ASGI shell's light request: in a traced or measured service where no document, load
count, mTLS or access log applies, a request that comes out unsampled (a new trace decided ahead
as dropped, a child of a caller's unsampled trace) runs inline, without a `Request`, and gets
exactly what the full sequence (`Gate.admit`, `Request.finish`) gives it; any other request
takes the full sequence."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from opentelemetry import baggage, propagate
from opentelemetry import trace as trace_api
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)

import meshlib
from meshlib import context
from meshlib.http import asgi
from meshlib.http.asgi import MeshMiddleware
from meshlib.inbound import BARE, FULL, LIGHT, MARK
from meshlib.security.authorization import PEER_KEY
from meshlib.telemetry import tracing
from tests.http.test_asgi import App as BareApp

TRACEPARENT = b"traceparent"
CALLER_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN = 0xB7AD6B7169203331


def _traceparent(flags: str, trace: str = f"{CALLER_TRACE:032x}", version: str = "00") -> tuple[bytes, bytes]:
    return TRACEPARENT, f"{version}-{trace}-{CALLER_SPAN:016x}-{flags}".encode()


class _Mesh:
    """A service traced with new traces dropped (a caller's sampled trace is sampled), its spans
    kept in memory, its metrics read by an in-memory reader."""

    def __init__(self, sampler: Any = None, metrics: bool = True) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(sampler=sampler or ParentBased(ALWAYS_OFF))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.meters = MeterProvider(metric_readers=[InMemoryMetricReader()]) if metrics else False
        self.mesh = meshlib.Mesh("orders", tracing=self.provider, metrics=self.meters)

    def close(self) -> None:
        self.mesh.close()
        self.provider.shutdown()
        if self.meters:
            self.meters.shutdown()


class App(BareApp):
    """Notes what the app sees: the caller's context, the span the mesh made current, what a
    call it makes would carry, the requests counted in flight."""

    def __init__(
        self, mesh: meshlib.Mesh, status: int = 200, fail: str | None = None, route: str | None = None
    ) -> None:
        super().__init__(status, fail)
        self.mesh = mesh
        self.route = route
        self.span_ids: list[int] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.route is not None:  # as a router sets it (Starlette's is the route object)
            scope["route"] = self.route
        ctx = context.current()
        assert ctx is not None
        span = trace_api.get_current_span().get_span_context()
        carried: dict[str, str] = {}
        propagate.inject(carried)
        parts = carried["traceparent"].split("-") if "traceparent" in carried else None
        self.span_ids.append(span.span_id)
        self.seen.append(
            {
                "caller": (ctx.service, ctx.source, ctx.method, ctx.path, ctx.remaining() is None),
                "marked": (scope.get(MARK), PEER_KEY in scope and scope[PEER_KEY]),
                "span": None
                if not span.is_valid
                else (
                    span.trace_id == CALLER_TRACE,
                    span.span_id != CALLER_SPAN,
                    span.is_remote,
                    span.trace_flags,
                ),
                "sends": None if parts is None else (parts[1] == f"{span.trace_id:032x}", parts[3]),
                "tracestate": carried.get("tracestate"),
                "baggage": baggage.get_all(),
                "in flight": self.mesh.telemetry.active_in,
                "carried": tracing.CARRIED.get(),
            }
        )
        await self.answer(send)


def _call(middleware: MeshMiddleware, headers: list[tuple[bytes, bytes]]) -> list[str]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def once() -> None:
        scope = {"type": "http", "method": "POST", "path": "/api/x", "scheme": "http", "headers": headers}
        with contextlib.suppress(RuntimeError):  # the app's own failure, passed on by both paths
            await middleware(scope, receive, send)
        # the context is the one before the request, whichever path ran it
        assert context.current() is None and not trace_api.get_current_span().get_span_context().is_valid

    asyncio.run(once())
    return [m["type"] for m in sent]


def _full_sequences(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The scopes the full sequence is asked to read from now on."""
    requests: list[Any] = []
    real = asgi._request
    monkeypatch.setattr(asgi, "_request", lambda scope, *found: requests.append(scope) or real(scope, *found))
    return requests


CALLER = [(b"x-mesh-source", b"checkout"), (b"x-mesh-timeout", b"1500")]
LIGHT_CASES = {
    "a new trace, dropped": [],
    "a caller's sampled trace": [_traceparent("01")],
    "a caller's unsampled trace": [_traceparent("00")],
    "a caller's unsampled trace, random id": [_traceparent("02")],
    "a caller's unsampled trace, other flags set": [_traceparent("fe")],
    "a new trace with tracestate": [(b"tracestate", b"vendor=1")],  # ignored without a traceparent
}
FULL_CASES = {
    "with tracestate": [_traceparent("00"), (b"tracestate", b"vendor=1")],
    "with baggage": [_traceparent("00"), (b"baggage", b"tenant=a")],
    "a new trace with baggage": [(b"baggage", b"tenant=a")],
    "malformed": [(b"traceparent", b"00-xyz")],
    "an all-zero trace id": [_traceparent("00", trace="0" * 32)],
    "another version": [_traceparent("00", version="01")],
    "uppercase": [_traceparent("00", trace=f"{CALLER_TRACE:032X}")],
    "uppercase flags": [_traceparent("0A")],
    "an all-zero span id": [(TRACEPARENT, f"00-{CALLER_TRACE:032x}-{0:016x}-00".encode())],
}


SAMPLERS = {"new traces dropped": ParentBased(ALWAYS_OFF), "every trace sampled": ALWAYS_ON}


def _exported(span: Any) -> tuple[Any, ...]:
    """What a backend sees of an exported span (an exception event's stack trace aside: its frames
    are the middleware's own)."""
    events = [(e.name, sorted(k for k in e.attributes if k != "exception.stacktrace")) for e in span.events]
    status = (span.status.status_code, span.status.description)
    return span.kind, span.name, dict(span.attributes), status, span.context.trace_id == CALLER_TRACE, events


@pytest.mark.parametrize("sampler", SAMPLERS.values(), ids=list(SAMPLERS))
@pytest.mark.parametrize(
    "headers", [*LIGHT_CASES.values(), *FULL_CASES.values()], ids=[*LIGHT_CASES, *FULL_CASES]
)
@pytest.mark.parametrize(
    ("status", "fail", "route"),
    [
        (200, None, None),
        (503, None, None),
        (200, "before", None),
        (201, "after", None),
        (200, None, "/api/{id}"),
    ],
)
def test_a_request_gets_what_the_full_sequence_gives(
    sampler: Any,
    headers: list[tuple[bytes, bytes]],
    status: int,
    fail: str | None,
    route: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    light = any(headers is case for case in LIGHT_CASES.values())
    outcomes = []
    for lane in (LIGHT, FULL):
        service = _Mesh(sampler)
        mesh = service.mesh
        if lane == FULL:
            mesh.load.tracking = True  # one thing that takes every request through the full sequence
        app = App(mesh, status, fail, route)
        middleware = MeshMiddleware(app, mesh=mesh)
        assert middleware.gate.lane() == lane
        _call(middleware, list(CALLER))  # the first new trace: its response decides the next ones
        exported = len(service.exporter.get_finished_spans())
        requests = _full_sequences(monkeypatch)
        sent = _call(middleware, [*CALLER, *headers])
        monkeypatch.undo()
        if lane == LIGHT:
            assert len(requests) == (0 if light else 1)
        seen = app.seen[-1]
        spans = service.exporter.get_finished_spans()[exported:]
        edges = {key: dict(edge.by_class) for key, edge in mesh.stats.edges().items()}
        outcomes.append((seen, sent, edges, [_exported(s) for s in spans]))
        assert mesh.telemetry.active_in == 0
        service.close()
    assert outcomes[0] == outcomes[1]
    seen, _, edges, spans = outcomes[0]
    assert seen["caller"] == ("orders", "checkout", "POST", "/api/x", False)
    assert seen["marked"] == (True, None) and seen["in flight"] == 1
    assert sum(edges[("in", "checkout", "")].values()) == 2
    traceparent = dict(headers).get(TRACEPARENT)
    if light and (sampler is ALWAYS_ON or (traceparent is not None and int(traceparent[-2:], 16) & 1)):
        assert len(spans) == 1 and seen["span"] is not None  # sampled: started and ended inline
        kind, name, attributes, (code, _), from_caller, _ = spans[0]
        assert kind == trace_api.SpanKind.SERVER and from_caller is (traceparent is not None)
        assert seen["span"][3] & 1 and seen["span"][1]  # sampled, a span id of its own
        assert name == ("POST /api/{id}" if route else "POST") and attributes["mesh.source"] == "checkout"
        assert attributes.get("http.route") == route and (code == trace_api.StatusCode.ERROR) is (
            status >= 500 or fail is not None
        )
        assert ("error.type" in attributes) is (code == trace_api.StatusCode.ERROR)
    elif light:
        assert spans == [] and seen["span"] is not None
        from_caller, new_span, remote, flags = seen["span"]
        assert new_span and not remote and not flags & 1  # a dropped child, or a dropped root
        assert from_caller is (TRACEPARENT in dict(headers)) and seen["sends"] == (True, f"{flags:02x}")


def test_a_dropped_child_keeps_the_callers_random_flag_and_a_new_span_id() -> None:
    service = _Mesh()
    app = App(service.mesh)
    middleware = MeshMiddleware(app, mesh=service.mesh)
    for flags in ("00", "02", "00"):
        _call(middleware, [_traceparent(flags)])
    spans = [seen["span"] for seen in app.seen]
    assert [s[3] for s in spans] == [0x00, 0x02, 0x00]
    assert all(s[0] and s[1] for s in spans)  # the caller's trace, a span id other than the caller's
    assert len(set(app.span_ids)) == 3  # each request a span id of its own
    service.close()


def test_sampled_requests_of_a_light_service_are_traced_in_full() -> None:
    service = _Mesh(ParentBased(ALWAYS_ON))  # new traces sampled; a caller's unsampled one dropped
    app = App(service.mesh)
    middleware = MeshMiddleware(app, mesh=service.mesh)
    assert middleware.gate.lane() == LIGHT
    for _ in range(3):
        _call(middleware, list(CALLER))
    _call(middleware, [*CALLER, _traceparent("00")])
    spans = service.exporter.get_finished_spans()
    assert len(spans) == 3 and all(s.kind == trace_api.SpanKind.SERVER for s in spans)
    assert {s.attributes["mesh.source"] for s in spans} == {"checkout"}
    assert app.seen[-1]["span"][0] and not app.seen[-1]["span"][3] & 1
    service.close()


class _Custom(Sampler):
    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        return SamplingResult(Decision.DROP)

    def get_description(self) -> str:
        return "custom"


class _Processor(SpanProcessor):
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass


def test_what_decides_the_lane(tmp_path: Any) -> None:
    def lane(**options: Any) -> int:
        mesh = meshlib.Mesh("orders", **options)
        try:
            return MeshMiddleware(App(mesh), mesh=mesh).gate.lane()
        finally:
            mesh.close()

    assert lane(tracing=False, metrics=False) == BARE
    assert lane(tracing=TracerProvider(sampler=ParentBased(ALWAYS_OFF)), metrics=False) == LIGHT
    assert lane(tracing=TracerProvider(sampler=ParentBased(ALWAYS_ON)), metrics=False) == LIGHT
    # every new trace sampled: its span made ahead, started and ended inline
    assert lane(tracing=TracerProvider(sampler=ALWAYS_ON), metrics=False) == LIGHT
    # sampled by a sampler the mesh does not know, or spans processed by a processor of the app's
    # own (its `on_start` is to be called): nothing to serve lightly
    assert lane(tracing=TracerProvider(sampler=_Custom()), metrics=False) == FULL
    processed = TracerProvider(sampler=ALWAYS_ON)
    processed.add_span_processor(_Processor())
    assert lane(tracing=processed, metrics=False) == FULL
    assert lane(tracing=False, metrics=MeterProvider()) == LIGHT
    assert lane(tracing=False, metrics=False, metrics_path="/metrics") == LIGHT
    log = str(tmp_path / "access.log")
    assert (
        lane(tracing=TracerProvider(sampler=ParentBased(ALWAYS_OFF)), metrics=False, access_log=log) == FULL
    )


def test_a_measured_service_without_a_tracer_passes_a_callers_trace_on_in_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
    mesh = meshlib.Mesh("orders", tracing=False, metrics=meters)
    app = App(mesh)
    middleware = MeshMiddleware(app, mesh=mesh)
    assert middleware.gate.lane() == LIGHT
    requests = _full_sequences(monkeypatch)
    _call(middleware, [*CALLER, (b"baggage", b"tenant=a")])  # nothing a tracer-less mesh passes on
    assert requests == [] and app.seen[-1]["in flight"] == 1 and app.seen[-1]["carried"] is None
    traceparent = _traceparent("00")
    _call(middleware, [*CALLER, traceparent])  # carried as is, for the calls the app makes
    assert len(requests) == 1
    assert app.seen[-1]["carried"] == (traceparent[1].decode(), None) and app.seen[-1]["in flight"] == 1
    mesh.close()
    meters.shutdown()
