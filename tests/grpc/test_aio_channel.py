"""AioMeshChannel against real grpc.aio servers on 127.0.0.1: the same stack as the sync channel,
driven by the asyncio shell."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

import meshlib
from meshlib.rules import parse_documents
from tests.conftest import write_rules
from tests.grpc import echo_pb2, echo_pb2_grpc
from tests.grpc.echo_fleet import GRPC, EchoFleet, echo_fleet, endpoints

__all__ = ["echo_fleet"]

Ping = echo_pb2.Ping
RETRY_UNAVAILABLE = {
    "retries": {"attempts": 2, "on": ["unavailable"], "backoff": {"base": "1ms", "max": "2ms"}}
}


@pytest.fixture
def make_mesh(tmp_path: Path) -> Iterator[object]:
    meshes: list[meshlib.Mesh] = []

    def make(*docs: dict) -> meshlib.Mesh:
        mesh = meshlib.Mesh("client", config=write_rules(tmp_path / "mesh.yaml", list(docs)))
        meshes.append(mesh)
        return mesh

    yield make
    for mesh in meshes:
        mesh.close()


def route(*rules: dict) -> dict:
    return {"kind": "Route", "service": "echo", "routes": list(rules)}


async def pings(*texts: str) -> AsyncIterator[echo_pb2.Ping]:
    for text in texts:
        yield Ping(text=text)


async def test_generated_aio_stubs_work_unchanged_for_all_four_kinds(
    echo_fleet: EchoFleet, make_mesh
) -> None:
    _, address = echo_fleet.start("a", aio=True)
    mesh = make_mesh(endpoints("echo", [address]))
    async with mesh.grpc_aio_channel("echo") as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        call = stub.Unary(Ping(text="hi"), metadata=(("x-user", "ann"),))
        pong = await call
        assert (pong.text, pong.server, pong.caller, pong.metadata["x-user"]) == ("hi", "a", "client", "ann")
        assert await call.code() is grpc.StatusCode.OK
        assert [p.index async for p in stub.ServerStream(Ping(count=3))] == [0, 1, 2]
        assert (await stub.ClientStream(pings("a", "b"))).text == "a+b"
        assert [p.text async for p in stub.Bidi(pings("x", "y"))] == ["x", "y"]
        stream = stub.ServerStream(Ping(count=2))
        assert (await stream.read()).index == 0 and (await stream.read()).index == 1
        assert await stream.read() is grpc.aio.EOF
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Unary(Ping(fail="NOT_FOUND"))
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND


async def test_an_ok_answers_metadata_are_there_when_awaited(echo_fleet: EchoFleet, make_mesh) -> None:
    """Without a retry policy an OK answer's metadata stay with grpc until asked for."""
    knobs, address = echo_fleet.start("a", aio=True)
    knobs.ok_trailing = (("x-note", "kept"),)
    for docs in ([], [route({"name": "r", "retries": {"attempts": 2, "on": ["unavailable"]}})]):
        mesh = make_mesh(endpoints("echo", [address]), *docs)
        async with mesh.grpc_aio_channel("echo") as channel:
            call = echo_pb2_grpc.EchoStub(channel).Unary(Ping(text="m"))
            assert (await call).text == "m"
            assert dict(await call.trailing_metadata())["x-note"] == "kept"
            assert isinstance(await call.initial_metadata(), grpc.aio.Metadata)


async def test_a_call_starts_at_once_and_cancels_however_it_is_awaited(
    echo_fleet: EchoFleet, make_mesh
) -> None:
    """A unary call awaited at once runs in the awaiting task, one left alone in a task of its
    own: either way it starts at once, and cancel() ends it as grpc.aio's would."""
    slow, address = echo_fleet.start("slow", aio=True)
    slow.delay = 0.4
    mesh = make_mesh(endpoints("echo", [address]))
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
    load = mesh.snapshot.grpc_plan("echo").endpoints[0].load

    started = time.monotonic()
    first, second = stub.Unary(Ping(text="1")), stub.Unary(Ping(text="2"))  # both running already
    assert (await first).text == "1" and (await second).text == "2"
    assert time.monotonic() - started < 0.7 and first.done() and not first.cancelled()

    calls: list[object] = []

    async def awaits_at_once() -> int:
        call = stub.Unary(Ping())
        calls.append(call)
        try:
            await call
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            return task.cancelling()  # the call was cancelled, not the task awaiting it
        return -1

    waiter = asyncio.ensure_future(awaits_at_once())
    deadline = time.monotonic() + 5
    while slow.total() < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    call = calls[0]
    ended: list[object] = []
    call.add_done_callback(ended.append)
    assert not call.done() and load.outstanding == 1
    assert call.cancel()
    assert await waiter == 0
    assert call.cancelled() and call.done() and load.outstanding == 0
    await asyncio.sleep(0)
    assert ended == [call]
    assert (await stub.Unary(Ping(text="after"))).text == "after"


async def test_round_robin_across_three_aio_servers(echo_fleet: EchoFleet, make_mesh) -> None:
    addresses = [echo_fleet.start(name, aio=True)[1] for name in ("a", "b", "c")]
    stub = echo_pb2_grpc.EchoStub(make_mesh(endpoints("echo", addresses)).grpc_aio_channel("echo"))
    seen = Counter([(await stub.Unary(Ping())).server for _ in range(30)])
    assert seen == {"a": 10, "b": 10, "c": 10}
    concurrent = await asyncio.gather(*(stub.Unary(Ping()) for _ in range(30)))
    assert Counter(p.server for p in concurrent) == {"a": 10, "b": 10, "c": 10}


async def test_a_retry_on_unavailable_lands_on_another_endpoint(echo_fleet: EchoFleet, make_mesh) -> None:
    bad, bad_address = echo_fleet.start("bad", aio=True)
    bad.fail = grpc.StatusCode.UNAVAILABLE
    _, good_address = echo_fleet.start("good")  # a sync server: the channel does not care
    mesh = make_mesh(endpoints("echo", [bad_address, good_address]), route(RETRY_UNAVAILABLE))
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
    assert {(await stub.Unary(Ping())).server for _ in range(10)} == {"good"}
    assert bad.total() >= 5 and mesh.stats.counter("retries", "echo") == bad.total()
    assert [p.server async for p in stub.ServerStream(Ping(count=2))] == ["good", "good"]


async def test_no_retry_after_the_first_streamed_message(echo_fleet: EchoFleet, make_mesh) -> None:
    knobs, address = echo_fleet.start("a", aio=True)
    stub = echo_pb2_grpc.EchoStub(
        make_mesh(endpoints("echo", [address]), route(RETRY_UNAVAILABLE)).grpc_aio_channel("echo")
    )
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for p in stub.ServerStream(Ping(count=3, fail="UNAVAILABLE", fail_after=1)):
            received.append(p.index)
    assert received == [0] and raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert knobs.total() == 1
    with pytest.raises(grpc.aio.AioRpcError):  # failed before its first message: retried once
        async for _ in stub.ServerStream(Ping(count=3, fail="UNAVAILABLE")):
            pass
    assert knobs.total() == 3


async def test_the_timeout_is_a_deadline_exceeded(echo_fleet: EchoFleet, make_mesh) -> None:
    slow, address = echo_fleet.start("slow", aio=True)
    slow.delay = 1.0
    stub = echo_pb2_grpc.EchoStub(make_mesh(endpoints("echo", [address])).grpc_aio_channel("echo"))
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Unary(Ping(), timeout=0.1)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.6


async def test_a_slow_unary_call_is_hedged(echo_fleet: EchoFleet, make_mesh) -> None:
    slow, slow_address = echo_fleet.start("slow", aio=True)
    slow.delay = 1.0
    _, fast_address = echo_fleet.start("fast", aio=True)
    rule = {"hedge": {"delay": "30ms"}, "retries": {"attempts": 1}}
    mesh = make_mesh(endpoints("echo", [slow_address, fast_address]), route(rule))
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
    started = time.monotonic()
    assert {(await stub.Unary(Ping())).server for _ in range(2)} == {"fast"}
    assert time.monotonic() - started < 0.8 and mesh.stats.counter("hedges", "echo") >= 1


async def test_one_aio_channel_per_endpoint_closed_when_it_leaves(echo_fleet: EchoFleet, make_mesh) -> None:
    addresses = [echo_fleet.start(name, aio=True)[1] for name in ("a", "b")]
    mesh = make_mesh(endpoints("echo", addresses))
    channel = mesh.grpc_aio_channel("echo")
    stub = echo_pb2_grpc.EchoStub(channel)
    await asyncio.gather(*(stub.Unary(Ping()) for _ in range(20)))
    pool = channel.pool
    assert pool.opened == 2 and set(pool.channels()) == set(addresses)
    mesh.apply_rules(parse_documents([endpoints("echo", addresses[:1])]), "one left")
    assert set(pool.channels()) == {addresses[0]} and pool.closed == 1
    assert {(await stub.Unary(Ping())).server for _ in range(4)} == {"a"}
    assert pool.opened == 2


async def test_faults_and_mirrors_through_the_aio_channel(echo_fleet: EchoFleet, make_mesh) -> None:
    main, main_address = echo_fleet.start("v1", aio=True)
    shadow, shadow_address = echo_fleet.start("v2", aio=True)
    labels = [{**GRPC, "version": "v1"}, {**GRPC, "version": "v2"}]
    chaos = {"match": {"headers": {"x-chaos": {"present": True}}}, "fault": {"abort": {"status": 503}}}
    rule = {"to": [{"subset": "v1"}], "mirror": {"subset": "v2"}}
    mesh = make_mesh(
        endpoints("echo", [main_address, shadow_address], labels),
        {
            "kind": "Destination",
            "service": "echo",
            "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        },
        route(chaos, rule),
    )
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Unary(Ping(), metadata=(("x-chaos", "1"),))
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE and main.total() == 0
    assert {(await stub.Unary(Ping())).server for _ in range(3)} == {"v1"}
    deadline = time.monotonic() + 5
    while shadow.calls.get("Unary", 0) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert shadow.calls.get("Unary") == 3
