"""A control service with xDS on, real grpcio echo servers registered in its registry, and plain
grpcio xDS clients in their own processes (tests/control/xds/xds_client.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from meshlib.control.plane import ControlPlane, ControlSettings
from meshlib.control.xds.bootstrap import bootstrap
from meshlib.control.xds.server import serve
from tests.control.process import ControlProcess, free_port
from tests.grpc import echo_pb2, echo_pb2_grpc
from tests.grpc.echo_servicers import Echo

ROOT = Path(__file__).resolve().parents[3]


class Unavailable(echo_pb2_grpc.EchoServicer):
    """Every call fails with UNAVAILABLE (a server that is going away)."""

    def __init__(self) -> None:
        self.calls = 0

    def Unary(self, request: echo_pb2.Ping, context: grpc.ServicerContext) -> echo_pb2.Pong:
        self.calls += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "going away")


class XdsControl:
    """The control service (`meshlib control --xds-port N`) and its admin calls."""

    def __init__(self, proc: ControlProcess, xds_port: int) -> None:
        self.proc, self.url, self.xds = proc, proc.url, f"127.0.0.1:{xds_port}"
        self.auth = {"authorization": f"Bearer {proc.token}"}

    def apply(self, docs: list[dict[str, Any]]) -> int:
        r = httpx.put(f"{self.url}/v1/config", json=docs, headers=self.auth)
        assert r.status_code == 200, r.text
        return int(r.json()["version"])

    def register(self, service: str, address: str, labels: dict[str, str], weight: int = 1) -> str:
        body = {"address": address, "labels": labels, "weight": weight, "ttl": 60}
        r = httpx.post(f"{self.url}/v1/registry/{service}", json=body)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def deregister(self, service: str, instance_id: str) -> None:
        r = httpx.delete(f"{self.url}/v1/registry/{service}/{instance_id}")
        assert r.status_code in (200, 204), r.text

    def clients(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/v1/clients").json())


@pytest.fixture
def xds_control(tmp_path: Path) -> Iterator[XdsControl]:
    port = free_port()
    proc = ControlProcess(tmp_path / "control", "--xds-port", str(port))
    try:
        yield XdsControl(proc, port)
    finally:
        proc.stop()


class Servers:
    """grpcio servers on 127.0.0.1, each named; `start` returns its address."""

    def __init__(self) -> None:
        self.servers: list[grpc.Server] = []

    def start(self, servicer: echo_pb2_grpc.EchoServicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        echo_pb2_grpc.add_EchoServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.servers.append(server)
        return f"127.0.0.1:{port}"

    def echo(self, name: str) -> str:
        return self.start(Echo(name))


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = Servers()
    try:
        yield s
    finally:
        for server in s.servers:
            server.stop(None)


class XdsClient:
    """One xds_client.py process; `calls` runs a batch of calls and returns what they got.
    `xds`: the control service's ADS address."""

    def __init__(self, xds: str, target: str, tmp: Path, node_id: str, service: str) -> None:
        path = tmp / f"bootstrap-{node_id}.json"
        path.write_text(json.dumps(bootstrap(service, xds, node_id)))
        env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(path), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.control.xds.xds_client", target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert json.loads(self._line()) == {"ready": True}

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the xDS client process ended"
        return line

    def calls(self, n: int, **options: Any) -> tuple[dict[str, int], dict[str, int]]:
        """(answers per server, failures per status code) of `n` calls."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"calls": n, **options}) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self._line())
        return out["servers"], out["codes"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def xds_clients(tmp_path: Path) -> Iterator[Callable[..., XdsClient]]:
    """Clients of any ADS address: `make(xds, target, node_id=..., service=...)`."""
    made: list[XdsClient] = []

    def make(xds: str, target: str, node_id: str = "checkout-1", service: str = "checkout") -> XdsClient:
        client = XdsClient(xds, target, tmp_path, node_id, service)
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            client.close()


@pytest.fixture
def xds_client(xds_control: XdsControl, xds_clients: Callable[..., XdsClient]) -> Callable[..., XdsClient]:
    """Clients of the `xds_control` service: `make(target, node_id=..., service=...)`."""

    def make(target: str, node_id: str = "checkout-1", service: str = "checkout") -> XdsClient:
        return xds_clients(xds_control.xds, target, node_id, service)

    return make


def poll(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """`check()` until it returns something true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")


@pytest.fixture
async def ads_channel(tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, grpc.aio.Channel]]:
    """The ADS server alone, on a ControlPlane in this test's loop (one stream at a time), and
    a channel to it: for tests that speak the protocol by hand."""
    plane = ControlPlane(ControlSettings(tmp_path))
    port = free_port()
    task = asyncio.create_task(serve(plane, "127.0.0.1", port, max_connections=1))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await asyncio.wait_for(channel.channel_ready(), 5.0)
        yield plane, channel
    finally:
        await channel.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        plane.close()


async def poll_rows(plane: ControlPlane, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The first xDS row of `plane` once `check` holds for it (5 s at most)."""
    deadline = time.monotonic() + 5.0
    while True:
        rows = [r for r in await plane.client_rows() if r.get("protocol") == "xds"]
        if rows and check(rows[0]):
            return rows[0]
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.01)
