"""The server interceptor of a `grpc.aio.server`: the same shell as `meshlib.grpc.server`, for
an event loop.

`grpc.aio.server(interceptors=meshlib.grpc.aio_server_interceptors(mesh))`. Each call runs in
a task of its own, so the caller's context set around the servicer stays with that call. A
Redis-backed rate limit is asked on a worker thread: the loop never waits on it. A streamed
answer is written by the wrapper (`context.write`) whatever the servicer's shape, so the call
ends in its own task; a plain function (grpc runs those on its thread pool) runs on a worker
thread, in the call's context.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from meshlib.grpc.calls import (
    finish,
    inbound_request,
    outcome,
    refusal_status,
    report_load,
    servicer_context,
)
from meshlib.grpc.probes import aio_probe_handler, is_probe
from meshlib.inbound import Gate, Pending, Request

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

Behaviour = Callable[[Any, Any], Any]
_END = object()


class MeshAioServerInterceptor(grpc.aio.ServerInterceptor):
    """Identity, authorization, rate limit, deadline and caller context, stats and telemetry
    for every call of the asyncio server it is given to."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.gate = Gate(mesh)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if is_probe(handler_call_details):  # a prequal probe: the mesh's, not the servicers', not counted
            return aio_probe_handler(self.mesh.load)
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED
            return None
        return wrap(handler, self.gate, handler_call_details.method)


def aio_server_interceptors(mesh: Mesh) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors a `grpc.aio.server(...)` of this mesh takes (put them first)."""
    return [MeshAioServerInterceptor(mesh)]


def wrap(handler: grpc.RpcMethodHandler, gate: Gate, path: str) -> grpc.RpcMethodHandler:
    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    streaming_in = handler.request_streaming
    if handler.response_streaming:
        behaviour = handler.stream_stream if streaming_in else handler.unary_stream
        assert behaviour is not None
        run = _streaming(gate, path, behaviour, streaming_in)
        if streaming_in:
            return grpc.stream_stream_rpc_method_handler(run, **options)
        return grpc.unary_stream_rpc_method_handler(run, **options)
    behaviour = handler.stream_unary if streaming_in else handler.unary_unary
    assert behaviour is not None
    run = _unary(gate, path, behaviour, streaming_in)
    if streaming_in:
        return grpc.stream_unary_rpc_method_handler(run, **options)
    return grpc.unary_unary_rpc_method_handler(run, **options)


async def _admit(gate: Gate, path: str, context: grpc.aio.ServicerContext[Any, Any]) -> Request:
    request = inbound_request(path, context)
    verdict = gate.admit(request)
    if verdict is not None:
        while isinstance(verdict, Pending):  # Redis, a JWKS fetch: never on the event loop
            await asyncio.to_thread(verdict.wait)
            verdict = verdict.then()
        if verdict is not None:
            code, details, trailing = refusal_status(verdict)
            await context.abort(code, details, trailing_metadata=trailing)
    return request


def _ended(request: Request, context: Any, error: BaseException | None) -> None:
    """grpc cancels the call's task when the caller goes away or the deadline passes."""
    gone = isinstance(error, asyncio.CancelledError)
    finish(request, outcome(context.code(), error, gone, context), None if gone else error)


def _blocking(argument: Any, streaming_in: bool) -> Any:
    """What a plain function on a worker thread reads: the requests as a blocking iterator
    (grpc hands an interceptor's coroutine the asynchronous one)."""
    if not streaming_in:
        return argument
    return _iterate(argument, asyncio.get_running_loop())


def _iterate(requests: AsyncIterator[Any], loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    while True:
        try:
            yield asyncio.run_coroutine_threadsafe(anext(requests), loop).result()  # type: ignore[arg-type]
        except StopAsyncIteration:
            return


def _unary(gate: Gate, path: str, behaviour: Behaviour, streaming_in: bool) -> Behaviour:
    is_coroutine = inspect.iscoroutinefunction(behaviour)

    async def run(argument: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        request = await _admit(gate, path, context)
        seen = servicer_context(request, context)
        try:
            if is_coroutine:
                response = await behaviour(argument, seen)
            else:
                blocking = _blocking(argument, streaming_in)
                response = await asyncio.to_thread(behaviour, blocking, seen)
        except BaseException as exc:
            _ended(request, context, exc)
            raise
        report_load(request, context)
        _ended(request, context, None)
        return response

    return run


def _streaming(gate: Gate, path: str, behaviour: Behaviour, streaming_in: bool) -> Behaviour:
    """A streamed answer, sent by this coroutine with `context.write` whatever the servicer's
    shape (a writer coroutine, an async generator, a plain generator): so the whole call, its
    end included, runs in the call's task and context. An async generator handed back to grpc
    would be closed by the loop's finalizer, in another context, when the caller goes away."""
    is_writer = inspect.iscoroutinefunction(behaviour)
    is_async = inspect.isasyncgenfunction(behaviour)

    async def run(argument: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        request = await _admit(gate, path, context)
        seen = servicer_context(request, context)
        error: BaseException | None = None
        try:
            if is_writer:
                await behaviour(argument, seen)
            elif is_async:
                responses = behaviour(argument, seen)
                try:
                    async for item in responses:
                        await context.write(item)
                finally:
                    await responses.aclose()
            else:  # a plain generator: each step on a worker thread, in this call's context
                made = await asyncio.to_thread(behaviour, _blocking(argument, streaming_in), seen)
                iterator = iter(made)
                while (item := await asyncio.to_thread(next, iterator, _END)) is not _END:
                    await context.write(item)
            report_load(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _ended(request, context, error)

    return run
