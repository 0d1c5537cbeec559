"""Zone-aware routing end to end: a real Mesh in zone a, uvicorn backends on 127.0.0.1 labelled
in zones a, b and c; traffic stays local while a is healthy, spills in proportion when it is
not, and comes back once it recovers."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

import meshlib
from tests.conftest import Fleet, write_rules

URL = "http://orders/whoami"
OUTLIERS = {"consecutive_5xx": 3, "base_ejection": "2s", "max_ejection_percent": 50, "interval": "10s"}


def zoned(tmp_path: Path, fleet: Fleet, layout: dict[str, int], **dest: object) -> tuple[Path, dict]:
    """Backends named a0, a1, b0, ... labelled with their zone; the rules over them."""
    backends, endpoints = {}, []
    for zone, n in layout.items():
        for i in range(n):
            backend, server = fleet.start(f"{zone}{i}", {"zone": zone})
            backends[backend.name] = backend
            endpoints.append({"address": server.address, "labels": {"zone": zone}})
    docs: list[dict] = [
        {"kind": "Endpoints", "service": "orders", "endpoints": endpoints},
        {"kind": "Destination", "service": "orders", "zone_aware": {"min_cluster_size": 6}} | dest,
    ]
    return write_rules(tmp_path / "mesh.yaml", docs), backends


async def zones_of(client: httpx.AsyncClient, n: int) -> Counter[str]:
    """The zones (first letter of the backend's name) that answered n sequential requests."""
    out: Counter[str] = Counter()
    for _ in range(n):
        r = await client.get(URL)
        r.raise_for_status()
        out[r.json()["name"][0]] += 1
    return out


async def test_local_while_healthy_spills_when_ejected_and_returns(tmp_path: Path, fleet: Fleet) -> None:
    cfg, backends = zoned(tmp_path, fleet, {"a": 2, "b": 2, "c": 2}, outlier_detection=OUTLIERS)
    async with meshlib.Mesh("checkout", config=cfg, labels={"zone": "a"}) as mesh, mesh.client() as client:
        assert await zones_of(client, 120) == {"a": 120}

        before = backends["a0"].hits
        backends["a0"].fail_status = 503
        deadline = time.monotonic() + 5
        while mesh.stats.counter("ejections", "orders") < 1:  # a0 fails until it is ejected
            assert time.monotonic() < deadline, "a0 was not ejected"
            await client.get(URL)
        got = await zones_of(client, 300)  # 1 of 5 healthy in a: 0.6 local, 0.2 to b and c each
        assert backends["a0"].hits == before + 3  # ejected after three 5xx: none of the 300 went there
        assert 0.45 < got["a"] / 300 < 0.75, got
        assert 0.1 < got["b"] / 300 < 0.3 and 0.1 < got["c"] / 300 < 0.3, got

        backends["a0"].fail_status = None
        deadline = time.monotonic() + 5
        while (await zones_of(client, 40)) != {"a": 40}:  # back to all local after base_ejection
            assert time.monotonic() < deadline, "traffic did not return to zone a"
            await asyncio.sleep(0.05)
        assert backends["a0"].hits > before + 3


async def test_a_zone_with_fewer_than_its_share_spills_to_zones_with_room(
    tmp_path: Path, fleet: Fleet
) -> None:
    # a holds 1 of 6 (its share is 2): half stays local, the rest goes to b, the only zone above its
    # share (3 of 6); c, at exactly its share, gets nothing
    cfg, _ = zoned(tmp_path, fleet, {"a": 1, "b": 3, "c": 2})
    async with meshlib.Mesh("checkout", config=cfg, labels={"zone": "a"}) as mesh, mesh.client() as client:
        got = await zones_of(client, 300)
    assert set(got) == {"a", "b"}, got
    assert 0.38 < got["a"] / 300 < 0.62, got


async def test_off_by_default_and_without_a_caller_zone(tmp_path: Path, fleet: Fleet) -> None:
    cfg, _ = zoned(tmp_path, fleet, {"a": 2, "b": 2, "c": 2})
    async with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.client() as client:
        assert await zones_of(client, 60) == {"a": 20, "b": 20, "c": 20}  # no zone: round robin over all
    plain = tmp_path / "plain.yaml"
    write_rules(plain, [d for d in yaml.safe_load_all(cfg.read_text()) if d["kind"] == "Endpoints"])
    async with meshlib.Mesh("checkout", config=plain, labels={"zone": "a"}) as mesh, mesh.client() as client:
        assert await zones_of(client, 60) == {"a": 20, "b": 20, "c": 20}  # no zone_aware: off


async def test_a_pool_in_panic_mode_is_balanced_whole(tmp_path: Path, fleet: Fleet) -> None:
    # panic_threshold 100: one endpoint out puts the pool in panic, and zone routing stands aside
    cfg, backends = zoned(
        tmp_path, fleet, {"a": 2, "b": 2, "c": 2}, outlier_detection=OUTLIERS, panic_threshold=100
    )
    async with meshlib.Mesh("checkout", config=cfg, labels={"zone": "a"}) as mesh, mesh.client() as client:
        assert await zones_of(client, 30) == {"a": 30}
        backends["a0"].fail_status = 503  # fails on: in panic it is still picked, and keeps failing
        deadline = time.monotonic() + 5
        while mesh.stats.counter("ejections", "orders") < 1:
            assert time.monotonic() < deadline, "a0 was not ejected"
            await client.get(URL)
        before = {name: b.hits for name, b in backends.items()}
        for _ in range(60):
            await client.get(URL)
        got = Counter({name[0]: 0 for name in backends})
        for name, b in backends.items():
            got[name[0]] += b.hits - before[name]
    assert mesh.stats.counter("panic", "orders") > 0
    assert got["b"] >= 10 and got["c"] >= 10 and got["a"] <= 35, got  # not 100% local
