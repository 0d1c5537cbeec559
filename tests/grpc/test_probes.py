"""prequal over gRPC: the server interceptors (sync and aio) answer the probe method themselves,
and a mesh channel balancing with prequal probes its endpoints on their own channels. Real
grpcio servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from concurrent import futures
from pathlib import Path

import grpc
import grpc.aio

import meshlib
from meshlib.balancing.orca import HEADER
from meshlib.grpc import aio_server_interceptors, server_interceptors
from meshlib.probing import PROBE_METHOD, read
from tests.conftest import write_rules
from tests.grpc import echo_pb2, echo_pb2_grpc
from tests.grpc.echo_fleet import GRPC, endpoints
from tests.grpc.echo_servicers import AioEcho, Echo


def probe(channel: grpc.Channel) -> tuple[int, float] | None:
    _, call = channel.unary_unary(PROBE_METHOD).with_call(b"", timeout=5)
    return read(dict(call.trailing_metadata()).get(HEADER))


class Meshed:
    """A sync grpc server behind the mesh's interceptors, its servicer `Echo(name)`."""

    def __init__(self, name: str, servicer: Echo | None = None) -> None:
        self.mesh = meshlib.Mesh("echo")
        self.servicer = servicer if servicer is not None else Echo(name)
        self.server = grpc.server(futures.ThreadPoolExecutor(8), interceptors=server_interceptors(self.mesh))
        echo_pb2_grpc.add_EchoServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(None).wait()
        self.mesh.close()


def test_the_sync_interceptor_answers_probes_outside_the_servicer_and_the_counts() -> None:
    served = Meshed("a")
    try:
        with grpc.insecure_channel(served.address) as channel:
            assert probe(channel) == (0, 0.0)  # counting starts with the first probe
            stub = echo_pb2_grpc.EchoStub(channel)
            assert stub.Unary(echo_pb2.Ping(text="x", delay_ms=20)).text == "x"
            answer = probe(channel)
        assert answer is not None and answer[0] == 0 and answer[1] >= 0.02
        assert served.servicer.calls == 1
        assert served.mesh.stats.edge("in", "unknown").total == 1  # the Unary, no probe
    finally:
        served.stop()


def test_the_aio_interceptor_answers_probes() -> None:
    async def run() -> tuple[tuple[int, float] | None, tuple[int, float] | None, int]:
        with meshlib.Mesh("echo") as mesh:
            server = grpc.aio.server(interceptors=aio_server_interceptors(mesh))
            servicer = AioEcho()
            echo_pb2_grpc.add_EchoServicer_to_server(servicer, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    check = channel.unary_unary(PROBE_METHOD)
                    first = await check(b"")
                    assert first == b""
                    call = check(b"")
                    await call
                    before = read(dict(await call.trailing_metadata()).get(HEADER))
                    await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.Ping(text="x", delay_ms=20))
                    call = check(b"")
                    await call
                    after = read(dict(await call.trailing_metadata()).get(HEADER))
            finally:
                await server.stop(None)
            return before, after, mesh.stats.edge("in", "unknown").total

    before, after, counted = asyncio.run(run())
    assert before == (0, 0.0)
    assert after is not None and after[0] == 0 and after[1] >= 0.02
    assert counted == 1


class Slow(Echo):
    """An Echo that takes `extra` seconds more for every unary call."""

    def __init__(self, name: str, extra: float) -> None:
        super().__init__(name)
        self.extra = extra

    def Unary(self, request: echo_pb2.Ping, context: grpc.ServicerContext) -> echo_pb2.Pong:
        time.sleep(self.extra)
        return super().Unary(request, context)


def test_a_mesh_channel_with_prequal_probes_on_its_endpoints_channels(tmp_path: Path) -> None:
    """Two servers, one 30 ms slower a call: the probes (unary calls on the endpoints' channels,
    counted) report its latency, and four callers' picks keep away from it."""
    fast, slow = Meshed("fast"), Meshed("slow", Slow("slow", 0.030))
    docs = [
        endpoints("echo", [fast.address, slow.address], [GRPC, GRPC]),
        {"kind": "Destination", "service": "echo", "load_balancer": "prequal"},
    ]
    mesh = meshlib.Mesh("client", config=write_rules(tmp_path / "mesh.yaml", docs))
    seen: Counter[str] = Counter()
    lock = threading.Lock()
    try:
        stub = echo_pb2_grpc.EchoStub(mesh.grpc_channel("echo"))
        end = time.monotonic() + 1.2

        def caller() -> None:
            while time.monotonic() < end:
                server = stub.Unary(echo_pb2.Ping(text="x")).server
                with lock:
                    seen[server] += 1

        with futures.ThreadPoolExecutor(4) as pool:
            for f in [pool.submit(caller) for _ in range(4)]:
                f.result()
        pools = mesh.snapshot.loads.probes.pools()
        sent = mesh.stats.counter("probes_sent", "echo")
        failed = mesh.stats.counter("probes_failed", "echo")
    finally:
        mesh.close()
        fast.stop()
        slow.stop()
    assert [len(p) for p in pools] == [2]  # both answered (the gRPC plan's own pool)
    assert sent > 20 and failed == 0
    total = seen["fast"] + seen["slow"]
    assert total > 100
    assert seen["slow"] / total < 0.3  # its latency is 30x the other's; an even split is 50%
