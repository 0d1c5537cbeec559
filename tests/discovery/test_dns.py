"""The DNS provider against a real authoritative server on 127.0.0.1 (tests/discovery/dns_server.py):
A/AAAA and SRV sets, re-resolution at the clamped TTL, failures raised, NXDOMAIN as no endpoints,
and traffic through a Mesh to real uvicorn backends fed by the provider."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

import meshlib
from meshlib.discovery.base import EndpointSet, Target
from meshlib.discovery.dns import DnsLookupError, DnsProvider, Options, Srv, refresh_after, srv_endpoints
from meshlib.errors import NoEndpointsError
from meshlib.rules.models import MAX_WEIGHT
from tests.conftest import Fleet, write_rules
from tests.discovery.dns_server import DnsServer

WEB = "web.mesh.test"
SRV = "_http._tcp.orders.mesh.test"


@pytest.fixture
def server() -> Iterator[DnsServer]:
    s = DnsServer()
    s.a(WEB, ["127.0.0.1"])
    yield s
    s.close()


@pytest.fixture
async def provider(server: DnsServer) -> AsyncIterator[DnsProvider]:
    p = DnsProvider.from_url(server.url)
    yield p
    await p.aclose()


def target(name: str, **options: object) -> Target:
    return Target(service="orders", name=name, options=options)


async def next_set(watch: AsyncIterator[EndpointSet], timeout: float = 5.0) -> EndpointSet:
    return await asyncio.wait_for(anext(watch), timeout)


def addresses(endpoints: EndpointSet) -> list[str]:
    return [e.address for e in endpoints]


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


async def collect(watch: AsyncIterator[EndpointSet], into: list[EndpointSet]) -> None:
    """Reads a watch to its end, as the runner does (a watch refreshes only while it is read)."""
    async for endpoints in watch:
        into.append(endpoints)


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


# -- options and URL ------------------------------------------------------------------------


def test_options_say_what_is_missing_or_contradictory() -> None:
    assert Options(port=8080).record == "A"
    assert Options.model_validate({"record": "SRV", "min_refresh": "100ms"}).min_refresh == 0.1
    for bad in (
        {"record": "A"},  # no port
        {"record": "SRV", "port": 80},  # SRV has its own
        {"port": 80, "min_refresh": "10s", "max_refresh": "1s"},
        {"port": 80, "record": "MX"},
        {"port": 80, "refresh": "1s"},
        {"port": 0},
    ):
        with pytest.raises(ValueError):
            Options.model_validate(bad)


def test_options_import_without_dnspython_and_the_provider_says_it_needs_it() -> None:
    code = (
        "import sys; sys.modules['dns'] = None\n"
        "from meshlib.discovery.dns import DnsProvider, Options\n"
        "Options(port=80)\n"
        "try:\n    DnsProvider.from_url('dns://127.0.0.1:53')\n"
        "except ModuleNotFoundError as exc:\n    print(exc.name, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("dns ") and "pip install 'meshlib[dns]'" in out.stdout


def test_a_system_without_nameservers_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "resolv.conf"
    empty.write_text("search mesh.test\n")
    with pytest.raises(ValueError, match="names no nameserver"):
        DnsProvider(resolv_conf=str(empty))


def test_url_forms() -> None:
    assert DnsProvider.from_url("dns://").nameserver is None  # the system's resolver (nothing is asked)
    p = DnsProvider.from_url("dns://127.0.0.1:5353")
    assert (p.nameserver, p.port, p.resolver.nameservers) == ("127.0.0.1", 5353, ["127.0.0.1"])
    assert DnsProvider.from_url("dns://127.0.0.1").port == 53
    assert DnsProvider.from_url("dns://[::1]:5353").nameserver == "::1"
    for bad in ("http://127.0.0.1", "dns://ns.mesh.test:53", "dns://127.0.0.1:53/x", "dns://127.0.0.1?t=1"):
        with pytest.raises(ValueError):
            DnsProvider.from_url(bad)


# -- A and AAAA ------------------------------------------------------------------------------


async def test_a_and_aaaa_records_become_endpoints_at_the_port(
    server: DnsServer, provider: DnsProvider
) -> None:
    server.aaaa(WEB, ["::1"])
    a = provider.watch(target(WEB, port=8080))
    aaaa = provider.watch(target(WEB, record="AAAA", port=8080))
    assert addresses(await next_set(a)) == ["127.0.0.1:8080"]
    assert addresses(await next_set(aaaa)) == ["[::1]:8080"]
    await a.aclose()
    await aaaa.aclose()


async def test_a_change_is_seen_within_the_ttl(server: DnsServer, provider: DnsProvider) -> None:
    server.a("api.mesh.test", ["127.0.0.1"], ttl=1)
    server.aaaa("api.mesh.test", ["::1"], ttl=1)  # the name stays when its A records go
    watch = provider.watch(target("api.mesh.test", port=80, min_refresh="50ms"))
    assert addresses(await next_set(watch)) == ["127.0.0.1:80"]
    server.a("api.mesh.test", [])
    changed = time.monotonic()
    assert await next_set(watch) == ()  # NODATA: the name has no A record now
    # the TTL's 1 s, not the default max_refresh's 5 min; 1.5 s left a stalled thread 0.5 s
    assert time.monotonic() - changed < 3.0
    # asked again when the TTL ran out, not at min_refresh
    assert all(g > 0.8 for g in gaps([q.at for q in server.asked("api.mesh.test", "A")]))
    await watch.aclose()


# -- the TTL and its bounds ------------------------------------------------------------------


def test_refresh_is_the_ttl_clamped_to_the_bounds() -> None:
    options = Options(port=80, min_refresh="2s", max_refresh="1m")
    assert refresh_after(30, options) == 30
    assert refresh_after(0, options) == 2
    assert refresh_after(86400, options) == 60


async def test_a_long_ttl_is_asked_again_at_max_refresh(server: DnsServer, provider: DnsProvider) -> None:
    server.srv(SRV, [(1, 1, 8001, WEB)], ttl=3600)
    watch = provider.watch(target(SRV, record="SRV", min_refresh="10ms", max_refresh="200ms"))
    assert addresses(await next_set(watch)) == ["127.0.0.1:8001"]
    server.srv(SRV, [(1, 1, 8002, WEB)], ttl=3600)
    changed = time.monotonic()
    assert addresses(await next_set(watch)) == ["127.0.0.1:8002"]  # not an hour later
    assert time.monotonic() - changed < 2.0
    # max_refresh's 200 ms, not min_refresh's 10 ms (nor the TTL's hour); the upper bound leaves
    # room for a stalled thread
    assert all(0.15 < g < 1.5 for g in gaps([q.at for q in server.asked(SRV, "SRV")]))
    await watch.aclose()


async def test_a_zero_ttl_is_asked_again_at_min_refresh_not_in_a_loop(
    server: DnsServer, provider: DnsProvider
) -> None:
    server.a("zero.mesh.test", ["127.0.0.1"], ttl=0)
    watch = provider.watch(target("zero.mesh.test", port=80, min_refresh="300ms"))
    seen: list[EndpointSet] = []
    reader = asyncio.create_task(collect(watch, seen))
    await until(lambda: len(server.asked("zero.mesh.test", "A")) >= 4, what="4 queries")
    times = [q.at for q in server.asked("zero.mesh.test", "A")]
    assert all(g > 0.25 for g in gaps(times)), gaps(times)
    assert [addresses(e) for e in seen] == [["127.0.0.1:80"]]  # the same set is not yielded again
    await provider.aclose()
    await asyncio.wait_for(reader, 1)


# -- SRV ----------------------------------------------------------------------------------------


async def test_srv_lowest_priority_group_with_its_weights(server: DnsServer, provider: DnsProvider) -> None:
    server.srv(SRV, [(10, 3, 8001, WEB), (10, 1, 8002, WEB), (20, 5, 8003, WEB)], ttl=1)
    watch = provider.watch(target(SRV, record="SRV", min_refresh="50ms"))
    first = await next_set(watch)
    assert [(e.address, e.weight) for e in first] == [("127.0.0.1:8001", 3), ("127.0.0.1:8002", 1)]
    server.srv(SRV, [(20, 5, 8003, WEB)], ttl=1)  # the first group gone from DNS: the fallback
    assert [(e.address, e.weight) for e in await next_set(watch)] == [("127.0.0.1:8003", 5)]
    await watch.aclose()


def test_srv_weights_are_clamped_to_the_rules_bounds() -> None:
    group = [Srv(1, 0, 8001, "a"), Srv(1, 65535, 8002, "a"), Srv(1, 7, 8003, "a")]
    got = srv_endpoints(group, {"a": ["127.0.0.1"]})
    assert [e.weight for e in got] == [1, MAX_WEIGHT, 7]


async def test_srv_targets_are_resolved_when_the_answer_has_no_glue(
    server: DnsServer, provider: DnsProvider
) -> None:
    server.glue = False
    server.a("a.mesh.test", ["127.0.0.1"], ttl=60)
    server.aaaa("b.mesh.test", ["::1"], ttl=60)
    server.srv(SRV, [(1, 1, 8001, "a.mesh.test"), (1, 1, 8002, "b.mesh.test")])
    ipv4 = await provider.resolve(SRV, Options(record="SRV"))
    assert addresses(ipv4.endpoints) == ["127.0.0.1:8001"]  # b has no A record: no address
    assert len(server.asked("a.mesh.test", "A")) == 1
    ipv6 = await provider.resolve(SRV, Options(record="SRV", target_record="AAAA"))
    assert addresses(ipv6.endpoints) == ["[::1]:8002"]


async def test_srv_ttl_is_the_smallest_of_the_records_it_used(
    server: DnsServer, provider: DnsProvider
) -> None:
    server.a("a.mesh.test", ["127.0.0.1"], ttl=7)
    server.srv(SRV, [(1, 1, 8001, "a.mesh.test")], ttl=60)
    for glue in (True, False):
        server.glue = glue
        answer = await provider.resolve(SRV, Options(record="SRV"))
        assert 6 < answer.ttl <= 7


async def test_srv_dot_target_says_no_service(server: DnsServer, provider: DnsProvider) -> None:
    server.srv(SRV, [(1, 0, 0, ".")])
    assert (await provider.resolve(SRV, Options(record="SRV"))).endpoints == ()


async def test_a_large_srv_answer_comes_over_tcp(server: DnsServer, provider: DnsProvider) -> None:
    server.srv(SRV, [(1, 1, 9000 + i, WEB) for i in range(60)])
    answer = await provider.resolve(SRV, Options(record="SRV"))
    assert len(answer.endpoints) == 60
    assert [q.transport for q in server.asked(SRV, "SRV")] == ["udp", "tcp"]


# -- failures and negative answers ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["servfail", "silent"])
async def test_a_failing_resolver_raises_and_never_yields_a_lesser_set(
    server: DnsServer, provider: DnsProvider, mode: str
) -> None:
    server.srv(SRV, [(1, 1, 8001, WEB)], ttl=1)
    # a 1 s lifetime: the good answers before and after must come within it on a loaded machine
    # too; the silent server's failure still comes well within next_set's 3 s
    options = {"record": "SRV", "min_refresh": "50ms", "max_refresh": "100ms", "timeout": "1s"}
    watch = provider.watch(target(SRV, **options))
    assert addresses(await next_set(watch)) == ["127.0.0.1:8001"]
    server.mode = mode  # type: ignore[assignment]
    with pytest.raises(DnsLookupError):
        await next_set(watch, timeout=3)  # the runner keeps 8001 and watches again
    server.mode = "answer"
    assert addresses(await next_set(provider.watch(target(SRV, **options)))) == ["127.0.0.1:8001"]


async def test_a_failing_srv_target_fails_the_whole_set(server: DnsServer, provider: DnsProvider) -> None:
    server.glue = False
    server.a("a.mesh.test", ["127.0.0.1"])
    server.srv(SRV, [(1, 1, 8001, WEB), (1, 1, 8002, "a.mesh.test")])
    server.failing.add(WEB)  # the SRV answer and a.mesh.test are fine; web's addresses fail
    with pytest.raises(DnsLookupError, match=WEB):
        await provider.resolve(SRV, Options(record="SRV"))
    assert server.asked(SRV, "SRV") and server.asked(WEB, "A")


async def test_nxdomain_is_no_endpoints_until_the_name_appears(
    server: DnsServer, provider: DnsProvider
) -> None:
    server.negative_ttl = 1
    watch = provider.watch(target("new.mesh.test", port=80, min_refresh="50ms"))
    assert await next_set(watch) == ()  # the server says there is no such name: no endpoints
    server.a("new.mesh.test", ["127.0.0.1"], ttl=1)
    appeared = time.monotonic()
    assert addresses(await next_set(watch)) == ["127.0.0.1:80"]
    assert time.monotonic() - appeared < 3.0  # the SOA's negative TTL (1 s), not max_refresh (5 min)
    server.drop("new.mesh.test")
    dropped = time.monotonic()
    assert await next_set(watch) == ()  # gone again: NXDOMAIN, seen within the A record's TTL
    assert time.monotonic() - dropped < 3.0
    await watch.aclose()


async def test_the_negative_ttl_is_clamped_too(server: DnsServer, provider: DnsProvider) -> None:
    server.negative_ttl = 0
    watch = provider.watch(target("gone.mesh.test", port=80, min_refresh="300ms"))
    seen: list[EndpointSet] = []
    reader = asyncio.create_task(collect(watch, seen))
    await until(lambda: len(server.asked("gone.mesh.test", "A")) >= 3, what="3 queries")
    assert all(g > 0.25 for g in gaps([q.at for q in server.asked("gone.mesh.test", "A")]))
    assert seen == [()]
    await provider.aclose()
    await asyncio.wait_for(reader, 1)


async def test_aclose_ends_every_watch_at_once(server: DnsServer, provider: DnsProvider) -> None:
    watch = provider.watch(target(WEB, port=80))  # TTL 60s: the next look is a minute away
    await next_set(watch)
    await provider.aclose()
    with pytest.raises(StopAsyncIteration):
        await next_set(watch, timeout=1)


# -- through a Mesh ------------------------------------------------------------------------------


async def test_traffic_follows_the_srv_records(
    server: DnsServer, provider: DnsProvider, fleet: Fleet
) -> None:
    _, a = fleet.start("a")
    _, b = fleet.start("b")
    port_a, port_b = (int(s.address.rsplit(":", 1)[1]) for s in (a, b))
    server.srv(SRV, [(1, 1, port_a, WEB), (1, 1, port_b, WEB)], ttl=1)
    failures: list[Exception] = []

    async with meshlib.Mesh("checkout") as mesh, mesh.client() as client:

        async def feed() -> None:
            """What the runner does: each set into the snapshot; on failure keep it, watch again."""
            n = 0
            while True:
                try:
                    async for endpoints in provider.watch(target(SRV, record="SRV", min_refresh="50ms")):
                        n += 1
                        mesh.update(lambda s, e=endpoints, v=n: s.with_discovered({"orders": e}, f"dns:{v}"))
                    return
                except DnsLookupError as exc:
                    failures.append(exc)
                    await asyncio.sleep(0.05)

        async def names(n: int) -> Counter[str]:
            return Counter([(await client.get("http://orders/whoami")).json()["name"] for _ in range(n)])

        feeder = asyncio.create_task(feed())
        try:
            await until(lambda: "orders" in mesh.snapshot.discovered, what="the first set")
            assert set(await names(40)) == {"a", "b"}

            server.srv(SRV, [(1, 1, port_b, WEB)], ttl=1)  # a leaves DNS
            await until(lambda: len(mesh.snapshot.discovered["orders"]) == 1, what="a to leave")
            assert set(await names(20)) == {"b"}

            server.mode = "servfail"  # an outage: b keeps serving
            await until(lambda: bool(failures), what="a failed refresh")
            assert set(await names(20)) == {"b"}

            server.mode = "answer"
            server.drop(SRV)  # NXDOMAIN: the service has no endpoints
            await until(lambda: mesh.snapshot.discovered["orders"] == (), what="the empty set")
            with pytest.raises(NoEndpointsError):
                await client.get("http://orders/whoami")
        finally:
            feeder.cancel()
            await provider.aclose()


async def test_the_runner_feeds_a_mesh_from_a_discovery_block(tmp_path: Path, fleet: Fleet) -> None:
    """The same through the discovery runner and the rules, where the runner exists."""
    if importlib.util.find_spec("meshlib.discovery.runner") is None:
        pytest.skip("the discovery runner (meshlib/discovery/runner.py) is not on this branch")
    server = DnsServer()
    _, a = fleet.start("a")
    _, b = fleet.start("b")
    port_a, port_b = (int(s.address.rsplit(":", 1)[1]) for s in (a, b))
    server.a(WEB, ["127.0.0.1"])
    server.srv(SRV, [(1, 1, port_a, WEB), (1, 1, port_b, WEB)], ttl=1)
    block = {"provider": "dns", "name": SRV, "options": {"record": "SRV", "min_refresh": "100ms"}}
    cfg = write_rules(
        tmp_path / "mesh.yaml", [{"kind": "Endpoints", "service": "orders", "discovery": block}]
    )
    try:
        mesh = meshlib.Mesh("checkout", config=cfg, discovery=server.url)
        async with mesh, mesh.client() as client:

            async def names(n: int) -> set[str]:
                return {(await client.get("http://orders/whoami")).json()["name"] for _ in range(n)}

            assert await asyncio.to_thread(mesh.wait_for_discovery, "orders", timeout=5)
            assert await names(30) == {"a", "b"}
            server.srv(SRV, [(1, 1, port_b, WEB)], ttl=1)
            await until(
                lambda: len(getattr(mesh.snapshot.plan("orders"), "endpoints", ())) == 1, what="a to leave"
            )
            assert await names(10) == {"b"}
            server.mode = "servfail"
            queries = len(server.asked(SRV, "SRV"))
            await until(lambda: len(server.asked(SRV, "SRV")) > queries + 1, what="failed refreshes")
            assert await names(10) == {"b"}  # the last good set
    finally:
        server.close()


async def test_traffic_through_a_records(server: DnsServer, provider: DnsProvider, fleet: Fleet) -> None:
    _, a = fleet.start("a")
    port = int(a.address.rsplit(":", 1)[1])
    async with meshlib.Mesh("checkout") as mesh, mesh.client() as client:
        watch = provider.watch(target(WEB, port=port))
        endpoints = await next_set(watch)
        mesh.update(lambda s: s.with_discovered({"orders": endpoints}, "dns:1"))
        r = await client.get("http://orders/whoami")
        assert r.json()["name"] == "a"
        await watch.aclose()


def test_the_docs_example_runs_and_prints_what_the_docs_show() -> None:
    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "discovery.md").read_text()
    section = re.split(r"^## ", re.split(r"^## DNS\n", text, maxsplit=1, flags=re.M)[1], flags=re.M)[0]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    code = next(body for lang, body in blocks if lang == "python" and "asyncio.run(main())" in body)
    shown = next(body for lang, body in blocks if lang == "" and body.startswith("first:"))
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout == shown
