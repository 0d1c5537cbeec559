"""Echo servicers for the server-side tests, sync and asyncio: each answer says what the
servicer saw of the mesh's inbound context (the caller, the deadline left) and the metadata."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import grpc

from meshlib import context as mesh_context
from tests.grpc import echo_pb2, echo_pb2_grpc


def pong(request: echo_pb2.Ping, grpc_context: Any, server: str, index: int = 0) -> echo_pb2.Pong:
    inbound = mesh_context.current()
    remaining = inbound.remaining() if inbound is not None else None
    metadata = {k: v for k, v in grpc_context.invocation_metadata() or () if isinstance(v, str)}
    return echo_pb2.Pong(
        text=request.text,
        server=server,
        caller=(inbound.source or "") if inbound is not None else "<none>",
        deadline=remaining or 0.0,
        index=index,
        metadata=metadata,
    )


def code_named(name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, name)


class Echo(echo_pb2_grpc.EchoServicer):
    """The sync servicer; `text="raise"` makes it raise, `fail` abort with that code."""

    def __init__(self, name: str = "echo") -> None:
        self.name = name
        self.calls = 0

    def Unary(self, request: echo_pb2.Ping, context: grpc.ServicerContext) -> echo_pb2.Pong:
        self.calls += 1
        if request.delay_ms:
            time.sleep(request.delay_ms / 1000)
        if request.text == "raise":
            raise RuntimeError("the servicer failed")
        if request.fail:
            context.abort(code_named(request.fail), f"asked to fail with {request.fail}")
        return pong(request, context, self.name)

    def ServerStream(self, request: echo_pb2.Ping, context: grpc.ServicerContext) -> Iterator[echo_pb2.Pong]:
        self.calls += 1
        for i in range(request.count):
            if request.fail and i == request.fail_after:
                context.abort(code_named(request.fail), "failed mid-stream")
            if request.delay_ms:
                time.sleep(request.delay_ms / 1000)
            yield pong(request, context, self.name, i)

    def ClientStream(
        self, request_iterator: Iterable[echo_pb2.Ping], context: grpc.ServicerContext
    ) -> echo_pb2.Pong:
        self.calls += 1
        texts = [p.text for p in request_iterator]
        return pong(echo_pb2.Ping(text=",".join(texts)), context, self.name, len(texts))

    def Bidi(
        self, request_iterator: Iterable[echo_pb2.Ping], context: grpc.ServicerContext
    ) -> Iterator[echo_pb2.Pong]:
        self.calls += 1
        for i, request in enumerate(request_iterator):
            yield pong(request, context, self.name, i)


class AioEcho(echo_pb2_grpc.EchoServicer):
    """The asyncio servicer: coroutines and async generators, and one writer-style stream."""

    def __init__(self, name: str = "aio-echo") -> None:
        self.name = name
        self.calls = 0

    async def Unary(self, request: echo_pb2.Ping, context: grpc.aio.ServicerContext) -> echo_pb2.Pong:  # type: ignore[override]
        self.calls += 1
        if request.delay_ms:
            await asyncio.sleep(request.delay_ms / 1000)
        if request.text == "raise":
            raise RuntimeError("the servicer failed")
        if request.fail:
            await context.abort(code_named(request.fail), f"asked to fail with {request.fail}")
        return pong(request, context, self.name)

    async def ServerStream(  # type: ignore[override]
        self, request: echo_pb2.Ping, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[echo_pb2.Pong]:
        self.calls += 1
        for i in range(request.count):
            if request.fail and i == request.fail_after:
                await context.abort(code_named(request.fail), "failed mid-stream")
            if request.delay_ms:
                await asyncio.sleep(request.delay_ms / 1000)
            yield pong(request, context, self.name, i)

    async def ClientStream(  # type: ignore[override]
        self, request_iterator: AsyncIterator[echo_pb2.Ping], context: grpc.aio.ServicerContext
    ) -> echo_pb2.Pong:
        self.calls += 1
        texts = [p.text async for p in request_iterator]
        return pong(echo_pb2.Ping(text=",".join(texts)), context, self.name, len(texts))

    async def Bidi(  # type: ignore[override]
        self, request_iterator: AsyncIterator[echo_pb2.Ping], context: grpc.aio.ServicerContext
    ) -> None:
        """Writer style: `context.write`, no yield (grpc tells the kinds apart by the function)."""
        self.calls += 1
        i = 0
        async for request in request_iterator:
            await context.write(pong(request, context, self.name, i))
            i += 1
