"""The client side's telemetry stages: a span per request, a span per attempt, the access log.

The callee's SERVER span is a child of the attempt (a retry, a hedged copy) that reached it,
itself a child of the request's span. Where each stage sits, and why: `meshlib.filters.WHY`.

With tracing, metrics and the access log all off (no SDK installed), each stage costs a couple
of attribute reads per request: no span is created. A streamed answer's spans, duration and
access-log line wait for its end (`Wire.on_end`): they carry the status it ended with.
"""

from __future__ import annotations

import contextvars
import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind

from meshlib.headers import FAULT as FAULT_HEADER
from meshlib.pipeline import Call, Response, Stage
from meshlib.stats import status_class
from meshlib.telemetry import tracing
from meshlib.telemetry.metrics import duration_attributes

if TYPE_CHECKING:
    from meshlib.telemetry.hub import Telemetry

log = logging.getLogger("meshlib.telemetry")


class RequestTelemetry(Stage):
    """Per request: the CLIENT span, the duration histogram, the outbound access-log line."""

    role = "request-telemetry"

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry
        self._traces = telemetry.traces
        self._meters = telemetry.meters

    def enter(self, call: Call) -> None:
        tracer = self._traces.get()
        if tracer is None:
            return
        try:
            rpc = call.wire.rpc_attributes(call, None)
            if rpc is None:
                name = f"{call.method} {call.service}"
                attributes = {"http.request.method": tracing.method_attribute(call.method)}
            else:  # an RPC protocol's conventions: `pkg.Service/Method`
                name, attributes = f"{rpc['rpc.service']}/{rpc['rpc.method']}", rpc
            attributes["server.address"] = call.service
            attributes["mesh.service"] = call.service
            call.span = tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        except Exception:  # telemetry never fails a request
            log.debug("could not start a client span", exc_info=True)

    def leave(self, call: Call, state: None, response: Response | None, error: BaseException | None) -> None:
        span = call.span
        instruments = self._meters.get()
        access = self._telemetry.access
        if span is None and instruments is None and access is None:
            return
        if response is not None and call.wire.open(response):  # a stream: ends with its status
            # it may end on another thread (grpc's): the access log reads the caller's context
            context = contextvars.copy_context()
            call.wire.on_end(response, lambda error: context.run(self.leave, call, None, response, error))
            return
        try:
            seconds = time.monotonic() - call.started
            status = call.wire.status(response) if response is not None else None
            route = call.route.name if call.route is not None else None
            endpoint = call.endpoint.address if call.endpoint is not None else None
            attempts = len(call.tried)  # every attempt, hedged copies included (they share `tried`)
            if span is not None and not span.is_recording():
                span.end()  # sampled out: nothing to add
            elif span is not None:
                last: dict[str, Any] = {"mesh.attempt": attempts}
                if call.subset is not None:
                    last["mesh.subset"] = call.subset
                if route is not None:
                    last["mesh.route"] = route
                if endpoint is not None:
                    last["mesh.endpoint"] = endpoint
                rpc = None
                if response is not None:
                    if attempts == 0:
                        fault = call.wire.header(response, FAULT_HEADER)
                        if fault:
                            last["mesh.fault"] = fault
                    rpc = call.wire.rpc_attributes(call, response)
                elif error is not None:  # refused by the mesh: the status the caller gets
                    rpc = call.wire.rpc_attributes(call, None, error)
                if rpc is not None:
                    last.update(rpc)
                    tracing.end_rpc_span(span, status, error, attributes=last)
                    span = None
                if span is not None:
                    tracing.end_span(span, status, error, server=False, attributes=last)
            if instruments is not None:
                attributes = duration_attributes(
                    "out", call.source or "", call.service, call.subset or "", status_class(status)
                )
                instruments.duration.record(seconds, attributes)
            if access is not None:
                trace_id, span_id = tracing.ids(span)
                if trace_id is None:
                    carried = tracing.CARRIED.get()
                    trace_id = tracing.trace_id_of(carried[0]) if carried is not None else None
                access.write(
                    started_wall=time.time() - seconds,
                    direction="out",
                    trace_id=trace_id,
                    span_id=span_id,
                    source=call.source,
                    destination=call.service,
                    route=route,
                    subset=call.subset,
                    upstream=endpoint,
                    method=call.method,
                    path=call.path,
                    status=status,
                    seconds=seconds,
                    attempts=attempts,
                    mirror=False,
                    error=tracing.error_type(error) if error is not None else None,
                )
        except Exception:
            log.debug("client telemetry failed", exc_info=True)


class AttemptTelemetry(Stage):
    """Per attempt: a CLIENT span under the request's, and trace context on the wire.

    The attempt's span is the one a service graph pairs with the callee's SERVER span. Without
    a span (tracing off), an inbound request's trace context is passed on unchanged.
    """

    role = "attempt-telemetry"

    def __init__(self, telemetry: Telemetry) -> None:
        self._traces = telemetry.traces

    def enter(self, call: Call) -> Any:
        parent = call.span
        if parent is None:
            carried = tracing.CARRIED.get()
            if carried is not None:
                tracing.pass_through(call.headers, carried)
            return None
        tracer = self._traces.get()
        if tracer is None:
            return None
        if not parent.is_recording():  # sampled out: pass the (unsampled) context on, no span
            tracing.inject(call.headers, parent)
            return None
        # the request's span has the service, subset and route: each attribute costs the SDK
        # several microseconds, so an attempt carries only what tells it apart
        endpoint = call.endpoint
        rpc = call.wire.rpc_attributes(call, None)
        attributes: dict[str, Any] = (
            {"http.request.method": tracing.method_attribute(call.method)} if rpc is None else rpc
        )
        attributes["mesh.attempt"] = call.attempt
        if endpoint is not None:
            attributes["server.address"] = endpoint.host
            attributes["server.port"] = endpoint.port
            attributes["mesh.endpoint"] = endpoint.address
        if call.attempt > 1 and rpc is None:  # an RPC's attempt says it in `mesh.attempt` only
            attributes["http.request.resend_count"] = call.attempt - 1
        try:
            name = (
                f"{call.method} {call.service}"
                if rpc is None
                else f"{rpc['rpc.service']}/{rpc['rpc.method']}"
            )
            span = tracing.start_span(tracer, f"{name} attempt", parent, SpanKind.CLIENT, attributes)
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
                tracing.inject(call.headers, span)
            else:
                carried = tracing.CARRIED.get()
                if carried is not None:
                    tracing.pass_through(call.headers, carried)
        except Exception:
            log.debug("could not mark a mirrored request", exc_info=True)
