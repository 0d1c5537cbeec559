"""The server interceptor of a sync `grpc.server`: a thin shell over the inbound sequence.

`grpc.server(pool, interceptors=meshlib.grpc.server_interceptors(mesh))`. grpc calls an
interceptor before it knows the call's peer or deadline, and runs the servicer later on a pool
thread; so the interceptor wraps the method's behaviour (all four kinds), and the admission,
the caller's context and the final count happen in the thread that runs the servicer. A
streamed answer is counted when it ends (or when the caller goes away): each of its steps runs
in one `contextvars.Context` of its own, so the caller's context never leaks into the pool.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from meshlib.grpc.calls import (
    finish,
    inbound_request,
    outcome,
    refusal_status,
    report_load,
    servicer_context,
)
from meshlib.grpc.probes import is_probe, probe_handler
from meshlib.inbound import Gate, Pending, Request

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

Behaviour = Callable[[Any, Any], Any]


class MeshServerInterceptor(grpc.ServerInterceptor):
    """Identity, authorization, rate limit, deadline and caller context, stats and telemetry
    for every call of the server it is given to."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.gate = Gate(mesh)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if is_probe(handler_call_details):  # a prequal probe: the mesh's, not the servicers', not counted
            return probe_handler(self.mesh.load)
        handler = continuation(handler_call_details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED
            return None
        return wrap(handler, self.gate, handler_call_details.method)


def server_interceptors(mesh: Mesh) -> list[grpc.ServerInterceptor]:
    """The interceptors a sync `grpc.server(...)` of this mesh takes (put them first)."""
    return [MeshServerInterceptor(mesh)]


def wrap(handler: grpc.RpcMethodHandler, gate: Gate, path: str) -> grpc.RpcMethodHandler:
    """The same method handler, its behaviour run inside the inbound sequence."""
    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:
        streamed = handler.stream_stream if handler.request_streaming else handler.unary_stream
        assert streamed is not None

        def run_streamed(argument: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            return _streamed(gate, path, streamed, argument, context)

        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(run_streamed, **options)
        return grpc.unary_stream_rpc_method_handler(run_streamed, **options)
    unary = handler.stream_unary if handler.request_streaming else handler.unary_unary
    assert unary is not None

    def run_unary(argument: Any, context: grpc.ServicerContext) -> Any:
        return _unary(gate, path, unary, argument, context)

    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(run_unary, **options)
    return grpc.unary_unary_rpc_method_handler(run_unary, **options)


def _admit(gate: Gate, path: str, context: grpc.ServicerContext) -> Request:
    """The call admitted (in the caller's context from here), or aborted with the refusal."""
    request = inbound_request(path, context)
    verdict = gate.admit(request)
    if verdict is not None:
        while isinstance(verdict, Pending):  # Redis, a JWKS fetch: a pool thread, blocking is fine
            verdict.wait()
            verdict = verdict.then()
        if verdict is not None:
            code, details, trailing = refusal_status(verdict)
            if trailing:
                context.set_trailing_metadata(trailing)
            context.abort(code, details)  # raises
    return request


def _unary(gate: Gate, path: str, behaviour: Behaviour, argument: Any, context: grpc.ServicerContext) -> Any:
    request = _admit(gate, path, context)
    try:
        response = behaviour(argument, servicer_context(request, context))
    except BaseException as exc:
        finish(request, outcome(context.code(), exc, not context.is_active(), context), exc)
        raise
    report_load(request, context)
    finish(request, outcome(context.code(), None, not context.is_active(), context), None)
    return response


def _streamed(
    gate: Gate, path: str, behaviour: Behaviour, argument: Any, context: grpc.ServicerContext
) -> Iterator[Any]:
    steps = contextvars.copy_context()
    request = steps.run(_admit, gate, path, context)
    try:
        responses = steps.run(behaviour, argument, servicer_context(request, context))
    except BaseException as exc:
        steps.run(finish, request, outcome(context.code(), exc, False, context), exc)
        raise
    ending = _Ending(steps, request, context)
    context.add_callback(ending.terminated)
    return _responses(ending, iter(responses))


class _Ending:
    """Counts a streamed call once: when its answers end, or when grpc ends the call first (a
    cancel, a deadline: grpc then stops asking for answers and never closes the iterator)."""

    def __init__(self, steps: contextvars.Context, request: Request, context: grpc.ServicerContext) -> None:
        self.steps = steps
        self.request = request
        self.context = context
        self._lock = threading.Lock()
        self.done = False

    def end(self, error: BaseException | None, cancelled: bool) -> None:
        with self._lock:
            if self.done:
                return
            self.done = True
        code = outcome(self.context.code(), error, cancelled, self.context)
        self.steps.run(finish, self.request, code, error)

    def terminated(self) -> None:
        """grpc's callback once the call is over: count it if its answers did not end."""
        if not self.done:
            try:
                self.end(None, True)
            except RuntimeError:  # a step runs in the call's context now: it ends it on return
                with self._lock:
                    self.done = False


def _responses(ending: _Ending, responses: Iterator[Any]) -> Iterator[Any]:
    """The servicer's answers, each produced in the call's context; counted once they end."""
    error: BaseException | None = None
    cancelled = False
    try:
        while True:
            try:
                item = ending.steps.run(next, responses)
            except StopIteration:
                report_load(ending.request, ending.context)
                return
            if not ending.context.is_active():  # grpc ended the call while this step ran
                cancelled = True
                return
            yield item
    except GeneratorExit:
        cancelled = True
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        ending.end(error, cancelled)
