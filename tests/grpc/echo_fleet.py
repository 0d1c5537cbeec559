"""Real Echo servers on 127.0.0.1 for the channel tests: sync `grpc.server` and `grpc.aio.server`
(each aio server on a loop of its own thread), with per-server knobs to fail, delay and push back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest

from meshlib.headers import SOURCE
from tests.grpc import echo_pb2, echo_pb2_grpc

GRPC = {"meshlib.io/protocol": "grpc"}


@dataclass
class Knobs:
    """How one server answers: `fail` every call with that code (with `trailing` metadata),
    after `delay` seconds, or OK with `ok_trailing` metadata; `calls` counts the calls it got,
    by method name."""

    name: str
    fail: grpc.StatusCode | None = None
    trailing: tuple[tuple[str, str], ...] = ()
    ok_trailing: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)
    metadata: list[dict[str, str]] = field(default_factory=list)  # of each call, text entries
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, method: str, context: Any) -> None:
        seen = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        with self.lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            self.metadata.append(seen)

    def total(self) -> int:
        with self.lock:
            return sum(self.calls.values())


def pong(knobs: Knobs, ping: echo_pb2.Ping, context: Any, index: int = 0) -> echo_pb2.Pong:
    metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
    remaining = context.time_remaining()
    if knobs.ok_trailing:
        context.set_trailing_metadata(knobs.ok_trailing)
    return echo_pb2.Pong(
        text=ping.text,
        server=knobs.name,
        caller=metadata.get(SOURCE, ""),
        deadline=remaining if remaining is not None else 0.0,
        index=index,
        metadata=metadata,
    )


def _code(name: str) -> grpc.StatusCode:
    return grpc.StatusCode[name] if name else grpc.StatusCode.UNAVAILABLE


class SyncEcho(echo_pb2_grpc.EchoServicer):
    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs

    def _gate(self, method: str, ping: echo_pb2.Ping, context: Any) -> None:
        self.knobs.count(method, context)
        wait = self.knobs.delay or ping.delay_ms / 1000
        if wait:
            time.sleep(wait)
        if self.knobs.fail is not None:
            context.set_trailing_metadata(self.knobs.trailing)
            context.abort(self.knobs.fail, f"{self.knobs.name} fails")
        if ping.fail and not ping.fail_after:
            context.abort(_code(ping.fail), f"{self.knobs.name} asked to fail")

    def Unary(self, request: echo_pb2.Ping, context: Any) -> echo_pb2.Pong:
        self._gate("Unary", request, context)
        return pong(self.knobs, request, context)

    def ServerStream(self, request: echo_pb2.Ping, context: Any) -> Iterator[echo_pb2.Pong]:
        self._gate("ServerStream", request, context)
        for i in range(request.count):
            if request.fail and request.fail_after and i == request.fail_after:
                context.abort(_code(request.fail), f"{self.knobs.name} fails after {i}")
            if i and request.delay_ms:
                time.sleep(request.delay_ms / 1000)
            yield pong(self.knobs, request, context, i)

    def ClientStream(self, request_iterator: Iterator[echo_pb2.Ping], context: Any) -> echo_pb2.Pong:
        texts = [p.text for p in request_iterator]
        self._gate("ClientStream", echo_pb2.Ping(), context)
        return pong(self.knobs, echo_pb2.Ping(text="+".join(texts)), context, len(texts))

    def Bidi(self, request_iterator: Iterator[echo_pb2.Ping], context: Any) -> Iterator[echo_pb2.Pong]:
        self._gate("Bidi", echo_pb2.Ping(), context)
        for i, ping in enumerate(request_iterator):
            yield pong(self.knobs, ping, context, i)


class AioEcho(echo_pb2_grpc.EchoServicer):
    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs

    async def _gate(self, method: str, ping: echo_pb2.Ping, context: Any) -> None:
        self.knobs.count(method, context)
        wait = self.knobs.delay or ping.delay_ms / 1000
        if wait:
            await asyncio.sleep(wait)
        if self.knobs.fail is not None:
            context.set_trailing_metadata(self.knobs.trailing)
            await context.abort(self.knobs.fail, f"{self.knobs.name} fails")
        if ping.fail and not ping.fail_after:
            await context.abort(_code(ping.fail), f"{self.knobs.name} asked to fail")

    async def Unary(self, request: echo_pb2.Ping, context: Any) -> echo_pb2.Pong:
        await self._gate("Unary", request, context)
        return pong(self.knobs, request, context)

    async def ServerStream(self, request: echo_pb2.Ping, context: Any) -> Any:
        await self._gate("ServerStream", request, context)
        for i in range(request.count):
            if request.fail and request.fail_after and i == request.fail_after:
                await context.abort(_code(request.fail), f"{self.knobs.name} fails after {i}")
            if i and request.delay_ms:
                await asyncio.sleep(request.delay_ms / 1000)
            yield pong(self.knobs, request, context, i)

    async def ClientStream(self, request_iterator: Any, context: Any) -> echo_pb2.Pong:
        texts = [p.text async for p in request_iterator]
        await self._gate("ClientStream", echo_pb2.Ping(), context)
        return pong(self.knobs, echo_pb2.Ping(text="+".join(texts)), context, len(texts))

    async def Bidi(self, request_iterator: Any, context: Any) -> Any:
        await self._gate("Bidi", echo_pb2.Ping(), context)
        i = 0
        async for ping in request_iterator:
            yield pong(self.knobs, ping, context, i)
            i += 1


class EchoFleet:
    """Echo servers started on demand, stopped at the end of the test."""

    def __init__(self) -> None:
        self.knobs: dict[str, Knobs] = {}  # by address
        self._stops: list[Any] = []

    def start(self, name: str, *, aio: bool = False) -> tuple[Knobs, str]:
        knobs = Knobs(name)
        address = self._start_aio(knobs) if aio else self._start_sync(knobs)
        self.knobs[address] = knobs
        return knobs, address

    def _start_sync(self, knobs: Knobs) -> str:
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(8))
        echo_pb2_grpc.add_EchoServicer_to_server(SyncEcho(knobs), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._stops.append(lambda: server.stop(None).wait(5))
        return f"127.0.0.1:{port}"

    def _start_aio(self, knobs: Knobs) -> str:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()

        async def up() -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server()
            echo_pb2_grpc.add_EchoServicer_to_server(AioEcho(knobs), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        server, port = asyncio.run_coroutine_threadsafe(up(), loop).result(5)

        def stop() -> None:
            asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(5)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            loop.close()

        self._stops.append(stop)
        return f"127.0.0.1:{port}"

    def stop(self) -> None:
        for stop in reversed(self._stops):
            stop()
        self._stops.clear()


@pytest.fixture
def echo_fleet() -> Iterator[EchoFleet]:
    fleet = EchoFleet()
    yield fleet
    fleet.stop()


def endpoints(service: str, addresses: list[str], labels: list[dict[str, str]] | None = None) -> dict:
    """An Endpoints document (every endpoint labelled grpc unless `labels` says otherwise)."""
    labels = labels or [GRPC] * len(addresses)
    return {
        "kind": "Endpoints",
        "service": service,
        "endpoints": [{"address": a, "labels": dict(lab)} for a, lab in zip(addresses, labels, strict=True)],
    }
