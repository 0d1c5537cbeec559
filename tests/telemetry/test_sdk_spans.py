"""Spans the mesh makes where the SDK's answer is known: the same as the SDK's, field for field, and
the same sampling decisions; through real meshed servers on 127.0.0.1 for the server side."""

from __future__ import annotations

import gc
import json
from typing import Any

import httpx
import opentelemetry.trace as trace_api
import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider, _Span
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags, TraceState

import meshlib
from meshlib.telemetry import sdk_spans
from meshlib.testing import serve
from tests.telemetry.conftest import Traces, calls_payments, point, relay, service

PARENT = SpanContext(
    0x0AF7651916CD43DD8448EB211C80319C,
    0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(0x03),
    trace_state=TraceState([("vendor", "kept")]),
)


def _provider(
    sampler: Any, processor: type = SimpleSpanProcessor
) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(processor(exporter))
    return provider, exporter


def _finished(provider: TracerProvider, exporter: InMemorySpanExporter) -> tuple[ReadableSpan, ...]:
    provider.force_flush()  # a batch processor's queue
    return exporter.get_finished_spans()


def _exported(span: ReadableSpan) -> dict[str, Any]:
    """What an exporter reads of a span, but for its own ids and times."""
    ctx = span.context
    return {
        "name": span.name,
        "kind": span.kind,
        "parent": span.parent,
        "trace_id": ctx.trace_id if span.parent is not None else None,
        "flags": ctx.trace_flags,
        "state": ctx.trace_state,
        "remote": ctx.is_remote,
        "attributes": dict(span.attributes),
        "events": [(e.name, dict(e.attributes)) for e in span.events],
        "links": list(span.links),
        "status": (span.status.status_code, span.status.description),
        "resource": span.resource,
        "scope": span.instrumentation_scope,
        "dropped": (span.dropped_attributes, span.dropped_events, span.dropped_links),
        "timed": span.start_time is not None
        and span.end_time is not None
        and span.end_time >= span.start_time,
    }


@pytest.mark.parametrize("processor", [SimpleSpanProcessor, BatchSpanProcessor])
@pytest.mark.parametrize("sampler", [ALWAYS_ON, ParentBased(ALWAYS_ON)])
@pytest.mark.parametrize("parent", [None, PARENT])
def test_a_sampled_span_is_the_sdk_span_field_for_field(
    sampler: Any, parent: SpanContext | None, processor: type
) -> None:
    """Made, started and ended by the mesh (its processors handed the span directly), the span
    and the `ReadableSpan` the exporter gets are the SDK's, field for field."""
    provider, exporter = _provider(sampler, processor)
    tracer = provider.get_tracer("test", "1.0")
    plan = sdk_spans.plans.get(tracer)
    assert plan is not None and plan.maker is not None and plan.maker.pipeline is not None
    context = Context() if parent is None else trace_api.set_span_in_context(NonRecordingSpan(parent))
    attributes = {"http.request.method": "GET", "url.path": "/a", "mesh.attempt": 2, "mesh.mirror": True}
    made = []
    for ours in (False, True):
        if ours:
            span = sdk_spans.start(tracer, "GET /a", SpanKind.SERVER, context)
            sdk_spans.put(span, dict(attributes), new=True)  # as the server span gets them
        else:
            span = tracer.start_span("GET /a", context=context, kind=SpanKind.SERVER)
            span.set_attributes(dict(attributes))
        assert isinstance(span, _Span) and span.is_recording()
        span.add_event("retry", {"n": 1})
        span.set_attribute("app.added", "yes")  # the app annotating the current server span
        sdk_spans.put(span, {"http.response.status_code": 503, "error.type": "503"})
        span.set_status(trace_api.Status(StatusCode.ERROR))
        made.append(span)
        if ours:
            sdk_spans.end(span)
        else:
            span.end()
    theirs, ours_span = made
    # a light span: the tracer's fields on its class, its containers made when the app used them
    assert {k: type(getattr(ours_span, k)) for k in vars(theirs)} == {
        k: type(v) for k, v in vars(theirs).items()
    }
    assert ours_span.end_time is not None and not ours_span.is_recording()
    exported = {s.context.span_id: s for s in _finished(provider, exporter)}
    first, second = exported[theirs.context.span_id], exported[ours_span.context.span_id]
    assert type(second) is type(first) is ReadableSpan
    assert {k: type(v) for k, v in vars(second).items()} == {k: type(v) for k, v in vars(first).items()}
    assert _exported(second) == _exported(first)
    assert second.context.span_id != first.context.span_id and second.context.span_id != 0
    assert second.end_time == ours_span.end_time and second.start_time == ours_span.start_time
    provider.shutdown()


def _json_without_ids(span: ReadableSpan) -> dict[str, Any]:
    made = json.loads(span.to_json())
    for key in ("context", "start_time", "end_time"):
        made.pop(key)
    return made


@pytest.mark.parametrize("processor", [SimpleSpanProcessor, BatchSpanProcessor])
@pytest.mark.parametrize("parent", [None, PARENT])
def test_a_span_only_the_mesh_touched_is_exported_as_the_sdk_exports_it(
    parent: SpanContext | None, processor: type
) -> None:
    """A light span (the usual server span: the mesh's attributes at its start and end, a route
    name) never makes its containers: the exporter gets a `ReadableSpan` over a plain attribute
    dict, which reads as the SDK's does, property for property, and the collector does not
    walk its attributes; the span is then ended for every SDK method, as the SDK's is."""
    provider, exporter = _provider(ALWAYS_ON, processor)
    tracer = provider.get_tracer("test", "1.0")
    context = Context() if parent is None else trace_api.set_span_in_context(NonRecordingSpan(parent))
    attributes = {"http.request.method": "GET", "url.path": "/a/1", "mesh.attempt": 2, "mesh.mirror": True}
    last = {"http.route": "/a/{id}", "http.response.status_code": 200}
    theirs = tracer.start_span("GET", context=context, kind=SpanKind.SERVER)
    theirs.set_attributes(dict(attributes))
    theirs.update_name("GET /a/{id}")
    theirs.set_attributes(dict(last))
    theirs.end()
    ours: Any = sdk_spans.start(tracer, "GET", SpanKind.SERVER, context)
    sdk_spans.put(ours, dict(attributes), new=True)
    assert isinstance(ours, _Span) and ours.is_recording() and "_attributes" not in vars(ours)
    sdk_spans.end(ours, dict(last), "GET /a/{id}")
    assert ours._lock is sdk_spans._ENDED and not ours.is_recording()
    exported = {s.context.span_id: s for s in _finished(provider, exporter)}
    first, second = exported[theirs.context.span_id], exported[ours.context.span_id]
    assert type(second) is type(first) is ReadableSpan
    assert _exported(second) == _exported(first)
    assert _json_without_ids(second) == _json_without_ids(first)
    assert type(second._attributes) is dict and not gc.is_tracked(second._attributes)
    assert second.events == () and second.links == ()
    assert second.end_time == ours.end_time and second.start_time == ours.start_time
    # ended for the SDK's methods too: nothing more reaches the exported span or the exporter
    ours.set_attribute("late", 1)
    ours.add_event("late")
    ours.end()
    assert dict(ours.attributes) == dict(second.attributes) == {**attributes, **last}
    assert "late" not in second.attributes and not ours.events
    assert len(_finished(provider, exporter)) == 2
    provider.shutdown()


def test_a_light_span_the_app_read_or_wrote_keeps_what_it_was_given() -> None:
    """The app reading the server span's attributes, setting its own and adding an event while
    the request runs: its containers are made then, holding what the mesh had put, and the
    span ends as the SDK's does, with everything."""
    provider, exporter = _provider(ALWAYS_ON)
    tracer = provider.get_tracer("app")
    span: Any = sdk_spans.start(tracer, "GET", SpanKind.SERVER, Context())
    sdk_spans.put(span, {"url.path": "/b"}, new=True)
    assert dict(span.attributes) == {"url.path": "/b"}  # a read makes the map over the same dict
    span.set_attribute("app.user", "u1")
    span.add_event("cache miss")
    sdk_spans.end(span, {"http.response.status_code": 200}, "GET /b")
    (done,) = exporter.get_finished_spans()
    assert done.name == "GET /b" and [e.name for e in done.events] == ["cache miss"]
    assert dict(done.attributes) == {"url.path": "/b", "app.user": "u1", "http.response.status_code": 200}
    with pytest.raises(TypeError):  # frozen, as the SDK leaves an ended span's map
        span._attributes["x"] = 1
    provider.shutdown()


def test_a_processor_added_later_or_of_another_kind_gets_every_call_from_the_sdk() -> None:
    """The mesh hands spans to the SDK's batch and simple processors only: once the provider
    has another (added after the plan was made), the SDK starts and ends spans again, and the
    new processor sees both calls."""

    class Seen(SpanProcessor):
        def __init__(self) -> None:
            self.started: list[str] = []
            self.ended: list[str] = []

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            self.started.append(span.name)

        def on_end(self, span: ReadableSpan) -> None:
            self.ended.append(span.name)

    provider, exporter = _provider(ALWAYS_ON, BatchSpanProcessor)
    tracer = provider.get_tracer("later")
    first = sdk_spans.start(tracer, "before", SpanKind.SERVER, Context())
    sdk_spans.end(first)
    seen = Seen()
    provider.add_span_processor(seen)
    second = sdk_spans.start(tracer, "after", SpanKind.SERVER, Context())
    sdk_spans.end(second)
    assert seen.started == ["after"] and seen.ended == ["after"]
    assert sorted(s.name for s in _finished(provider, exporter)) == ["after", "before"]
    assert sdk_spans.plan_for(tracer).maker.pipeline is None  # type: ignore[union-attr]
    provider.shutdown()


def test_a_light_span_ended_after_a_processor_joined_is_ended_by_the_sdk() -> None:
    """Started while the pipeline held, ended once it no longer does: the SDK's `end` makes the
    span's containers as it reads them, and every processor, the new one too, gets it."""
    seen: list[ReadableSpan] = []

    class Seen(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            seen.append(span)

    provider, exporter = _provider(ALWAYS_ON, BatchSpanProcessor)
    tracer = provider.get_tracer("joined")
    span = sdk_spans.start(tracer, "GET", SpanKind.SERVER, Context())
    sdk_spans.put(span, {"url.path": "/c"}, new=True, known=True)
    provider.add_span_processor(Seen())
    sdk_spans.end(span, {"http.response.status_code": 200}, "GET /c", known=True)
    (done,) = _finished(provider, exporter)
    assert [s.name for s in seen] == ["GET /c"] and seen[0] is done
    assert dict(done.attributes) == {"url.path": "/c", "http.response.status_code": 200}
    assert done.end_time is not None and not span.is_recording()
    provider.shutdown()


def test_the_pipeline_stands_only_on_sdk_methods_it_knows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins what the mesh relies on in the installed SDK (an upgrade that changes any of it fails
    here, not only slows down): any method it stands in for touching other names and the SDK
    does every start and end."""
    provider, _ = _provider(ALWAYS_ON, BatchSpanProcessor)
    tracer = provider.get_tracer("pinned")
    plan = sdk_spans.plan_for(tracer)
    assert plan is not None and plan.maker is not None and plan.maker.pipeline is not None
    assert sdk_spans._FAST_CONTEXTS and plan.valid_ids and plan.config is tracer
    changed = dict(sdk_spans._KNOWN_NAMES, **{"_Span.end": {"_lock", "_end_time", "on_end"}})
    monkeypatch.setattr(sdk_spans, "_KNOWN_NAMES", changed)
    assert sdk_spans.plan_for(tracer).maker.pipeline is None  # type: ignore[union-attr]
    provider.shutdown()


def test_a_span_ended_twice_is_exported_once() -> None:
    provider, exporter = _provider(ALWAYS_ON)
    tracer = provider.get_tracer("twice")
    span = sdk_spans.start(tracer, "GET", SpanKind.SERVER, Context())
    sdk_spans.end(span)
    end_time = span.end_time  # type: ignore[attr-defined]
    sdk_spans.end(span)  # the SDK's warning, nothing sent
    assert len(exporter.get_finished_spans()) == 1 and span.end_time == end_time  # type: ignore[attr-defined]
    provider.shutdown()


def test_attributes_that_do_not_fit_go_through_the_sdk() -> None:
    from opentelemetry.sdk.trace import SpanLimits

    provider, exporter = _provider(ALWAYS_ON)
    provider._span_limits = SpanLimits(max_attributes=2, max_attribute_length=3)  # as OTEL_* settings would
    tracer = provider.get_tracer("limits")
    span = sdk_spans.start(tracer, "GET", SpanKind.SERVER, Context())
    sdk_spans.put(span, {"url.path": "/longer", "mesh.source": "ab", "mesh.service": "abc"})
    span.end()
    (done,) = exporter.get_finished_spans()
    assert dict(done.attributes) == {"mesh.source": "ab", "mesh.service": "abc"}  # the SDK's own limits
    assert done.dropped_attributes == 1
    provider.shutdown()


def test_a_root_is_decided_from_its_trace_id_as_trace_id_ratio_based_decides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider, exporter = _provider(ParentBased(TraceIdRatioBased(0.25)))
    tracer = provider.get_tracer("ratio")
    monkeypatch.setattr(tracer, "start_span", None)  # the SDK's start_span is never asked
    judge = TraceIdRatioBased(0.25)
    sampled = 0
    for _ in range(2000):
        span = sdk_spans.start(tracer, "GET", SpanKind.SERVER, Context())
        ctx = span.get_span_context()
        want = judge.should_sample(None, ctx.trace_id, "GET").decision.is_sampled()
        assert span.is_recording() is want
        assert ctx.is_valid and not ctx.is_remote and ctx.trace_flags == (0x03 if want else 0x02)
        sampled += want
        span.end()
    assert 0.18 < sampled / 2000 < 0.32
    assert len(exporter.get_finished_spans()) == sampled  # the dropped ones were never SDK spans
    provider.shutdown()


def test_a_root_decided_ahead_is_the_span_start_would_make_or_the_id_it_samples() -> None:
    provider, exporter = _provider(ParentBased(TraceIdRatioBased(0.25)))
    tracer = provider.get_tracer("ahead")
    judge = TraceIdRatioBased(0.25)
    sampled = 0
    batch = sdk_spans.decide_roots(tracer, SpanKind.SERVER, 2000)
    assert len(batch) == 2000 and len({d.get_span_context().trace_id for d in batch}) == 2000
    for decided in batch:
        assert not isinstance(decided, int)  # a light span where the processors allow one
        ctx = decided.get_span_context()
        want = judge.should_sample(None, ctx.trace_id, "GET").decision.is_sampled()
        assert ctx.is_valid and not ctx.is_remote
        if want:  # sampled: made ahead, named and started by `begin`, ended as `start`'s are
            assert ctx.trace_flags == 0x03 and sdk_spans.begin(decided, "GET", {"url.path": "/x"})
            sdk_spans.end(decided, {"http.response.status_code": 200}, known=True)
            sampled += 1
        else:
            assert type(decided) is NonRecordingSpan and ctx.trace_flags == 0x02
    assert 0.18 < sampled / 2000 < 0.32
    done = exporter.get_finished_spans()
    assert len(done) == sampled
    made = sdk_spans.start(tracer, "GET", SpanKind.SERVER, Context())  # the same, made when asked
    while not made.is_recording():
        made = sdk_spans.start(tracer, "GET", SpanKind.SERVER, Context())
    sdk_spans.put(made, {"url.path": "/x"}, new=True, known=True)
    sdk_spans.end(made, {"http.response.status_code": 200}, known=True)
    assert _json_without_ids(done[0]) == _json_without_ids(exporter.get_finished_spans()[-1])
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))  # no light spans now
    batch = sdk_spans.decide_roots(tracer, SpanKind.SERVER, 200)
    ids = [decided for decided in batch if isinstance(decided, int)]
    assert all(not decided.is_recording() for decided in batch if not isinstance(decided, int))
    assert ids and all(judge.should_sample(None, i, "GET").decision.is_sampled() for i in ids)  # sampled: ids
    odd = TracerProvider(sampler=TraceIdRatioBased(0.5))
    odd.id_generator = type("Own", (odd.id_generator.__class__,), {"generate_trace_id": lambda self: 7})()
    assert sdk_spans.decide_roots(odd.get_tracer("own ids"), SpanKind.SERVER, 4) == []  # the app's draws
    provider.shutdown()


def test_a_child_follows_its_parent_with_the_parent_trace_state() -> None:
    provider, exporter = _provider(ParentBased(TraceIdRatioBased(0.0)))  # no new trace sampled
    tracer = provider.get_tracer("parent")
    span = sdk_spans.start(
        tracer, "GET", SpanKind.SERVER, trace_api.set_span_in_context(NonRecordingSpan(PARENT))
    )
    assert span.is_recording()
    span.end()
    (done,) = exporter.get_finished_spans()
    assert done.context.trace_id == PARENT.trace_id and done.parent == PARENT
    assert done.context.trace_state == PARENT.trace_state and done.context.trace_flags == 0x03
    provider.shutdown()


def test_a_dropped_child_of_an_unsampled_caller_is_the_span_the_sdk_makes() -> None:
    provider, exporter = _provider(ParentBased(TraceIdRatioBased(1.0)))  # an unsampled caller: dropped
    tracer = provider.get_tracer("dropped")
    assert sdk_spans.drops(tracer)
    for flags in (0x00, 0x02):
        parent = SpanContext(PARENT.trace_id, PARENT.span_id, is_remote=True, trace_flags=TraceFlags(flags))
        sdk = tracer.start_span("GET", trace_api.set_span_in_context(NonRecordingSpan(parent)))
        mesh = sdk_spans.dropped_child(tracer, PARENT.trace_id, flags)
        assert type(mesh) is type(sdk) is NonRecordingSpan
        assert vars(mesh).keys() == vars(sdk).keys()  # made without `__init__`, as it would make it
        made, want = mesh.get_span_context(), sdk.get_span_context()
        assert made.span_id not in (want.span_id, PARENT.span_id) and made.is_valid
        fields = ("trace_id", "is_remote", "trace_flags", "trace_state", "is_valid")
        assert [getattr(made, f) for f in fields] == [getattr(want, f) for f in fields]
    assert sdk_spans.dropped_child(tracer, PARENT.trace_id, 0x01) is not None  # flags: the caller's to check
    kept, _ = _provider(ParentBased(TraceIdRatioBased(1.0), remote_parent_not_sampled=ALWAYS_ON))
    keeping = kept.get_tracer("kept")
    assert sdk_spans.dropped_child(keeping, PARENT.trace_id, 0) is None  # sampled: the SDK's own span
    assert sdk_spans.drops(keeping) is False  # new traces all sampled, unsampled callers kept
    assert not sdk_spans.drops(_provider(ALWAYS_ON)[0].get_tracer("all"))  # nothing is ever dropped
    assert exporter.get_finished_spans() == ()
    provider.shutdown()
    kept.shutdown()


def test_a_dropped_child_made_ahead_is_the_span_dropped_child_makes() -> None:
    provider, _ = _provider(ParentBased(TraceIdRatioBased(0.5)))  # every unsampled caller's child dropped
    tracer = provider.get_tracer("shells")
    shells = sdk_spans.dropped_shells(tracer, 8)
    assert len(shells) == 8 and all(shell[0] is tracer for shell in shells)
    assert len({shell[1] for shell in shells}) == 8  # a span id each
    for flags, (_, span_id, span, context) in zip((0x00, 0x02, 0x0A, 0x0E), shells, strict=False):
        span._context = SpanContext(PARENT.trace_id, span_id, False, sdk_spans.CHILD_FLAGS[flags])
        made = sdk_spans.dropped_child(tracer, PARENT.trace_id, flags)
        assert type(span) is type(made) is NonRecordingSpan and vars(span).keys() == vars(made).keys()
        fields = ("trace_id", "is_remote", "trace_flags", "trace_state", "is_valid")
        want, got = made.get_span_context(), span.get_span_context()
        assert [getattr(got, f) for f in fields] == [getattr(want, f) for f in fields]
        assert context == trace_api.set_span_in_context(span, Context())  # the context `unsampled` sets
    # where such a child may be sampled, or the SDK decides it, none is made ahead
    kept, _ = _provider(ParentBased(TraceIdRatioBased(1.0), remote_parent_not_sampled=ALWAYS_ON))
    assert sdk_spans.dropped_shells(kept.get_tracer("kept"), 8) == []
    some, _ = _provider(ParentBased(ALWAYS_OFF, remote_parent_not_sampled=TraceIdRatioBased(0.5)))
    assert sdk_spans.dropped_shells(some.get_tracer("some"), 8) == []

    class Odd(ALWAYS_ON.__class__):
        """A sampler of the app's own: the SDK asks it."""

    odd, _ = _provider(ParentBased(ALWAYS_OFF, remote_parent_not_sampled=Odd(ALWAYS_ON._decision)))
    assert sdk_spans.dropped_shells(odd.get_tracer("odd"), 8) == []
    for other in (provider, kept, some, odd):
        other.shutdown()


def test_another_sampler_is_asked_as_usual() -> None:
    class Odd(ALWAYS_ON.__class__):
        """A sampler of the app's own (a subclass): the mesh cannot know its answer."""

    provider, _ = _provider(Odd(ALWAYS_ON._decision))
    assert sdk_spans.plan_for(provider.get_tracer("odd")) is None
    provider.shutdown()


def test_an_unsampled_root_makes_no_span_yet_passes_a_valid_unsampled_traceparent_on(fleet) -> None:
    provider, exporter = _provider(ParentBased(TraceIdRatioBased(0.0)))
    downstream, server = fleet.start("payments")
    mesh = meshlib.Mesh("orders", tracing=provider)
    point(mesh, "payments", server.address)

    app = calls_payments(mesh)

    with serve(mesh.asgi(app)) as front:
        assert httpx.get(front.url).status_code == 204  # no trace context: a new trace, dropped
    mesh.close()
    version, trace_id, span_id, flags = downstream.seen[0]["headers"]["traceparent"].split("-")
    assert version == "00" and len(trace_id) == 32 and int(trace_id, 16) != 0
    assert len(span_id) == 16 and int(span_id, 16) != 0
    assert flags == "02"  # not sampled; the trace id is random, as the SDK flags it
    assert exporter.get_finished_spans() == ()
    provider.shutdown()


def test_a_sampled_server_span_has_every_attribute_and_its_children(traces: Traces) -> None:
    mesh = meshlib.Mesh("orders", tracing=traces.provider)
    with serve(_ok) as payments:
        point(mesh, "payments", payments.address)
        with service(mesh, relay(mesh, "payments")) as front:
            headers = {"x-mesh-source": "checkout", "x-mesh-attempt": "2", "x-mesh-mirror": "1"}
            assert httpx.get(f"{front.url}/items/7", headers=headers).status_code == 200
            spans = traces.wait_for(2)
    mesh.close()
    server = next(s for s in spans if s.kind == SpanKind.SERVER and s.name == "GET /items/{item}")
    client = next(s for s in spans if s.kind == SpanKind.CLIENT)
    assert dict(server.attributes) == {
        "http.request.method": "GET",
        "url.path": "/items/7",
        "url.scheme": "http",
        "mesh.service": "orders",
        "mesh.source": "checkout",
        "mesh.attempt": 2,
        "mesh.mirror": True,
        "http.route": "/items/{item}",
        "http.response.status_code": 200,
    }
    assert server.parent is None and server.context.trace_flags.sampled
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert client.context.trace_id == server.context.trace_id


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_trace_state_and_baggage_beside_a_traceparent_reach_the_span_and_the_next_call(
    traces: Traces, fleet
) -> None:
    """Whether a request has `tracestate` or `baggage` is read from the headers the middleware
    picked out already: both still go through the propagators."""
    downstream, server = fleet.start("payments")
    mesh = meshlib.Mesh("orders", tracing=traces.provider)
    point(mesh, "payments", server.address)

    app = calls_payments(mesh)

    traceparent = f"00-{PARENT.trace_id:032x}-{PARENT.span_id:016x}-01"
    headers = {"traceparent": traceparent, "tracestate": "vendor=kept", "baggage": "tenant=acme"}
    with serve(mesh.asgi(app)) as front:
        assert httpx.get(front.url, headers=headers).status_code == 204
        spans = traces.wait_for(2)
    mesh.close()
    server_span = next(s for s in spans if s.kind == SpanKind.SERVER)
    assert server_span.parent.span_id == PARENT.span_id and server_span.context.trace_id == PARENT.trace_id
    assert server_span.context.trace_state.to_header() == "vendor=kept"
    sent = downstream.seen[0]["headers"]
    assert sent["baggage"] == "tenant=acme" and sent["tracestate"] == "vendor=kept"
    assert sent["traceparent"].split("-")[1] == f"{PARENT.trace_id:032x}"


def test_ids_of_a_generator_of_the_app_own_come_from_it() -> None:
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class Counting(RandomIdGenerator):
        """Ids the app draws itself: the mesh cannot draw them for it."""

        def __init__(self) -> None:
            self.next = 0x1000

        def generate_span_id(self) -> int:
            self.next += 1
            return self.next

    provider, exporter = _provider(ALWAYS_ON)
    provider.id_generator = Counting()
    tracer = provider.get_tracer("ids")
    plan = sdk_spans.plan_for(tracer)
    assert plan is not None and not plan.valid_ids
    span = sdk_spans.start(tracer, "GET", SpanKind.SERVER, Context())
    sdk_spans.end(span)
    assert (
        span.get_span_context().span_id == 0x1001
        and exporter.get_finished_spans()[0].context.span_id == 0x1001
    )
    provider.shutdown()
