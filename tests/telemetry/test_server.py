"""The server side's new traces, decided ahead of the requests that take them: the sampler's
proportion and fresh ids kept, through a real meshed uvicorn server on 127.0.0.1; and never a
trace decided for another tracer, a disabled one, or a forked child's parent."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import httpx
import opentelemetry.trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider, _Span, _TracerConfig
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanKind

import meshlib
from meshlib.telemetry import sdk_spans
from meshlib.telemetry.server import AHEAD, REFILL_BELOW, Inbound
from meshlib.testing import serve


def _provider(ratio: float) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _recording(seen: list[Any]) -> Any:
    """An ASGI app that keeps the span current while it runs, then answers 204."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(trace_api.get_current_span())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


def _traced(ratio: float) -> tuple[TracerProvider, InMemorySpanExporter, meshlib.Mesh, list[Any], Any]:
    """A mesh tracing at `ratio` (parent-based) and its ASGI app, whose requests' spans go to
    the list."""
    provider, exporter = _provider(ratio)
    mesh = meshlib.Mesh("orders", tracing=provider, metrics=False)
    seen: list[Any] = []
    return provider, exporter, mesh, seen, mesh.asgi(_recording(seen))


def _call(app: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """One GET through `app` in process (an ASGI call, as uvicorn makes it)."""
    scope = {"type": "http", "method": "GET", "path": "/x", "scheme": "http", "headers": headers or []}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    asyncio.run(app(scope, receive, send))


def test_new_traces_decided_ahead_keep_the_sampler_proportion_and_each_id_once() -> None:
    provider, exporter = _provider(0.25)
    mesh = meshlib.Mesh("orders", tracing=provider, metrics=False)
    seen: list[Any] = []
    requests = 400
    with serve(mesh.asgi(_recording(seen))) as server, httpx.Client() as client:
        for _ in range(requests):
            assert client.get(f"{server.url}/x").status_code == 204
    ahead = list(mesh.telemetry.ahead)
    mesh.close()
    contexts = [span.get_span_context() for span in seen]
    assert len({c.trace_id for c in contexts}) == requests  # no trace decided ahead is taken twice
    assert len({c.span_id for c in contexts}) == requests
    assert all(c.is_valid and not c.is_remote for c in contexts)
    sampled = [c for c in contexts if c.trace_flags.sampled]
    # binomial(400, 0.25): sd 0.022; dropping or redrawing the sampled decisions would leave
    # 0.0 or 0.06, taking only dropped ones 0.0
    assert 0.15 < len(sampled) / requests < 0.35
    assert {s.context.span_id for s in exporter.get_finished_spans()} == {c.span_id for c in sampled}
    dropped = [span for span in seen if not span.get_span_context().trace_flags.sampled]
    assert all(type(span) is NonRecordingSpan for span in dropped)
    assert all(c.trace_flags == 0x02 for c in contexts if not c.trace_flags.sampled)  # random id flag
    assert REFILL_BELOW - 1 <= len(ahead) <= AHEAD  # refilled in batches
    provider.shutdown()


def _dropped_ahead(item: Any) -> bool:
    """A dropped new trace decided ahead: (tracer, the context holding its `NonRecordingSpan`)."""
    _, context = item
    return isinstance(context, Context) and type(trace_api.get_current_span(context)) is NonRecordingSpan


def test_a_dropped_new_trace_is_the_one_decided_ahead_and_a_traced_caller_takes_none() -> None:
    # every new trace dropped: every one decided ahead is a made span
    provider, _, mesh, seen, app = _traced(0.0)
    _call(app)  # the first: nothing decided yet; its response decides the next ones
    ahead = mesh.telemetry.ahead
    assert len(ahead) == AHEAD and all(_dropped_ahead(item) for item in ahead)
    top = trace_api.get_current_span(ahead[-1][1])
    _call(app)
    assert seen[-1] is top and len(ahead) == AHEAD - 1  # taken; the others wait
    waiting = list(ahead)
    parent = f"00-{0x0AF7651916CD43DD8448EB211C80319C:032x}-{0xB7AD6B7169203331:016x}-00"
    _call(app, [(b"traceparent", parent.encode())])
    assert ahead == waiting  # a caller's trace: nothing decided ahead is used up
    assert seen[-1].get_span_context().trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    mesh.close()
    assert mesh.telemetry.ahead == []
    provider.shutdown()


def test_the_full_sequence_takes_a_dropped_new_trace_decided_ahead_as_the_light_request_does() -> None:
    provider, _, mesh, seen, app = _traced(0.0)
    mesh.load.tracking = True  # one thing that takes every request through the full sequence
    _call(app)
    ahead = mesh.telemetry.ahead
    assert len(ahead) == AHEAD and all(_dropped_ahead(item) for item in ahead)
    top = trace_api.get_current_span(ahead[-1][1])
    _call(app)
    assert seen[-1] is top and len(ahead) == AHEAD - 1  # the very span, made into the request's Inbound
    assert mesh.telemetry.active_in == 0
    mesh.close()
    provider.shutdown()


def test_new_traces_are_decided_in_a_batch_once_few_are_left() -> None:
    provider, _, mesh, seen, app = _traced(0.0)
    _call(app)
    ahead = mesh.telemetry.ahead
    sizes = []
    for _ in range(2 * AHEAD):
        _call(app)
        sizes.append(len(ahead))
    # one taken per request; decided again, back to AHEAD, only once fewer than REFILL_BELOW are left
    expected = []
    size = AHEAD
    for _ in range(2 * AHEAD):
        size -= 1
        if size < REFILL_BELOW:
            size = AHEAD
        expected.append(size)
    assert sizes == expected and AHEAD in sizes
    assert len({span.get_span_context().trace_id for span in seen}) == len(seen)
    mesh.close()
    provider.shutdown()


def test_a_trace_decided_for_another_tracer_or_before_the_tracer_was_disabled_is_not_taken() -> None:
    provider, _ = _provider(0.0)
    other, _ = _provider(0.0)
    mesh = meshlib.Mesh("orders", tracing=provider, metrics=False)
    elsewhere = meshlib.Mesh("payments", tracing=other, metrics=False)
    seen: list[Any] = []
    app = mesh.asgi(_recording(seen))
    _call(elsewhere.asgi(_recording([])))
    foreign = list(elsewhere.telemetry.ahead)
    assert len(foreign) == AHEAD
    mesh.telemetry.ahead[:] = foreign  # decided by another tracer
    _call(app)
    assert all(seen[-1] is not trace_api.get_current_span(context) for _, context in foreign)
    assert seen[-1].get_span_context().is_valid
    provider._set_tracer_configurator(tracer_configurator=lambda scope: _TracerConfig(is_enabled=False))
    assert mesh.telemetry.ahead  # decided while the tracer was enabled
    _call(app)
    assert seen[-1].get_span_context() == trace_api.INVALID_SPAN_CONTEXT  # as the SDK's disabled tracer
    mesh.close()
    elsewhere.close()
    provider.shutdown()
    other.shutdown()


def test_a_forked_child_forgets_the_traces_its_parent_decided() -> None:
    provider, _ = _provider(0.0)
    mesh = meshlib.Mesh("orders", tracing=provider, metrics=False)
    _call(mesh.asgi(_recording([])))
    assert len(mesh.telemetry.ahead) == AHEAD
    pid = os.fork()
    if pid == 0:  # the child: the parent's ids must not be taken here too
        os._exit(0 if mesh.telemetry.ahead == [] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(mesh.telemetry.ahead) == AHEAD  # the parent keeps its own
    mesh.close()
    provider.shutdown()


UNSAMPLED_CALLER = [(b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-02")]


def test_dropped_children_of_unsampled_callers_are_made_ahead_and_each_taken_once() -> None:
    provider, exporter, mesh, seen, app = _traced(0.0)
    children = mesh.telemetry.children
    _call(app, UNSAMPLED_CALLER)  # made on the request's path: none made ahead yet
    assert len(children) == AHEAD
    shells = list(children)
    for _ in range(AHEAD - REFILL_BELOW + 1):
        _call(app, UNSAMPLED_CALLER)
    taken = shells[REFILL_BELOW - 1 :][::-1]  # taken from the end, then topped up
    assert [span for span in seen[1:]] == [shell[2] for shell in taken]
    for span, shell in zip(seen[1:], taken, strict=True):
        context = span.get_span_context()
        assert (context.trace_id, context.span_id) == (0x0AF7651916CD43DD8448EB211C80319C, shell[1])
        assert context.trace_flags == 0x02 and not context.is_remote  # the caller's random flag kept
    assert len({span.get_span_context().span_id for span in seen}) == len(seen)
    assert len(children) == AHEAD  # topped up once fewer than REFILL_BELOW were left
    assert not any(shell in children for shell in taken)
    assert exporter.get_finished_spans() == ()
    mesh.close()
    provider.shutdown()


def test_a_child_made_ahead_for_another_tracer_or_before_the_tracer_was_disabled_is_not_taken() -> None:
    provider, _, mesh, seen, app = _traced(0.0)
    other, _, elsewhere, _, foreign_app = _traced(0.0)
    _call(foreign_app, UNSAMPLED_CALLER)
    foreign = list(elsewhere.telemetry.children)
    mesh.telemetry.children[:] = foreign
    _call(app, UNSAMPLED_CALLER)
    assert seen[-1] not in [shell[2] for shell in foreign] and seen[-1].get_span_context().is_valid
    assert seen[-1].get_span_context().trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    provider._set_tracer_configurator(tracer_configurator=lambda scope: _TracerConfig(is_enabled=False))
    mesh.telemetry.children[:] = made = sdk_spans.dropped_shells(mesh.telemetry.traces.get(), AHEAD)
    _call(app, UNSAMPLED_CALLER)
    assert len(mesh.telemetry.children) == AHEAD - 1  # the one looked at is let go, not used
    context = seen[-1].get_span_context()  # the SDK's disabled tracer's: the caller's own span context
    assert seen[-1] not in [shell[2] for shell in made] and (context.span_id, context.is_remote) == (
        0xB7AD6B7169203331,
        True,
    )
    mesh.close()
    elsewhere.close()
    provider.shutdown()
    other.shutdown()


def test_a_forked_child_forgets_the_children_its_parent_made_ahead() -> None:
    provider, _, mesh, _, app = _traced(0.0)
    _call(app, UNSAMPLED_CALLER)
    assert len(mesh.telemetry.children) == AHEAD
    pid = os.fork()
    if pid == 0:  # the child: the parent's span ids must not be taken here too
        os._exit(0 if mesh.telemetry.children == [] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(mesh.telemetry.children) == AHEAD
    mesh.close()
    assert mesh.telemetry.children == []
    provider.shutdown()


def test_a_sampled_new_trace_decided_ahead_is_started_when_taken_as_the_sdk_starts_one() -> None:
    provider, exporter, mesh, seen, app = _traced(1.0)  # every new trace sampled: light spans made ahead
    _call(app)  # made by `start`, as before anything is decided
    ahead = mesh.telemetry.ahead
    assert len(ahead) == AHEAD and all(type(item) is Inbound for item in ahead)
    pooled = ahead[-1].span
    drawn = pooled.get_span_context()
    before = time.time_ns()
    _call(app, [(b"x-mesh-source", b"checkout")])
    assert seen[-1] is pooled  # the very span decided ahead, current in the app
    first, done = exporter.get_finished_spans()
    assert done.context == drawn and done.context.trace_flags == 0x03 and done.parent is None
    assert done.name == first.name == "GET" and done.kind == first.kind == SpanKind.SERVER
    common = {"http.request.method": "GET", "url.path": "/x", "url.scheme": "http", "mesh.service": "orders"}
    assert dict(first.attributes) == common | {"mesh.source": "", "http.response.status_code": 204}
    assert dict(done.attributes) == common | {"mesh.source": "checkout", "http.response.status_code": 204}
    assert before <= done.start_time <= done.end_time <= time.time_ns()  # started when taken
    assert first.resource is done.resource and first.instrumentation_scope == done.instrumentation_scope
    mesh.close()
    provider.shutdown()


def test_a_sampled_trace_decided_before_a_processor_joined_is_started_by_every_processor() -> None:
    provider, exporter, mesh, seen, app = _traced(1.0)
    _call(app)
    drawn = mesh.telemetry.ahead[-1].span.get_span_context()
    later = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(later))  # the light span no longer applies
    _call(app)
    (got,) = later.get_finished_spans()
    assert got.context.trace_id == drawn.trace_id and got.context.trace_flags.sampled  # the same decision
    assert type(seen[-1]) is _Span  # the SDK's own span class, started through the SDK
    assert exporter.get_finished_spans()[-1].context == got.context
    mesh.close()
    provider.shutdown()


def test_a_sampled_trace_id_decided_for_another_tracer_is_not_taken() -> None:
    class Own(SimpleSpanProcessor):
        """A processor of the app's own kind: no light spans, so a sampled one is kept as its id."""

    provider, _ = _provider(1.0)
    other = TracerProvider(sampler=ParentBased(TraceIdRatioBased(1.0)))
    other.add_span_processor(Own(InMemorySpanExporter()))
    mesh = meshlib.Mesh("orders", tracing=provider, metrics=False)
    elsewhere = meshlib.Mesh("payments", tracing=other, metrics=False)
    _call(elsewhere.asgi(_recording([])))
    foreign = list(elsewhere.telemetry.ahead)
    assert len(foreign) == AHEAD and all(type(item) is tuple for item in foreign)
    mesh.telemetry.ahead[:] = foreign
    seen: list[Any] = []
    _call(mesh.asgi(_recording(seen)))
    assert seen[-1].get_span_context().trace_id not in {trace_id for _, trace_id in foreign}
    assert seen[-1].get_span_context().trace_flags.sampled  # its own decision, its own id
    mesh.close()
    elsewhere.close()
    provider.shutdown()
    other.shutdown()
