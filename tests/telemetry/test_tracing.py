"""Tracing: spans and W3C trace context across real meshed services on 127.0.0.1.

Each Mesh gets the test's SDK TracerProvider explicitly (`Mesh(tracing=provider)`); the global
provider is never set, so these tests also show that the mesh needs no global configuration.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import opentelemetry.propagate
import opentelemetry.trace as trace_api
import pytest
from flask import Flask
from opentelemetry import baggage as baggage_api
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags, TraceState
from werkzeug.serving import make_server

import meshlib
import meshlib.asgi
import meshlib.wsgi
from meshlib.telemetry import tracing
from meshlib.testing import serve
from tests.backend import Backend
from tests.conftest import wait_until
from tests.telemetry.conftest import Flaky, Traces, calls_payments, point, relay, service

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _one(spans: list[ReadableSpan], **want: Any) -> ReadableSpan:
    found = [s for s in spans if all(_get(s, k) == v for k, v in want.items())]
    assert len(found) == 1, (
        f"want one span with {want}, found {[(s.name, dict(s.attributes)) for s in found]}"
    )
    return found[0]


def _get(span: ReadableSpan, key: str) -> Any:
    if key in ("kind", "name"):
        return getattr(span, key)
    return span.attributes.get(key.replace("__", "."))


def _child_of(child: ReadableSpan, parent: ReadableSpan) -> bool:
    return child.parent is not None and child.parent.span_id == parent.context.span_id


@pytest.fixture
def chain(traces: Traces) -> Iterator[dict[str, Any]]:
    """a -> b -> c, each its own Mesh on the same provider; b retries c once (c fails first)."""
    meshes = {name: meshlib.Mesh(name, tracing=traces.provider) for name in "abc"}
    flaky = Flaky(failures=1)
    c = service(meshes["c"], flaky)
    b = service(meshes["b"], relay(meshes["b"], "c"))
    a = service(meshes["a"], relay(meshes["a"], "b"))
    point(meshes["a"], "b", b.address)
    point(meshes["b"], "c", c.address, retries=2)
    yield {"a": a, "meshes": meshes, "c": flaky}
    for s in (a, b, c):
        s.stop()
    for m in meshes.values():
        m.close()


def test_three_services_make_one_trace_with_a_span_per_call_and_per_retry(
    chain: dict[str, Any], traces: Traces
) -> None:
    r = httpx.get(f"{chain['a'].url}/items/42", headers={"x-mesh-source": "tester"})
    assert r.status_code == 200, r.text
    # a: server, client; b: server, client, the retry's attempt span; c: 2 servers
    spans = traces.wait_for(7)
    assert len(spans) == 7, [s.name for s in spans]
    assert len({s.context.trace_id for s in spans}) == 1, "every span belongs to one trace"

    a_server = _one(spans, kind=SpanKind.SERVER, mesh__service="a")
    a_client = _one(
        spans,
        name="GET b",
        kind=SpanKind.CLIENT,
        mesh__service="b",
        server__address="b",
        http__request__method="GET",
        mesh__endpoint=chain["meshes"]["a"].snapshot.plans["b"].endpoints[0].address,
    )
    b_server = _one(spans, kind=SpanKind.SERVER, mesh__service="b")
    b_client = [s for s in spans if s.name == "GET c"]
    b_attempts = [s for s in spans if s.name == "GET c attempt"]
    c_servers = sorted(
        (s for s in spans if _get(s, "mesh.service") == "c" and s.kind == SpanKind.SERVER),
        key=lambda s: s.start_time,
    )

    assert a_server.parent is None  # the test's request carried no trace context
    assert a_server.name == "GET /items/{item}" and a_server.attributes["http.route"] == "/items/{item}"
    assert a_server.attributes["mesh.source"] == "tester" and a_server.attributes["url.path"] == "/items/42"
    assert a_server.attributes["http.response.status_code"] == 200
    assert a_client.name == "GET b" and _child_of(a_client, a_server)
    assert a_client.attributes["mesh.route"] == "main" and a_client.attributes["mesh.attempt"] == 1
    assert not [s for s in spans if s.name == "GET b attempt"], "one attempt: no span of its own"
    assert _child_of(b_server, a_client), "the call's span stands for its only attempt"
    assert b_server.attributes["mesh.source"] == "a"

    assert len(b_client) == 1 and _child_of(b_client[0], b_server)
    assert b_client[0].attributes["mesh.attempt"] == 2
    assert b_client[0].attributes["http.response.status_code"] == 200
    assert len(b_attempts) == 1 and _child_of(b_attempts[0], b_client[0])
    retry = b_attempts[0]
    assert retry.attributes["mesh.attempt"] == 2 and retry.attributes["http.request.resend_count"] == 1
    assert retry.attributes["http.response.status_code"] == 200 and "error.type" not in retry.attributes
    assert retry.attributes["server.address"] == "127.0.0.1"
    assert isinstance(retry.attributes["server.port"], int)

    assert len(c_servers) == 2
    assert _child_of(c_servers[0], b_client[0]), "the first attempt went out as the call's span"
    assert _child_of(c_servers[1], retry), "the retry hangs under its own attempt span"
    assert c_servers[0].attributes["http.response.status_code"] == 503
    assert c_servers[0].status.status_code is StatusCode.ERROR  # a server span fails on 5xx
    assert c_servers[1].attributes["mesh.attempt"] == 2  # from x-mesh-attempt

    # on the wire: c saw the call span's id, then the retry's, in traceparent
    sent = [h["traceparent"].split("-")[2] for h in chain["c"].seen]
    assert sent == [format(s.context.span_id, "016x") for s in (b_client[0], retry)]


def test_client_span_records_a_connection_failure(traces: Traces) -> None:
    from tests.backend import dead_address

    mesh = meshlib.Mesh("caller", tracing=traces.provider)
    point(mesh, "gone", dead_address())
    with mesh.sync_client() as client, pytest.raises(httpx.ConnectError):
        client.get("http://gone/x")
    mesh.close()
    spans = traces.spans()
    outer = _one(spans, name="GET gone", kind=SpanKind.CLIENT, mesh__attempt=1, mesh__service="gone")
    assert len(spans) == 1, "one attempt: the call's span alone"
    assert outer.name == "GET gone" and outer.status.status_code is StatusCode.ERROR
    assert outer.attributes["error.type"] == "ConnectError"


def test_inbound_trace_context_is_continued(traces: Traces) -> None:
    mesh = meshlib.Mesh("orders", tracing=traces.provider)
    with serve(mesh.asgi(Backend("orders"))) as server:
        r = httpx.get(f"{server.url}/x", headers={"traceparent": TRACEPARENT, "tracestate": "k=v"})
        assert r.status_code == 200
        span = traces.wait_for(1)[0]
    mesh.close()
    assert span.kind == SpanKind.SERVER and span.name == "GET"  # no route template known
    assert format(span.context.trace_id, "032x") == TRACEPARENT.split("-")[1]
    assert format(span.parent.span_id, "016x") == TRACEPARENT.split("-")[2]
    assert span.parent.is_remote


def test_mirrored_copy_joins_the_trace_marked_as_mirror(traces: Traces) -> None:
    caller = meshlib.Mesh("caller", tracing=traces.provider)
    primary = meshlib.Mesh("orders", tracing=traces.provider)
    shadow = meshlib.Mesh("orders", tracing=traces.provider)
    with serve(primary.asgi(Backend("v1"))) as s1, serve(shadow.asgi(Backend("v2"))) as s2:
        docs = [
            {
                "kind": "Endpoints",
                "service": "orders",
                "endpoints": [
                    {"address": s1.address, "labels": {"version": "v1"}},
                    {"address": s2.address, "labels": {"version": "v2"}},
                ],
            },
            {
                "kind": "Destination",
                "service": "orders",
                "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
            },
            {
                "kind": "Route",
                "service": "orders",
                "routes": [{"to": [{"subset": "v1"}], "mirror": {"subset": "v2", "percent": 100}}],
            },
        ]
        from meshlib.rules import parse_documents

        caller.apply_rules(parse_documents(docs, source="test"), "test")
        with caller.sync_client() as client:
            assert client.get("http://orders/x").status_code == 200
        spans = traces.wait_for(3)  # client, primary's server span, the mirror's
    for m in (caller, primary, shadow):
        m.close()
    outer = _one(spans, name="GET orders", kind=SpanKind.CLIENT, mesh__subset="v1")
    mirror = _one(spans, kind=SpanKind.SERVER, mesh__mirror=True)
    served = next(s for s in spans if s.kind == SpanKind.SERVER and s is not mirror)
    assert len(spans) == 3, [s.name for s in spans]
    assert outer.attributes["mesh.mirror.subset"] == "v2"
    assert _child_of(mirror, outer), "the mirrored copy hangs under the request it copies"
    assert _child_of(served, outer) and "mesh.mirror" not in served.attributes


def test_a_hedged_copy_gets_an_attempt_span(traces: Traces) -> None:
    from meshlib.rules import parse_documents

    mesh = meshlib.Mesh("caller", tracing=traces.provider)
    slow, fast = Backend("slow"), Backend("fast")
    slow.delay = 0.5
    with serve(slow) as s1, serve(fast) as s2:
        docs = [
            {
                "kind": "Endpoints",
                "service": "orders",
                "endpoints": [{"address": s1.address}, {"address": s2.address}],
            },
            {"kind": "Route", "service": "orders", "routes": [{"hedge": {"delay": "50ms"}}]},
        ]
        mesh.apply_rules(parse_documents(docs, source="test"), "test")
        with mesh.sync_client() as client:
            for _ in range(2):  # round robin: one of the two goes to the slow endpoint first
                assert client.get("http://orders/x").json()["name"] == "fast"

        def calls() -> list[ReadableSpan]:
            return [s for s in traces.spans() if s.name == "GET orders"]

        wait_until(lambda: len(calls()) == 2, what="both calls' spans")
    mesh.close()
    spans = traces.spans()
    hedged = [s for s in calls() if s.attributes["mesh.attempt"] == 2]
    assert hedged, "at least one call went to the slow endpoint first and was hedged"
    for call in calls():
        copies = [s for s in spans if s.name == "GET orders attempt" and _child_of(s, call)]
        if call not in hedged:
            assert copies == [] and call.attributes["mesh.endpoint"] == s2.address, "one attempt: one span"
            continue
        assert len(copies) == 1, "only the copy gets a span of its own"
        copy = copies[0].attributes
        assert copy["mesh.attempt"] == 2 and copy["mesh.endpoint"] == s2.address
        assert copies[0].end_time <= call.end_time, "the copy answered the call"
        assert call.attributes["mesh.endpoint"] == s1.address, "the call's span is its first copy's"


def test_an_unsampled_trace_is_passed_on_unsampled_without_spans(traces: Traces, fleet) -> None:
    downstream, server = fleet.start("payments")
    mesh = meshlib.Mesh("orders", tracing=traces.provider)  # default sampler: follows the parent
    point(mesh, "payments", server.address)

    app = calls_payments(mesh)

    unsampled = TRACEPARENT[:-2] + "00"
    with serve(mesh.asgi(app)) as front:
        assert httpx.get(front.url, headers={"traceparent": unsampled}).status_code == 204
    mesh.close()
    sent = downstream.seen[0]["headers"]["traceparent"].split("-")
    assert sent[1] == TRACEPARENT.split("-")[1] and sent[3] == "00"
    assert sent[2] not in (TRACEPARENT.split("-")[2], "0" * 16)  # the client span's own id
    assert traces.spans() == []


def _unsampled_parent(flags: int, remote: bool) -> Context:
    trace_id, span_id = (int(part, 16) for part in TRACEPARENT.split("-")[1:3])
    state = TraceState([("vendor", "kept")])
    parent = SpanContext(
        trace_id, span_id, is_remote=remote, trace_flags=TraceFlags(flags), trace_state=state
    )
    return trace_api.set_span_in_context(NonRecordingSpan(parent))


@pytest.mark.parametrize("remote", [True, False])
@pytest.mark.parametrize("flags", [0x00, 0x02])  # 0x02: the random trace id flag, kept
def test_a_child_of_an_unsampled_parent_is_made_as_the_sdk_makes_it(
    monkeypatch: pytest.MonkeyPatch, remote: bool, flags: int
) -> None:
    tracer = TracerProvider().get_tracer("test")  # default sampler: parent-based
    parent = _unsampled_parent(flags, remote)
    theirs = tracer.start_span("GET x", context=parent, kind=SpanKind.CLIENT).get_span_context()
    monkeypatch.setattr(tracer, "start_span", None)  # the mesh makes this one without the SDK
    span = tracing.start_span_in(tracer, "GET x", SpanKind.CLIENT, parent)
    ours = span.get_span_context()
    assert not span.is_recording()
    assert (ours.trace_id, ours.trace_flags, ours.trace_state, ours.is_remote) == (
        theirs.trace_id,
        theirs.trace_flags,
        theirs.trace_state,
        theirs.is_remote,
    )
    assert ours.span_id not in (0, trace_api.get_current_span(parent).get_span_context().span_id)


def test_a_sampler_that_keeps_unsampled_children_is_asked(traces: Traces) -> None:
    keeps = ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON, local_parent_not_sampled=ALWAYS_ON)
    provider = TracerProvider(sampler=keeps)
    span = tracing.start_span_in(
        provider.get_tracer("test"), "GET", SpanKind.SERVER, _unsampled_parent(0, True)
    )
    assert span.is_recording()
    span.end()
    rooted = tracing.start_span_in(traces.provider.get_tracer("test"), "GET", SpanKind.SERVER)  # no parent
    assert rooted.is_recording()  # a root: the sampler decides (always on)
    rooted.end()


@pytest.fixture
def flask_chain(traces: Traces) -> Iterator[tuple[str, meshlib.Mesh]]:
    mesh = meshlib.Mesh("payments", tracing=traces.provider)
    app = Flask("payments")

    @app.get("/charges/<int:charge>")
    def charge(charge: int) -> dict[str, int]:
        return {"charge": charge}

    app.wsgi_app = meshlib.wsgi.MeshMiddleware(app.wsgi_app, mesh=mesh)  # type: ignore[method-assign]
    server = make_server("127.0.0.1", 0, app, threaded=True)
    import threading

    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", mesh
    server.shutdown()
    thread.join(5)
    mesh.close()


def test_wsgi_server_span_has_the_flask_route_and_the_remote_parent(flask_chain, traces: Traces) -> None:
    url, _ = flask_chain
    r = httpx.get(f"{url}/charges/7", headers={"traceparent": TRACEPARENT, "x-mesh-source": "checkout"})
    assert r.status_code == 200
    span = traces.wait_for(1)[0]
    assert span.kind == SpanKind.SERVER and span.name == "GET /charges/<int:charge>"
    assert span.attributes["http.route"] == "/charges/<int:charge>"
    assert span.attributes["mesh.source"] == "checkout" and span.attributes["url.path"] == "/charges/7"
    assert format(span.parent.span_id, "016x") == TRACEPARENT.split("-")[2]


def test_tracing_false_makes_no_spans_but_passes_trace_context_on(traces: Traces, fleet) -> None:
    downstream, server = fleet.start("payments")
    mesh = meshlib.Mesh("orders", tracing=False)
    point(mesh, "payments", server.address)

    app = calls_payments(mesh)

    with serve(mesh.asgi(app)) as front:
        httpx.get(front.url, headers={"traceparent": TRACEPARENT, "tracestate": "k=v"})
    mesh.close()
    seen = downstream.seen[0]["headers"]
    assert seen["traceparent"] == TRACEPARENT and seen["tracestate"] == "k=v"


def test_a_tracer_provider_is_never_set_globally(traces: Traces) -> None:
    mesh = meshlib.Mesh("orders", tracing=traces.provider)
    mesh.close()
    assert not isinstance(trace_api.get_tracer_provider(), TracerProvider)


def test_without_an_sdk_no_span_is_created(monkeypatch: pytest.MonkeyPatch, fleet) -> None:
    """The API's no-op provider is detected up front: the mesh never asks it for a span."""
    if not isinstance(trace_api.get_tracer_provider(), trace_api.ProxyTracerProvider):
        pytest.skip("a global TracerProvider was set in this process")
    calls: list[str] = []

    def count(name: str) -> Any:
        return lambda *args, **kwargs: calls.append(name)

    for cls in (trace_api.ProxyTracer, trace_api.NoOpTracer):
        monkeypatch.setattr(cls, "start_span", count("start_span"))
        monkeypatch.setattr(cls, "start_as_current_span", count("start_as_current_span"))
    monkeypatch.setattr(trace_api.ProxyTracerProvider, "get_tracer", count("get_tracer"))
    monkeypatch.setattr(opentelemetry.propagate, "inject", count("inject"))
    monkeypatch.setattr(opentelemetry.propagate, "extract", count("extract"))

    downstream, server = fleet.start("payments")
    front = meshlib.Mesh("front")
    point(front, "payments", server.address, retries=2)
    downstream.fail_status, downstream.fail_times = 503, 1  # a retry: two attempts
    with serve(front.asgi(Backend("front"))) as s, front.sync_client() as client:
        assert client.get("http://payments/x").status_code == 200
        assert httpx.get(s.url, headers={"traceparent": TRACEPARENT}).status_code == 200
        assert httpx.get(s.url).status_code == 200
    front.close()
    assert calls == []
    assert front.telemetry.traces.get() is None
    assert downstream.hits == 2


LATE = """
import json
import re
import httpx
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import meshlib
from meshlib.telemetry import tracing
from meshlib.testing import serve
from tests.backend import Backend
from tests.telemetry.conftest import point

mesh = meshlib.Mesh("orders")  # before the app configures anything
backend = serve(Backend("payments"))
point(mesh, "payments", backend.address)
with mesh.sync_client() as client:
    client.get("http://payments/x")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    client.get("http://payments/x")
names = sorted(m.name for rm in reader.get_metrics_data().resource_metrics
               for sm in rm.scope_metrics for m in sm.metrics)
print(json.dumps({"spans": sorted(s.name for s in exporter.get_finished_spans()), "metrics": names}))
mesh.close()
backend.stop()
"""


def test_an_sdk_configured_after_the_mesh_is_picked_up() -> None:
    """In a process of its own, as the global providers can be set only once."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", LATE], cwd=root, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["spans"] == ["GET payments"], "the first request made none"
    assert "mesh.requests" in out["metrics"] and "mesh.request.duration.sum" in out["metrics"]


def test_baggage_without_traceparent_is_extracted_and_passed_on(traces: Traces, fleet) -> None:
    """The middleware skips extraction for a request with no trace context at all, not for one
    that carries only baggage: the W3C baggage propagator still reads it, and the call the app
    makes carries it on with the new trace's context."""
    downstream, server = fleet.start("payments")
    mesh = meshlib.Mesh("orders", tracing=traces.provider)
    point(mesh, "payments", server.address)

    app = calls_payments(mesh)

    with serve(mesh.asgi(app)) as front:
        assert httpx.get(front.url, headers={"baggage": "tenant=acme"}).status_code == 204
        assert httpx.get(front.url).status_code == 204
        spans = traces.wait_for(4)
    mesh.close()
    with_baggage, without = (d["headers"] for d in downstream.seen)
    assert with_baggage["baggage"] == "tenant=acme" and "baggage" not in without
    calls = {format(s.context.span_id, "016x"): s for s in spans if s.name == "GET payments"}
    sent = with_baggage["traceparent"].split("-")
    assert sent[2] in calls and sent[1] == format(calls[sent[2]].context.trace_id, "032x")
    assert all(s.kind != SpanKind.SERVER or s.parent is None for s in spans), "no caller's context: roots"


def test_a_propagator_other_than_w3c_is_asked_as_usual(traces: Traces, fleet) -> None:
    """The mesh writes `traceparent` itself only for the API's default propagator: another one
    (here a W3C propagator of the app's own class) does its own injecting and extracting."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    class Marking(TraceContextTextMapPropagator):
        def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
            super().inject(carrier, context)
            carrier["x-marked"] = "1"

    previous = opentelemetry.propagate.get_global_textmap()
    opentelemetry.propagate.set_global_textmap(Marking())
    try:
        downstream, server = fleet.start("payments")
        mesh = meshlib.Mesh("orders", tracing=traces.provider)
        point(mesh, "payments", server.address)
        with mesh.sync_client() as client:
            assert client.get("http://payments/x").status_code == 200
        mesh.close()
    finally:
        opentelemetry.propagate.set_global_textmap(previous)
    seen = downstream.seen[0]["headers"]
    (call,) = traces.spans()
    assert seen["x-marked"] == "1"
    assert seen["traceparent"].split("-")[2] == format(call.context.span_id, "016x")


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": TRACEPARENT},
        {"traceparent": TRACEPARENT[:-2] + "00"},
        {"traceparent": TRACEPARENT[:-2] + "03"},
        {"traceparent": TRACEPARENT, "baggage": "user=alice"},
        {"traceparent": TRACEPARENT, "tracestate": "vendor=kept"},
        {"traceparent": "00-" + "0" * 32 + TRACEPARENT[35:]},
        {"traceparent": "00-" + TRACEPARENT[3:36] + "0" * 16 + "-01"},
        {"traceparent": TRACEPARENT.upper()},
        {"traceparent": " " + TRACEPARENT},
        {"traceparent": TRACEPARENT + "-extra"},
        {"traceparent": "01" + TRACEPARENT[2:] + "-extra"},
        {"traceparent": "ff" + TRACEPARENT[2:]},
        {"traceparent": TRACEPARENT[:-1] + "g"},
        {"baggage": "user=alice"},
        {},
    ],
)
def test_inbound_trace_context_is_read_as_the_propagator_reads_it(headers: dict[str, str]) -> None:
    environ = {"HTTP_" + name.upper(): value for name, value in headers.items()}
    ours = tracing.extract(environ, tracing.WSGI_HEADERS, headers.get("traceparent"))
    theirs = opentelemetry.propagate.extract(environ, getter=tracing.WSGI_HEADERS)
    assert (
        trace_api.get_current_span(ours).get_span_context()
        == trace_api.get_current_span(theirs).get_span_context()
    )
    assert dict(baggage_api.get_all(ours)) == dict(baggage_api.get_all(theirs))


@pytest.mark.parametrize(
    ("flags", "traceparent"),
    [
        *((flags, TRACEPARENT[:-2] + flags) for flags in ("00", "02", "0a", "0e", "f0", "fe")),
        *(
            (None, traceparent)
            for traceparent in (
                TRACEPARENT,  # sampled
                TRACEPARENT[:-2] + "03",
                TRACEPARENT[:-2] + "0b",
                TRACEPARENT[:-2] + "0A",  # uppercase: the propagator takes none
                "00-" + "0" * 32 + TRACEPARENT[35:-2] + "00",
                TRACEPARENT[:36] + "0" * 16 + "-00",
                TRACEPARENT[:-2].upper() + "00",
                " " + TRACEPARENT[:-2] + "00",  # what the propagator reads, left to it
                TRACEPARENT[:-2] + "00-extra",
                "01" + TRACEPARENT[2:-2] + "00",
                TRACEPARENT[:-2] + "0",
                TRACEPARENT[:-2] + "0g",
            )
        ),
    ],
)
def test_an_unsampled_parent_is_read_as_the_propagator_reads_it(flags: str | None, traceparent: str) -> None:
    """The light request's parse: the exact form only, and then the propagator's own reading."""
    ours = tracing.unsampled_parent(traceparent)
    theirs = trace_api.get_current_span(opentelemetry.propagate.extract({"traceparent": traceparent}))
    if flags is None:
        assert ours is None
        return
    parent = theirs.get_span_context()
    assert parent.is_valid and parent.is_remote and not parent.trace_flags.sampled
    assert (
        ours
        == (parent.trace_id, parent.trace_flags & 0x0F)
        == (int(TRACEPARENT[3:35], 16), int(flags, 16) & 0x0F)
    )


@pytest.mark.parametrize(
    "traceparent",
    [
        *(TRACEPARENT[:-2] + flags for flags in ("00", "01", "02", "03", "0b", "fe", "ff")),
        TRACEPARENT[:-2] + "0A",  # uppercase: the propagator takes none
        "00-" + "0" * 32 + TRACEPARENT[35:],
        TRACEPARENT[:36] + "0" * 16 + "-01",
        TRACEPARENT.upper(),
        " " + TRACEPARENT,
        TRACEPARENT + "-extra",
        "01" + TRACEPARENT[2:],
        TRACEPARENT[:-1],
        TRACEPARENT[:-2] + "0g",
    ],
)
def test_a_callers_span_context_is_read_as_the_propagator_reads_it(traceparent: str) -> None:
    """The light request's parse of a caller's trace: the exact form with ids that are not zero
    only, and then the very span context the propagator reads (remote, flags, trace state)."""
    ours = tracing.parent_of(traceparent)
    theirs = trace_api.get_current_span(opentelemetry.propagate.extract({"traceparent": traceparent}))
    exact = re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", traceparent)
    if exact is None or not theirs.get_span_context().is_valid:
        assert ours is None
        return
    assert ours == theirs.get_span_context() and type(ours) is SpanContext
    assert ours.is_remote and ours.trace_flags == int(traceparent[-2:], 16)
