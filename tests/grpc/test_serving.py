"""`Mesh.serve_grpc` / `serve_grpc_aio` with the real control service: the gRPC endpoint is
registered with the protocol label beside the same process's HTTP endpoint, and leaves the
registry when its server stops, while the HTTP one stays."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest

import meshlib
from meshlib.endpoint import PROTOCOL_LABEL
from meshlib.grpc import server_interceptors
from meshlib.testing import bind, serve
from tests.conftest import wait_until
from tests.control.test_mesh_control import Control
from tests.grpc import echo_pb2, echo_pb2_grpc
from tests.grpc.echo_servicers import AioEcho, Echo

FROM_CHECKOUT = (("x-mesh-source", "checkout"),)


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    c = Control(tmp_path / "control")
    yield c
    if c.server is not None:
        c.stop()


def protocols(control: Control) -> dict[str, str | None]:
    """address -> protocol label of the orders instances in the registry."""
    instances = httpx.get(f"{control.url}/v1/registry/orders").json().get("orders", [])
    return {i["address"]: i["labels"].get(PROTOCOL_LABEL) for i in instances}


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":  # startup and shutdown, acknowledged
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


def test_serve_grpc_registers_beside_the_http_endpoint_and_deregisters_on_stop(
    control: Control, tmp_path: Path
) -> None:
    mesh = meshlib.Mesh("orders", control=control.url, cache_dir=tmp_path / "cache", labels={"v": "1"})
    with mesh, serve(mesh.asgi(hello)) as http:
        mesh.register(http.address)
        servicer = Echo()
        serving = mesh.serve_grpc(
            [functools.partial(echo_pb2_grpc.add_EchoServicer_to_server, servicer)], port=0
        )
        try:
            assert serving.address.startswith("127.0.0.1:") and serving.port > 0
            both = {http.address: None, serving.address: "grpc"}
            wait_until(lambda: protocols(control) == both, timeout=5, what="both endpoints registered")
            labels = httpx.get(f"{control.url}/v1/registry/orders").json()["orders"]
            assert all(i["labels"]["v"] == "1" for i in labels)  # the Mesh's labels on both
            with grpc.insecure_channel(serving.address) as channel:
                pong = echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.Ping(text="hi"), metadata=FROM_CHECKOUT)
            assert (pong.text, pong.caller) == ("hi", "checkout")  # built with the interceptors
            assert mesh.stats.edge("in", "checkout").by_class == {"2xx": 1}
        finally:
            serving.stop(grace=1)
        only_http = {http.address: None}
        wait_until(lambda: protocols(control) == only_http, timeout=5, what="the gRPC endpoint gone")
        assert httpx.get(http.url).text == "hello"
    wait_until(lambda: protocols(control) == {}, timeout=5, what="the HTTP endpoint gone on close")


def test_serve_grpc_takes_a_server_the_app_built(control: Control, tmp_path: Path) -> None:
    with meshlib.Mesh("orders", control=control.url, cache_dir=tmp_path / "cache") as mesh:
        server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=server_interceptors(mesh))
        echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
        with mesh.serve_grpc(server, port=0) as serving:
            assert serving.server is server
            wait_until(lambda: protocols(control) == {serving.address: "grpc"}, timeout=5, what="registered")
        wait_until(lambda: protocols(control) == {}, timeout=5, what="deregistered")
        assert mesh.address is None  # the gRPC port is not the Mesh's HTTP address


async def test_serve_grpc_aio_registers_and_deregisters(control: Control, tmp_path: Path) -> None:
    with meshlib.Mesh("orders", control=control.url, cache_dir=tmp_path / "cache") as mesh:
        servicer = AioEcho()
        adders = [functools.partial(echo_pb2_grpc.add_EchoServicer_to_server, servicer)]
        serving = await mesh.serve_grpc_aio(adders, port=0)
        try:
            await wait_async(lambda: protocols(control) == {serving.address: "grpc"})
            async with grpc.aio.insecure_channel(serving.address) as channel:
                pong = await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.Ping(), metadata=FROM_CHECKOUT)
            assert (pong.server, pong.caller) == ("aio-echo", "checkout")
        finally:
            await serving.stop(grace=1)
        await wait_async(lambda: protocols(control) == {})


async def wait_async(predicate: Any, timeout: float = 5.0) -> None:
    """Poll with a deadline without blocking the loop (the registry is asked on a thread)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(predicate):
        assert loop.time() < deadline, "timed out waiting for the registry"
        await asyncio.sleep(0.02)


def test_the_example_in_the_docs_runs_and_prints_what_it_says(capsys: pytest.CaptureFixture[str]) -> None:
    text = (Path(__file__).parents[2] / "docs" / "grpc-server.md").read_text()
    start = text.index("```python\nimport functools") + len("```python\n")
    exec(compile(text[start : text.index("```", start)], "docs/grpc-server.md", "exec"), {})
    assert capsys.readouterr().out.splitlines() == [
        "checkout 2.0",
        "StatusCode.PERMISSION_DENIED RBAC: access denied: source billing may not POST"
        " /meshlib.test.Echo/Unary",
        "{'2xx': 1}",
    ]


# -- an HTTP server that stops takes only its own endpoint out of the registry --------------------


def test_the_asgi_lifespan_deregisters_only_the_http_endpoint(control: Control, tmp_path: Path) -> None:
    sock = bind("127.0.0.1", 0)
    http_address = f"127.0.0.1:{sock.getsockname()[1]}"
    mesh = meshlib.Mesh("orders", control=control.url, cache_dir=tmp_path / "cache", address=http_address)
    with mesh:
        http = serve(mesh.asgi(hello), sock=sock, lifespan="on")  # registers at startup
        with mesh.serve_grpc(
            [functools.partial(echo_pb2_grpc.add_EchoServicer_to_server, Echo())], port=0
        ) as grpc_serving:
            both = {http_address: None, grpc_serving.address: "grpc"}
            wait_until(lambda: protocols(control) == both, timeout=5, what="both endpoints registered")
            http.stop()  # lifespan shutdown
            only_grpc = {grpc_serving.address: "grpc"}
            wait_until(lambda: protocols(control) == only_grpc, timeout=5, what="the HTTP endpoint gone")
            with grpc.insecure_channel(grpc_serving.address) as channel:
                assert echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.Ping(text="still")).text == "still"
            assert protocols(control) == only_grpc


def test_mesh_serve_deregisters_only_its_http_endpoint_when_it_stops(
    control: Control, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.http.test_serve_wsgi import serving as serving_http

    adders = [functools.partial(echo_pb2_grpc.add_EchoServicer_to_server, Echo())]
    mesh = meshlib.Mesh("orders", control=control.url, cache_dir=tmp_path / "cache")
    with mesh, mesh.serve_grpc(adders, port=0) as grpc_serving:
        with serving_http(mesh, hello, monkeypatch) as http_address:
            both = {http_address: None, grpc_serving.address: "grpc"}
            wait_until(lambda: protocols(control) == both, timeout=5, what="both endpoints registered")
        only_grpc = {grpc_serving.address: "grpc"}
        wait_until(lambda: protocols(control) == only_grpc, timeout=5, what="the HTTP endpoint gone")
        with grpc.insecure_channel(grpc_serving.address) as channel:  # and it still serves
            assert echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.Ping(text="on")).text == "on"


def test_two_http_servers_of_one_mesh_each_deregister_only_their_own_address(
    control: Control, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mesh.address` names the last server to start; the first one stopping must not take the
    second out of the registry."""
    import threading

    import uvicorn

    from tests.http.test_serve_wsgi import _Servers

    servers = _Servers()
    monkeypatch.setattr(uvicorn, "Server", servers.cls)
    mesh = meshlib.Mesh("orders", control=control.url, cache_dir=tmp_path / "cache")
    with mesh:
        threads = [threading.Thread(target=mesh.serve, args=(hello,), kwargs={"port": 0}, daemon=True)]
        threads[0].start()
        wait_until(lambda: len(protocols(control)) == 1, timeout=5, what="the first server registered")
        first = next(iter(protocols(control)))
        threads.append(threading.Thread(target=mesh.serve, args=(hello,), kwargs={"port": 0}, daemon=True))
        threads[1].start()
        wait_until(lambda: len(protocols(control)) == 2, timeout=5, what="the second server registered")
        second = next(a for a in protocols(control) if a != first)
        assert mesh.address == second
        servers.made[0].should_exit = True  # the first server stops
        threads[0].join(10)
        wait_until(lambda: list(protocols(control)) == [second], timeout=5, what="only the second left")
        assert httpx.get(f"http://{second}/").text == "hello"  # and it still serves
        servers.made[1].should_exit = True
        threads[1].join(10)
        wait_until(lambda: protocols(control) == {}, timeout=5, what="both gone")
