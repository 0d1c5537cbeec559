"""The sync server interceptor on a real `grpc.server` on 127.0.0.1, called through plain grpc
channels: the inbound sequence (caller, authorization, rate limit, deadline, stats, spans) for
all four kinds of call."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from opentelemetry.trace import StatusCode

import meshlib
from meshlib.balancing.orca import HEADER, parse_report
from meshlib.grpc import server_interceptors
from meshlib.grpc.calls import PUSHBACK
from meshlib.rules import parse_documents
from meshlib.testing import serve
from tests.conftest import wait_until
from tests.grpc import echo_pb2, echo_pb2_grpc
from tests.grpc.echo_servicers import Echo
from tests.telemetry.conftest import Traces

FROM_CHECKOUT = (("x-mesh-source", "checkout"),)
ONLY_BILLING = [{"kind": "Authorization", "service": "orders", "allow": [{"from": ["billing"]}]}]
ONE_PER_SECOND = [{"kind": "RateLimit", "service": "orders", "requests_per_second": 1, "burst": 1}]


@dataclass
class Served:
    mesh: meshlib.Mesh
    servicer: Echo
    stub: echo_pb2_grpc.EchoStub


def start(mesh: meshlib.Mesh, workers: int = 4) -> tuple[grpc.Server, Echo, grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(workers), interceptors=server_interceptors(mesh))
    servicer = Echo()
    echo_pb2_grpc.add_EchoServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, servicer, grpc.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture
def served() -> Iterator[Served]:
    with meshlib.Mesh("orders") as mesh:
        server, servicer, channel = start(mesh)
        try:
            yield Served(mesh, servicer, echo_pb2_grpc.EchoStub(channel))
        finally:
            channel.close()
            server.stop(None).wait()


def pings(*texts: str) -> Iterator[echo_pb2.Ping]:
    return iter([echo_pb2.Ping(text=t) for t in texts])


def test_all_four_kinds_pass_through_see_the_caller_and_are_counted(served: Served) -> None:
    stub = served.stub
    assert stub.Unary(echo_pb2.Ping(text="a"), metadata=FROM_CHECKOUT).caller == "checkout"
    streamed = list(stub.ServerStream(echo_pb2.Ping(text="s", count=3), metadata=FROM_CHECKOUT))
    assert [(p.index, p.caller) for p in streamed] == [(0, "checkout"), (1, "checkout"), (2, "checkout")]
    gathered = stub.ClientStream(pings("x", "y"), metadata=FROM_CHECKOUT)
    assert (gathered.text, gathered.caller) == ("x,y", "checkout")
    echoed = list(stub.Bidi(pings("p", "q"), metadata=FROM_CHECKOUT))
    assert [(p.text, p.caller) for p in echoed] == [("p", "checkout"), ("q", "checkout")]
    edge = served.mesh.stats.edge("in", "checkout")
    assert edge.by_class == {"2xx": 4}


def test_the_callers_context_does_not_stay_on_the_pool_thread() -> None:
    """One worker thread serves both calls: the second, from nobody, sees no caller."""
    with meshlib.Mesh("orders") as mesh:
        server, _, channel = start(mesh, workers=1)
        try:
            stub = echo_pb2_grpc.EchoStub(channel)
            list(stub.ServerStream(echo_pb2.Ping(count=2), metadata=FROM_CHECKOUT))
            assert stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT).caller == "checkout"
            assert stub.Unary(echo_pb2.Ping()).caller == ""
            assert [p.caller for p in stub.ServerStream(echo_pb2.Ping(count=1))] == [""]
            assert meshlib.context.current() is None
        finally:
            channel.close()
            server.stop(None).wait()


def test_authorization_denies_with_permission_denied_and_the_reason(served: Served) -> None:
    served.mesh.apply_rules(parse_documents(ONLY_BILLING), "1")
    for call in (
        lambda: served.stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT),
        lambda: list(served.stub.ServerStream(echo_pb2.Ping(count=2), metadata=FROM_CHECKOUT)),
        lambda: served.stub.ClientStream(pings("a"), metadata=FROM_CHECKOUT),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == (
        "RBAC: access denied: source checkout may not POST /meshlib.test.Echo/ClientStream"
    )
    assert served.servicer.calls == 0
    assert served.stub.Unary(echo_pb2.Ping(), metadata=(("x-mesh-source", "billing"),)).caller == "billing"
    assert served.mesh.stats.counter("denied", "orders") == 3
    assert served.mesh.stats.edge("in", "checkout").by_class == {"4xx": 3}


def test_a_rate_limit_answers_resource_exhausted_with_pushback(served: Served) -> None:
    served.mesh.apply_rules(parse_documents(ONE_PER_SECOND), "1")
    served.stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT)
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT)
    error = caught.value
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(error.trailing_metadata())
    assert trailing[PUSHBACK] == "1000"
    assert trailing["retry-after"] == "1"
    assert served.servicer.calls == 1
    assert served.mesh.stats.counter("rate_limited", "orders") == 1
    assert served.mesh.stats.edge("in", "checkout").by_class == {"2xx": 1, "4xx": 1}


class Blocking:
    """A limiter that blocks as a Redis-backed one does (`blocking`): notes where it is asked."""

    blocking = True

    def __init__(self) -> None:
        self.threads: list[str] = []

    def try_acquire(self) -> float:
        self.threads.append(threading.current_thread().name)
        return 0.0 if len(self.threads) == 1 else 0.4


def test_a_limit_that_waits_on_the_network_is_asked_on_the_pool_thread(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = Blocking()
    monkeypatch.setattr(served.mesh.resilience, "limiter", lambda doc: limiter)
    served.mesh.apply_rules(parse_documents(ONE_PER_SECOND), "1")
    assert served.stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT).caller == "checkout"
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(caught.value.trailing_metadata())[PUSHBACK] == "1000"  # 0.4 s: one whole second
    assert len(limiter.threads) == 2
    assert threading.current_thread().name not in limiter.threads


def test_the_incoming_deadline_is_the_inbound_deadline(served: Served) -> None:
    stub = served.stub
    assert stub.Unary(echo_pb2.Ping()).deadline == 0.0  # no deadline at all
    assert 2.0 < stub.Unary(echo_pb2.Ping(), timeout=3).deadline <= 3.1
    # both sent: the smaller wins, whichever it is
    assert (
        0.5 < stub.Unary(echo_pb2.Ping(), timeout=3, metadata=(("x-mesh-timeout", "1000"),)).deadline <= 1.0
    )
    assert (
        2.0 < stub.Unary(echo_pb2.Ping(), timeout=3, metadata=(("x-mesh-timeout", "9000"),)).deadline <= 3.1
    )
    streamed = list(stub.ServerStream(echo_pb2.Ping(count=2), timeout=3))
    assert all(2.0 < p.deadline <= 3.1 for p in streamed)
    assert 2.0 < stub.ClientStream(pings("a"), timeout=3).deadline <= 3.1


async def budget(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An HTTP service answering with the deadline budget it was sent (`x-mesh-timeout`, ms)."""
    sent = dict(scope["headers"]).get(b"x-mesh-timeout", b"none")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": sent})


class Forwarding(Echo):
    """Unary calls the HTTP service `inventory` through the mesh and answers with its budget."""

    def __init__(self, mesh: meshlib.Mesh) -> None:
        super().__init__()
        self.mesh = mesh

    def Unary(self, request: echo_pb2.Ping, context: grpc.ServicerContext) -> echo_pb2.Pong:
        with self.mesh.sync_client() as client:
            return echo_pb2.Pong(text=client.get("http://inventory/").text)


def test_the_servicers_http_calls_inherit_the_incoming_deadline() -> None:
    with serve(budget) as inventory, meshlib.Mesh("orders") as mesh:
        endpoints = [
            {"kind": "Endpoints", "service": "inventory", "endpoints": [{"address": inventory.address}]}
        ]
        mesh.apply_rules(parse_documents(endpoints), "1")
        server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=server_interceptors(mesh))
        echo_pb2_grpc.add_EchoServicer_to_server(Forwarding(mesh), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = echo_pb2_grpc.EchoStub(channel)
                assert 1000 < float(stub.Unary(echo_pb2.Ping(), timeout=1.5).text) <= 1500
                assert stub.Unary(echo_pb2.Ping()).text == "none"  # no deadline, none passed on
        finally:
            server.stop(None).wait()


def test_statuses_the_servicer_answers_with_are_counted_by_their_http_class(served: Served) -> None:
    stub = served.stub
    with pytest.raises(grpc.RpcError) as caught:
        stub.Unary(echo_pb2.Ping(text="raise"), metadata=FROM_CHECKOUT)
    assert caught.value.code() is grpc.StatusCode.UNKNOWN
    with pytest.raises(grpc.RpcError) as caught:
        stub.Unary(echo_pb2.Ping(fail="NOT_FOUND"), metadata=FROM_CHECKOUT)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for p in stub.ServerStream(
            echo_pb2.Ping(count=4, fail="UNAVAILABLE", fail_after=2), metadata=FROM_CHECKOUT
        ):
            received.append(p.index)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert received == [0, 1]
    edge = served.mesh.stats.edge("in", "checkout")
    assert edge.by_class == {"5xx": 2, "4xx": 1}
    assert edge.failures == 2


def test_a_stream_the_caller_cancels_is_counted_as_cancelled(served: Served) -> None:
    call = served.stub.ServerStream(echo_pb2.Ping(count=1000, delay_ms=5), metadata=FROM_CHECKOUT)
    assert next(call).index == 0
    call.cancel()
    stats = served.mesh.stats
    wait_until(
        lambda: stats.edge("in", "checkout").by_class == {"4xx": 1}, timeout=5, what="the cancel counted"
    )
    assert stats.edge("in", "checkout").total == 1


def test_spans_and_the_access_log_show_the_calls(caplog: pytest.LogCaptureFixture) -> None:
    """Spans in the rpc conventions; one access-log line per call, its gRPC status by HTTP class."""
    caplog.set_level(logging.INFO, logger="meshlib.access")
    traces = Traces()
    with meshlib.Mesh("orders", tracing=traces.provider, access_log=True) as mesh:
        server, _, channel = start(mesh)
        try:
            stub = echo_pb2_grpc.EchoStub(channel)
            stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT)
            with pytest.raises(grpc.RpcError):
                stub.Unary(echo_pb2.Ping(fail="UNAVAILABLE"))
            ok, failed = traces.wait_for(2)
        finally:
            channel.close()
            server.stop(None).wait()
            traces.provider.shutdown()
    assert ok.name == "meshlib.test.Echo/Unary"
    assert ok.attributes is not None and failed.attributes is not None
    assert {
        k: ok.attributes[k] for k in ("rpc.system", "rpc.service", "rpc.method", "rpc.grpc.status_code")
    } == {
        "rpc.system": "grpc",
        "rpc.service": "meshlib.test.Echo",
        "rpc.method": "Unary",
        "rpc.grpc.status_code": 0,
    }
    assert ok.attributes["mesh.source"] == "checkout"
    assert "http.response.status_code" not in ok.attributes
    assert ok.status.status_code is StatusCode.UNSET
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert failed.status.status_code is StatusCode.ERROR
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "meshlib.access"]
    assert [(line["method"], line["path"], line["status"], line["source"]) for line in lines] == [
        ("POST", "/meshlib.test.Echo/Unary", 200, "checkout"),
        ("POST", "/meshlib.test.Echo/Unary", 503, None),
    ]


def test_a_call_past_its_deadline_is_counted_as_deadline_exceeded(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.Unary(echo_pb2.Ping(delay_ms=300), timeout=0.1, metadata=FROM_CHECKOUT)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    stats = served.mesh.stats
    wait_until(lambda: stats.edge("in", "checkout").total == 1, timeout=5, what="the late call counted")
    assert stats.edge("in", "checkout").by_class == {"5xx": 1}  # 504, as the caller saw it


PINNED_TO_ONE = [  # the limit starts with its minRTT measurement: pinned to one call at a time
    {
        "kind": "ConcurrencyLimit",
        "service": "orders",
        "min_limit": 1,
        "gradient": {"min_rtt": {"concurrency": 1}},
    }
]


def test_a_concurrency_limit_answers_unavailable_with_pushback(served: Served) -> None:
    served.mesh.apply_rules(parse_documents(PINNED_TO_ONE), "1")
    first = served.stub.Unary.future(echo_pb2.Ping(delay_ms=500), metadata=FROM_CHECKOUT)
    wait_until(lambda: served.servicer.calls == 1, timeout=5, what="the first call running")
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT)
    error = caught.value
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert error.details() == "overloaded"
    trailing = dict(error.trailing_metadata())
    assert (trailing[PUSHBACK], trailing["retry-after"]) == ("1000", "1")
    assert first.result().caller == "checkout"
    assert served.stub.Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT).caller == "checkout"  # its slot is back
    assert served.servicer.calls == 2
    assert served.mesh.stats.counter("concurrency_limited", "orders") == 1


def test_load_reports_ride_in_the_trailing_metadata_when_on() -> None:
    """Unary and streamed answers carry ORCA's report after the servicer's own trailers."""
    with meshlib.Mesh("orders", load_reports=True) as mesh:
        mesh.load.set_application_utilization(0.5)
        server, _, channel = start(mesh)
        try:
            stub = echo_pb2_grpc.EchoStub(channel)
            _, call = stub.Unary.with_call(echo_pb2.Ping(text="a"))
            report = parse_report(dict(call.trailing_metadata())[HEADER])
            assert report is not None and report.application_utilization == 0.5
            assert report.named_metrics["rif"] == 1.0  # the call itself was in flight
            streamed = stub.ServerStream(echo_pb2.Ping(text="s", count=2))
            assert len(list(streamed)) == 2
            assert parse_report(dict(streamed.trailing_metadata())[HEADER]) is not None
            assert mesh.load.in_flight == 0
        finally:
            channel.close()
            server.stop(None).wait()


def test_no_load_report_unless_on(served: Served) -> None:
    _, call = served.stub.Unary.with_call(echo_pb2.Ping(text="a"))
    assert HEADER not in dict(call.trailing_metadata() or ())
