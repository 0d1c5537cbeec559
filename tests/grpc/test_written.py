"""Requests written with `call.write()` / `done_writing()` on AioMeshChannel (WrittenRequests),
against real grpc.aio servers on 127.0.0.1, and the queue's own rules."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

from meshlib.grpc.written import DONE, WrittenRequests
from tests.grpc import echo_pb2, echo_pb2_grpc
from tests.grpc.echo_fleet import EchoFleet, echo_fleet, endpoints
from tests.grpc.test_aio_channel import eventually, make_mesh, out_edge, pings

__all__ = ["echo_fleet", "make_mesh"]  # the fixtures, used by name

Ping = echo_pb2.Ping


async def test_a_streamed_request_by_write_and_done_writing(echo_fleet: EchoFleet, make_mesh) -> None:
    _, address = echo_fleet.start("a", aio=True)
    mesh = make_mesh(endpoints("echo", [address]))
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))

    call = stub.ClientStream()
    for text in ("a", "b", "c"):
        await call.write(Ping(text=text))
    await call.done_writing()
    await call.done_writing()  # idempotent, as grpc's
    pong = await call
    assert (pong.text, pong.index, pong.server) == ("a+b+c", 3, "a")

    bidi = stub.Bidi()
    answers = []
    for text in ("x", "y"):
        await bidi.write(Ping(text=text))
        answers.append((await bidi.read()).text)  # each answer before the next request
    await bidi.done_writing()
    assert answers == ["x", "y"] and await bidi.read() is grpc.aio.EOF
    assert await bidi.code() is grpc.StatusCode.OK
    with pytest.raises(asyncio.InvalidStateError):
        await bidi.write(Ping(text="late"))
    assert out_edge(mesh) == {"2xx": 2}

    mixed = stub.Bidi(pings("a"))
    with pytest.raises(grpc.aio.UsageError):
        await mixed.write(Ping(text="b"))
    assert [p.text async for p in mixed] == ["a"]


async def test_writes_to_a_failed_call_raise_its_status(echo_fleet: EchoFleet, make_mesh) -> None:
    knobs, address = echo_fleet.start("a", aio=True)
    knobs.mid_stream = grpc.StatusCode.UNAVAILABLE
    mesh = make_mesh(endpoints("echo", [address]))
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
    bidi = stub.Bidi()
    await bidi.write(Ping(text="a"))
    assert (await bidi.read()).text == "a"
    await bidi.write(Ping(text="b"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await bidi.read()
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        for _ in range(3):  # the queue holds one message: a later write finds the call over
            await bidi.write(Ping(text="c"))
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    await eventually(lambda: out_edge(mesh) == {"5xx": 1}, "the failed stream counted")

    nowhere = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("elsewhere"))
    refused = nowhere.ClientStream()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        for _ in range(3):
            await refused.write(Ping(text="a"))
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError):
        await refused


async def test_a_write_waits_for_the_one_before_and_fails_when_the_call_ends() -> None:
    requests = WrittenRequests()
    await requests.put("a")  # the queue holds one
    waiting = asyncio.ensure_future(requests.put("b"))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # held until the RPC takes "a"
    assert await requests.__anext__() == "a"
    await asyncio.wait_for(waiting, 1)
    stuck = asyncio.ensure_future(requests.put("c"))
    await asyncio.sleep(0.01)
    requests.end(lambda: RuntimeError("the call failed"))
    with pytest.raises(RuntimeError):
        await stuck  # the call is over: the write fails with its status
    with pytest.raises(RuntimeError):
        await requests.put("d")
    assert await requests.__anext__() == "b"
    assert requests._queue.empty()  # "c" and "d" never went in


async def test_a_cancelled_write_puts_nothing_in_later() -> None:
    requests = WrittenRequests()
    await requests.put("a")
    waiting = asyncio.ensure_future(requests.put("b"))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await requests.__anext__() == "a"
    await requests.put(DONE)
    with pytest.raises(StopAsyncIteration):
        await requests.__anext__()  # "b" was never written
