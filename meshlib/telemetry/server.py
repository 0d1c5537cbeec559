"""The server side's telemetry, for the ASGI and WSGI middleware: one `Inbound` per request.

An `Inbound` opens the SERVER span as a child of the caller's context (read with the global
propagator) and makes it current, so that the app's own spans and the calls it makes hang under
it; once the response is done it ends the span, records the duration, writes the access-log
line and keeps the in-flight gauge. When this process makes no spans, an inbound W3C trace
context is kept as is and passed on by the calls the app makes.

The middleware asks for one before identity and authorization run, so refused requests (403,
429) are traced and logged like any other. `asgi_inbound`/`wsgi_inbound` return None when there
is nothing to do: no tracer, no instruments, no access log, no /metrics, no trace context.
"""

from __future__ import annotations

import logging
import time
from contextvars import Token
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer

from meshlib.stats import status_class
from meshlib.telemetry import tracing
from meshlib.telemetry.metrics import duration_attributes

if TYPE_CHECKING:
    from meshlib.telemetry.hub import Telemetry
    from meshlib.telemetry.metrics import Instruments

log = logging.getLogger("meshlib.telemetry")

_MIRROR = b"x-mesh-mirror"
_ATTEMPT = b"x-mesh-attempt"
_TRACESTATE = tracing.TRACESTATE.encode()


class Inbound:
    """One inbound request as telemetry sees it; `finish` once, when the response is done."""

    __slots__ = (
        "_carried",
        "_counted",
        "_token",
        "attempt",
        "instruments",
        "method",
        "mirror",
        "path",
        "route",
        "source",
        "span",
        "started",
        "telemetry",
        "trace_id",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        tracer: Tracer | None,
        instruments: Instruments | None,
        *,
        method: str,
        path: str,
        scheme: str,
        source: str | None,
        mirror: bool,
        attempt: int | None,
        carrier: Any,
        getter: Any,
        traceparent: str | None,
        tracestate: str | None,
    ) -> None:
        self.started = time.monotonic()
        self.telemetry = telemetry
        self.instruments = instruments
        self.method = method
        self.path = path
        self.source = source
        self.mirror = mirror
        self.attempt = attempt
        self.route: Any = None
        """The matched route, when the middleware learns it before `finish` (Flask's URL rule)."""
        self.span: Span | None = None
        self.trace_id: str | None = None
        self._token: object | None = None
        self._carried: Token[tuple[str, str | None] | None] | None = None
        self._counted = telemetry.counting(instruments)
        if self._counted:
            telemetry.enter_inbound()
        if tracer is not None:
            try:
                parent = tracing.extract(carrier, getter)
                attributes: dict[str, Any] = {
                    "http.request.method": tracing.method_attribute(method),
                    "url.path": path,
                    "url.scheme": scheme,
                    "mesh.service": telemetry.service,
                    "mesh.source": source or "",
                }
                if mirror:
                    attributes["mesh.mirror"] = True
                if attempt is not None:
                    attributes["mesh.attempt"] = attempt
                name = tracing.method_attribute(method)
                span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
                self.span = span
                self._token = otel_context.attach(trace.set_span_in_context(span, parent))
            except Exception:
                log.debug("could not start a server span", exc_info=True)
        elif traceparent is not None:
            self.trace_id = tracing.trace_id_of(traceparent)
            if self.trace_id is not None:
                self._carried = tracing.CARRIED.set((traceparent, tracestate))

    def detach(self) -> None:
        """Stop being the current context (in the context that made it current: a WSGI
        middleware calls this when the app returns, before the body is sent)."""
        token, self._token = self._token, None
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]
        carried, self._carried = self._carried, None
        if carried is not None:
            tracing.CARRIED.reset(carried)

    def finish(self, status: int | None, error: BaseException | None = None, route: Any = None) -> None:
        """The response is done (or failed): end the span, record, log. Never raises."""
        try:
            self._finish(status, error, route)
        except Exception:
            log.debug("server telemetry failed", exc_info=True)
        finally:
            if self._counted:
                self._counted = False
                self.telemetry.leave_inbound()

    def _finish(self, status: int | None, error: BaseException | None, route: Any) -> None:
        self.detach()
        seconds = time.monotonic() - self.started
        route_text = _route_text(route if route is not None else self.route)
        span = self.span
        if span is not None and not span.is_recording():
            span.end()
        elif span is not None:
            last = None
            if route_text is not None:
                span.update_name(f"{tracing.method_attribute(self.method)} {route_text}")
                last = {"http.route": route_text}
            tracing.end_span(span, status, error, server=True, attributes=last)
        telemetry = self.telemetry
        source = self.source or "unknown"
        if self.instruments is not None:
            attributes = duration_attributes("in", source, telemetry.service, "", status_class(status))
            self.instruments.duration.record(seconds, attributes)
        access = telemetry.access
        if access is not None:
            trace_id, span_id = tracing.ids(span)
            access.write(
                started_wall=time.time() - seconds,
                direction="in",
                trace_id=trace_id or self.trace_id,
                span_id=span_id,
                source=self.source,
                destination=telemetry.service or None,
                route=route_text,
                subset=None,
                upstream=None,
                method=self.method,
                path=self.path,
                status=status,
                seconds=seconds,
                attempts=self.attempt,
                mirror=self.mirror,
                error=tracing.error_type(error) if error is not None else None,
            )


def _route_text(route: Any) -> str | None:
    """The route template: Starlette's matched route (`scope["route"].path`), Flask's URL rule."""
    if route is None:
        return None
    if isinstance(route, str):
        return route
    text = getattr(route, "path", None) or getattr(route, "rule", None)
    return text if isinstance(text, str) else None


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() and len(value) < 6 else None


def asgi_inbound(
    telemetry: Telemetry, scope: dict[str, Any], source: str | None, traceparent: bytes | None
) -> Inbound | None:
    """The `Inbound` of an ASGI request, or None when telemetry has nothing to do for it.

    `traceparent`: the header's value, which the middleware picks up in its own header scan.
    """
    tracer = telemetry.traces.get()
    instruments = telemetry.meters.get()
    if (
        tracer is None
        and instruments is None
        and telemetry.access is None
        and not telemetry.exposed
        and traceparent is None
    ):
        return None
    headers = scope["headers"]
    mirror = attempt = tracestate = None
    if tracer is not None or telemetry.access is not None or traceparent is not None:
        for name, value in headers:
            if name == _MIRROR:
                mirror = value
            elif name == _ATTEMPT:
                attempt = value
            elif name == _TRACESTATE:
                tracestate = value
    return Inbound(
        telemetry,
        tracer,
        instruments,
        method=scope["method"],
        path=scope["path"],
        scheme=scope.get("scheme", "http"),
        source=source,
        mirror=mirror == b"1",
        attempt=_int(attempt.decode("latin-1")) if attempt is not None else None,
        carrier=headers,
        getter=tracing.ASGI_HEADERS,
        traceparent=traceparent.decode("latin-1") if traceparent is not None else None,
        tracestate=tracestate.decode("latin-1") if tracestate is not None else None,
    )


def wsgi_inbound(
    telemetry: Telemetry, environ: dict[str, Any], method: str, path: str, source: str | None
) -> Inbound | None:
    """The `Inbound` of a WSGI request, or None when telemetry has nothing to do for it."""
    tracer = telemetry.traces.get()
    instruments = telemetry.meters.get()
    traceparent = environ.get("HTTP_TRACEPARENT")
    if (
        tracer is None
        and instruments is None
        and telemetry.access is None
        and not telemetry.exposed
        and traceparent is None
    ):
        return None
    return Inbound(
        telemetry,
        tracer,
        instruments,
        method=method,
        path=path,
        scheme=environ.get("wsgi.url_scheme", "http"),
        source=source,
        mirror=environ.get("HTTP_X_MESH_MIRROR") == "1",
        attempt=_int(environ.get("HTTP_X_MESH_ATTEMPT")),
        carrier=environ,
        getter=tracing.WSGI_HEADERS,
        traceparent=traceparent,
        tracestate=environ.get("HTTP_TRACESTATE"),
    )


def flask_route(environ: dict[str, Any]) -> Any:
    """Flask's matched URL rule, if the app is Flask: werkzeug keeps the request in the environ
    while the app runs (Flask clears it before returning, so ask from `start_response`)."""
    request = environ.get("werkzeug.request")
    return getattr(request, "url_rule", None) if request is not None else None
