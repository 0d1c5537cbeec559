"""The asyncio server interceptor on a real `grpc.aio.server` on 127.0.0.1, called through plain
grpc.aio channels: the same inbound sequence as the sync server, on an event loop."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest

import meshlib
from meshlib.grpc import aio_server_interceptors
from meshlib.grpc.calls import PUSHBACK
from meshlib.rules import parse_documents
from tests.grpc import echo_pb2, echo_pb2_grpc
from tests.grpc.echo_servicers import AioEcho, Echo

FROM_CHECKOUT = (("x-mesh-source", "checkout"),)
ONLY_BILLING = [{"kind": "Authorization", "service": "orders", "allow": [{"from": ["billing"]}]}]
ONE_PER_SECOND = [{"kind": "RateLimit", "service": "orders", "requests_per_second": 1, "burst": 1}]


@dataclass
class Served:
    mesh: meshlib.Mesh
    servicer: AioEcho
    stub: echo_pb2_grpc.EchoStub


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    with meshlib.Mesh("orders") as mesh:
        server = grpc.aio.server(interceptors=aio_server_interceptors(mesh))
        servicer = AioEcho()
        echo_pb2_grpc.add_EchoServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield Served(mesh, servicer, echo_pb2_grpc.EchoStub(channel))
        finally:
            await channel.close()
            await server.stop(None)


async def pings(*texts: str) -> AsyncIterator[echo_pb2.Ping]:
    for t in texts:
        yield echo_pb2.Ping(text=t)


async def test_all_four_kinds_pass_through_see_the_caller_and_are_counted(served: Served) -> None:
    stub = served.stub
    assert (await stub.Unary(echo_pb2.Ping(text="a"), metadata=FROM_CHECKOUT)).caller == "checkout"
    streamed = [p async for p in stub.ServerStream(echo_pb2.Ping(count=3), metadata=FROM_CHECKOUT)]
    assert [(p.index, p.caller) for p in streamed] == [(0, "checkout"), (1, "checkout"), (2, "checkout")]
    gathered = await stub.ClientStream(pings("x", "y"), metadata=FROM_CHECKOUT)
    assert (gathered.text, gathered.caller) == ("x,y", "checkout")
    echoed = [p async for p in stub.Bidi(pings("p", "q"), metadata=FROM_CHECKOUT)]  # writer style
    assert [(p.text, p.caller) for p in echoed] == [("p", "checkout"), ("q", "checkout")]
    assert (await stub.Unary(echo_pb2.Ping())).caller == ""
    assert served.mesh.stats.edge("in", "checkout").by_class == {"2xx": 4}


async def test_authorization_denies_with_permission_denied_and_the_reason(served: Served) -> None:
    served.mesh.apply_rules(parse_documents(ONLY_BILLING), "1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert (
        caught.value.details() == "RBAC: access denied: source checkout may not POST /meshlib.test.Echo/Unary"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [p async for p in served.stub.Bidi(pings("a"), metadata=FROM_CHECKOUT)]
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert served.servicer.calls == 0
    billing = (("x-mesh-source", "billing"),)
    assert (await served.stub.Unary(echo_pb2.Ping(), metadata=billing)).caller == "billing"
    assert served.mesh.stats.edge("in", "checkout").by_class == {"4xx": 2}


async def test_a_rate_limit_answers_resource_exhausted_with_pushback(served: Served) -> None:
    served.mesh.apply_rules(parse_documents(ONE_PER_SECOND), "1")
    await served.stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(caught.value.trailing_metadata() or ())
    assert (trailing[PUSHBACK], trailing["retry-after"]) == ("1000", "1")
    assert served.servicer.calls == 1
    assert served.mesh.stats.edge("in", "checkout").by_class == {"2xx": 1, "4xx": 1}


class Blocking:
    """A limiter that blocks as a Redis-backed one does (`blocking`): notes where it is asked."""

    blocking = True

    def __init__(self) -> None:
        self.threads: list[int] = []

    def try_acquire(self) -> float:
        self.threads.append(threading.get_ident())
        return 0.0 if len(self.threads) == 1 else 2.5


async def test_a_limit_that_waits_on_the_network_is_asked_off_the_event_loop(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = Blocking()
    monkeypatch.setattr(served.mesh.resilience, "limiter", lambda doc: limiter)
    served.mesh.apply_rules(parse_documents(ONE_PER_SECOND), "1")
    await served.stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(caught.value.trailing_metadata() or ())[PUSHBACK] == "3000"
    assert len(limiter.threads) == 2
    assert threading.get_ident() not in limiter.threads  # the loop (this thread) never asked


async def test_the_incoming_deadline_is_the_inbound_deadline(served: Served) -> None:
    stub = served.stub
    assert (await stub.Unary(echo_pb2.Ping())).deadline == 0.0
    assert 2.0 < (await stub.Unary(echo_pb2.Ping(), timeout=3)).deadline <= 3.1
    smaller = await stub.Unary(echo_pb2.Ping(), timeout=3, metadata=(("x-mesh-timeout", "1000"),))
    assert 0.5 < smaller.deadline <= 1.0
    streamed = [p async for p in stub.ServerStream(echo_pb2.Ping(count=2), timeout=3)]
    assert all(2.0 < p.deadline <= 3.1 for p in streamed)


async def test_statuses_the_servicer_answers_with_are_counted_by_their_http_class(served: Served) -> None:
    stub = served.stub
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Unary(echo_pb2.Ping(text="raise"), metadata=FROM_CHECKOUT)
    assert caught.value.code() is grpc.StatusCode.UNKNOWN
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Unary(echo_pb2.Ping(fail="NOT_FOUND"), metadata=FROM_CHECKOUT)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        ping = echo_pb2.Ping(count=4, fail="UNAVAILABLE", fail_after=2)
        async for p in stub.ServerStream(ping, metadata=FROM_CHECKOUT):
            received.append(p.index)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert received == [0, 1]
    edge = served.mesh.stats.edge("in", "checkout")
    assert edge.by_class == {"5xx": 2, "4xx": 1}


async def test_a_stream_the_caller_cancels_is_counted_as_cancelled(served: Served) -> None:
    """Cancelled while the servicer waits, and while grpc waits to send (flow control): both
    counted once, ended in the call's own task (no error from a finalizer elsewhere)."""
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: loop_errors.append(ctx))
    slow = echo_pb2.Ping(count=1000, delay_ms=5)
    bulky = echo_pb2.Ping(count=100000, text="x" * 4000)
    for ping in (slow, bulky):
        call = served.stub.ServerStream(ping, metadata=FROM_CHECKOUT)
        assert (await call.read()).index == 0
        await asyncio.sleep(0.05)
        call.cancel()
    stats = served.mesh.stats
    for _ in range(500):
        if stats.edge("in", "checkout").total == 2:
            break
        await asyncio.sleep(0.01)
    gc.collect()
    await asyncio.sleep(0.05)
    assert stats.edge("in", "checkout").by_class == {"4xx": 2}
    assert loop_errors == []


async def test_a_call_past_its_deadline_is_counted_as_deadline_exceeded(served: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Unary(echo_pb2.Ping(delay_ms=300), timeout=0.1, metadata=FROM_CHECKOUT)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    stats = served.mesh.stats
    for _ in range(500):
        if stats.edge("in", "checkout").total:
            break
        await asyncio.sleep(0.01)
    assert stats.edge("in", "checkout").by_class == {"5xx": 1}


async def test_a_sync_servicer_on_an_asyncio_server_runs_on_worker_threads_in_the_callers_context() -> None:
    with meshlib.Mesh("orders") as mesh:
        server = grpc.aio.server(interceptors=aio_server_interceptors(mesh))
        echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = echo_pb2_grpc.EchoStub(channel)
                assert (await stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT)).caller == "checkout"
                streamed = [
                    p.caller async for p in stub.ServerStream(echo_pb2.Ping(count=2), metadata=FROM_CHECKOUT)
                ]
                assert streamed == ["checkout", "checkout"]
                gathered = await stub.ClientStream(pings("x", "y"), metadata=FROM_CHECKOUT)
                assert (gathered.text, gathered.caller) == ("x,y", "checkout")
                echoed = [p.text async for p in stub.Bidi(pings("p", "q"), metadata=FROM_CHECKOUT)]
                assert echoed == ["p", "q"]
        finally:
            await server.stop(None)
        assert mesh.stats.edge("in", "checkout").by_class == {"2xx": 4}


async def test_a_concurrency_limit_answers_unavailable_and_gives_the_slot_back(served: Served) -> None:
    pinned = {"kind": "ConcurrencyLimit", "service": "orders", "min_limit": 1}
    served.mesh.apply_rules(parse_documents([pinned | {"gradient": {"min_rtt": {"concurrency": 1}}}]), "1")
    first = asyncio.ensure_future(served.stub.Unary(echo_pb2.Ping(delay_ms=500), metadata=FROM_CHECKOUT))

    async def running() -> None:  # the first call is in the servicer (a poll: the loop is the server's too)
        while served.servicer.calls == 0:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(running(), 5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    trailing = dict(caught.value.trailing_metadata() or ())
    assert (trailing[PUSHBACK], trailing["retry-after"]) == ("1000", "1")
    assert (await first).caller == "checkout"
    assert (await served.stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT)).caller == "checkout"
    assert served.mesh.stats.counter("concurrency_limited", "orders") == 1
