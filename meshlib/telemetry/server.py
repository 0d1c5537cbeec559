"""The server side's telemetry, for the ASGI and WSGI middleware and the gRPC interceptors: one
`Inbound` per request (an RPC's span follows the rpc conventions instead of the HTTP ones).

An `Inbound` opens the SERVER span as a child of the caller's context (read with the global
propagator) and makes it current, so that the app's own spans and the calls it makes hang under
it, with the request's attributes (a sampled span only, all in one call); once the response is
done it adds the outcome's (status, route), ends it, writes the access-log line and keeps the
in-flight gauge. The duration is the
stats' (`Request.finish`), read by the instruments at collection. When this process makes no
spans, an inbound W3C trace context is kept as is and passed on by the calls the app makes.

The inbound sequence (`meshlib.inbound`) asks for one before authorization runs, so refused
requests (403, 429) are traced and logged like any other. `observe` returns None when there is
nothing to do: no tracer, no instruments, no access log, no /metrics, no trace context.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Mapping
from contextvars import Token
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from meshlib.headers import ATTEMPT, BAGGAGE, MIRROR, TRACEPARENT, TRACESTATE
from meshlib.telemetry import current_span, sdk_spans, tracing
from meshlib.telemetry.providers import UNSETTLED
from meshlib.telemetry.trace_facts import METHODS

if TYPE_CHECKING:
    from meshlib.inbound import Request
    from meshlib.telemetry.hub import Telemetry
    from meshlib.telemetry.metrics import Instruments

log = logging.getLogger("meshlib.telemetry")
_SERVER = SpanKind.SERVER  # read once: an enum member read off its class is an unspecialized lookup
_new_inbound = object.__new__
_set_context = current_span.set_context
_tuple_new = tuple.__new__
_CHILD_FLAGS = sdk_spans.CHILD_FLAGS


class Inbound:
    """One inbound request as telemetry sees it; `finish` once, when the response is done."""

    __slots__ = ("_carried", "_counted", "_made", "_token", "span", "telemetry", "trace_id")

    def __init__(
        self,
        telemetry: Telemetry,
        tracer: Tracer | None,
        instruments: Instruments | None,
        request: Request,
        traceparent: str | None,
        trace_id: int | None = None,
    ) -> None:
        """`request`: its method, path, caller (`source`) and `started` are set already. Not
        kept (it keeps this): `finish` is handed it again, so no cycle outlives the request.
        `trace_id`: a new trace's, decided sampled ahead (`sdk_spans.decide_roots`)."""
        headers = request.headers
        self.telemetry = telemetry
        self.span: Span | None = None
        self.trace_id: str | None = None
        self._token: Token[Any] | None = None
        self._carried: Token[tuple[str, str | None] | None] | None = None
        self._made: tuple[Any, Context, bool] | None = None  # (tracer, context, sampled): made ahead
        self._counted = counted = telemetry.exposed or instruments is not None
        if counted:
            telemetry.inflight.append(None)
        if tracer is not None:
            try:
                if traceparent is None and BAGGAGE not in headers and tracing.w3c():
                    parent = tracing.EMPTY  # what `extract` would find: nothing
                else:
                    parent = tracing.extract(request.carrier, request.getter, traceparent, headers)
                method, name = _named(request)
                span = self.span = sdk_spans.start(tracer, name, _SERVER, parent, trace_id)
                if type(span) is not NonRecordingSpan and span.is_recording():
                    # a sampled span: the request's attributes, in one call
                    sdk_spans.put(span, _attributes(telemetry, request, method), new=True, known=True)
                self._token = current_span.attach(span, parent)
            except Exception:
                log.debug("could not start a server span", exc_info=True)
        elif traceparent is not None:
            self.trace_id = tracing.trace_id_of(traceparent)
            if self.trace_id is not None:
                self._carried = tracing.CARRIED.set((traceparent, headers.get(TRACESTATE)))

    @classmethod
    def ahead(cls, telemetry: Telemetry, tracer: Any, span: Span, context: Context | None = None) -> Inbound:
        """The `Inbound` of a request that starts a new trace decided ahead (`_decide_ahead`):
        its span and the context holding it (`context`, when made already) made, nothing else
        set, nothing counted (`observe` does that when a request takes it)."""
        made = _new_inbound(cls)
        made.telemetry = telemetry
        made.span = span
        made.trace_id = made._token = made._carried = None
        made._counted = False
        made._made = (tracer, _alone(span) if context is None else context, span.is_recording())
        return made

    def detach(self) -> None:
        """Stop being the current context (in the context that made it current: a WSGI
        middleware calls this when the app returns, before the body is sent)."""
        token = self._token
        if token is not None:
            self._token = None
            current_span.detach(token)
        carried = self._carried
        if carried is not None:
            self._carried = None
            tracing.CARRIED.reset(carried)

    def refused(self, reason: str) -> None:
        """The sequence answered instead of the app: the span says why (the refusal's reason,
        a fixed text or a rule's words, never a credential)."""
        span = self.span
        if span is not None:
            try:
                span.set_attribute("mesh.refusal", reason)
            except Exception:
                log.debug("could not annotate the server span", exc_info=True)

    def finish(
        self, request: Request, status: int | None, error: BaseException | None = None, route: Any = None
    ) -> None:
        """The response is done (or failed): end the span, record, log. Never raises."""
        try:
            token = self._token
            if token is not None:  # `detach`, inline
                self._token = None
                current_span.detach(token)
            if self._carried is not None:
                self.detach()
            route_text = _route_text(route) if route is not None else None
            span = self.span
            if span is not None and type(span) is not NonRecordingSpan:  # else its `end` does nothing
                _end(span, request.method, request.rpc, status, error, route_text)
            if self.telemetry.access is not None:
                self._log(request, status, error, route_text)
        except Exception:
            log.debug("server telemetry failed", exc_info=True)
        finally:
            if self._counted:
                self._counted = False
                self.telemetry.inflight.pop()
            if self.span is not None:  # traced: the next new traces, decided off the request's path
                ahead = self.telemetry.ahead
                if len(ahead) < REFILL_BELOW:
                    _decide_ahead(self.telemetry, ahead)

    def finish_light(self, method: str, status: int | None, error: BaseException | None, route: Any) -> None:
        """`finish` for a light request (`sampled`): what it does where no access log is kept and
        the shell counts the request itself. Never raises."""
        try:
            token = self._token
            if token is not None:
                self._token = None
                current_span.detach(token)
            span = self.span
            if span is not None:
                _end(span, method, None, status, error, _route_text(route) if route is not None else None)
        except Exception:
            log.debug("server telemetry failed", exc_info=True)
        finally:
            ahead = self.telemetry.ahead
            if len(ahead) < REFILL_BELOW:
                _decide_ahead(self.telemetry, ahead)

    def _log(
        self, request: Request, status: int | None, error: BaseException | None, route_text: Any
    ) -> None:
        """The request's access-log line."""
        span = self.span
        telemetry = self.telemetry
        access = telemetry.access
        if access is not None:
            seconds = time.monotonic() - request.started
            trace_id, span_id = tracing.ids(span)
            access.write(
                started_wall=time.time() - seconds,
                direction="in",
                trace_id=trace_id or self.trace_id,
                span_id=span_id,
                source=request.source,
                destination=telemetry.service or None,
                route=route_text,
                subset=None,
                upstream=None,
                method=request.method,
                path=request.path,
                status=status,
                seconds=seconds,
                attempts=_int(request.headers.get(ATTEMPT)),
                mirror=request.headers.get(MIRROR) == "1",
                error=tracing.error_type(error) if error is not None else None,
            )


def _end(
    span: Span, method: str, rpc: Any, status: int | None, error: BaseException | None, route_text: str | None
) -> None:
    """End a request's span with its outcome: the status (or the RPC's code), the route, the
    failure."""
    if not span.is_recording():
        span.end()
    elif rpc is not None:
        _end_rpc_span(span, rpc.code, status, error, {})
    else:
        last: dict[str, Any] = {}
        name = None
        if route_text is not None:
            name = f"{tracing.method_attribute(method)} {route_text}"
            last["http.route"] = route_text
        if error is None and status is not None and status < 500:  # not failed: no status to set
            last["http.response.status_code"] = status
            sdk_spans.end(span, last, name, known=True)
        else:
            if name is not None:
                span.update_name(name)
            tracing.end_span(span, status, error, server=True, attributes=last)


def _named(request: Request) -> tuple[str, str]:
    """(the request's method as the attribute names it, the SERVER span's name): the method
    over HTTP, `service/method` for an RPC."""
    method = request.method if request.method in METHODS else "_OTHER"  # method_attribute
    rpc = request.rpc
    return method, method if rpc is None else f"{rpc.service}/{rpc.method}"


def _attributes(telemetry: Telemetry, request: Request, method: str) -> dict[str, Any]:
    """A sampled SERVER span's request attributes (the HTTP or the rpc conventions); `method`:
    the request's as the attribute names it."""
    rpc = request.rpc
    if rpc is None:
        path, scheme, source = request.path, request.scheme, request.source
        return _http_attributes(telemetry, method, path, scheme, source, request.headers)
    attributes: dict[str, Any] = {
        "rpc.system": rpc.system,
        "rpc.service": rpc.service,
        "rpc.method": rpc.method,
        "mesh.service": telemetry.mesh.service or "",
        "mesh.source": request.source or "",
    }
    return _headed(attributes, request.headers)


def _http_attributes(
    telemetry: Telemetry, method: str, path: str, scheme: str, source: str | None, headers: Mapping[str, str]
) -> dict[str, Any]:
    """A sampled HTTP SERVER span's request attributes; `method`: as the attribute names it."""
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.path": path,
        "url.scheme": scheme,
        "mesh.service": telemetry.mesh.service or "",
        "mesh.source": source or "",
    }
    if MIRROR in headers and headers[MIRROR] == "1":  # `_headed`, inline: a call less
        attributes["mesh.mirror"] = True
    if ATTEMPT in headers and (attempt := _int(headers[ATTEMPT])) is not None:
        attributes["mesh.attempt"] = attempt
    return attributes


def _headed(attributes: dict[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
    """`attributes` with what the mesh's own headers say of the request (a mirror, an attempt)."""
    if MIRROR in headers and headers[MIRROR] == "1":
        attributes["mesh.mirror"] = True
    if ATTEMPT in headers and (attempt := _int(headers[ATTEMPT])) is not None:
        attributes["mesh.attempt"] = attempt
    return attributes


def _end_rpc_span(
    span: Span, code: int | None, status: int | None, error: BaseException | None, attributes: dict[str, Any]
) -> None:
    """An RPC's outcome in the rpc conventions: its status code, failed as a server span fails
    (the codes that map to 5xx: UNKNOWN, INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED, ...)."""
    if code is not None:
        attributes["rpc.grpc.status_code"] = code
    failed = None
    if error is not None and isinstance(error, Exception):
        failed = attributes["error.type"] = tracing.error_type(error)
    elif status is None or status >= 500:
        failed = attributes["error.type"] = str(code) if code is not None else "unknown"
    if failed is not None:
        span.set_status(Status(StatusCode.ERROR, failed))
    sdk_spans.end(span, attributes)


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


def observe(telemetry: Telemetry, request: Request) -> Inbound | None:
    """The `Inbound` of a request, or None when telemetry has nothing to do for it. A request
    that starts a new trace takes the next one decided ahead, if any (`_decide_ahead`)."""
    tracer: Any = telemetry.traces.settled  # a settled source's answer, without a call
    if tracer is UNSETTLED:
        tracer = telemetry.traces.get()
    instruments = telemetry.meters.settled
    if instruments is UNSETTLED:
        instruments = telemetry.meters.get()
    headers = request.headers
    traceparent = headers.get(TRACEPARENT)
    if traceparent is None:
        if tracer is None:
            if instruments is None and telemetry.access is None and not telemetry.exposed:
                return None
        elif telemetry.ahead and BAGGAGE not in headers and tracing.w3c():  # a new trace
            taken = _take_ahead(telemetry, tracer, instruments, request)
            if taken is not None:
                return taken
    return Inbound(telemetry, tracer, instruments, request, traceparent)


NO_SPAN = Context()
"""`unsampled`'s answer when there is no tracer and no trace context to pass on: no context to set
(never set itself)."""


def unsampled(telemetry: Telemetry, headers: Mapping[str, str]) -> Context | None:
    """The context a request with these mesh headers (`meshlib.headers.INBOUND`) runs in when
    telemetry makes no span of it: a new trace's context decided ahead as dropped (no
    `traceparent`), or a dropped child of a caller's unsampled trace; `NO_SPAN` with no tracer
    and no `traceparent`. None when `observe` is needed: the request is sampled, carries
    `tracestate` or `baggage` to a tracer, or its trace context is to be carried as is (no
    tracer). With no access log, such a request's `Inbound` would only set this context and count
    the request in flight (the ASGI shell's light request, docs/decisions.md)."""
    traceparent = headers.get(TRACEPARENT)
    tracer: Any = telemetry.traces.settled
    if tracer is UNSETTLED:
        tracer = telemetry.traces.get()
    if tracer is None:
        return NO_SPAN if traceparent is None else None
    if traceparent is None:  # a new trace: the next one decided ahead, if dropped
        ahead = telemetry.ahead
        try:
            next_one = ahead[-1]
        except IndexError:
            return None
        if type(next_one) is not tuple:  # a sampled one (its light span made): `observe` takes it
            return None
        made = next_one[1]
        if type(made) is not Context or next_one[0] is not tracer or not tracer._tracer_config.is_enabled:
            return None  # sampled (its trace id), or stale
        if BAGGAGE in headers or not tracing.w3c():
            return None
        taken = ahead.pop()
        if taken is not next_one:  # another thread took it first
            ahead.append(taken)
            return None
        return made
    if TRACESTATE in headers or BAGGAGE in headers or not tracing.w3c():
        return None
    parent = tracing.unsampled_parent(traceparent)
    if parent is None:
        return None
    try:
        shell = telemetry.children.pop()  # the child's span and context, made ahead (`refill`)
    except IndexError:
        pass
    else:
        if shell[0] is tracer and tracer._tracer_config.is_enabled:
            made = shell[2]  # its span context: what `dropped_child` would make, in the caller's trace
            made._context = _tuple_new(
                SpanContext, (parent[0], shell[1], False, _CHILD_FLAGS[parent[1]], DEFAULT_TRACE_STATE, True)
            )
            return shell[3]
    span = sdk_spans.dropped_child(tracer, *parent)
    if span is None:
        return None
    key = current_span.SPAN_KEY  # `_alone(span)`, inline: a call less on the request's path
    return Context({key: span}) if key is not None else current_span.context_with(span, tracing.EMPTY)


def sampled(
    telemetry: Telemetry, headers: Mapping[str, str], method: str, path: str, scheme: str, source: str | None
) -> Inbound | None:
    """The `Inbound` of a request with these mesh headers that starts a new trace decided ahead
    as sampled (a light span made, `_decide_ahead`): its span named, given the request's
    attributes and started, its context current; the light request ends it (`finish_light`) and
    counts it. None when `observe` is needed: a trace context or baggage came with the request,
    the next trace decided ahead is dropped, none is left, or it was decided for another tracer."""
    if TRACEPARENT in headers or BAGGAGE in headers:
        return None
    tracer: Any = telemetry.traces.settled
    if tracer is UNSETTLED or tracer is None:
        return None
    ahead = telemetry.ahead
    try:
        next_one = ahead[-1]
    except IndexError:
        return None
    if type(next_one) is not Inbound:
        return None
    made = next_one._made
    if made is None or not made[2] or made[0] is not tracer or not tracer._tracer_config.is_enabled:
        return None
    if not tracing.w3c():
        return None
    taken = ahead.pop()
    if taken is not next_one:  # another thread took it first
        ahead.append(taken)
        return None
    span: Any = taken.span
    named = method if method in METHODS else "_OTHER"  # `_named`, for HTTP
    if not sdk_spans.begin(span, named, _http_attributes(telemetry, named, path, scheme, source, headers)):
        ahead.append((tracer, span.get_span_context().trace_id))  # for `observe` to start as usual
        return None
    taken._token = _set_context(made[1])
    return taken


def child(
    telemetry: Telemetry, headers: Mapping[str, str], method: str, path: str, scheme: str, source: str | None
) -> Inbound | None:
    """The `Inbound` of a request whose caller's trace context is a `traceparent` in the exact W3C
    form (no `tracestate`, no `baggage`) that `unsampled` left (sampled, or a child the plan may
    sample): its SERVER span started as a child of it, as `Inbound.__init__` starts it, with the
    request's attributes if sampled, its context current; the light request ends it
    (`finish_light`) and counts it. None when `observe` is needed (any other trace context, no
    tracer, another propagator)."""
    traceparent = headers.get(TRACEPARENT)
    if traceparent is None or TRACESTATE in headers or BAGGAGE in headers:
        return None
    tracer: Any = telemetry.traces.settled
    if tracer is UNSETTLED or tracer is None or not tracing.w3c():
        return None
    key = current_span.SPAN_KEY
    parent = tracing.parent_of(traceparent)  # what `extract` reads from it, as `Inbound` asks
    if parent is None or key is None:  # another form, or zero ids (a new trace, as `observe` starts it)
        return None
    named = method if method in METHODS else "_OTHER"  # `_named`, for HTTP
    try:
        span = sdk_spans.start_child(tracer, named, _SERVER, parent)
        if span is None:  # the SDK's to start
            return None
        if type(span) is not NonRecordingSpan and span.is_recording():
            attributes = _http_attributes(telemetry, named, path, scheme, source, headers)
            sdk_spans.put(span, attributes, new=True, known=True)
        token = _set_context(Context({key: span}))  # `attach(span, parent)`: the parent's is replaced
    except Exception:
        log.debug("could not start a server span", exc_info=True)
        return None
    made = _new_inbound(Inbound)
    made.telemetry = telemetry
    made.span = span
    made.trace_id = made._carried = made._made = None
    made._counted = False
    made._token = token
    return made


def _alone(span: Span) -> Context:
    """`context_with(span, EMPTY)`: the context of a span with no parent context to keep."""
    key = current_span.SPAN_KEY
    return Context({key: span}) if key is not None else current_span.context_with(span, tracing.EMPTY)


def refill(telemetry: Telemetry) -> None:
    """After a traced request that `unsampled` served: the new traces decided ahead, topped up
    (as `Inbound.finish` does), and the dropped children of callers' unsampled traces made ahead
    (made once where no request takes them)."""
    ahead = telemetry.ahead
    if len(ahead) < REFILL_BELOW:
        _decide_ahead(telemetry, ahead)
    children = telemetry.children
    if len(children) < REFILL_BELOW:
        tracer: Any = telemetry.traces.settled
        if tracer is not UNSETTLED and tracer is not None:
            if not children:
                _AHEAD_OF.add(telemetry)
            children += sdk_spans.dropped_shells(tracer, AHEAD - len(children))


def _take_ahead(telemetry: Telemetry, tracer: Any, instruments: Any, request: Request) -> Inbound | None:
    """The `Inbound` of a request starting a new trace, from the next one decided ahead; None
    when there is none this tracer can take (the caller starts one as usual)."""
    try:
        ahead = telemetry.ahead.pop()
    except IndexError:  # another thread took the last one
        return None
    if type(ahead) is not Inbound:  # a sampled one's (tracer, trace id), a dropped one's (tracer, context)
        if ahead[0] is not tracer:
            return None
        decided = ahead[1]
        if type(decided) is not Context:
            return Inbound(telemetry, tracer, instruments, request, None, decided)
        ahead = Inbound.ahead(telemetry, tracer, current_span.span_in(decided), decided)
    made = ahead._made  # its span made (a sampled one not yet started), its context too
    if made is None or made[0] is not tracer or not tracer._tracer_config.is_enabled:
        return None
    if made[2]:  # sampled: named, given the request's attributes, started now
        span: Any = ahead.span
        method, name = _named(request)
        if not sdk_spans.begin(span, name, _attributes(telemetry, request, method)):
            trace_id = span.get_span_context().trace_id
            return Inbound(telemetry, tracer, instruments, request, None, trace_id)
    ahead._token = _set_context(made[1])
    if telemetry.exposed or instruments is not None:
        ahead._counted = True
        telemetry.inflight.append(None)
    return ahead


AHEAD = 16
"""New traces decided ahead per Telemetry, in one go once fewer than `REFILL_BELOW` are left:
one response in a dozen pays for a batch (`decide_roots` looks the tracer's plan up once for
it), and a burst of concurrent requests still finds some made."""
REFILL_BELOW = 4


def _decide_ahead(telemetry: Telemetry, ahead: list[Any]) -> None:
    """Refill `ahead` (after a response, off the next request's path) with new traces of the
    tracer in use, decided as the sampler would decide them (`sdk_spans.decide_roots`), in the
    order they are drawn, so that sampled and dropped ones are taken in their proportion: a
    dropped one as (tracer, the context holding its span, a `NonRecordingSpan`), so that taking
    it is one context-variable `set` (the full sequence makes its `Inbound` when it takes one); a
    sampled one as an `Inbound` whose light span and context are made, the span named and
    started when taken (`sdk_spans.begin`), or as (tracer, trace id) where the tracer's
    processors allow no light span. Nothing when the tracer's plan leaves roots to the SDK."""
    tracer: Any = telemetry.traces.settled
    if tracer is UNSETTLED or tracer is None:
        return
    if not ahead:
        _AHEAD_OF.add(telemetry)
    for decided in sdk_spans.decide_roots(tracer, _SERVER, AHEAD - len(ahead)):
        if isinstance(decided, int):
            ahead.append((tracer, decided))
        elif type(decided) is NonRecordingSpan:
            ahead.append((tracer, _alone(decided)))
        else:
            ahead.append(Inbound.ahead(telemetry, tracer, decided))


_AHEAD_OF: weakref.WeakSet[Telemetry] = weakref.WeakSet()
"""Every Telemetry that has decided traces or made children ahead: a forked child forgets them
(its parent may take the same ids)."""


def _forget_ahead() -> None:
    for telemetry in list(_AHEAD_OF):
        telemetry.ahead.clear()
        telemetry.children.clear()


os.register_at_fork(after_in_child=_forget_ahead)


def flask_route(environ: dict[str, Any]) -> Any:
    """Flask's matched URL rule, if the app is Flask: werkzeug keeps the request in the environ
    while the app runs (Flask clears it before returning, so ask from `start_response`)."""
    request = environ.get("werkzeug.request")
    return getattr(request, "url_rule", None) if request is not None else None
