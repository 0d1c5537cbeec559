"""AioMeshChannel against real grpc.aio servers on 127.0.0.1: the same stack as the sync channel,
driven by the asyncio shell."""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

import meshlib
from meshlib.grpc import aio_server_interceptors
from meshlib.rules import parse_documents
from tests.conftest import write_rules
from tests.grpc import echo_pb2, echo_pb2_grpc
from tests.grpc.echo_fleet import GRPC, EchoFleet, echo_fleet, endpoints
from tests.grpc.echo_servicers import AioEcho

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
    slow.delay = 1.0
    mesh = make_mesh(endpoints("echo", [address]))
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
    load = mesh.snapshot.grpc_plan("echo").endpoints[0].load

    started = time.monotonic()
    first, second = stub.Unary(Ping(text="1")), stub.Unary(Ping(text="2"))  # both running already
    assert (await first).text == "1" and (await second).text == "2"
    # one after the other would take 2 s; the margin absorbs a stall of the machine
    assert time.monotonic() - started < 1.8 and first.done() and not first.cancelled()
    slow.delay = 0.4

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


async def test_a_cancelled_calls_status_is_cancelled_as_grpc_aio_says_never_a_cancelled_error(
    echo_fleet: EchoFleet, make_mesh
) -> None:
    """A CancelledError out of `code()` would cancel the task that asked: grpc.aio answers
    CANCELLED; only the asking task's own cancellation is raised."""
    knobs, address = echo_fleet.start("a", aio=True)
    mesh = make_mesh(endpoints("echo", [address]))
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
    me = asyncio.current_task()
    assert me is not None

    async def reports_cancelled(call: grpc.aio.Call) -> None:
        assert await call.code() is grpc.StatusCode.CANCELLED
        assert await call.details() == "Locally cancelled by application!"
        assert list(await call.initial_metadata()) == [] and list(await call.trailing_metadata()) == []
        assert call.cancelled() and call.done() and me.cancelling() == 0

    # awaited at once (its stack runs in the awaiting task), cancelled in flight
    calls: list[grpc.aio.Call] = []

    async def awaits_at_once() -> None:
        call = stub.Unary(Ping(delay_ms=5000))
        calls.append(call)
        await call

    waiter = asyncio.ensure_future(awaits_at_once())
    await eventually(lambda: knobs.total() == 1, "the call at the server")
    assert calls[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await reports_cancelled(calls[0])

    # in a task of its own, its status asked while it runs, then cancelled
    call = stub.Unary(Ping(delay_ms=5000))
    asking = asyncio.ensure_future(call.code())
    await eventually(lambda: knobs.total() == 2, "the call at the server")
    assert call.cancel()
    assert await asking is grpc.StatusCode.CANCELLED
    await reports_cancelled(call)

    # cancelled before it started
    call = stub.Unary(Ping())
    assert call.cancel()
    await reports_cancelled(call)

    # a stream given up after its first message
    stream = stub.ServerStream(Ping(count=20, delay_ms=50))
    assert (await stream.read()).index == 0
    assert stream.cancel()
    await reports_cancelled(stream)
    with pytest.raises(asyncio.CancelledError):  # as grpc.aio's read()
        await stream.read()

    # the asking task's own cancellation is still raised, and leaves the call alone
    before = knobs.total()
    call = stub.Unary(Ping(delay_ms=5000))
    asking = asyncio.ensure_future(call.code())
    await eventually(lambda: knobs.total() == before + 1, "the call at the server")
    asking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asking
    assert not call.done() and not call.cancelled()  # still running
    assert call.cancel()
    await reports_cancelled(call)


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
    slow.delay = 3.0  # far above the bound below: a stalled thread cannot blur the two
    stub = echo_pb2_grpc.EchoStub(make_mesh(endpoints("echo", [address])).grpc_aio_channel("echo"))
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Unary(Ping(), timeout=0.1)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5


async def test_a_slow_unary_call_is_hedged(echo_fleet: EchoFleet, make_mesh) -> None:
    slow, slow_address = echo_fleet.start("slow", aio=True)
    slow.delay = 3.0  # far above the bound below: a stalled thread cannot blur the two
    _, fast_address = echo_fleet.start("fast", aio=True)
    rule = {"hedge": {"delay": "30ms"}, "retries": {"attempts": 1}}
    mesh = make_mesh(endpoints("echo", [slow_address, fast_address]), route(rule))
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
    started = time.monotonic()
    assert {(await stub.Unary(Ping())).server for _ in range(2)} == {"fast"}
    assert time.monotonic() - started < 2.0 and mesh.stats.counter("hedges", "echo") >= 1


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


def test_the_channels_of_an_event_loop_that_has_closed_are_let_go(echo_fleet: EchoFleet, make_mesh) -> None:
    """`asyncio.run` per batch of calls: each loop gets channels of its own, and once the loop
    has closed the mesh lets them go (found at the next update, or at the next loop's first
    call), rather than keeping the channels of every loop the process ever ran."""
    _, address = echo_fleet.start("a", aio=True)
    mesh = make_mesh(endpoints("echo", [address]))
    opened: list[weakref.ref[grpc.aio.Channel]] = []

    async def call() -> str:
        channel = mesh.grpc_aio_channel("echo")
        pong = await echo_pb2_grpc.EchoStub(channel).Unary(Ping(text="x"), timeout=5)
        opened.append(weakref.ref(channel.pool.channels()[address]))
        return pong.server

    assert [asyncio.run(call()) for _ in range(2)] == ["a", "a"]
    assert asyncio.run(call()) == "a"  # the third loop's first call let the first two go
    gc.collect()
    assert [ref() is None for ref in opened] == [True, True, False]
    mesh.apply_rules(parse_documents([endpoints("echo", [address])]), "an update")  # and an update the third
    gc.collect()
    assert [ref() for ref in opened] == [None, None, None]


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


@pytest.mark.parametrize("status", [200, 204])
async def test_a_2xx_abort_fails_every_aio_call_style_with_unknown(
    echo_fleet: EchoFleet, make_mesh, status: int
) -> None:
    """A made-up answer has no response message: a 2xx abort must not pass for OK (None)."""
    knobs, address = echo_fleet.start("a", aio=True)
    mesh = make_mesh(
        endpoints("echo", [address]), route({"name": "chaos", "fault": {"abort": {"status": status}}})
    )
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))

    async def written() -> object:
        call = stub.ClientStream()
        await call.done_writing()
        return await call

    styles: dict[str, Callable[[], Any]] = {
        "unary": lambda: stub.Unary(Ping()),
        "client stream": lambda: stub.ClientStream(pings("a")),
        "client stream written": written,
        "server stream": lambda: stub.ServerStream(Ping(count=2)).read(),
        "server stream iterated": lambda: anext(aiter(stub.ServerStream(Ping(count=2)))),
        "bidi": lambda: stub.Bidi(pings("a")).read(),
    }
    for style, rpc in styles.items():
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await rpc()
        assert raised.value.code() is grpc.StatusCode.UNKNOWN, style
        details = raised.value.details() or ""
        assert "fault" in details and "'chaos'" in details and str(status) in details
    call = stub.Unary(Ping())  # its status asked first: the stack runs in a task of its own
    assert await call.code() is grpc.StatusCode.UNKNOWN
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    assert knobs.total() == 0


# -- how a stream ends --------------------------------------------------------------------------


def destination(**fields: object) -> dict:
    return {"kind": "Destination", "service": "echo", **fields}


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll with a deadline, yielding to the loop (where a stream's end is read)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def out_edge(mesh: meshlib.Mesh) -> dict[str, int]:
    return dict(mesh.stats.edge("out", "echo").by_class)


async def test_mid_stream_failures_count_and_open_the_breaker(echo_fleet: EchoFleet, make_mesh) -> None:
    bad, bad_address = echo_fleet.start("bad", aio=True)
    bad.mid_stream = grpc.StatusCode.UNAVAILABLE
    _, good_address = echo_fleet.start("good", aio=True)
    breaker = {"consecutive_failures": 2, "backoff": {"base": "30s"}}
    mesh = make_mesh(endpoints("echo", [bad_address, good_address]), destination(circuit_breaker=breaker))
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
    failed = 0
    for i in range(6):
        try:
            if i % 2:
                assert len([p async for p in stub.Bidi(pings("a", "b"))]) == 2
            else:
                assert len([p async for p in stub.ServerStream(Ping(count=2))]) == 2
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAVAILABLE
            failed += 1
        await eventually(
            lambda failed=failed: mesh.stats.edge("out", "echo").failures == failed, "the stream judged"
        )
    assert failed == 2 and mesh.resilience.breakers.states()[bad_address] == "open"
    assert out_edge(mesh) == {"5xx": 2, "2xx": 4}
    servers = set()
    for _ in range(6):
        servers |= {p.server async for p in stub.ServerStream(Ping(count=1))}
    assert servers == {"good"} and bad.total() == 2


async def test_a_cancelled_aio_stream_gives_back_its_slot_and_is_no_verdict(
    echo_fleet: EchoFleet, make_mesh
) -> None:
    _, address = echo_fleet.start("a", aio=True)
    breaker = {"consecutive_failures": 1, "backoff": {"base": "30s"}}
    mesh = make_mesh(
        endpoints("echo", [address]), destination(max_concurrent_requests=1, circuit_breaker=breaker)
    )
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
    call = stub.ServerStream(Ping(count=20, delay_ms=50))
    assert (await call.read()).index == 0
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Unary(Ping())  # the open stream holds the only slot
    assert call.cancel() is True
    assert (await stub.Unary(Ping())).server == "a"
    assert out_edge(mesh) == {"error": 1, "4xx": 1, "2xx": 1}  # the stream once, as a 499

    reading = asyncio.Event()

    async def reader() -> None:
        async for _ in stub.Bidi(pings(*["x"] * 50)):
            reading.set()
            await asyncio.sleep(0.05)

    task = asyncio.ensure_future(reader())
    await asyncio.wait_for(reading.wait(), 5)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Unary(Ping())  # the bidi stream holds the slot now
    task.cancel()  # the reader is cancelled: the stream is given up
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: out_edge(mesh).get("4xx") == 2, "the cancelled stream counted")
    assert (await stub.Unary(Ping())).server == "a"
    assert mesh.resilience.breakers.states()[address] == "closed"
    assert out_edge(mesh) == {"error": 2, "4xx": 2, "2xx": 2}


async def test_an_aio_stream_cut_by_the_callers_deadline_is_no_verdict_one_cut_by_the_routes_timeout_is(
    echo_fleet: EchoFleet, make_mesh
) -> None:
    _, mine = echo_fleet.start("mine", aio=True)
    _, routed = echo_fleet.start("routed", aio=True)
    breaker = {"consecutive_failures": 1, "backoff": {"base": "30s"}}
    mesh = make_mesh(
        endpoints("echo", [mine]),
        destination(circuit_breaker=breaker),
        endpoints("timed", [routed]),
        {"kind": "Destination", "service": "timed", "circuit_breaker": breaker},
        {"kind": "Route", "service": "timed", "routes": [{"timeout": "300ms"}]},
    )
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in stub.ServerStream(Ping(count=5, delay_ms=200), timeout=0.3):
            pass
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    release = asyncio.Event()

    async def requests() -> AsyncIterator[echo_pb2.Ping]:  # a bidi stream the caller keeps open
        yield Ping(text="a")
        await release.wait()

    try:
        bidi = stub.Bidi(requests(), timeout=1.0)  # its first answer comes within it under load too
        assert (await bidi.read()).index == 0
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await bidi.read()
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        release.set()
    await eventually(lambda: out_edge(mesh) == {"5xx": 2}, "both streams counted as 504s")
    assert mesh.resilience.breakers.states()[mine] == "closed"  # no verdict on the endpoint

    timed = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("timed"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in timed.ServerStream(Ping(count=5, delay_ms=200)):
            pass
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(
        lambda: mesh.resilience.breakers.states()[routed] == "open", "the route's timeout judged"
    )


async def test_spans_of_a_failed_aio_stream(echo_fleet: EchoFleet, tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    knobs, address = echo_fleet.start("a", aio=True)
    knobs.mid_stream = grpc.StatusCode.UNAVAILABLE
    cfg = write_rules(tmp_path / "mesh.yaml", [endpoints("echo", [address])])
    with meshlib.Mesh("client", config=cfg, tracing=provider) as mesh:
        stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
        call = stub.Bidi(pings("a", "b"))
        assert (await call.read()).text == "a"
        assert exporter.get_finished_spans() == ()  # open: its spans wait for its end
        with pytest.raises(grpc.aio.AioRpcError):
            await call.read()
        assert await call.code() is grpc.StatusCode.UNAVAILABLE  # the status it ended with
        await eventually(lambda: len(exporter.get_finished_spans()) == 1, "the stream's span")
    spans = exporter.get_finished_spans()
    provider.shutdown()
    assert [s.name for s in spans] == ["meshlib.test.Echo/Bidi"]  # one attempt: the call's span alone
    for span in spans:
        assert span.attributes is not None
        assert not [key for key in span.attributes if key.startswith("http.")]
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
        assert span.status.status_code is StatusCode.ERROR


async def test_the_meshs_refusals_are_statuses_whether_a_unary_call_is_awaited_at_once_or_not(
    echo_fleet: EchoFleet, make_mesh
) -> None:
    _, address = echo_fleet.start("a", aio=True)
    mesh = make_mesh(endpoints("echo", [address]))
    nowhere = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("nowhere"))  # no endpoints: refused at once
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await nowhere.Unary(Ping())
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    later = nowhere.Unary(Ping())
    await asyncio.sleep(0)  # its task has started (and ended) before anything awaits it
    assert await later.code() is grpc.StatusCode.UNAVAILABLE and later.done()
    with pytest.raises(grpc.aio.AioRpcError) as raised:  # a deadline spent before the attempt: the stack's
        await stub.Unary(Ping(), timeout=1e-9)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    spent = stub.Unary(Ping(), timeout=1e-9)
    assert await spent.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert (await stub.Unary(Ping(text="ok"))).text == "ok"


async def test_a_unary_call_cancelled_or_dropped_before_it_starts_leaves_no_coroutine_unawaited(
    echo_fleet: EchoFleet, make_mesh
) -> None:
    _, address = echo_fleet.start("a", aio=True)
    mesh = make_mesh(endpoints("echo", [address]))
    stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
    nowhere = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("nowhere"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for each in (stub, nowhere):
            call = each.Unary(Ping())
            assert call.cancel()
            await asyncio.sleep(0.01)
            assert call.cancelled()
            del call
            dropped = each.Unary(Ping())
            del dropped
            await asyncio.sleep(0.01)
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
    assert (await stub.Unary(Ping(text="ok"))).text == "ok"


async def test_load_reports_reach_the_endpoints_load_through_the_aio_channel(make_mesh) -> None:
    """An asyncio server's trailers, read by the aio channel for a balancer that weighs by them."""
    with meshlib.Mesh("echo", load_reports=True) as served:
        served.load.set_application_utilization(0.25)
        served.load.period = 0.01  # a request rate after the first few calls
        server = grpc.aio.server(interceptors=aio_server_interceptors(served))
        echo_pb2_grpc.add_EchoServicer_to_server(AioEcho(), server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            mesh = make_mesh(endpoints("echo", [address]), destination(load_balancer="weighted_round_robin"))
            stub = echo_pb2_grpc.EchoStub(mesh.grpc_aio_channel("echo"))
            load = mesh.loads.get(address)
            deadline = time.monotonic() + 5.0
            while load.report is None and time.monotonic() < deadline:
                await stub.Unary(Ping(text="x"))  # a plain await: the mesh reads the trailers all the same
                await asyncio.sleep(0.01)
            assert load.report is not None and load.report.application_utilization == 0.25
        finally:
            await server.stop(None)
