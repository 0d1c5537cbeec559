"""MeshChannel against real grpcio servers on 127.0.0.1: generated stubs unchanged, balancing and
routing by the mesh, retries judged on gRPC codes, deadlines, health, the channel pool."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

import meshlib
from meshlib.context import InboundContext, inbound
from meshlib.grpc import channel as grpc_channel
from meshlib.grpc import server_interceptors
from meshlib.headers import MIRROR
from meshlib.rules import parse_documents
from tests.conftest import Fleet, wait_until, write_rules
from tests.grpc import echo_pb2, echo_pb2_grpc
from tests.grpc.echo_fleet import GRPC, EchoFleet, echo_fleet, endpoints
from tests.grpc.echo_servicers import Echo

__all__ = ["echo_fleet"]  # the fixture, used by name

Ping = echo_pb2.Ping


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


def stub_of(mesh: meshlib.Mesh, service: str = "echo") -> echo_pb2_grpc.EchoStub:
    return echo_pb2_grpc.EchoStub(mesh.grpc_channel(service))


def route(*rules: dict, service: str = "echo") -> dict:
    return {"kind": "Route", "service": service, "routes": list(rules)}


def destination(service: str = "echo", **fields: object) -> dict:
    return {"kind": "Destination", "service": service, **fields}


# -- stubs ------------------------------------------------------------------------------------


def test_generated_stubs_work_unchanged_for_all_four_kinds(echo_fleet: EchoFleet, make_mesh) -> None:
    _, address = echo_fleet.start("a")
    stub = stub_of(make_mesh(endpoints("echo", [address])))

    pong = stub.Unary(Ping(text="hi"), metadata=(("x-user", "ann"),))
    assert (pong.text, pong.server, pong.caller) == ("hi", "a", "client")
    assert pong.metadata["x-user"] == "ann"
    value, call = stub.Unary.with_call(Ping(text="with"))
    assert value.text == "with" and call.code() is grpc.StatusCode.OK
    assert stub.Unary.future(Ping(text="later")).result(timeout=5).text == "later"

    assert [p.index for p in stub.ServerStream(Ping(count=3))] == [0, 1, 2]
    assert stub.ClientStream(iter([Ping(text="a"), Ping(text="b")])).text == "a+b"
    assert stub.ClientStream.with_call(iter([Ping(text="c")]))[0].text == "c"
    assert [p.text for p in stub.Bidi(iter([Ping(text="x"), Ping(text="y")]))] == ["x", "y"]


def test_with_call_hands_over_an_ok_answers_metadata_with_and_without_retries(
    echo_fleet: EchoFleet, make_mesh
) -> None:
    """An OK answer's metadata are read only when asked for: still there for `with_call`."""
    knobs, address = echo_fleet.start("a")
    knobs.ok_trailing = (("x-note", "kept"),)
    plain = stub_of(make_mesh(endpoints("echo", [address])))
    retrying = stub_of(
        make_mesh(
            endpoints("echo", [address]),
            route({"name": "r", "retries": {"attempts": 2, "on": ["unavailable"]}}),
        )
    )
    for stub in (plain, retrying):
        value, call = stub.Unary.with_call(Ping(text="m"))
        assert value.text == "m"
        assert dict(call.trailing_metadata())["x-note"] == "kept"
        assert call.initial_metadata() is not None
    assert plain.Unary.future(Ping(text="f")).trailing_metadata() == (("x-note", "kept"),)


def test_a_status_is_raised_as_grpc_does_and_counted_by_its_http_status(
    echo_fleet: EchoFleet, make_mesh
) -> None:
    _, address = echo_fleet.start("a")
    mesh = make_mesh(endpoints("echo", [address]))
    stub = stub_of(mesh)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Unary(Ping(fail="NOT_FOUND"))
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as streamed:
        list(stub.ServerStream(Ping(count=2, fail="PERMISSION_DENIED")))
    assert streamed.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert stub.Unary(Ping()).server == "a"
    with pytest.raises(grpc.RpcError):
        stub.Unary(Ping(fail="UNAVAILABLE"))
    # NOT_FOUND is a 404, PERMISSION_DENIED a 403, UNAVAILABLE a 503 (meshlib.grpc.codes)
    assert mesh.stats.edge("out", "echo").by_class == {"4xx": 2, "2xx": 1, "5xx": 1}


# -- balancing and routing --------------------------------------------------------------------


def test_round_robin_spreads_rpcs_evenly_across_three_servers(echo_fleet: EchoFleet, make_mesh) -> None:
    addresses = [echo_fleet.start(name)[1] for name in ("a", "b", "c")]
    stub = stub_of(make_mesh(endpoints("echo", addresses)))
    seen = Counter(stub.Unary(Ping()).server for _ in range(30))
    assert seen == {"a": 10, "b": 10, "c": 10}


def subsets_docs(addresses: list[str], *rules: dict) -> list[dict]:
    labels = [{**GRPC, "version": "v1"}, {**GRPC, "version": "v2"}]
    return [
        endpoints("echo", addresses, labels),
        destination(subsets={"v1": {"version": "v1"}, "v2": {"version": "v2"}}),
        route(*rules),
    ]


def test_a_weighted_split_between_subsets(echo_fleet: EchoFleet, make_mesh) -> None:
    addresses = [echo_fleet.start(name)[1] for name in ("v1", "v2")]
    split = {"to": [{"subset": "v1", "weight": 80}, {"subset": "v2", "weight": 20}]}
    stub = stub_of(make_mesh(*subsets_docs(addresses, split)))
    seen = Counter(stub.Unary(Ping()).server for _ in range(400))
    assert 0.12 <= seen["v2"] / 400 <= 0.28, seen  # 20% expected; 5 sigma is about 0.10


def test_canary_by_metadata_and_method_name(echo_fleet: EchoFleet, make_mesh) -> None:
    addresses = [echo_fleet.start(name)[1] for name in ("v1", "v2")]
    canary = {"match": {"headers": {"x-canary": {"exact": "true"}}}, "to": [{"subset": "v2"}]}
    streams = {"match": {"path": {"exact": "/meshlib.test.Echo/ServerStream"}}, "to": [{"subset": "v2"}]}
    stub = stub_of(make_mesh(*subsets_docs(addresses, canary, streams, {"to": [{"subset": "v1"}]})))
    assert {stub.Unary(Ping(), metadata=(("X-Canary", "true"),)).server for _ in range(5)} == {"v2"}
    assert {stub.Unary(Ping()).server for _ in range(5)} == {"v1"}
    assert {p.server for p in stub.ServerStream(Ping(count=2))} == {"v2"}


def test_http_clients_never_pick_a_grpc_endpoint_and_grpc_prefers_its_own(
    echo_fleet: EchoFleet, fleet: Fleet, make_mesh
) -> None:
    _, grpc_address = echo_fleet.start("rpc")
    _, http_server = fleet.start("web")
    docs = endpoints("echo", [grpc_address, http_server.address], [GRPC, {}])
    mesh = make_mesh(docs)
    with mesh.sync_client() as client:
        assert {client.get("http://echo/whoami").json()["name"] for _ in range(10)} == {"web"}
    assert {stub_of(mesh).Unary(Ping()).server for _ in range(10)} == {"rpc"}


def test_a_grpc_channel_falls_back_to_unlabelled_endpoints(echo_fleet: EchoFleet, make_mesh) -> None:
    _, address = echo_fleet.start("plain")
    stub = stub_of(make_mesh(endpoints("echo", [address], [{}])))
    assert stub.Unary(Ping()).server == "plain"


def test_no_endpoint_is_unavailable(make_mesh) -> None:
    stub = stub_of(make_mesh(endpoints("echo", ["127.0.0.1:9"], [{"meshlib.io/protocol": "http"}])))
    with pytest.raises(grpc.RpcError) as raised:
        stub.Unary(Ping())
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "no endpoint" in (raised.value.details() or "")


def test_an_unknown_service_is_unavailable_and_says_why(make_mesh) -> None:
    mesh = make_mesh(endpoints("echo", ["127.0.0.1:9"]))
    with pytest.raises(grpc.RpcError) as raised:
        stub_of(mesh, "nowhere").Unary(Ping())
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "nowhere" in (raised.value.details() or "")
    with pytest.raises(grpc.RpcError) as streamed:
        next(stub_of(mesh, "nowhere").ServerStream(Ping()))
    assert streamed.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_target_no_rpc_could_ever_reach_is_refused_when_the_channel_is_made(make_mesh) -> None:
    """None, '' or 'Bad Name' failed only at the first RPC (AttributeError, UNAVAILABLE); a
    well-formed target outside the rules is still each RPC's question (the rules change)."""
    mesh = make_mesh(endpoints("echo", ["127.0.0.1:9"]))
    makers = {
        "mesh.grpc_channel(service)": mesh.grpc_channel,
        "mesh.grpc_aio_channel(service)": mesh.grpc_aio_channel,
    }
    cannot = ["", "Bad Name", "a/b", " echo", "-echo", "echo:0", "echo:65536", "echo:grpc", "[echo]:443"]
    schemes = ["dns:///echo:443", "xds:///echo", "unix:/tmp/echo.sock", "ipv4:127.0.0.1:50051"]
    can = [
        "echo",
        "Echo",
        "payments.example",
        "Payments.Example:443",
        "127.0.0.1:50051",
        "[::1]:50051",
        "::1",
    ]
    for name, make in makers.items():
        for wrong in (None, 443, b"echo"):
            with pytest.raises(TypeError, match=re.escape(f"{name} must be")):
                make(wrong)  # type: ignore[arg-type]
        for target in cannot + schemes:
            with pytest.raises(ValueError, match=re.escape(f"{name}: {target!r}")):
                make(target)
        with pytest.raises(ValueError, match="name-resolver scheme"):
            make("dns:///echo:443")
        with pytest.raises(ValueError, match=re.escape("1 to 253 lowercase letters")):
            make("Bad Name")
        for target in can:
            assert make(target).service == target
    with pytest.raises(grpc.RpcError) as later:  # well-formed, in no rules: refused by the RPC
        stub_of(mesh, "payments.example:443").Unary(Ping())
    assert later.value.code() is grpc.StatusCode.UNAVAILABLE


# -- retries ----------------------------------------------------------------------------------

RETRY_UNAVAILABLE = {
    "retries": {"attempts": 2, "on": ["unavailable"], "backoff": {"base": "1ms", "max": "2ms"}}
}


def test_a_retry_on_unavailable_lands_on_another_endpoint(echo_fleet: EchoFleet, make_mesh) -> None:
    bad, bad_address = echo_fleet.start("bad")
    bad.fail = grpc.StatusCode.UNAVAILABLE
    _, good_address = echo_fleet.start("good")
    mesh = make_mesh(endpoints("echo", [bad_address, good_address]), route(RETRY_UNAVAILABLE))
    stub = stub_of(mesh)
    assert {stub.Unary(Ping()).server for _ in range(10)} == {"good"}
    assert bad.total() >= 5  # round robin sent half the first tries there; each was retried
    assert mesh.stats.counter("retries", "echo") == bad.total()


def test_retries_are_judged_on_the_grpc_code_not_the_http_status(echo_fleet: EchoFleet, make_mesh) -> None:
    bad, address = echo_fleet.start("bad")
    bad.fail = grpc.StatusCode.UNKNOWN  # an HTTP 500, as INTERNAL is
    rule = {"retries": {"attempts": 3, "on": ["internal"], "backoff": {"base": "1ms", "max": "2ms"}}}
    stub = stub_of(make_mesh(endpoints("echo", [address]), route(rule)))
    with pytest.raises(grpc.RpcError) as raised:
        stub.Unary(Ping())
    assert raised.value.code() is grpc.StatusCode.UNKNOWN
    assert bad.total() == 1
    bad.fail = grpc.StatusCode.INTERNAL
    with pytest.raises(grpc.RpcError):
        stub.Unary(Ping())
    assert bad.total() == 1 + 3


def test_a_stream_is_retried_before_its_first_message_never_after(echo_fleet: EchoFleet, make_mesh) -> None:
    bad, bad_address = echo_fleet.start("bad")
    bad.fail = grpc.StatusCode.UNAVAILABLE
    good, good_address = echo_fleet.start("good")
    stub = stub_of(make_mesh(endpoints("echo", [bad_address, good_address]), route(RETRY_UNAVAILABLE)))
    for _ in range(4):  # those that reach "bad" first fail before any message: retried
        assert [p.server for p in stub.ServerStream(Ping(count=2))] == ["good", "good"]
    assert bad.calls["ServerStream"] >= 2
    bad.fail = None
    before = good.total() + bad.total()
    received = []
    with pytest.raises(grpc.RpcError) as raised:
        for p in stub.ServerStream(Ping(count=3, fail="UNAVAILABLE", fail_after=1)):
            received.append(p.index)
    assert received == [0]  # committed with the first message: the failure is the caller's
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert good.total() + bad.total() == before + 1


def test_pushback_is_waited_for_and_a_negative_one_stops_retries(echo_fleet: EchoFleet, make_mesh) -> None:
    bad, address = echo_fleet.start("bad")
    bad.fail = grpc.StatusCode.UNAVAILABLE
    bad.trailing = (("grpc-retry-pushback-ms", "300"),)
    stub = stub_of(make_mesh(endpoints("echo", [address]), route(RETRY_UNAVAILABLE)))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError):
        stub.Unary(Ping())
    assert time.monotonic() - started >= 0.3  # the backoff alone is 2 ms at most
    assert bad.total() == 2
    bad.trailing = (("grpc-retry-pushback-ms", "-1"),)
    with pytest.raises(grpc.RpcError):
        stub.Unary(Ping())
    assert bad.total() == 3  # not retried


# -- deadlines --------------------------------------------------------------------------------


def test_the_calls_timeout_is_a_deadline_exceeded(echo_fleet: EchoFleet, make_mesh) -> None:
    slow, address = echo_fleet.start("slow")
    slow.delay = 3.0  # far above the bound below: a stalled thread cannot blur the two
    rule = {"retries": {"attempts": 3, "on": ["deadline-exceeded", "5xx"]}}
    mesh = make_mesh(endpoints("echo", [address]), route(rule))
    stub = stub_of(mesh)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        stub.Unary(Ping(), timeout=0.1)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5
    assert slow.total() == 1  # the call's deadline passed: nothing left to retry in
    assert mesh.stats.edge("out", "echo").by_class == {"error": 1}  # DeadlineExceeded, as HTTP


def test_the_route_timeout_and_the_inbound_deadline_reach_the_server(
    echo_fleet: EchoFleet, make_mesh
) -> None:
    _, address = echo_fleet.start("a")
    stub = stub_of(make_mesh(endpoints("echo", [address]), route({"timeout": "2s"})))
    assert 1.0 < stub.Unary(Ping()).deadline <= 2.05
    # 1.5 s: each call may take a stalled thread's fraction of a second and still see its part
    token = inbound.set(InboundContext("client", None, deadline=time.monotonic() + 1.5))
    try:
        assert 0.5 < stub.Unary(Ping()).deadline <= 1.55  # the earlier of the two
        assert 0.5 < stub.Unary(Ping(), timeout=5).deadline <= 1.55
        assert 0.5 < stub.Unary.future(Ping()).result(timeout=5).deadline <= 1.55  # on another thread
    finally:
        inbound.reset(token)


def test_a_futures_deadline_starts_when_future_is_called_not_when_a_thread_takes_it(
    echo_fleet: EchoFleet, make_mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The channel's threads may all be busy: a call queued past its deadline fails with
    DEADLINE_EXCEEDED and is never sent, as grpc's own future would have failed by then."""
    monkeypatch.setattr(grpc_channel, "FUTURE_THREADS", 1)
    knobs, address = echo_fleet.start("a")
    mesh = make_mesh(endpoints("echo", [address]))
    stub = stub_of(mesh)
    busy = stub.Unary.future(Ping(text="busy", delay_ms=300))  # the only thread, for 300 ms
    late = stub.Unary.future(Ping(text="late"), timeout=0.1)  # queued behind it past its deadline
    patient = stub.Unary.future(Ping(text="patient"))  # no deadline: it waits its turn
    assert busy.result(timeout=5).text == "busy"
    with pytest.raises(grpc.RpcError) as raised:
        late.result(timeout=5)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert late.code() is grpc.StatusCode.DEADLINE_EXCEEDED and late.time_remaining() == 0.0
    assert patient.result(timeout=5).text == "patient"
    assert [m["x-mesh-source"] for m in knobs.metadata] == ["client", "client"]  # busy and patient
    assert knobs.total() == 2
    assert mesh.stats.edge("out", "echo").by_class == {"2xx": 2, "error": 1}


class Held(echo_pb2_grpc.EchoServicer):
    """Holds a `Unary(text="hold")` until grpc ends the RPC (a client's cancel, the server's
    stop): `entered` when one is in, `ended` when one was ended before it answered."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.ended = threading.Event()
        self.calls = 0

    def Unary(self, request: echo_pb2.Ping, context: grpc.ServicerContext) -> echo_pb2.Pong:
        self.calls += 1
        if request.text == "hold":
            over = threading.Event()
            context.add_callback(over.set)
            self.entered.set()
            if over.wait(30):
                self.ended.set()
        return echo_pb2.Pong(text=request.text, server="held")


def test_a_future_cancelled_in_flight_is_cancelled_at_the_server_and_gives_back_its_slot(
    make_mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grpc_channel, "FUTURE_THREADS", 1)
    held = Held()
    server = grpc.server(ThreadPoolExecutor(4))
    echo_pb2_grpc.add_EchoServicer_to_server(held, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        mesh = make_mesh(endpoints("echo", [address]), destination(max_concurrent_requests=1))
        stub = stub_of(mesh)
        future = stub.Unary.future(Ping(text="hold"))
        queued = stub.Unary.future(Ping(text="queued"))  # behind it: the channel's only thread
        assert held.entered.wait(5)
        assert queued.cancel() is True and queued.cancelled()  # still queued: never sent
        with pytest.raises(grpc.FutureCancelledError):
            queued.result(timeout=0)
        seen: list[object] = []
        future.add_done_callback(seen.append)
        assert future.running() and not future.done()
        assert future.cancel() is True
        assert future.cancelled() and future.done() and not future.running() and seen == [future]
        with pytest.raises(grpc.FutureCancelledError):
            future.result(timeout=0)  # at once, not when the thread is done with it
        with pytest.raises(grpc.FutureCancelledError):
            future.exception(timeout=0)
        assert future.code() is grpc.StatusCode.CANCELLED
        assert future.details() == "Locally cancelled by application!"
        assert future.cancel() is False  # done already
        assert held.ended.wait(5)  # the server saw the RPC end before it answered it
        bulkhead = mesh.resilience.bulkhead("echo", 1)
        wait_until(lambda: bulkhead.in_flight == 0, 5, "the cancelled call's slot back")
        assert stub.Unary(Ping(text="after")).text == "after"
        assert held.calls == 2  # the cancelled one and "after": "queued" was never sent
        done = stub.Unary.future(Ping(text="done"))
        assert done.result(timeout=5).text == "done" and done.cancel() is False and not done.cancelled()
        assert mesh.resilience.breakers.states().get(address, "closed") == "closed"
    finally:
        server.stop(None)


def test_the_budget_also_rides_as_x_mesh_timeout_rounded_down(echo_fleet: EchoFleet, make_mesh) -> None:
    # grpc-timeout may round up (a plain server here saw up to 1.509 s of a 1.5 s timeout); a
    # meshed server takes the smaller of both, so the budget never grows across a hop
    _, address = echo_fleet.start("a")
    stub = stub_of(make_mesh(endpoints("echo", [address])))
    pong = stub.Unary(Ping(), timeout=1.5)
    sent = int(pong.metadata["x-mesh-timeout"])
    assert 1000 < sent < 1500  # less the time to send it (a connect under load: not 100 ms)
    assert "x-mesh-timeout" not in stub.Unary(Ping()).metadata  # no deadline, no budget
    mine = stub.Unary(Ping(), timeout=1.5, metadata=(("x-mesh-timeout", "300"),))
    assert mine.metadata["x-mesh-timeout"] == "300"  # the caller's own is sent as given


def test_a_per_try_timeout_is_retried_on_another_endpoint(echo_fleet: EchoFleet, make_mesh) -> None:
    slow, slow_address = echo_fleet.start("slow")
    slow.delay = 3.0  # far above the bound below: a stalled thread cannot blur the two
    _, fast_address = echo_fleet.start("fast")
    # a try of 250 ms: fast's answers come within it on a loaded machine too
    rule = {"retries": {"attempts": 2, "per_try_timeout": "250ms", "on": ["deadline-exceeded"]}}
    stub = stub_of(make_mesh(endpoints("echo", [slow_address, fast_address]), route(rule)))
    started = time.monotonic()
    assert {stub.Unary(Ping()).server for _ in range(2)} == {"fast"}
    assert slow.total() >= 1 and time.monotonic() - started < 2.0  # each try there cut at 250 ms


# -- health, faults, mirror, hedge ------------------------------------------------------------


def test_a_failing_endpoint_is_ejected(echo_fleet: EchoFleet, make_mesh) -> None:
    bad, bad_address = echo_fleet.start("bad")
    bad.fail = grpc.StatusCode.UNAVAILABLE
    _, good_address = echo_fleet.start("good")
    outliers = {"consecutive_5xx": 3, "interval": "10s", "base_ejection": "30s"}
    mesh = make_mesh(endpoints("echo", [bad_address, good_address]), destination(outlier_detection=outliers))
    stub = stub_of(mesh)
    for _ in range(6):
        try:
            stub.Unary(Ping())
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAVAILABLE
    assert bad.total() == 3
    assert {stub.Unary(Ping()).server for _ in range(10)} == {"good"}
    assert bad.total() == 3


def test_a_breaker_opens_on_unavailable(echo_fleet: EchoFleet, make_mesh) -> None:
    bad, bad_address = echo_fleet.start("bad")
    bad.fail = grpc.StatusCode.UNAVAILABLE
    _, good_address = echo_fleet.start("good")
    breaker = {"consecutive_failures": 2, "backoff": {"base": "30s"}}
    mesh = make_mesh(endpoints("echo", [bad_address, good_address]), destination(circuit_breaker=breaker))
    stub = stub_of(mesh)
    answers = []
    for _ in range(12):
        try:
            answers.append(stub.Unary(Ping()).server)
        except grpc.RpcError as exc:
            answers.append(exc.code().name)
    assert bad.total() == 2  # two UNAVAILABLEs (503s) in a row opened its breaker
    assert answers.count("UNAVAILABLE") == 2 and answers.count("good") == 10
    assert mesh.resilience.breakers.states()[bad_address] == "open"


def test_the_bulkhead_holds_a_stream_until_it_ends(echo_fleet: EchoFleet, make_mesh) -> None:
    _, address = echo_fleet.start("a")
    mesh = make_mesh(endpoints("echo", [address]), destination(max_concurrent_requests=1))
    stub = stub_of(mesh)
    stream = stub.ServerStream(Ping(count=2))
    with pytest.raises(grpc.RpcError) as raised:
        stub.Unary(Ping())
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert mesh.stats.counter("bulkhead_rejected", "echo") == 1
    assert [p.index for p in stream] == [0, 1]
    assert stub.Unary(Ping()).server == "a"
    dropped = stub.ServerStream(Ping(count=5, delay_ms=50))
    assert next(dropped).index == 0
    del dropped  # a stream left unread is cancelled and gives its slot back
    assert stub.Unary(Ping()).server == "a"


def test_the_retry_budget_holds_for_rpcs(echo_fleet: EchoFleet, make_mesh) -> None:
    bad, address = echo_fleet.start("bad")
    bad.fail = grpc.StatusCode.UNAVAILABLE
    rule = {"retries": {"attempts": 3, "on": ["unavailable"], "budget": {"percent": 0, "min_per_second": 0}}}
    mesh = make_mesh(endpoints("echo", [address]), route(rule))
    with pytest.raises(grpc.RpcError):
        stub_of(mesh).Unary(Ping())
    assert bad.total() == 1 and mesh.stats.counter("budget_exhausted", "echo") == 1


def test_fault_injection_aborts_with_a_grpc_status_and_delays(echo_fleet: EchoFleet, make_mesh) -> None:
    knobs, address = echo_fleet.start("a")
    rule = {"match": {"headers": {"x-chaos": {"present": True}}}, "fault": {"abort": {"status": 429}}}
    slow = {"fault": {"delay": {"duration": "150ms"}}}
    stub = stub_of(make_mesh(endpoints("echo", [address]), route(rule, slow)))
    with pytest.raises(grpc.RpcError) as raised:
        stub.Unary(Ping(), metadata=(("x-chaos", "1"),))
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert knobs.total() == 0
    started = time.monotonic()
    assert stub.Unary(Ping()).server == "a"
    assert time.monotonic() - started >= 0.15


@pytest.mark.parametrize("status", [200, 204])
def test_a_2xx_abort_fails_every_call_style_with_unknown(
    echo_fleet: EchoFleet, make_mesh, status: int
) -> None:
    """A made-up answer has no response message: a 2xx abort must not pass for OK (None)."""
    knobs, address = echo_fleet.start("a")
    mesh = make_mesh(
        endpoints("echo", [address]), route({"name": "chaos", "fault": {"abort": {"status": status}}})
    )
    stub = stub_of(mesh)
    styles: dict[str, Any] = {
        "unary": lambda: stub.Unary(Ping()),
        "with_call": lambda: stub.Unary.with_call(Ping()),
        "future": lambda: stub.Unary.future(Ping()).result(timeout=5),
        "client stream": lambda: stub.ClientStream(iter([Ping()])),
        "client stream with_call": lambda: stub.ClientStream.with_call(iter([Ping()])),
        "server stream": lambda: list(stub.ServerStream(Ping(count=2))),
        "bidi": lambda: list(stub.Bidi(iter([Ping()]))),
    }
    for style, rpc in styles.items():
        with pytest.raises(grpc.RpcError) as raised:
            rpc()
        error: Any = raised.value
        assert error.code() is grpc.StatusCode.UNKNOWN, style
        assert "fault" in error.details() and "'chaos'" in error.details() and str(status) in error.details()
    assert knobs.total() == 0
    assert mesh.stats.edge("out", "echo").by_class == {"5xx": len(styles)}  # UNKNOWN: a 500


def test_unary_calls_are_mirrored_to_a_subset(echo_fleet: EchoFleet, make_mesh) -> None:
    addresses = [echo_fleet.start(name)[1] for name in ("v1", "v2")]
    shadow = echo_fleet.knobs[addresses[1]]
    rule = {"to": [{"subset": "v1"}], "mirror": {"subset": "v2"}}
    stub = stub_of(make_mesh(*subsets_docs(addresses, rule)))
    assert {stub.Unary(Ping()).server for _ in range(3)} == {"v1"}
    wait_until(lambda: shadow.calls.get("Unary") == 3, 5, "three mirrored copies")
    assert [p.server for p in stub.ServerStream(Ping(count=1))] == ["v1"]
    assert "ServerStream" not in shadow.calls  # streams are not mirrored
    assert all(seen.get(MIRROR) == "1" for seen in shadow.metadata)


def test_a_slow_unary_call_is_hedged(echo_fleet: EchoFleet, make_mesh) -> None:
    slow, slow_address = echo_fleet.start("slow")
    slow.delay = 3.0  # far above the bound below: a stalled thread cannot blur the two
    _, fast_address = echo_fleet.start("fast")
    rule = {"hedge": {"delay": "30ms"}, "retries": {"attempts": 1}}
    stub = stub_of(make_mesh(endpoints("echo", [slow_address, fast_address]), route(rule)))
    started = time.monotonic()
    assert {stub.Unary(Ping()).server for _ in range(2)} == {"fast"}
    assert time.monotonic() - started < 2.0 and slow.total() >= 1


# -- the pool ---------------------------------------------------------------------------------


def test_one_channel_per_endpoint_reused_and_closed_when_it_leaves(echo_fleet: EchoFleet, make_mesh) -> None:
    addresses = [echo_fleet.start(name)[1] for name in ("a", "b", "c")]
    mesh = make_mesh(endpoints("echo", addresses))
    channel = mesh.grpc_channel("echo")
    stub = echo_pb2_grpc.EchoStub(channel)
    for _ in range(30):
        stub.Unary(Ping())
    list(stub.ServerStream(Ping(count=2)))
    pool = channel.pool
    assert pool.opened == 3 and set(pool.channels()) == set(addresses)
    assert stub_of(mesh).Unary(Ping()) and pool.opened == 3  # another MeshChannel shares the pool
    gone = pool.channels()[addresses[2]]
    mesh.apply_rules(parse_documents([endpoints("echo", addresses[:2])]), "c left")
    assert set(pool.channels()) == set(addresses[:2]) and pool.closed == 1
    with pytest.raises(ValueError):  # grpc's own answer on a closed channel
        gone.unary_unary("/meshlib.test.Echo/Unary")(b"")
    assert {stub.Unary(Ping()).server for _ in range(4)} == {"a", "b"} and pool.opened == 3


# -- telemetry --------------------------------------------------------------------------------


def test_spans_follow_the_rpc_conventions_and_trace_context_rides_in_metadata(
    echo_fleet: EchoFleet, tmp_path: Path
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _, address = echo_fleet.start("a")
    cfg = write_rules(tmp_path / "mesh.yaml", [endpoints("echo", [address])])
    with meshlib.Mesh("client", config=cfg, tracing=provider) as mesh:
        pong = stub_of(mesh).Unary(Ping())
    spans = {s.name: s for s in exporter.get_finished_spans()}
    provider.shutdown()
    assert list(spans) == ["meshlib.test.Echo/Unary"], "one attempt: one span, the call's"
    request = spans["meshlib.test.Echo/Unary"]
    assert request.attributes is not None
    assert request.attributes["rpc.system"] == "grpc"
    assert request.attributes["rpc.service"] == "meshlib.test.Echo"
    assert request.attributes["rpc.method"] == "Unary"
    assert request.attributes["rpc.grpc.status_code"] == 0
    assert request.attributes["mesh.endpoint"] == address
    trace_id, span_id = pong.metadata["traceparent"].split("-")[1:3]
    assert int(trace_id, 16) == request.context.trace_id and int(span_id, 16) == request.context.span_id


def test_a_call_the_mesh_refuses_has_the_code_the_caller_gets_on_its_span(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cfg = write_rules(tmp_path / "mesh.yaml", [endpoints("echo", [])])  # no endpoint to take it
    with meshlib.Mesh("client", config=cfg, tracing=provider) as m, pytest.raises(grpc.RpcError) as refused:
        stub_of(m).Unary(Ping())
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    (request,) = [s for s in exporter.get_finished_spans() if s.name == "meshlib.test.Echo/Unary"]
    provider.shutdown()
    assert request.attributes is not None
    assert request.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert request.attributes["error.type"] == "NoEndpointsError"


# -- how a stream ends --------------------------------------------------------------------------


def out_edge(mesh: meshlib.Mesh) -> dict[str, int]:
    return dict(mesh.stats.edge("out", "echo").by_class)


def test_a_stream_that_fails_after_its_first_message_counts_as_a_failure_once(
    echo_fleet: EchoFleet, make_mesh
) -> None:
    _, address = echo_fleet.start("a")
    mesh = make_mesh(endpoints("echo", [address]))
    stub = stub_of(mesh)
    received = []
    with pytest.raises(grpc.RpcError) as raised:
        for p in stub.ServerStream(Ping(count=3, fail="UNAVAILABLE", fail_after=1)):
            received.append(p.index)
    assert received == [0] and raised.value.code() is grpc.StatusCode.UNAVAILABLE
    wait_until(lambda: out_edge(mesh) == {"5xx": 1}, 5, "the stream counted as a 503")
    assert [p.index for p in stub.ServerStream(Ping(count=2))] == [0, 1]
    wait_until(lambda: out_edge(mesh) == {"5xx": 1, "2xx": 1}, 5, "the good stream counted once")
    with pytest.raises(grpc.RpcError) as raised:
        for _ in stub.ServerStream(Ping(count=5, delay_ms=200), timeout=0.3):
            pass
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # the deadline, mid-stream
    wait_until(lambda: out_edge(mesh) == {"5xx": 2, "2xx": 1}, 5, "the deadline counted as a 504")
    time.sleep(0.05)  # nothing else is counted late (grpc's done callback comes after the caller's end)
    assert out_edge(mesh) == {"5xx": 2, "2xx": 1}


def test_consecutive_mid_stream_unavailables_eject_the_endpoint(echo_fleet: EchoFleet, make_mesh) -> None:
    bad, bad_address = echo_fleet.start("bad")
    bad.mid_stream = grpc.StatusCode.UNAVAILABLE
    good, good_address = echo_fleet.start("good")
    outliers = {"consecutive_5xx": 3, "interval": "10s", "base_ejection": "30s"}
    mesh = make_mesh(endpoints("echo", [bad_address, good_address]), destination(outlier_detection=outliers))
    stub = stub_of(mesh)
    failed = 0
    for _ in range(8):
        try:
            assert [p.index for p in stub.ServerStream(Ping(count=3))] == [0, 1, 2]
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAVAILABLE
            failed += 1
        # each stream is judged when it ends: wait for that before the next pick
        wait_until(
            lambda failed=failed: mesh.stats.edge("out", "echo").failures == failed, 5, "the stream judged"
        )
    assert failed == 3 and bad.calls["ServerStream"] == 3  # each began with a message: committed
    assert {p.server for _ in range(6) for p in stub.ServerStream(Ping(count=1))} == {"good"}
    assert bad.calls["ServerStream"] == 3 and good.calls["ServerStream"] == 5 + 6


def test_a_bidi_stream_failing_mid_stream_opens_the_breaker(echo_fleet: EchoFleet, make_mesh) -> None:
    bad, bad_address = echo_fleet.start("bad")
    bad.mid_stream = grpc.StatusCode.INTERNAL
    _, good_address = echo_fleet.start("good")
    breaker = {"consecutive_failures": 2, "backoff": {"base": "30s"}}
    mesh = make_mesh(endpoints("echo", [bad_address, good_address]), destination(circuit_breaker=breaker))
    stub = stub_of(mesh)
    failed = 0
    for _ in range(6):
        try:
            assert len(list(stub.Bidi(iter([Ping(text="a"), Ping(text="b")])))) == 2
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.INTERNAL  # a 500: a failure to the breaker
            failed += 1
        wait_until(
            lambda failed=failed: mesh.stats.edge("out", "echo").failures == failed, 5, "the stream judged"
        )
    assert failed == 2 and mesh.resilience.breakers.states()[bad_address] == "open"
    assert {p.server for _ in range(6) for p in stub.Bidi(iter([Ping(text="a")]))} == {"good"}
    assert bad.calls["Bidi"] == 2


def test_a_cancelled_stream_gives_back_its_slot_and_is_no_verdict_on_the_endpoint(
    echo_fleet: EchoFleet, make_mesh
) -> None:
    _, address = echo_fleet.start("a")
    breaker = {"consecutive_failures": 1, "backoff": {"base": "30s"}}
    outliers = {"consecutive_5xx": 1, "interval": "10s", "base_ejection": "30s"}
    mesh = make_mesh(
        endpoints("echo", [address]),
        destination(max_concurrent_requests=1, circuit_breaker=breaker, outlier_detection=outliers),
    )
    stub = stub_of(mesh)
    stream = stub.ServerStream(Ping(count=20, delay_ms=50))
    assert next(stream).index == 0
    (endpoint,) = mesh.snapshot.grpc_plan("echo").endpoints
    assert endpoint.load.outstanding == 1  # the open stream is load on its endpoint
    with pytest.raises(grpc.RpcError):
        stub.Unary(Ping())  # the open stream holds the only slot
    assert stream.cancel() is True
    assert stream.code() is grpc.StatusCode.CANCELLED
    assert endpoint.load.outstanding == 0
    assert stub.Unary(Ping()).server == "a"  # its slot is back at once
    assert mesh.resilience.breakers.states()[address] == "closed"
    assert out_edge(mesh) == {"error": 1, "4xx": 1, "2xx": 1}  # the stream once, as a 499
    bidi = stub.Bidi(iter([Ping(text="a")] * 50))
    assert next(bidi).index == 0
    del bidi  # dropped unread: cancelled too
    assert stub.Unary(Ping()).server == "a"
    assert mesh.resilience.breakers.states()[address] == "closed"
    assert out_edge(mesh) == {"error": 1, "4xx": 2, "2xx": 2}


def _waited_and_timed(make_mesh: Any, mine: str, routed: str, timeout: str) -> meshlib.Mesh:
    """`echo` on `mine` and `timed` on `routed` (with a route `timeout`), each endpoint's breaker
    opened by one failure."""
    breaker = {"consecutive_failures": 1, "backoff": {"base": "30s"}}
    return make_mesh(
        endpoints("echo", [mine]),
        destination(circuit_breaker=breaker),
        endpoints("timed", [routed]),
        destination("timed", circuit_breaker=breaker),
        route({"timeout": timeout}, service="timed"),
    )


def test_a_unary_call_cut_by_the_callers_deadline_is_no_verdict_one_cut_by_the_routes_timeout_is(
    echo_fleet: EchoFleet, make_mesh
) -> None:
    waited, mine = echo_fleet.start("mine")
    timed, routed = echo_fleet.start("routed")
    waited.delay = timed.delay = 1.0  # far past both bounds below
    mesh = _waited_and_timed(make_mesh, mine, routed, "150ms")
    for stub, timeout in ((stub_of(mesh), 0.15), (stub_of(mesh, "timed"), None)):
        with pytest.raises(grpc.RpcError) as raised:
            stub.Unary(Ping(), timeout=timeout)
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    states = mesh.resilience.breakers.states()
    assert states[mine] == "closed" and states[routed] == "open"
    waited.delay = 0.0
    assert stub_of(mesh).Unary(Ping()).server == "mine"


def test_a_stream_cut_by_the_callers_deadline_is_no_verdict_one_cut_by_the_routes_timeout_is(
    echo_fleet: EchoFleet, make_mesh
) -> None:
    # the caller's deadline says how long the caller waits, not how long the endpoint may take:
    # a stream it ends is no verdict (as an HTTP body it cuts); the route's timeout
    # is the owner's word on the endpoint, and a stream it ends is a 504 against it
    _, mine = echo_fleet.start("mine")
    _, routed = echo_fleet.start("routed")
    mesh = _waited_and_timed(make_mesh, mine, routed, "300ms")
    stub = stub_of(mesh)
    with pytest.raises(grpc.RpcError) as raised:
        for _ in stub.ServerStream(Ping(count=5, delay_ms=200), timeout=0.3):
            pass
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    release = threading.Event()

    def requests() -> Iterator[echo_pb2.Ping]:  # a bidi stream the caller keeps open
        yield Ping(text="a")
        release.wait(5)

    try:
        bidi = stub.Bidi(requests(), timeout=1.0)  # its first answer comes within it under load too
        assert next(bidi).index == 0
        with pytest.raises(grpc.RpcError) as raised:
            next(bidi)
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        release.set()
    wait_until(lambda: out_edge(mesh) == {"5xx": 2}, 5, "both streams counted as 504s")
    assert mesh.resilience.breakers.states()[mine] == "closed"  # no verdict on the endpoint
    assert [p.index for p in stub.ServerStream(Ping(count=2))] == [0, 1]

    timed = stub_of(mesh, "timed")
    with pytest.raises(grpc.RpcError) as raised:
        for _ in timed.ServerStream(Ping(count=5, delay_ms=200)):
            pass
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: mesh.resilience.breakers.states()[routed] == "open", 5, "the route's timeout judged")


def test_the_deadline_bounds_the_wait_for_a_streams_first_message(echo_fleet: EchoFleet, make_mesh) -> None:
    slow, address = echo_fleet.start("slow")
    slow.delay = 2.0
    stub = stub_of(make_mesh(endpoints("echo", [address])))
    started = time.monotonic()
    stream = stub.ServerStream(Ping(count=2), timeout=0.3)  # returns once the status is in
    assert 0.25 <= time.monotonic() - started < 1.5
    with pytest.raises(grpc.RpcError) as raised:
        next(stream)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_spans_of_a_failed_and_a_cancelled_stream(echo_fleet: EchoFleet, tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _, address = echo_fleet.start("a")
    cfg = write_rules(tmp_path / "mesh.yaml", [endpoints("echo", [address])])
    with meshlib.Mesh("client", config=cfg, tracing=provider) as mesh:
        stub = stub_of(mesh)
        stub.Unary(Ping())
        with pytest.raises(grpc.RpcError):
            list(stub.ServerStream(Ping(count=3, fail="UNAVAILABLE", fail_after=1)))
        wait_until(lambda: len(exporter.get_finished_spans()) == 2, 5, "the failed stream's span")
        stream = stub.ServerStream(Ping(count=20, delay_ms=50))
        next(stream)
        stream.cancel()
        wait_until(lambda: len(exporter.get_finished_spans()) == 3, 5, "the cancelled stream's span")
    spans = exporter.get_finished_spans()
    provider.shutdown()
    for span in spans:  # the rpc conventions only: no http.* attribute on a gRPC span
        assert span.attributes is not None
        assert not [key for key in span.attributes if key.startswith("http.")], span.name
    unary, failed, cancelled = spans[0:1], spans[1:2], spans[2:3]  # one attempt each: one span each
    for span in unary:
        assert span.attributes["rpc.grpc.status_code"] == 0 and span.status.status_code is StatusCode.UNSET
    for span in failed:
        assert span.name.startswith("meshlib.test.Echo/ServerStream")
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
        assert span.attributes["error.type"] == "14"
        assert span.status.status_code is StatusCode.ERROR
    for span in cancelled:
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
        assert span.attributes["mesh.cancelled"] is True
        assert span.status.status_code is StatusCode.UNSET


def test_a_stream_read_short_of_its_end_still_ends_when_the_server_ends_it(
    echo_fleet: EchoFleet, make_mesh
) -> None:
    _, address = echo_fleet.start("a")
    mesh = make_mesh(endpoints("echo", [address]), destination(max_concurrent_requests=1))
    stub = stub_of(mesh)
    stream = stub.ServerStream(Ping(count=2))
    assert [next(stream).index, next(stream).index] == [0, 1]  # never told of the end by a read
    wait_until(lambda: out_edge(mesh) == {"2xx": 1}, 5, "grpc's end of the stream")
    assert stub.Unary(Ping()).server == "a"  # the slot is back while the caller holds the stream
    assert stream.code() is grpc.StatusCode.OK
    with pytest.raises(StopIteration):
        next(stream)
    assert out_edge(mesh) == {"2xx": 2}  # the read of the end does not count it again


def test_a_streams_access_log_line_keeps_the_callers_trace_when_grpc_ends_it(
    echo_fleet: EchoFleet, tmp_path: Path
) -> None:
    import json

    from meshlib.telemetry import tracing

    _, address = echo_fleet.start("a")
    log_file = tmp_path / "access.log"
    cfg = write_rules(tmp_path / "mesh.yaml", [endpoints("echo", [address])])
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with meshlib.Mesh("client", config=cfg, tracing=False, access_log=log_file) as mesh:
        stub = stub_of(mesh)
        # grpc's thread runs while RPCs are open, in the context of the call that started it:
        # one started outside the trace keeps it running for the traced stream
        keeper = stub.ServerStream(Ping(count=2, delay_ms=600))
        assert next(keeper).index == 0
        carried = tracing.CARRIED.set((f"00-{trace_id}-00f067aa0ba902b7-01", None))
        try:
            stream = stub.ServerStream(Ping(count=2, delay_ms=100))
            assert [next(stream).index, next(stream).index] == [0, 1]  # its end comes on grpc's thread
        finally:
            tracing.CARRIED.reset(carried)
        wait_until(lambda: log_file.exists() and log_file.read_text().strip() != "", 5, "the stream's line")
        keeper.cancel()
    entry = json.loads(log_file.read_text().splitlines()[0])
    assert (entry["direction"], entry["status"], entry["trace_id"]) == ("out", 200, trace_id)
    assert entry["duration_ms"] >= 100  # the whole stream, not the time to its first message


def test_an_adaptive_limit_holds_a_stream_until_it_ends(echo_fleet: EchoFleet, make_mesh) -> None:
    """adaptive_concurrency in the bulkhead's slot: pinned to one call while its minRTT is
    measured, a stream holds it to the end, and its latency is learnt then."""
    _, address = echo_fleet.start("a")
    spec = {"min_limit": 1, "gradient": {"min_rtt": {"concurrency": 1, "requests": 50}}}
    mesh = make_mesh(endpoints("echo", [address]), destination(adaptive_concurrency=spec))
    stub = stub_of(mesh)
    stream = stub.ServerStream(Ping(count=2))
    with pytest.raises(grpc.RpcError) as raised:
        stub.Unary(Ping())
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert mesh.stats.counter("concurrency_limited", "echo") == 1
    assert [p.index for p in stream] == [0, 1]
    assert stub.Unary(Ping()).server == "a"
    (limiter,) = [lim for _, _, lim in mesh.resilience.concurrency_limits()]
    assert limiter.in_flight == 0
    assert len(limiter.limit._rtts) == 2  # the stream's latency and the call's, measured


def test_load_reports_in_the_trailers_reach_the_endpoints_load(make_mesh) -> None:
    """A balancer that weighs by reports gets them from gRPC's trailing metadata."""
    with meshlib.Mesh("echo", load_reports=True) as served:
        served.load.set_application_utilization(0.25)
        served.load.period = 0.01  # a request rate after the first few calls
        server = grpc.server(ThreadPoolExecutor(2), interceptors=server_interceptors(served))
        echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()
        try:
            mesh = make_mesh(endpoints("echo", [address]), destination(load_balancer="weighted_round_robin"))
            stub = stub_of(mesh)
            load = mesh.loads.get(address)

            def reported() -> bool:
                stub.Unary(Ping(text="x"))  # a plain call: the mesh reads the trailers all the same
                return load.report is not None

            wait_until(reported, 5.0, "a load report on the endpoint's load")
            assert load.report is not None and load.report.application_utilization == 0.25
            assert load.report.rps_fractional > 0
        finally:
            server.stop(None).wait()
