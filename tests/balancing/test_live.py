"""Each balancer's defining property, through a real Mesh and real uvicorn backends on 127.0.0.1.

The unit tests next to this file check the policies with fake endpoints and clocks; these check
that the same properties hold end to end: rules from a file, the pipeline's load bookkeeping,
httpx clients (async and sync) and servers that really answer, really stream and really lag.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import httpx

import meshlib
from meshlib.balancing import make_balancer
from tests.backend import Backend
from tests.conftest import Fleet, wait_until, write_rules

URL = "http://orders/whoami"


def orders_docs(
    addresses: Sequence[str],
    load_balancer: str,
    *,
    weights: Sequence[int] | None = None,
    routes: list[dict] | None = None,
    **dest: object,
) -> list[dict]:
    """Endpoints (each labelled with its position: name=0, 1, ...), a Destination, a Route."""
    endpoints = []
    for i, address in enumerate(addresses):
        ep: dict = {"address": address, "labels": {"name": str(i)}}
        if weights is not None:
            ep["weight"] = weights[i]
        endpoints.append(ep)
    docs: list[dict] = [
        {"kind": "Endpoints", "service": "orders", "endpoints": endpoints},
        {"kind": "Destination", "service": "orders", "load_balancer": load_balancer} | dest,
    ]
    if routes is not None:
        docs.append({"kind": "Route", "service": "orders", "routes": routes})
    return docs


def start(fleet: Fleet, *names: str) -> tuple[list[Backend], list[str]]:
    started = [fleet.start(name, {"name": name}) for name in names]
    return [b for b, _ in started], [s.address for _, s in started]


async def sequential(client: httpx.AsyncClient, n: int, **kw: object) -> list[str]:
    """The backend names of n requests sent one after the other, in order."""
    out = []
    for _ in range(n):
        r = await client.get(URL, **kw)
        r.raise_for_status()
        out.append(r.json()["name"])
    return out


async def concurrent(client: httpx.AsyncClient, n: int, width: int = 4, **kw: object) -> Counter[str]:
    sem = asyncio.Semaphore(width)

    async def one() -> str:
        async with sem:
            r = await client.get(URL, **kw)
            r.raise_for_status()
            return r.json()["name"]

    return Counter(await asyncio.gather(*(one() for _ in range(n))))


def ring_owners(mesh: meshlib.Mesh, backends: list[Backend], addresses: list[str]) -> Callable[[str], str]:
    """Where a pure ring over the mesh's current endpoints puts a key (a backend name)."""
    ring = make_balancer("ring_hash", mesh.snapshot.plans["orders"].endpoints)
    by_address = {address: b.name for address, b in zip(addresses, backends, strict=True)}

    def owner(key: str) -> str:
        ep = ring.pick(key)
        assert ep is not None
        return by_address[ep.address]

    return owner


def assert_smooth_rotation(seq: list[str], weights: dict[str, int]) -> None:
    """Every run of sum(weights) consecutive picks holds each endpoint exactly `weight` times."""
    period = sum(weights.values())
    for i in range(len(seq) - period + 1):
        assert Counter(seq[i : i + period]) == weights, (i, seq[i : i + period])


# -- round robin ---------------------------------------------------------------------------------


async def test_round_robin_is_exact_and_smooth(tmp_path: Path, fleet: Fleet) -> None:
    _, addresses = start(fleet, "a", "b", "c")
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs(addresses, "round_robin"))
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        seq = await sequential(client, 300)
    assert Counter(seq) == {"a": 100, "b": 100, "c": 100}
    assert_smooth_rotation(seq, {"a": 1, "b": 1, "c": 1})  # a strict rotation, not 100 a's then 100 b's

    _, weighted = start(fleet, "heavy", "light")
    cfg = write_rules(tmp_path / "weighted.yaml", orders_docs(weighted, "round_robin", weights=[3, 1]))
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        seq = await sequential(client, 400)
    assert Counter(seq) == {"heavy": 300, "light": 100}
    assert_smooth_rotation(seq, {"heavy": 3, "light": 1})  # interleaved: never 4 heavy in a row


def test_round_robin_through_the_sync_client(tmp_path: Path, fleet: Fleet) -> None:
    _, addresses = start(fleet, "a", "b", "c")
    _, weighted = start(fleet, "heavy", "light")
    docs = orders_docs(addresses, "round_robin")
    cfg = write_rules(tmp_path / "mesh.yaml", docs)
    with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.sync_client() as client:
        seq = [client.get(URL).json()["name"] for _ in range(300)]
    assert Counter(seq) == {"a": 100, "b": 100, "c": 100}
    assert_smooth_rotation(seq, {"a": 1, "b": 1, "c": 1})

    cfg = write_rules(tmp_path / "weighted.yaml", orders_docs(weighted, "round_robin", weights=[3, 1]))
    with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.sync_client() as client:
        seq = [client.get(URL).json()["name"] for _ in range(400)]
    assert Counter(seq) == {"heavy": 300, "light": 100}
    assert_smooth_rotation(seq, {"heavy": 3, "light": 1})


# -- least request -------------------------------------------------------------------------------


async def test_least_request_avoids_the_endpoint_with_requests_in_flight(
    tmp_path: Path, fleet: Fleet
) -> None:
    backends, addresses = start(fleet, "a", "b", "c")
    a = backends[0]
    # x-pin: a goes to the subset holding only a; everything else is balanced over all three.
    routes = [{"match": {"headers": {"x-pin": {"exact": "a"}}}, "to": [{"subset": "a"}]}, {"to": [{}]}]
    docs = orders_docs(addresses, "least_request", routes=routes, subsets={"a": {"name": "0"}})
    cfg = write_rules(tmp_path / "mesh.yaml", docs)
    held = 10
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        load_a = mesh.loads.get(addresses[0])
        async with AsyncExitStack() as stack:
            # Ten streams through the same Mesh, pinned to a: headers back, body due in 2 s.
            streams = [
                await stack.enter_async_context(
                    client.stream("GET", "http://orders/stream?chunks=1&ms=2000", headers={"x-pin": "a"})
                )
                for _ in range(held)
            ]
            assert a.in_flight == held
            assert load_a.outstanding == held  # the mesh counts them as load on a

            # At most 4 short requests are in flight on b and c, so a (10) loses every
            # comparison it is drawn into: least request never picks it.
            counts = await concurrent(client, 200, width=4)
            assert load_a.outstanding == held, "the streams ended before the short requests did"
            bodies = await asyncio.gather(*(r.aread() for r in streams))
        assert bodies == [b"a:0\n"] * held
        await asyncio.to_thread(wait_until, lambda: load_a.outstanding == 0, 5.0, "a's load to drain")

        assert counts["a"] == 0, counts
        # b and c split the rest: sd of b's share is ~3.5 points, this is over 4 sd either way.
        assert 0.35 <= counts["b"] / 200 <= 0.65, counts
        assert counts["b"] + counts["c"] == 200

        # Once its streams are over, a takes its third again (sd ~2.7 points; over 4 sd).
        after = await concurrent(client, 300, width=4)
    assert 0.22 <= after["a"] / 300 <= 0.45, after


# -- peak EWMA -----------------------------------------------------------------------------------

DECAY_S = 1.0
"""Peak-EWMA decay for the latency-aware tests.

Finagle's 10 s would make a shunned endpoint wait ~15-25 s before it is tried again here;
1 s keeps the same mechanism on a time scale a test can afford.
"""

WORKERS = 4
"""Concurrent request loops. Client and backends share one process (and its GIL): with many
more, a fast request's latency becomes mostly queueing and the slow endpoint stands out less."""

SLOW_S = 0.2
"""The slow endpoint's added delay: ~100x a request to an idle backend, ~20x one under load."""


async def traffic(client: httpx.AsyncClient, seconds: float) -> list[tuple[float, str]]:
    """WORKERS concurrent request loops for `seconds`: (start time, backend name) of each request.

    A request's start time orders it among the picks: nothing between `client.get` and the
    balancer's pick yields to the event loop.
    """
    records: list[tuple[float, str]] = []
    stop = time.monotonic() + seconds

    async def worker() -> None:
        while (t := time.monotonic()) < stop:
            r = await client.get(URL)
            r.raise_for_status()
            records.append((t, r.json()["name"]))

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    return records


def share_of(name: str, records: list[tuple[float, str]], since: float = 0.0) -> float:
    window = [n for t, n in records if t >= since]
    assert len(window) >= 30, f"only {len(window)} requests in the window"
    return window.count(name) / len(window)


async def slow_endpoint_scenario(tmp_path: Path, fleet: Fleet, load_balancer: str) -> float:
    """a becomes SLOW_S slower than the others: a's share of the second second after that."""
    backends, addresses = start(fleet, "a", "b", "c")
    a = backends[0]
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs(addresses, load_balancer))
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        for address in addresses:
            mesh.loads.get(address).decay = DECAY_S
        # All equally fast, a gets its part. Polled: a stall of the machine on a's first request
        # (its connection) is a peak that shuns a for about DECAY_S (seen under CI's load).
        await until_share_of_a(client, lambda share: share > 0.15, "a to get its part while fast")

        a.delay = SLOW_S
        t0 = time.monotonic()
        slow = await traffic(client, 2.0)
        share = share_of("a", slow, since=t0 + 1.0)
        if load_balancer != "peak_ewma":
            return share

        # a is fast again: its cost decays until it wins comparisons, then its fast answers
        # bring its average down; it gets a fair part of the traffic back within a few seconds.
        a.delay = 0.0
        await until_share_of_a(client, lambda share: share >= 0.2, "a to get traffic back, fast again")
    return share


async def until_share_of_a(client: httpx.AsyncClient, enough: Callable[[float], bool], what: str) -> None:
    """Windows of traffic until a's share in one is `enough`, for at most 10 s. A window with too
    few requests to judge (the machine stalled) is no verdict."""
    deadline = time.monotonic() + 10.0
    shares: list[Counter[str]] = []
    while True:
        window = await traffic(client, 0.3)
        names = Counter(n for _, n in window)
        shares.append(names)
        if len(window) >= 30 and enough(names["a"] / len(window)):
            return
        assert time.monotonic() < deadline, f"waiting for {what}: {shares}"


async def test_peak_ewma_shuns_a_slow_endpoint_and_takes_it_back(tmp_path: Path, fleet: Fleet) -> None:
    share = await slow_endpoint_scenario(tmp_path, fleet, "peak_ewma")
    assert share < 0.10, share


async def test_round_robin_keeps_sending_a_slow_endpoint_its_third(tmp_path: Path, fleet: Fleet) -> None:
    # The contrast to the test above: the same slow endpoint keeps its place in the rotation.
    share = await slow_endpoint_scenario(tmp_path, fleet, "round_robin")
    assert 0.30 <= share <= 0.37, share


# -- ring hash -----------------------------------------------------------------------------------


async def test_ring_hash_on_header_is_sticky_and_moves_only_the_removed_endpoints_keys(
    tmp_path: Path, fleet: Fleet
) -> None:
    backends, addresses = start(fleet, "a", "b", "c", "d", "e")
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs(addresses, "ring_hash", hash_on="header:x-user"))
    users = [f"user-{i}" for i in range(200)]
    async with meshlib.Mesh("checkout", config=cfg, watch_interval=0.05) as mesh, mesh.client() as client:
        sem = asyncio.Semaphore(4)

        async def one(user: str) -> str:
            async with sem:
                r = await client.get(URL, headers={"x-user": user})
                r.raise_for_status()
                return r.json()["name"]

        async def owners(rounds: int) -> dict[str, str]:
            """Each user's backend, after checking that every round of requests agrees on it."""
            placed: dict[str, set[str]] = {}
            for _ in range(rounds):
                for user, name in zip(users, await asyncio.gather(*(one(u) for u in users)), strict=True):
                    placed.setdefault(user, set()).add(name)
            unstable = {u: names for u, names in placed.items() if len(names) > 1}
            assert not unstable, unstable
            return {u: names.pop() for u, names in placed.items()}

        before = await owners(3)
        assert set(before.values()) == {"a", "b", "c", "d", "e"}
        # The key is the header's value: the pure ring over the same endpoints agrees.
        owner = ring_owners(mesh, backends, addresses)
        assert all(owner(u) == before[u] for u in users)

        gone = "c"
        version = mesh.snapshot.version
        write_rules(cfg, orders_docs(addresses[:2] + addresses[3:], "ring_hash", hash_on="header:x-user"))
        await asyncio.to_thread(wait_until, lambda: mesh.snapshot.version != version, 5.0, "rules swap")
        assert addresses[2] not in {ep.address for ep in mesh.snapshot.plans["orders"].endpoints}
        hits_gone = backends[2].hits
        after = await owners(1)
    assert backends[2].hits == hits_gone

    moved = {u for u in users if after[u] != before[u]}
    assert moved == {u for u in users if before[u] == gone}  # all of c's keys, and no other
    # c held about 1/5 of the keys (sd ~3 points of key sampling, plus the ring's own unevenness).
    assert 0.08 <= len(moved) / len(users) <= 0.35, len(moved)
    # Virtual nodes spread c's keys over the others instead of handing them all to one neighbour.
    assert len({after[u] for u in moved}) >= 2


async def test_ring_hash_on_cookie(tmp_path: Path, fleet: Fleet) -> None:
    backends, addresses = start(fleet, "a", "b", "c")
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs(addresses, "ring_hash", hash_on="cookie:session"))
    sessions = [f"s{i:03d}" for i in range(60)]
    # The session cookie alone decides, wherever it sits among other cookies.
    jars = ["session={}", "theme=dark; session={}", "session={}; lang=en; x=1"]
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        owner = ring_owners(mesh, backends, addresses)
        placed: dict[str, set[str]] = {}
        for s in sessions:
            for jar in jars:
                r = await client.get(URL, headers={"cookie": jar.format(s)})
                placed.setdefault(s, set()).add(r.json()["name"])
    # The key is the cookie's value: the pure ring over the same endpoints agrees.
    assert all(names == {owner(s)} for s, names in placed.items()), placed
    assert {name for names in placed.values() for name in names} == {"a", "b", "c"}


# -- random --------------------------------------------------------------------------------------


async def test_weighted_random_follows_endpoint_weights(tmp_path: Path, fleet: Fleet) -> None:
    _, addresses = start(fleet, "light", "heavy")
    cfg = write_rules(tmp_path / "mesh.yaml", orders_docs(addresses, "random", weights=[1, 3]))
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        counts = await concurrent(client, 2000)
    # sd of the share is ~1 point: +-4 points is 4 sd, and an unweighted 50/50 is 25 points off.
    assert 0.71 <= counts["heavy"] / 2000 <= 0.79, counts
