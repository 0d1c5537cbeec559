"""Spans on the OpenTelemetry API, and W3C trace context on the wire.

Shared by the client stages (`meshlib.telemetry.client`) and the server middleware
(`meshlib.telemetry.server`): the tracer source, the attributes both sides set, and the
propagation helpers. Attributes follow the OpenTelemetry HTTP semantic conventions where they
have a name for the fact, `mesh.*` otherwise. No header value and no query string ever goes
into a span: both can carry credentials.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.trace import Span, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshlib.headers import TRACEPARENT, TRACESTATE
from meshlib.telemetry.providers import TRACES, ProviderSource

SCOPE = "meshlib"
"""The instrumentation scope name of every span and instrument the mesh makes."""

CARRIED: ContextVar[tuple[str, str | None] | None] = ContextVar("meshlib_trace_carried", default=None)
"""The inbound request's raw `traceparent` and `tracestate`, kept when this process makes no
spans: the calls it makes then pass the caller's trace context on unchanged, as a proxy that does
not trace would (the design promises trace context is always propagated)."""

_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"}
)


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
    return method if method in _METHODS else "_OTHER"


def error_type(error: BaseException) -> str:
    return type(error).__qualname__


def end_span(
    span: Span,
    status: int | None,
    error: BaseException | None,
    *,
    server: bool,
    attributes: dict[str, Any] | None = None,
) -> None:
    """Set the outcome (and any last `attributes`, all in one call) and end the span. Per the
    conventions a client span fails on 4xx and 5xx, a server span on 5xx only; a cancelled
    attempt (a hedge that lost) is not a failure."""
    attributes = attributes if attributes is not None else {}
    if status is not None:
        attributes["http.response.status_code"] = status
    failed = None
    if error is not None:
        if isinstance(error, Exception):
            failed = attributes["error.type"] = error_type(error)
        else:
            attributes["mesh.cancelled"] = True
    elif status is not None and status >= (500 if server else 400):
        attributes["error.type"] = str(status)
        failed = ""
    if attributes:
        span.set_attributes(attributes)
    if failed is not None:
        span.set_status(Status(StatusCode.ERROR, failed or None))
    span.end()


def end_rpc_span(
    span: Span, status: int | None, error: BaseException | None, *, attributes: dict[str, Any]
) -> None:
    """End a CLIENT span of an RPC in the rpc conventions: its code (`rpc.grpc.status_code`,
    in `attributes`) and no http.* attribute; it fails on any code but OK (0), with the code as
    `error.type`. Given up by the caller (a cancelled attempt, an abandoned stream) is not a
    failure. `status` (the code's HTTP mapping) is the fallback without a code."""
    code = attributes.get("rpc.grpc.status_code")
    failed = None
    if error is not None:
        if isinstance(error, Exception):
            failed = attributes["error.type"] = error_type(error)
        else:
            attributes["mesh.cancelled"] = True
    elif code is not None and code != 0:
        failed = attributes["error.type"] = str(code)
    elif code is None and status is not None and status >= 400:
        failed = attributes["error.type"] = str(status)
    span.set_attributes(attributes)
    if failed is not None:
        span.set_status(Status(StatusCode.ERROR, failed))
    span.end()


def start_span(
    tracer: Tracer, name: str, parent: Span, kind: trace.SpanKind, attributes: dict[str, Any]
) -> Span:
    return tracer.start_span(
        name, context=trace.set_span_in_context(parent), kind=kind, attributes=attributes
    )


class _W3c:
    """Whether the global propagator is the API's default kind: W3C trace context, with or
    without W3C baggage. Then the mesh writes `traceparent` itself (the propagator would make a
    context, look the span up in it and check the header twice on the way), and skips extracting
    from a request that carries neither `traceparent` nor `baggage`. Any other propagator (B3,
    Jaeger, a custom one) is asked every time. Decided once per global propagator."""

    __slots__ = ("baggage", "propagator", "w3c")

    def __init__(self) -> None:
        self.propagator: TextMapPropagator | None = None
        self.w3c = False
        self.baggage: TextMapPropagator | None = None

    def check(self) -> bool:
        propagator = propagate.get_global_textmap()
        if propagator is self.propagator:
            return self.w3c
        parts = getattr(propagator, "_propagators", None) if type(propagator) is CompositePropagator else None
        if parts is None:
            parts = [propagator]
        kinds = [type(p) for p in parts]
        self.w3c = TraceContextTextMapPropagator in kinds and all(
            k in (TraceContextTextMapPropagator, W3CBaggagePropagator) for k in kinds
        )
        self.baggage = next((p for p in parts if type(p) is W3CBaggagePropagator), None)
        self.propagator = propagator
        return self.w3c


_w3c = _W3c()


def inject(headers: MutableMapping[str, str], span: Span) -> None:
    """Put `span`'s context on an outgoing request (the global propagator: W3C by default), with
    the caller's baggage."""
    if not _w3c.check():
        propagate.inject(headers, context=trace.set_span_in_context(span))
        return
    ctx = span.get_span_context()
    if ctx.is_valid:
        headers[TRACEPARENT] = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
        if ctx.trace_state:
            headers[TRACESTATE] = ctx.trace_state.to_header()
    if _w3c.baggage is not None:
        _w3c.baggage.inject(headers)  # the current context's baggage, if any


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


class AsgiHeaders(Getter[list[tuple[bytes, bytes]]]):
    """Reads an ASGI scope's header list for `propagate.extract`."""

    def get(self, carrier: list[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [v.decode("latin-1") for k, v in carrier if k == name]
        return values or None

    def keys(self, carrier: list[tuple[bytes, bytes]]) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


class WsgiHeaders(Getter[dict[str, Any]]):
    """Reads a WSGI environ's `HTTP_*` keys for `propagate.extract`."""

    def get(self, carrier: dict[str, Any], key: str) -> list[str] | None:
        value = carrier.get("HTTP_" + key.upper().replace("-", "_"))
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: dict[str, Any]) -> list[str]:
        return [k[5:].lower().replace("_", "-") for k in carrier if k.startswith("HTTP_")]


ASGI_HEADERS = AsgiHeaders()
WSGI_HEADERS = WsgiHeaders()


def extract(carrier: Any, getter: Getter[Any], traceparent: str | None = None) -> Any:
    """The caller's context from an inbound request (the global propagator). `traceparent`: the
    request's, already read; without it and without baggage, a W3C propagator would find
    nothing, so it is not asked."""
    if traceparent is None and _w3c.check() and (_w3c.baggage is None or not getter.get(carrier, "baggage")):
        return Context()
    return propagate.extract(carrier, getter=getter)
