"""Spans on the OpenTelemetry API, and W3C trace context on the wire.

Shared by the client stages (`meshlib.telemetry.client`) and the server middleware
(`meshlib.telemetry.server`): the tracer source, the attributes both sides set, and the
propagation helpers. Attributes follow the OpenTelemetry HTTP semantic conventions where they
have a name for the fact, `mesh.*` otherwise. No header value and no query string ever goes
into a span: both can carry credentials.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Any

from opentelemetry import baggage as baggage_api
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.trace import Span, SpanContext, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshlib.headers import BAGGAGE, TRACEPARENT, TRACESTATE
from meshlib.telemetry import current_span, sdk_spans
from meshlib.telemetry.trace_facts import CARRIED as CARRIED
from meshlib.telemetry.trace_facts import SCOPE as SCOPE
from meshlib.telemetry.trace_facts import error_type as error_type
from meshlib.telemetry.trace_facts import ids as ids
from meshlib.telemetry.trace_facts import instrumentation_version as instrumentation_version
from meshlib.telemetry.trace_facts import method_attribute as method_attribute
from meshlib.telemetry.trace_facts import pass_through as pass_through
from meshlib.telemetry.trace_facts import trace_id_of as trace_id_of
from meshlib.telemetry.trace_facts import tracer_source as tracer_source


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
    if failed is not None:
        span.set_status(Status(StatusCode.ERROR, failed or None))
    sdk_spans.end(span, attributes)


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
    if failed is not None:
        span.set_status(Status(StatusCode.ERROR, failed))
    sdk_spans.end(span, attributes)


def start_span(
    tracer: Tracer, name: str, parent: Span, kind: trace.SpanKind, attributes: dict[str, Any]
) -> Span:
    return tracer.start_span(
        name, context=trace.set_span_in_context(parent), kind=kind, attributes=attributes
    )


def start_span_in(tracer: Tracer, name: str, kind: trace.SpanKind, context: Context | None = None) -> Span:
    """`tracer.start_span(name, context, kind)`, made by the mesh where the SDK's answer is known
    (`meshlib.telemetry.sdk_spans`: a dropped root, a child of an unsampled parent, a sampled
    span of the SDK's own class)."""
    return sdk_spans.start(tracer, name, kind, context)


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
w3c = _w3c.check
"""Whether the global propagator is W3C trace context (with or without W3C baggage) only: then a
request with neither `traceparent` nor `baggage` has no context to extract."""
EMPTY = Context()
"""The context of a request with no trace context: the same one each time (a Context is not
changed once made)."""


_FLAGS = tuple(f"-{flags:02x}" for flags in range(256))
"""`traceparent`'s last field for each value of the trace flags."""

_BAGGAGE_KEY: str | None = getattr(baggage_api, "_BAGGAGE_KEY", None)
"""The context key under which the API keeps baggage (not public: without it, the propagator is
asked every time, as before)."""


def inject(headers: MutableMapping[str, str], span: Span) -> None:
    """Put `span`'s context on an outgoing request (the global propagator: W3C by default), with
    the caller's baggage."""
    if not _w3c.check():
        propagate.inject(headers, context=trace.set_span_in_context(span))
        return
    ctx = span.get_span_context()
    if ctx.is_valid:
        # bytes.hex, not a format spec: half the cost for a 128-bit id (a valid id fits its width)
        headers[TRACEPARENT] = (
            "00-"
            + ctx.trace_id.to_bytes(16, "big").hex()
            + "-"
            + ctx.span_id.to_bytes(8, "big").hex()
            + _FLAGS[ctx.trace_flags & 0xFF]
        )
        state = ctx.trace_state
        if state:
            headers[TRACESTATE] = state.to_header()
    baggage = _w3c.baggage
    if baggage is not None and (_BAGGAGE_KEY is None or otel_context.get_value(_BAGGAGE_KEY) is not None):
        baggage.inject(headers)  # the current context's baggage


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


def extract(
    carrier: Any, getter: Getter[Any], traceparent: str | None = None, known: Mapping[str, str] | None = None
) -> Any:
    """The caller's context from an inbound request (the global propagator). `traceparent`: the
    request's, already read; without it and without baggage, a W3C propagator would find
    nothing, so it is not asked. With a W3C propagator, a well-formed version-00 `traceparent`
    without `tracestate` is read here (what the propagator would make, without its regular
    expression and its context copies); anything else goes to the propagator. `known`: the
    request's `meshlib.headers.INBOUND` headers, already read: whether it has `tracestate` or
    `baggage` is looked up there instead of in every header."""
    if not _w3c.check():
        return propagate.extract(carrier, getter=getter)
    if known is not None:
        has_state = TRACESTATE in known
        has_baggage = BAGGAGE in known
    else:
        has_state = has_baggage = True  # not known: asked of the carrier below
    if traceparent is None:
        if _w3c.baggage is None or not (has_baggage and getter.get(carrier, BAGGAGE)):
            return EMPTY
        return propagate.extract(carrier, getter=getter)
    context = w3c_context(traceparent)
    if context is None or (has_state and getter.get(carrier, TRACESTATE)):
        return propagate.extract(carrier, getter=getter)
    if _w3c.baggage is not None and has_baggage:
        context = _w3c.baggage.extract(carrier, context=context, getter=getter)
    return context


_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
"""`traceparent`'s exact form (version 00, lowercase, nothing around it)."""
_PARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
"""`_TRACEPARENT`'s form with ids that are not zero: one match and no groups."""
_TRACE_FLAGS = tuple(trace.TraceFlags(n) for n in range(256))


def parent_of(traceparent: str) -> SpanContext | None:
    """The caller's span context of a `traceparent` in the exact form with ids that are not zero
    (remote, its flags, the default trace state): the span `w3c_context`'s context holds,
    without that context. None for any other form."""
    if _PARENT.fullmatch(traceparent) is None:
        return None
    trace_id, span_id = int(traceparent[3:35], 16), int(traceparent[36:52], 16)
    return sdk_spans.valid_context(trace_id, span_id, True, _TRACE_FLAGS[int(traceparent[53:], 16)])


def w3c_context(traceparent: str) -> Context | None:
    """The context of a `traceparent` in the exact form `00-<32 hex>-<16 hex>-<2 hex>` (lowercase,
    nothing around it), or None for any other form. An all-zero id makes no parent, as in the
    propagator."""
    parent = parent_of(traceparent)
    if parent is not None:
        return current_span.context_with(trace.NonRecordingSpan(parent), EMPTY)
    return Context() if _TRACEPARENT.fullmatch(traceparent) is not None else None  # zero ids: no parent


_UNSAMPLED_PARENT = re.compile(
    r"(?=.{54}[02468ace])00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f][02468ace]", re.DOTALL
)
"""`_TRACEPARENT`'s form with ids that are not zero and the sampled flag clear: one match and no
groups (a group is a string and a tuple more per request). The lookahead refuses a sampled
caller's at once (its flags' last digit odd), before the digits are checked one by one: ~1,800
instructions less for it, ~250 more for an unsampled one."""
_LOW_FLAGS = {digit: int(digit, 16) for digit in "02468ace"}


def unsampled_parent(traceparent: str) -> tuple[int, int] | None:
    """(trace id, the low four bits of the trace flags) of a `traceparent` in `w3c_context`'s
    exact form whose sampled flag is clear and whose ids are not zero; None for any other (a
    sampled parent, a malformed one): what a shell needs to make a dropped child without the
    parent's context (the child's flags depend on no other bit)."""
    if _UNSAMPLED_PARENT.fullmatch(traceparent) is None:
        return None
    return int(traceparent[3:35], 16), _LOW_FLAGS[traceparent[54]]
