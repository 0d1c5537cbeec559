"""The client side's telemetry stages: one CLIENT span per call, the access log.

The request's span stands for its first attempt: its context goes on the wire, so the callee's
SERVER span is its child. Only a second attempt and later ones (a retry, a hedged copy) get a
span of their own ("GET orders attempt", a child of the request's span and the parent of the
SERVER span it reached). Most calls make one attempt, and so one span. Where each stage sits,
and why: `meshlib.filters.WHY`; the span model: docs/observability.md.

Attributes are built only for a span that records (a sampled-out span costs its start and end
alone), and set in one call when the span ends. Durations are not recorded here: the stats stage
keeps them, and the instruments read them at collection (`meshlib.telemetry.metrics`).

With tracing and the access log off (no SDK installed), each stage costs a couple of attribute
reads per request: no span is created. A streamed answer's spans and access-log line wait for
its end (`Wire.on_end`): they carry the status it ended with.
"""

from __future__ import annotations

import contextvars
import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from meshlib.headers import FAULT as FAULT_HEADER
from meshlib.pipeline import Call, Response, Stage
from meshlib.telemetry import trace_facts as facts

if TYPE_CHECKING:
    from meshlib.telemetry.hub import Telemetry

log = logging.getLogger("meshlib.telemetry")

_tracing: Any = None


def _otel() -> Any:
    """`meshlib.telemetry.tracing`, which imports the OpenTelemetry API: asked for only with a
    tracer or a span in hand (so the app has imported the API already)."""
    global _tracing
    if _tracing is None:
        from meshlib.telemetry import tracing

        _tracing = tracing
    return _tracing


class RequestTelemetry(Stage):
    """Per request: the CLIENT span (also the first attempt's) and the outbound access-log line."""

    role = "request-telemetry"

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry
        self._traces = telemetry.traces
        self._meters = telemetry.meters

    def enter(self, call: Call) -> None:
        # nothing to record (the instruments read the stats at collection), but a provider the
        # app sets after the Mesh was made is found here, and the instruments then made
        self._meters.get()
        tracer = self._traces.get()
        if tracer is None:
            return
        try:
            rpc = call.wire.rpc_attributes(call, None)
            name = _name(call, rpc)
            # no attributes yet: an unsampled span would drop them, and a sampled one takes
            # them all in one call at its end (the samplers the SDK has do not read them)
            tracing = _otel()
            call.span = tracing.start_span_in(tracer, name, tracing.trace.SpanKind.CLIENT)
        except Exception:  # telemetry never fails a request
            log.debug("could not start a client span", exc_info=True)

    def leave(self, call: Call, state: None, response: Response | None, error: BaseException | None) -> None:
        span = call.span
        access = self._telemetry.access
        if span is None and access is None:
            return
        if response is not None and call.wire.open(response):  # a stream: ends with its status
            # it may end on another thread (grpc's): the access log reads the caller's context
            context = contextvars.copy_context()
            call.wire.on_end(response, lambda error: context.run(self.leave, call, None, response, error))
            return
        try:
            status = call.wire.status(response) if response is not None else None
            if span is not None:
                if span.is_recording():
                    _end_request_span(call, span, status, response, error)
                else:
                    span.end()  # sampled out: nothing to add
            if access is not None:
                seconds = time.monotonic() - call.started
                trace_id, span_id = facts.ids(span)
                if trace_id is None:
                    carried = facts.CARRIED.get()
                    trace_id = facts.trace_id_of(carried[0]) if carried is not None else None
                access.write(
                    started_wall=time.time() - seconds,
                    direction="out",
                    trace_id=trace_id,
                    span_id=span_id,
                    source=call.source,
                    destination=call.service,
                    route=call.route.name if call.route is not None else None,
                    subset=call.subset,
                    upstream=call.endpoint.address if call.endpoint is not None else None,
                    method=call.method,
                    path=call.path,
                    status=status,
                    seconds=seconds,
                    attempts=len(call.tried),
                    mirror=False,
                    error=facts.error_type(error) if error is not None else None,
                )
        except Exception:
            log.debug("client telemetry failed", exc_info=True)


def _name(call: Call, rpc: dict[str, Any] | None) -> str:
    """A client span's name: "GET orders", or an RPC's "pkg.Service/Method"."""
    return f"{call.method} {call.service}" if rpc is None else f"{rpc['rpc.service']}/{rpc['rpc.method']}"


def _end_request_span(
    call: Call, span: Any, status: int | None, response: Response | None, error: BaseException | None
) -> None:
    """Every attribute of a sampled request span, set at once, and its end."""
    tracing = _otel()
    attempts = len(call.tried)  # every attempt, hedged copies included (they share `tried`)
    rpc = call.wire.rpc_attributes(call, None)
    attributes: dict[str, Any] = (
        {"http.request.method": facts.method_attribute(call.method)} if rpc is None else rpc
    )
    attributes["server.address"] = call.service
    attributes["mesh.service"] = call.service
    attributes["mesh.attempt"] = attempts
    if call.subset is not None:
        attributes["mesh.subset"] = call.subset
    if call.route is not None:
        attributes["mesh.route"] = call.route.name
    if call.endpoint is not None:
        attributes["mesh.endpoint"] = call.endpoint.address
    final = None
    if response is not None:
        if attempts == 0:
            fault = call.wire.header(response, FAULT_HEADER)
            if fault:
                attributes["mesh.fault"] = fault
        final = call.wire.rpc_attributes(call, response)
    elif error is not None:  # refused by the mesh: the status the caller gets
        final = call.wire.rpc_attributes(call, None, error)
    if final is not None:
        attributes.update(final)
        tracing.end_rpc_span(span, status, error, attributes=attributes)
    elif rpc is not None:  # an RPC without a final word (no response, no error to map)
        tracing.end_rpc_span(span, status, error, attributes=attributes)
    else:
        tracing.end_span(span, status, error, server=False, attributes=attributes)


class AttemptTelemetry(Stage):
    """Per attempt: trace context on the wire; a CLIENT span of its own from the second attempt on.

    The first attempt sends the request span's context (that span stands for it); a retry or a
    hedged copy gets a span under the request's, which a service graph pairs with the callee's
    SERVER span. Without a span (tracing off), an inbound request's trace context is passed on
    unchanged.
    """

    role = "attempt-telemetry"

    def __init__(self, telemetry: Telemetry) -> None:
        self._traces = telemetry.traces

    def enter(self, call: Call) -> Any:
        parent = call.span
        if parent is None:
            carried = facts.CARRIED.get()
            if carried is not None:
                facts.pass_through(call.headers, carried)
            return None
        if call.attempt <= 1 or not parent.is_recording():
            # the first attempt, or sampled out: the request span's context, no span
            try:
                _otel().inject(call.headers, parent)
            except Exception:
                log.debug("could not inject trace context", exc_info=True)
            return None
        tracer = self._traces.get()
        if tracer is None:
            return None
        endpoint = call.endpoint
        rpc = call.wire.rpc_attributes(call, None)
        attributes: dict[str, Any] = (
            {"http.request.method": facts.method_attribute(call.method)} if rpc is None else rpc
        )
        attributes["mesh.attempt"] = call.attempt
        if endpoint is not None:
            attributes["server.address"] = endpoint.host
            attributes["server.port"] = endpoint.port
            attributes["mesh.endpoint"] = endpoint.address
        if rpc is None:  # an RPC's attempt says it in `mesh.attempt` only
            attributes["http.request.resend_count"] = call.attempt - 1
        try:
            tracing = _otel()
            name = f"{_name(call, rpc)} attempt"
            span = tracing.start_span(tracer, name, parent, tracing.trace.SpanKind.CLIENT, attributes)
            tracing.inject(call.headers, span)
        except Exception:
            log.debug("could not start an attempt span", exc_info=True)
            return None
        return span

    def leave(self, call: Call, span: Any, response: Response | None, error: BaseException | None) -> None:
        if span is None:
            return
        if response is not None and call.wire.open(response):  # a stream: ends with its status
            call.wire.on_end(response, partial(self.leave, call, span, response))
            return
        try:
            status = call.wire.status(response) if response is not None else None
            rpc = call.wire.rpc_attributes(call, response) if response is not None else None
            tracing = _otel()
            if rpc is not None:
                tracing.end_rpc_span(span, status, error, attributes=rpc)
            else:
                tracing.end_span(span, status, error, server=False, attributes=rpc)
        except Exception:
            log.debug("could not end an attempt span", exc_info=True)


class MirrorTelemetry(Stage):
    """Before the mirror stage: a mirrored copy carries the request span's context (and the
    wire's `x-mesh-mirror: 1`), so the copy's SERVER span joins the trace, marked as a mirror."""

    role = "mirror-telemetry"
    needs = "mirror"

    def enter(self, call: Call) -> None:
        route = call.route
        if route is None or route.mirror is None:
            return
        span = call.span
        try:
            if span is not None:
                if route.mirror.subset:
                    span.set_attribute("mesh.mirror.subset", route.mirror.subset)
                _otel().inject(call.headers, span)
            else:
                carried = facts.CARRIED.get()
                if carried is not None:
                    facts.pass_through(call.headers, carried)
        except Exception:
            log.debug("could not mark a mirrored request", exc_info=True)
