"""The server span made current by the mesh is what the API's own calls would make current."""

from __future__ import annotations

import contextvars
import logging

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from meshlib.telemetry import current_span

SPAN = NonRecordingSpan(SpanContext(0x1234, 0x5678, is_remote=False, trace_flags=TraceFlags(1)))


def test_the_api_default_runtime_context_is_set_directly() -> None:
    assert current_span._VARIABLE is not None  # the installed API is the one the mesh knows


@pytest.mark.parametrize("with_baggage", [False, True])
def test_attach_makes_the_context_the_api_would_and_detach_restores_the_previous(with_baggage: bool) -> None:
    parent = baggage.set_baggage("tenant", "acme", Context()) if with_baggage else Context()
    before = otel_context.get_current()
    token = current_span.attach(SPAN, parent)
    now = otel_context.get_current()
    assert now == trace.set_span_in_context(SPAN, parent) and type(now) is Context
    assert trace.get_current_span() is SPAN
    assert baggage.get_baggage("tenant") == ("acme" if with_baggage else None)
    current_span.detach(token)
    assert otel_context.get_current() is before


def test_a_detach_in_another_context_is_logged_as_the_api_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    token = contextvars.copy_context().run(current_span.attach, SPAN, Context())
    with caplog.at_level(logging.ERROR, logger="opentelemetry.context"):
        current_span.detach(token)  # made in another context: the API's own error, logged, not raised
    assert "Failed to detach context" in caplog.text
    assert trace.get_current_span() is not SPAN


def test_another_runtime_context_goes_through_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    class Other(type(otel_context._RUNTIME_CONTEXT)):  # type: ignore[misc]
        """A runtime context of the app's own: the mesh does not know what its attach does."""

    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", Other())
    assert current_span._variable() == (None, "")


def test_the_span_a_context_holds_is_the_api_answer() -> None:
    with_span = trace.set_span_in_context(SPAN, Context())
    odd = otel_context.set_value("current-span-not-a-span", 1, Context())
    for context in (with_span, Context(), odd):
        assert current_span.span_in(context) is trace.get_current_span(context)
    assert current_span.context_with(SPAN, with_span) == trace.set_span_in_context(SPAN, with_span)


def test_an_sdk_span_in_a_context_is_found_as_the_api_finds_it() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    span = provider.get_tracer("found").start_span("local parent")
    context = trace.set_span_in_context(span, Context())
    assert current_span.span_in(context) is span is trace.get_current_span(context)
    span.end()
    provider.shutdown()
