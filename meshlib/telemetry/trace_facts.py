"""What tracing needs without the OpenTelemetry API: trace ids, the carried context, names.

The client stages and the hub import this module, not `tracing`, so a process that never
imports OpenTelemetry (no SDK, no instrumentation) does not load its API either
(docs/decisions.md). `tracing` re-exports every name here.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from meshlib.headers import TRACEPARENT, TRACESTATE
from meshlib.telemetry.providers import TRACES, ProviderSource

if TYPE_CHECKING:
    from opentelemetry.trace import Span

SCOPE = "meshlib"
"""The instrumentation scope name of every span and instrument the mesh makes."""

CARRIED: ContextVar[tuple[str, str | None] | None] = ContextVar("meshlib_trace_carried", default=None)
"""The inbound request's raw `traceparent` and `tracestate`, kept when this process makes no
spans: the calls it makes then pass the caller's trace context on unchanged, as a proxy that does
not trace would (the design promises trace context is always propagated)."""

METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"})


def instrumentation_version() -> str | None:
    import meshlib

    return getattr(meshlib, "__version__", None)


def tracer_source(option: Any) -> ProviderSource:
    """`Mesh(tracing=...)`: a TracerProvider, True/None (the global one) or False (no spans)."""
    return ProviderSource(
        option, TRACES, lambda provider: provider.get_tracer(SCOPE, instrumentation_version())
    )


def method_attribute(method: str) -> str:
    """`http.request.method`: the conventions' known methods, `_OTHER` for the rest (which
    would otherwise let a caller mint unbounded attribute values)."""
    return method if method in METHODS else "_OTHER"


def error_type(error: BaseException) -> str:
    return type(error).__qualname__


def pass_through(headers: MutableMapping[str, str], carried: tuple[str, str | None]) -> None:
    """Forward an inbound request's trace context unchanged (this process makes no spans)."""
    if TRACEPARENT not in headers:
        headers[TRACEPARENT] = carried[0]
        if carried[1]:
            headers[TRACESTATE] = carried[1]


def ids(span: Span | None) -> tuple[str | None, str | None]:
    """(trace id, span id) in the W3C hex form, or Nones for no span or an invalid one."""
    if span is None:
        return None, None
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id in a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if well formed."""
    if not traceparent or len(traceparent) < 55 or traceparent[2] != "-" or traceparent[35] != "-":
        return None
    trace_id = traceparent[3:35].lower()
    if trace_id == "0" * 32 or any(c not in "0123456789abcdef" for c in trace_id):
        return None
    return trace_id
