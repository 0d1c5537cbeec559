"""The Mesh end to end, local mode: real uvicorn backends on 127.0.0.1, rules from a file."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections import Counter
from collections.abc import AsyncGenerator
from pathlib import Path

import httpx
import pytest

import meshlib
from tests.conftest import Fleet, wait_until, write_rules


def orders_docs(v1: list[str], v2: list[str], routes: list[dict] | None = None, **dest: object) -> list[dict]:
    docs: list[dict] = [
        {
            "kind": "Endpoints",
            "service": "orders",
            "endpoints": [{"address": a, "labels": {"version": "v1"}} for a in v1]
            + [{"address": a, "labels": {"version": "v2"}} for a in v2],
        },
        {
            "kind": "Destination",
            "service": "orders",
            "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        }
        | dest,
    ]
    if routes is not None:
        docs.append({"kind": "Route", "service": "orders", "routes": routes})
    return docs


def split(v1: int, v2: int) -> list[dict]:
    return [{"to": [{"subset": "v1", "weight": v1}, {"subset": "v2", "weight": v2}]}]


@pytest.fixture
def two_subsets(fleet: Fleet) -> tuple[list[str], list[str]]:
    v1 = [
        fleet.start("v1-a", {"version": "v1"})[1].address,
        fleet.start("v1-b", {"version": "v1"})[1].address,
    ]
    v2 = [fleet.start("v2-a", {"version": "v2"})[1].address]
    return v1, v2


async def names(
    client: httpx.AsyncClient, n: int, url: str = "http://orders/whoami", **kw: object
) -> Counter:
    sem = asyncio.Semaphore(20)

    async def one() -> str:
        async with sem:
            r = await client.get(url, **kw)
            r.raise_for_status()
            return r.json()["labels"]["version"]

    return Counter(await asyncio.gather(*(one() for _ in range(n))))


async def test_weighted_split_80_20_over_2000_requests(tmp_path: Path, two_subsets) -> None:
    v1, v2 = two_subsets
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs(v1, v2, split(80, 20)))
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        counts = await names(client, 2000)
    share = counts["v2"] / 2000
    # sd of the share is ~0.9 points: +-3.5 points is ~4 sd, and a 70/30 bug lands 10 points off.
    assert 0.165 <= share <= 0.235, counts


async def test_header_path_method_and_source_matches(tmp_path: Path, two_subsets) -> None:
    v1, v2 = two_subsets
    routes = [
        {"match": {"headers": {"x-canary": {"exact": "true"}}}, "to": [{"subset": "v2"}]},
        {"match": {"headers": {"x-user": {"regex": "beta-.*"}}}, "to": [{"subset": "v2"}]},
        {"match": {"path": {"prefix": "/v2only"}}, "to": [{"subset": "v2"}]},
        {"match": {"path": {"regex": "/items/[0-9]+"}, "methods": ["POST"]}, "to": [{"subset": "v2"}]},
        {"match": {"path": {"exact": "/whoami"}, "source": ["billing"]}, "to": [{"subset": "v2"}]},
        {"to": [{"subset": "v1"}]},
    ]
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs(v1, v2, routes))
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        assert await names(client, 20, headers={"x-canary": "true"}) == {"v2": 20}
        assert await names(client, 20, headers={"x-canary": "false"}) == {"v1": 20}
        assert await names(client, 10, headers={"x-user": "beta-7"}) == {"v2": 10}
        assert await names(client, 10, headers={"x-user": "alpha-7"}) == {"v1": 10}
        assert await names(client, 10, "http://orders/v2only/x") == {"v2": 10}
        post = await client.post("http://orders/items/42")
        get = await client.get("http://orders/items/42")
        assert (post.json()["labels"]["version"], get.json()["labels"]["version"]) == ("v2", "v1")
        # the source rule is for billing: checkout's calls take the catch-all
        assert await names(client, 10) == {"v1": 10}
    async with meshlib.Mesh("billing", config=cfg) as billing, billing.client() as client:
        assert await names(client, 10) == {"v2": 10}


async def test_request_reaches_endpoint_with_service_host_and_source_header(
    tmp_path: Path, fleet: Fleet
) -> None:
    backend, server = fleet.start("one", {"version": "v1"})
    routes = [{"match": {"path": {"prefix": "/api"}}, "rewrite": {"prefix": "/v2/api"}, "to": [{}]}]
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs([server.address], [], routes))
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        r = await client.get("http://orders/api/items?q=1")
    assert r.status_code == 200
    seen = backend.seen[-1]
    assert seen["path"] == "/v2/api/items"
    assert seen["headers"]["host"] == "orders"
    assert seen["headers"]["x-mesh-source"] == "checkout"


async def test_unknown_host_passes_through_untouched(tmp_path: Path, fleet: Fleet) -> None:
    backend, server = fleet.start("outside")
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs([server.address], []))
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        r = await client.get(f"{server.url}/whoami")
    assert r.json()["name"] == "outside"
    assert "x-mesh-source" not in backend.seen[-1]["headers"]
    assert mesh.stats.edges() == {}


async def test_subset_without_endpoints_fails_with_mesh_error(tmp_path: Path, fleet: Fleet) -> None:
    _, server = fleet.start("v1", {"version": "v1"})
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs([server.address], [], [{"to": [{"subset": "v2"}]}]))
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        with pytest.raises(meshlib.NoEndpointsError, match="subset 'v2'"):
            await client.get("http://orders/whoami")
        with pytest.raises(httpx.TransportError):  # catchable as an ordinary httpx error
            await client.get("http://orders/whoami")


async def test_rules_file_edit_takes_effect_without_restart(tmp_path: Path, two_subsets) -> None:
    v1, v2 = two_subsets
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs(v1, v2, split(100, 0)))
    async with meshlib.Mesh("checkout", config=cfg, watch_interval=0.05) as mesh, mesh.client() as client:
        assert await names(client, 50) == {"v1": 50}
        before = mesh.snapshot.version
        write_rules(cfg, orders_docs(v1, v2, split(0, 100)))
        await asyncio.to_thread(wait_until, lambda: mesh.snapshot.version != before, what="rules swap")
        assert await names(client, 50) == {"v2": 50}


async def test_invalid_edit_is_refused_whole_and_old_rules_keep_serving(
    tmp_path: Path, two_subsets, caplog: pytest.LogCaptureFixture
) -> None:
    v1, v2 = two_subsets
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs(v1, v2, split(0, 100)))
    async with meshlib.Mesh("checkout", config=cfg, watch_interval=0.05) as mesh, mesh.client() as client:
        version = mesh.snapshot.version
        # valid Endpoints/Destination that would move traffic, plus a Route naming a missing subset
        bad = orders_docs(v1, v2, [{"to": [{"subset": "v1"}, {"subset": "v3"}]}])
        with caplog.at_level(logging.ERROR, logger="meshlib"):
            write_rules(cfg, bad)
            await asyncio.to_thread(
                wait_until, lambda: "rejected edit" in caplog.text, what="the rejection to be logged"
            )
        assert (
            "Route/orders" in caplog.text and "routes[0].to[1].subset" in caplog.text and "v3" in caplog.text
        )
        assert mesh.snapshot.version == version
        assert await names(client, 30) == {"v2": 30}


async def test_sync_and_async_clients_route_alike(tmp_path: Path, two_subsets) -> None:
    v1, v2 = two_subsets
    routes = [
        {"match": {"headers": {"x-canary": {"present": True}}}, "to": [{"subset": "v2"}]},
        *split(50, 50),
    ]
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs(v1, v2, routes))
    async with meshlib.Mesh("checkout", config=cfg) as mesh:
        async with mesh.client() as client:
            a_canary = await names(client, 20, headers={"x-canary": ""})
            a_split = await names(client, 600)

        def sync_side() -> tuple[Counter, Counter]:
            with mesh.sync_client() as c:
                canary = Counter(
                    c.get("http://orders/whoami", headers={"x-canary": ""}).json()["labels"]["version"]
                    for _ in range(20)
                )
                halves = Counter(
                    c.get("http://orders/whoami").json()["labels"]["version"] for _ in range(600)
                )
            return canary, halves

        s_canary, s_split = await asyncio.to_thread(sync_side)
    assert a_canary == s_canary == {"v2": 20}
    for counts in (a_split, s_split):  # sd ~2 points of share; +-10 points is 4.9 sd (8 was 3.9)
        assert 0.40 <= counts["v2"] / 600 <= 0.60, counts


async def test_streaming_response_holds_load_until_body_closed(tmp_path: Path, fleet: Fleet) -> None:
    _, server = fleet.start("streamer", {"version": "v1"})
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs([server.address], []))
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        load = mesh.loads.get(server.address)
        async with client.stream("GET", "http://orders/stream?chunks=5&ms=20") as r:
            assert r.status_code == 200
            assert load.outstanding == 1  # headers are back, the body is not
            lines = [line async for line in r.aiter_lines()]
        assert lines == [f"streamer:{i}" for i in range(5)]
        assert load.outstanding == 0

        def sync_stream() -> tuple[int, int]:
            with mesh.sync_client() as c, c.stream("GET", "http://orders/stream?chunks=2&ms=5") as r:
                during = load.outstanding
                r.read()
            return during, load.outstanding

        assert await asyncio.to_thread(sync_stream) == (1, 0)


async def test_call_decorator_async_and_sync(tmp_path: Path, fleet: Fleet) -> None:
    _, server = fleet.start("orders-1", {"version": "v1"})
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs([server.address], []))
    mesh = meshlib.Mesh("checkout", config=cfg)

    @mesh.call("orders")
    async def get_order(client: httpx.AsyncClient, order_id: int) -> dict:
        return (await client.get(f"/orders/{order_id}")).json()

    @mesh.call("orders")
    def get_order_sync(client: httpx.Client, order_id: int) -> dict:
        return client.get(f"/orders/{order_id}").json()

    try:
        assert (await get_order(42))["path"] == "/orders/42"
        assert (await get_order(order_id=7))["name"] == "orders-1"
        assert (await asyncio.to_thread(get_order_sync, 5))["path"] == "/orders/5"
        assert list(__import__("inspect").signature(get_order).parameters) == ["order_id"]
        assert mesh.stats.edge("out", "orders").total == 3
    finally:
        await mesh.aclose()


async def test_call_gives_async_generators_and_async_callables_the_async_client(
    tmp_path: Path, fleet: Fleet
) -> None:
    """A sync Client in async code would block the loop for each request: whatever is async
    (an async generator function, an object whose `__call__` is a coroutine function) gets
    the loop's AsyncClient."""
    _, server = fleet.start("orders-1", {"version": "v1"})
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs([server.address], []))
    mesh = meshlib.Mesh("checkout", config=cfg)
    given: list[type] = []

    @mesh.call("orders")
    async def paths(client: httpx.AsyncClient, first: str) -> AsyncGenerator[str, str]:
        given.append(type(client))
        path = first
        while True:
            try:
                path = yield (await client.get(path)).json()["path"]
            except LookupError as exc:
                path = f"/caught/{exc.args[0]}"

    class Order:
        async def __call__(self, client: httpx.AsyncClient, order_id: int) -> dict:
            given.append(type(client))
            return (await client.get(f"/orders/{order_id}")).json()

    get_order = mesh.call("orders")(Order())
    try:
        assert inspect.isasyncgenfunction(paths) and inspect.iscoroutinefunction(get_order)
        assert list(inspect.signature(paths).parameters) == ["first"]
        pages = paths("/a")
        assert await pages.__anext__() == "/a"
        assert await pages.asend("/b") == "/b"  # what the caller sends reaches the generator
        assert await pages.athrow(KeyError("c")) == "/caught/c"  # and what it throws
        await pages.aclose()
        assert (await get_order(3))["path"] == "/orders/3"
        assert given == [httpx.AsyncClient, httpx.AsyncClient]
    finally:
        await mesh.aclose()


def _connections_to(port: int) -> int:
    """TCP sockets of this process connected to `port` (its client ends; Linux's /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since listed
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == port:
            count += 1
    return count


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="counts sockets in Linux's /proc")
def test_call_async_clients_go_with_their_event_loops(tmp_path: Path, fleet: Fleet) -> None:
    """Each event loop has its own shared client; a loop that shuts down (asyncio.run) closes it,
    and the sockets of one closed without shutting down are closed when another loop asks or
    the mesh closes: neither clients nor connections pile up, one per loop ever run."""
    _, server = fleet.start("orders-1", {"version": "v1"})
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs([server.address], []))
    mesh = meshlib.Mesh("checkout", config=cfg)

    @mesh.call("orders")
    async def status(client: httpx.AsyncClient) -> int:
        return (await client.get("/whoami")).status_code

    def run_then_close_without_shutdown() -> None:
        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(status()) == 200
        finally:
            loop.close()  # no shutdown_asyncgens(): nothing can run on it to close its client

    try:
        for _ in range(5):
            assert asyncio.run(status()) == 200
            assert len(mesh._async_clients) == 0
            assert _connections_to(server.port) == 0
        for _ in range(3):
            run_then_close_without_shutdown()
            # its connection kept alive; the closed loop before it went when this one asked
            assert len(mesh._async_clients) == 1 and _connections_to(server.port) == 1
        assert asyncio.run(status()) == 200
        assert len(mesh._async_clients) == 0
        assert _connections_to(server.port) == 0
        run_then_close_without_shutdown()
        assert len(mesh._async_clients) == 1 and _connections_to(server.port) == 1  # until close()
    finally:
        mesh.close()
    assert len(mesh._async_clients) == 0
    assert _connections_to(server.port) == 0


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="counts sockets in Linux's /proc")
async def test_mesh_close_closes_a_running_loops_call_clients_on_that_loop(
    tmp_path: Path, fleet: Fleet
) -> None:
    _, server = fleet.start("orders-1", {"version": "v1"})
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs([server.address], []))
    mesh = meshlib.Mesh("checkout", config=cfg)

    @mesh.call("orders")
    async def status(client: httpx.AsyncClient) -> int:
        return (await client.get("/whoami")).status_code

    assert await status() == 200
    entry = mesh._async_clients[asyncio.get_running_loop()]
    assert _connections_to(server.port) == 1
    await asyncio.to_thread(mesh.close)  # from another thread, as a shutdown handler may
    assert entry._closing_task is not None  # handed to this loop, which alone can close them
    await entry._closing_task
    assert _connections_to(server.port) == 0 and not mesh._async_clients


def test_transport_kwargs_reach_the_inner_transport(tmp_path: Path) -> None:
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs(["127.0.0.1:9"], []))
    with meshlib.Mesh("checkout", config=cfg) as mesh:
        limits = httpx.Limits(max_connections=3)
        with mesh.sync_client(limits=limits, timeout=1) as client:
            pool = client._transport._inner._pool  # type: ignore[attr-defined]
            assert pool._max_connections == 3


def test_bad_rules_file_at_startup_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text("kind: Route\nservice: orders\nroutes: []\n")
    with pytest.raises(ValueError, match="Route/orders"):
        meshlib.Mesh("checkout", config=cfg)


async def test_responses_with_a_dual_sync_async_body_work_in_both_clients() -> None:
    # httpx's ByteStream is both a sync and an async stream (mock transports, made-up responses):
    # the mesh's bookkeeping wrapper must not take one interface away.
    from meshlib.rules import parse_documents

    mesh = meshlib.Mesh("checkout")
    mesh.apply_rules(
        parse_documents(
            [{"kind": "Endpoints", "service": "orders", "endpoints": [{"address": "127.0.0.1:9"}]}]
        ),
        "1",
    )
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, content=b"ok")

    async with mesh.client(transport=httpx.MockTransport(answer)) as client:
        assert (await client.get("http://orders/a?x=1")).text == "ok"
    with mesh.sync_client(transport=httpx.MockTransport(answer)) as client:
        assert client.get("http://orders/b").text == "ok"
    assert seen == ["http://127.0.0.1:9/a?x=1", "http://127.0.0.1:9/b"]
    assert mesh.loads.get("127.0.0.1:9").outstanding == 0
    await mesh.aclose()


# -- serve(): the address it registers ---------------------------------------------------------


def test_serve_registers_the_address_given_to_the_mesh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`Mesh(address=...)` (MESH_ADDRESS) is where callers reach the instance (a container's
    published address): serve() registers it, not the address it listens on."""
    import threading

    import uvicorn

    from tests.control import Control
    from tests.http.test_serve_wsgi import _Servers

    async def app(scope: dict, receive: object, send: object) -> None:
        pass

    control = Control(tmp_path / "data")
    servers = _Servers()
    monkeypatch.setattr(uvicorn, "Server", servers.cls)
    caplog.set_level(logging.INFO, logger="meshlib")
    mesh = meshlib.Mesh("orders", control=control.url, cache_dir=tmp_path / "cache", address="10.1.2.3:9000")
    thread = threading.Thread(target=mesh.serve, args=(app,), kwargs={"port": 0}, daemon=True)
    try:
        thread.start()
        wait_until(lambda: any("ready on" in r.getMessage() for r in caplog.records), what="the ready line")
        listed = control.http.get("/v1/registry/orders").json()["orders"]
        assert [i["address"] for i in listed] == ["10.1.2.3:9000"]
        (ready,) = [r.getMessage() for r in caplog.records if "ready on" in r.getMessage()]
        assert ready.startswith("orders ready on 127.0.0.1:") and ":0:" not in ready
        assert f"; registered as 10.1.2.3:9000 with {control.url};" in ready
        assert mesh.address == "10.1.2.3:9000"
    finally:
        if servers.made:
            servers.made[0].should_exit = True
        thread.join(10)
        mesh.close()
    try:
        assert control.http.get("/v1/registry/orders").json().get("orders", []) == []  # and it left
    finally:
        control.stop()


@pytest.mark.parametrize(
    ("address", "unspecified"),
    [("0.0.0.0:80", True), ("[::]:80", True), ("127.0.0.1:80", False), ("[::1]:80", False), ("h:80", False)],
)
def test_which_listening_addresses_only_this_host_can_call(address: str, unspecified: bool) -> None:
    from meshlib.mesh import _unspecified

    assert _unspecified(address) is unspecified
