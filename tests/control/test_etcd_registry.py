"""The registry, one suite for both backends (in memory with registry.json, and etcd shared by
replicas), then what only replicas over etcd can show: an instance registered on one replica is
seen by the subscribers of the others, heartbeats and deregistrations go to any replica, a
killed instance's lease removes it everywhere, and etcd going away or losing its leader
neither loses nor doubles a registration. Real control services on 127.0.0.1 over a real
3-member etcd cluster (tests/control/conftest.py)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshlib.control import ControlPlane, ControlSettings
from meshlib.control.etcd_client import EtcdClient, parse_etcd_url, prefix_end
from meshlib.control.etcd_registry import EtcdRegistry
from meshlib.control.stream import STEP
from tests.conftest import wait_until
from tests.control import Control, Watcher, wait_for
from tests.control.etcd_cluster import EtcdCluster
from tests.control.test_etcd_store import LoseTxnAnswers

Start = Callable[..., Control]


def _url(cluster: EtcdCluster) -> str:
    return f"{cluster.endpoints}/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["memory", "etcd"])
def start(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Start]:
    """Starts a control service on the backend of the run; on etcd, every call is another
    replica on the same store."""
    started: list[Control] = []
    url = _url(request.getfixturevalue("etcd_cluster")) if request.param == "etcd" else None

    def start_one(**options: Any) -> Control:
        store = {"etcd": parse_etcd_url(url)} if url is not None else {}
        started.append(Control(tmp_path / f"r{len(started)}", **store, **options))
        return started[-1]

    yield start_one
    for c in started:
        c.stop()


def _register(c: Control, service: str, address: str, **body: Any) -> httpx.Response:
    return c.http.post(f"/v1/registry/{service}", json={"address": address, **body})


def _shown(registry: dict[str, list[dict[str, Any]]]) -> dict[str, list[tuple[Any, ...]]]:
    return {s: [(i["id"], i["address"], i["labels"], i["weight"]) for i in v] for s, v in registry.items()}


def _listed(c: Control, service: str) -> list[tuple[str, str]]:
    return [(i["address"], i["id"]) for i in c.http.get(f"/v1/registry/{service}").json()[service]]


# --------------------------------------------------------------------------------------------
# Both backends


async def test_register_heartbeat_deregister(start: Start) -> None:
    c = start()
    async with Watcher(c.url, "w") as w:
        await w.next_event("snapshot")
        r = await asyncio.to_thread(_register, c, "orders", "127.0.0.1:8001", labels={"v": "1"}, weight=2)
        assert r.status_code == 201 and r.json()["ttl"] == 10
        first = r.json()["id"]
        # answered once this replica's registry holds it (on etcd: once its watch brought it back)
        assert _listed(c, "orders") == [("127.0.0.1:8001", first)]
        event = await w.next_event("endpoint", address="127.0.0.1:8001")
        assert event["id"] == first and event["endpoint"] == {
            "address": "127.0.0.1:8001",
            "labels": {"v": "1"},
            "weight": 2,
        }
        listed = c.http.get("/v1/registry/orders").json()["orders"][0]
        assert 9 < listed["expires_in"] <= 10
        assert c.http.put(f"/v1/registry/orders/{first}").json() == {"id": first, "ttl": 10}
        assert c.http.put(f"/v1/registry/orders/{first}", json={"ttl": 30}).json() == {"id": first, "ttl": 30}
        assert c.http.put(f"/v1/registry/orders/{first}").json() == {"id": first, "ttl": 30}
        assert 29 < c.http.get("/v1/registry/orders").json()["orders"][0]["expires_in"] <= 30
        assert c.http.put("/v1/registry/orders/unknown").status_code == 404
        assert c.http.put(f"/v1/registry/payments/{first}").status_code == 404  # another service's id
        assert c.http.delete(f"/v1/registry/payments/{first}").status_code == 404
        assert c.http.delete(f"/v1/registry/orders/{first}").status_code == 204
        assert c.http.get("/v1/registry/orders").json() == {"orders": []}
        gone = await w.next_event("endpoint", address="127.0.0.1:8001", endpoint=None)
        assert c.http.delete(f"/v1/registry/orders/{first}").status_code == 404
        assert c.http.put(f"/v1/registry/orders/{first}").status_code == 404
        # one event per change, a ttl change is none
        assert [e["endpoint"] is None for e in w.of("endpoint")] == [False, True]
        assert gone["revision"] > event["revision"]


async def test_a_second_registration_at_an_address_replaces_the_first(start: Start) -> None:
    """A new process at the address: a new id; the old process can neither heartbeat nor
    deregister it (its late deregistration does not remove its successor)."""
    c = start()
    async with Watcher(c.url, "w") as w:
        await w.next_event("snapshot")
        old = _register(c, "orders", "127.0.0.1:8001").json()["id"]
        new = _register(c, "orders", "127.0.0.1:8001", labels={"v": "2"}).json()["id"]
        assert new != old and _listed(c, "orders") == [("127.0.0.1:8001", new)]
        await w.next_event("endpoint", id=new)
        assert c.http.put(f"/v1/registry/orders/{old}").status_code == 404
        assert c.http.delete(f"/v1/registry/orders/{old}").status_code == 404
        assert _listed(c, "orders") == [("127.0.0.1:8001", new)]
        assert c.http.put(f"/v1/registry/orders/{new}").status_code == 200
        other = _register(c, "payments", "127.0.0.1:8001").json()["id"]  # another service, same address
        assert _listed(c, "payments") == [("127.0.0.1:8001", other)] and len(c.plane.registry) == 2
        await w.next_event("endpoint", id=other)
        assert [e["id"] for e in w.of("endpoint")] == [old, new, other]


async def test_a_new_subscriber_gets_the_registry_in_its_snapshot(start: Start) -> None:
    c = start()
    first = _register(c, "orders", "127.0.0.1:8001", labels={"v": "1"}).json()["id"]
    second = _register(c, "payments", "[::1]:9000", weight=3).json()["id"]
    async with Watcher(c.url, "w") as w:
        snap = await w.next_event("snapshot")
    assert snap["endpoints"] == {
        "orders": [{"address": "127.0.0.1:8001", "labels": {"v": "1"}, "weight": 1}],
        "payments": [{"address": "[::1]:9000", "labels": {}, "weight": 3}],
    }
    assert snap["instances"] == {"orders": {"127.0.0.1:8001": first}, "payments": {"[::1]:9000": second}}


def test_bounds(start: Start) -> None:
    c = start(max_instances=2)
    assert _register(c, "orders", "127.0.0.1:8001").status_code == 201
    assert _register(c, "orders", "127.0.0.1:8002").status_code == 201
    full = _register(c, "orders", "127.0.0.1:8003")
    assert full.status_code == 429 and "2 instances" in full.json()["error"]
    replacing = _register(c, "orders", "127.0.0.1:8002", weight=5)
    assert replacing.status_code == 201  # a replacement needs no room
    for ttl in (0.5, 3601):
        assert _register(c, "orders", "127.0.0.1:8001", ttl=ttl).status_code == 422
    first = _listed(c, "orders")[0][1]
    assert c.http.put(f"/v1/registry/orders/{first}", json={"ttl": 0}).status_code == 422
    bad = _register(c, "orders", "127.0.0.1:8001", labels={"a": "x\x00y"})
    assert bad.status_code == 422 and "printable" in bad.text
    assert len(c.plane.registry) == 2


async def test_an_instance_that_stops_heartbeating_expires(start: Start) -> None:
    """ttl 1: the silent one goes (on etcd when its lease runs out, at most a second or so
    later), the heartbeating one stays."""
    c = start()
    async with Watcher(c.url, "w") as w:
        await w.next_event("snapshot")
        _register(c, "orders", "127.0.0.1:8001", ttl=1)
        alive = _register(c, "orders", "127.0.0.1:8002", ttl=1).json()["id"]
        started = time.monotonic()

        def beat_until_gone() -> bool:
            assert c.http.put(f"/v1/registry/orders/{alive}").status_code == 200
            return [a for a, _ in _listed(c, "orders")] == ["127.0.0.1:8002"]

        await wait_for(beat_until_gone, 5.0, "the silent instance gone")
        assert time.monotonic() - started >= 0.9  # not before its TTL
        await w.next_event("endpoint", address="127.0.0.1:8001", endpoint=None)
        assert not any(e["address"] == "127.0.0.1:8002" and e["endpoint"] is None for e in w.of("endpoint"))


# --------------------------------------------------------------------------------------------
# Replicas over etcd


@pytest.fixture
def replicas(etcd_cluster: EtcdCluster, tmp_path: Path) -> Iterator[Callable[[int], list[Control]]]:
    started: list[Control] = []
    url = _url(etcd_cluster)

    def start_n(n: int, etcd_timeout: float = 5.0, **options: Any) -> list[Control]:
        etcd = parse_etcd_url(url, timeout=etcd_timeout)
        more = [Control(tmp_path / f"r{len(started) + i}", etcd=etcd, **options) for i in range(n)]
        started.extend(more)
        return more

    yield start_n
    for c in started:
        c.stop()


async def test_registered_on_a_heartbeated_on_b_deregistered_on_c(
    replicas: Callable[..., list[Control]],
) -> None:
    a, b, c = replicas(3)
    async with Watcher(b.url, "on-b") as wb, Watcher(c.url, "on-c") as wc:
        await wb.next_event("snapshot")
        await wc.next_event("snapshot")
        started = time.monotonic()
        instance = (await asyncio.to_thread(_register, a, "orders", "127.0.0.1:8001", ttl=1)).json()["id"]
        # through etcd's watch to both replicas: 4 s, not 2, for a machine under CI's load
        on_b = await wb.next_event("endpoint", id=instance, timeout=4.0)
        on_c = await wc.next_event("endpoint", id=instance, timeout=4.0)
        assert time.monotonic() - started < 4.0
        assert on_b == on_c and wb.events[-1].id == wc.events[-1].id  # the same event id everywhere
        assert on_b["revision"] % STEP == 0  # a store position

        # heartbeats on B for two TTLs keep it on every replica
        until = time.monotonic() + 2.2
        while time.monotonic() < until:
            assert (await asyncio.to_thread(b.http.put, f"/v1/registry/orders/{instance}")).status_code == 200
            await asyncio.sleep(0.3)
        for x in (a, b, c):
            assert _listed(x, "orders") == [("127.0.0.1:8001", instance)]
            # a replica's clock far ahead expires nothing: the lease in etcd decides
            assert x.plane.registry.expire(time.monotonic() + 1e6) == set() and len(x.plane.registry) == 1

        assert (await asyncio.to_thread(c.http.delete, f"/v1/registry/orders/{instance}")).status_code == 204
        for w in (wb, wc):
            await w.next_event("endpoint", address="127.0.0.1:8001", endpoint=None, timeout=2.0)
        assert [e.id for e in wb.events] == [e.id for e in wc.events]
        await wait_for(lambda: all(x.plane.registry.all() == {} for x in (a, b, c)), 5.0, "gone everywhere")


async def test_a_killed_instance_disappears_from_every_replica_when_its_lease_expires(
    replicas: Callable[..., list[Control]],
) -> None:
    a, b, c = replicas(3)
    async with Watcher(c.url, "on-c") as wc:
        await wc.next_event("snapshot")
        dead = (await asyncio.to_thread(_register, a, "orders", "127.0.0.1:8001", ttl=1)).json()["id"]
        live = (await asyncio.to_thread(_register, b, "orders", "127.0.0.1:8002", ttl=30)).json()["id"]
        assert (await asyncio.to_thread(b.http.put, f"/v1/registry/orders/{dead}")).status_code == 200
        killed = time.monotonic()  # no heartbeat from here on: the process is gone

        def everywhere_gone() -> bool:
            return all(x.plane.registry.get("orders", dead) is None for x in (a, b, c))

        await wait_for(everywhere_gone, 5.0, "the dead instance gone from every replica")
        assert time.monotonic() - killed >= 0.9
        await wc.next_event("endpoint", address="127.0.0.1:8001", endpoint=None)
        for x in (a, b, c):
            assert _listed(x, "orders") == [("127.0.0.1:8002", live)]
        assert (await asyncio.to_thread(a.http.put, f"/v1/registry/orders/{dead}")).status_code == 404


_INSTANCE = """
import asyncio, sys
from meshlib.control.registration import Registration

async def main():
    registration = Registration(sys.argv[1], "orders", "127.0.0.1:8009", ttl=1)
    task = asyncio.create_task(registration.run())
    await registration.registered.wait()
    print(registration.instance_id, flush=True)
    await task

asyncio.run(main())
"""


async def test_a_process_killed_with_sigkill_leaves_every_replica(
    replicas: Callable[..., list[Control]],
) -> None:
    """meshlib's own registration client in a process of its own, heartbeating replica A
    (ttl 1: every third of a second): alive past its TTL on every replica; SIGKILLed (no
    deregistration), it is gone from all three once its lease runs out."""
    a, b, c = replicas(3)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _INSTANCE, a.url, stdout=asyncio.subprocess.PIPE, env=_env()
    )
    try:
        assert proc.stdout is not None
        instance = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        assert instance, "the instance process did not register"
        await wait_for(lambda: all(x.plane.registry.get("orders", instance) for x in (a, b, c)), 5.0, "seen")
        await asyncio.sleep(1.5)  # its heartbeats keep it past its TTL
        assert all(x.plane.registry.get("orders", instance) for x in (a, b, c))
    finally:
        proc.kill()
        await proc.wait()
    killed = time.monotonic()
    await wait_for(
        lambda: not any(x.plane.registry.get("orders", instance) for x in (a, b, c)), 5.0, "gone everywhere"
    )
    assert time.monotonic() - killed >= 0.5  # not before its lease ran out


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def test_replacement_across_replicas(replicas: Callable[..., list[Control]]) -> None:
    a, b, c = replicas(3)
    old = _register(a, "orders", "127.0.0.1:8001", ttl=30).json()["id"]
    old_lease = a.plane.registry.at("orders", "127.0.0.1:8001").lease  # type: ignore[union-attr]
    new = _register(b, "orders", "127.0.0.1:8001", ttl=30, labels={"v": "2"}).json()["id"]
    assert new != old
    # C may not have watched either yet: it asks etcd
    assert c.http.put(f"/v1/registry/orders/{old}").status_code == 404
    assert c.http.delete(f"/v1/registry/orders/{old}").status_code == 404
    assert a.http.delete(f"/v1/registry/orders/{old}").status_code == 404
    assert c.http.put(f"/v1/registry/orders/{new}").status_code == 200
    wait_ok = time.monotonic() + 2.0
    while any(_listed(x, "orders") != [("127.0.0.1:8001", new)] for x in (a, b, c)):
        assert time.monotonic() < wait_ok, [_listed(x, "orders") for x in (a, b, c)]
        time.sleep(0.01)
    with EtcdClient(a.plane.store.options) as etcd:  # type: ignore[attr-defined]
        registry = EtcdRegistry(a.plane.store.options, client=etcd)  # type: ignore[attr-defined]
        kvs, _ = registry.load()
        assert [registry.names(kv.key) for kv in kvs] == [("orders", "127.0.0.1:8001")]
        # the replaced instance's lease was revoked: its process cannot keep anything alive
        assert kvs[0].lease != old_lease and etcd.keepalive(old_lease) == 0
        assert etcd.keepalive(kvs[0].lease) > 0
        # a new ttl on C: a new lease under the same id, seen by A; the old lease is revoked
        assert c.http.put(f"/v1/registry/orders/{new}", json={"ttl": 20}).json() == {"id": new, "ttl": 20}
        ((kv,), _) = registry.load()
        assert kv.lease != kvs[0].lease and etcd.keepalive(kvs[0].lease) == 0
        deadline = time.monotonic() + 2.0
        while not 19 < a.http.get("/v1/registry/orders").json()["orders"][0]["expires_in"] <= 20:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert a.http.put(f"/v1/registry/orders/{new}").json() == {"id": new, "ttl": 20}


def _expires_in(c: Control) -> float:
    return float(c.http.get("/v1/registry/orders").json()["orders"][0]["expires_in"])


def test_expires_in_is_the_leases_time_left_also_after_a_heartbeat_on_another_replica(
    replicas: Callable[..., list[Control]],
) -> None:
    a, b = replicas(2)
    r = _register(a, "orders", "127.0.0.1:8001", ttl=4)
    instance = r.json()["id"]
    assert 3.5 < _expires_in(a) <= 4  # the lease this replica was just granted
    wait_until(lambda: _expires_in(a) <= 2.0, 4.0, "the time left to run down")  # not the TTL
    wait_until(lambda: _expires_in(b) <= 2.5, 2.0, "the other replica to see it run down too")
    assert b.http.put(f"/v1/registry/orders/{instance}").status_code == 200  # renewed on B
    assert _expires_in(b) > 3.5  # B renewed it: it knows
    wait_until(lambda: _expires_in(a) >= 2.5, 2.0, "A to learn of the renewal from etcd")


def test_a_leases_time_left_is_asked_of_etcd_once_per_listing_window(etcd_cluster: EtcdCluster) -> None:
    options = parse_etcd_url(_url(etcd_cluster))
    with EtcdRegistry(options) as here, EtcdRegistry(options, client=AskCounting(options)) as other:
        leases = [
            _lease_of(here, here.register("orders", f"127.0.0.1:{port}", labels={}, weight=1, ttl=10).id)
            for port in (8001, 8002)
        ]
        # the replica that granted the leases knows their time left without asking
        assert all(9 < here.time_left(lease) <= 10 for lease in leases)  # type: ignore[operator]
        assert other.time_left(leases[0]) is None  # another replica has not asked yet
        other.refresh(leases)
        other.refresh(leases)  # within FRESH: nothing is asked again
        assert other._client.asked == 2  # type: ignore[attr-defined]
        assert all(8.5 <= other.time_left(lease) <= 10 for lease in leases)  # type: ignore[operator]


class AskCounting(EtcdClient):
    """A real client that counts the LeaseTimeToLive requests it sends."""

    asked = 0

    def call(self, path: str, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        if path == "/v3/lease/timetolive":
            self.asked += 1
        return super().call(path, body, **kwargs)


def _lease_of(registry: EtcdRegistry, instance_id: str) -> int:
    kvs, _ = registry.load()
    (kv,) = [kv for kv in kvs if registry.instance(kv, 0.0).id == instance_id]
    return kv.lease


def test_the_bound_holds_across_replicas(replicas: Callable[..., list[Control]]) -> None:
    a, b = replicas(2, max_instances=2)
    assert _register(a, "orders", "127.0.0.1:8001").status_code == 201
    assert _register(a, "orders", "127.0.0.1:8002").status_code == 201
    deadline = time.monotonic() + 2.0
    while len(b.plane.registry) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert _register(b, "orders", "127.0.0.1:8003").status_code == 429
    assert _register(b, "orders", "127.0.0.1:8001").status_code == 201


def test_a_restart_of_every_replica_loses_nothing(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    url = _url(etcd_cluster)
    first = [Control(tmp_path / f"a{i}", etcd=parse_etcd_url(url)) for i in range(2)]
    try:
        ids = {
            _register(first[0], "orders", "127.0.0.1:8001", ttl=30, labels={"v": "1"}).json()["id"],
            _register(first[1], "orders", "127.0.0.1:8002", ttl=30).json()["id"],
            _register(first[1], "payments", "[::1]:9000", ttl=30, weight=7).json()["id"],
        }
        before = first[0].http.get("/v1/registry").json()
    finally:
        for c in first:
            c.stop()
    assert not any((tmp_path / f"a{i}" / "registry.json").exists() for i in range(2))
    second = [Control(tmp_path / f"b{i}", etcd=parse_etcd_url(url)) for i in range(2)]  # new machines
    try:
        for c in second:
            after = c.http.get("/v1/registry").json()
            assert _shown(after) == _shown(before)
        assert {i["id"] for v in before.values() for i in v} == ids
        for instance in ids:  # the same ids heartbeat on the new replicas
            service = "payments" if second[0].plane.registry.get("payments", instance) else "orders"
            assert second[1].http.put(f"/v1/registry/{service}/{instance}").status_code == 200
    finally:
        for c in second:
            c.stop()


async def test_an_endpoint_subscriber_resumes_on_another_replica(
    replicas: Callable[..., list[Control]],
) -> None:
    """Endpoint events have store positions too: a Last-Event-ID from A resumes on B without
    a snapshot, with the registrations it missed."""
    a, b = replicas(2)
    async with Watcher(a.url, "mover") as w:
        await w.next_event("snapshot")
        first = (await asyncio.to_thread(_register, b, "orders", "127.0.0.1:8001")).json()["id"]
        await w.next_event("endpoint", id=first)
        last_id = w.events[-1].id
    second = (await asyncio.to_thread(_register, a, "orders", "127.0.0.1:8002")).json()["id"]
    await wait_for(lambda: b.plane.registry.get("orders", second), 2.0, "B has the second instance")
    async with Watcher(b.url, "mover", last_event_id=last_id) as w:
        await w.next_event("endpoint", id=second)
        assert [e.event for e in w.events] == ["endpoint"]


async def test_an_etcd_leader_killed_mid_registration(
    etcd_cluster: EtcdCluster, replicas: Callable[..., list[Control]]
) -> None:
    """Registrations while the leader dies: each one lands once (201, its id is the one
    served) or fails cleanly (503, and nothing is left of it); the next one succeeds."""
    a, b = replicas(2, etcd_timeout=1.0)  # a request stuck on the dead leader: retried after 1 s
    leader = etcd_cluster.leader()
    addresses = [f"127.0.0.1:{8000 + i}" for i in range(8)]
    try:

        def register(address: str) -> tuple[str, httpx.Response]:
            return address, _register(a, "orders", address, ttl=30)

        calls = [asyncio.to_thread(register, address) for address in addresses]
        killer = asyncio.to_thread(etcd_cluster.kill, leader)
        *results, _ = await asyncio.gather(*calls, killer)
        landed = {address: r.json()["id"] for address, r in results if r.status_code == 201}
        failed = [address for address, r in results if r.status_code != 201]
        assert all(r.status_code in (201, 503) for _, r in results), [r.text for _, r in results]
        assert all("etcd" in r.json()["error"] for _, r in results if r.status_code == 503)

        def served() -> dict[str, str]:
            return {address: instance for address, instance in _listed(b, "orders")}

        await wait_for(lambda: all(served().get(x) == i for x, i in landed.items()), 5.0, "the landed ones")
        with EtcdClient(a.plane.store.options) as etcd:  # type: ignore[attr-defined]
            kvs, _ = EtcdRegistry(a.plane.store.options, client=etcd).load()  # type: ignore[attr-defined]
            assert len(kvs) == len({kv.key for kv in kvs}) and len(kvs) <= len(addresses)
        # a failed one is no instance (its lease revoked or run out), whatever became of its put
        await wait_for(lambda: not set(failed) & set(served()), 5.0, "nothing left of the failed ones")
        after = await asyncio.to_thread(_register, a, "orders", "127.0.0.1:9999")
        assert after.status_code == 201
    finally:
        await asyncio.to_thread(etcd_cluster.restart, leader)


async def test_etcd_gone_keeps_the_registry_served_and_refuses_changes_with_503(tmp_path: Path) -> None:
    with EtcdCluster(tmp_path / "etcd", 1) as cluster:
        c = Control(tmp_path / "c", etcd=parse_etcd_url(f"{cluster.endpoints}/outage"))
        try:
            instance = _register(c, "orders", "127.0.0.1:8001", ttl=60).json()["id"]
            assert c.plane.etcd_registry is not None
            c.plane.etcd_registry.write_timeout = 0.5
            cluster.members[0].kill()
            assert _listed(c, "orders") == [("127.0.0.1:8001", instance)]
            for reply in (
                _register(c, "orders", "127.0.0.1:8002"),
                c.http.put(f"/v1/registry/orders/{instance}"),
                c.http.delete(f"/v1/registry/orders/{instance}"),
            ):
                assert reply.status_code == 503 and "etcd" in reply.json()["error"], reply.text
                assert reply.headers["retry-after"] == "1"
            assert _listed(c, "orders") == [("127.0.0.1:8001", instance)]
            await asyncio.to_thread(cluster.members[0].start)
            await asyncio.to_thread(cluster.wait_healthy)
            assert c.http.put(f"/v1/registry/orders/{instance}").status_code == 200
            second = _register(c, "orders", "127.0.0.1:8002").json()["id"]
            assert _listed(c, "orders") == [("127.0.0.1:8001", instance), ("127.0.0.1:8002", second)]
        finally:
            c.stop()


async def test_a_watch_that_lost_its_place_reads_the_registry_again(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    """Compacted past the replica's place: it reads the registry again and publishes only what
    differs from what it served (one instance it had, one new, one gone), then watches on. The
    history it was to read again at its start is gone too (deregistrations since the newest key
    may be in it), so a client from before the read gets a snapshot, not a resume."""
    url = _url(etcd_cluster)
    options = parse_etcd_url(url)
    with EtcdClient(options) as etcd:
        other = EtcdRegistry(options, client=etcd)
        kept = other.register("orders", "127.0.0.1:8001", labels={}, weight=1, ttl=30).id
        leaving = other.register("orders", "127.0.0.1:8002", labels={}, weight=1, ttl=30).id
        plane = ControlPlane(ControlSettings(tmp_path / "p", etcd=options))
        task = None
        try:
            assert len(plane.registry) == 2
            start = plane.hub.event_id()
            published = plane.hub.listen()  # every event the replica publishes from now on
            other.deregister("orders", leaving)
            added = other.register("orders", "127.0.0.1:8003", labels={}, weight=1, ttl=30).id
            revision = int(etcd.call("/v3/kv/range", {"key": "AA=="}, write=False)["header"]["revision"])
            etcd.call("/v3/kv/compaction", {"revision": str(revision), "physical": True}, write=True)
            task = asyncio.create_task(plane.run_store_watch())
            await wait_for(lambda: plane.registry.get("orders", added), 5.0, "the registry read again")
            assert plane.registry.get("orders", leaving) is None and plane.registry.get("orders", kept)
            events = [published.queue.get_nowait() for _ in range(published.queue.qsize())]
            assert [e.kind for e in events if e is not None] == ["endpoint", "endpoint"]  # not the one it had
            await wait_for(
                lambda: plane.hub.replay_after(start) is None, 2.0, "the start's position forgotten"
            )
            later = await asyncio.to_thread(
                other.register, "payments", "127.0.0.1:9000", labels={}, weight=1, ttl=30
            )
            await wait_for(lambda: plane.registry.get("payments", later.id), 2.0, "watching on")
            assert plane.hub.revision == later.revision * STEP
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            plane.close()


@pytest.mark.parametrize("before", [False, True], ids=["applied", "not-applied"])
def test_a_registration_whose_answer_is_lost_lands_once(etcd_cluster: EtcdCluster, before: bool) -> None:
    """The put reached etcd but its answer did not (or it never reached etcd): the registry
    reads the key, finds its id there (or not, and sends it again), and the key was written
    exactly once; a deregistration whose answer is lost is done too."""
    options = parse_etcd_url(_url(etcd_cluster))
    transport = LoseTxnAnswers(before=before)
    with EtcdRegistry(options, client=EtcdClient(options, transport=transport)) as registry:
        transport.n = 2
        done = registry.register("orders", "127.0.0.1:8001", labels={}, weight=1, ttl=30)
        assert transport.lost == (2 if before else 1)
        ((kv,), _) = registry.load()
        assert registry.instance(kv, 0.0).id == done.id and kv.version == 1  # one put, not two
        assert kv.mod_revision == done.revision
        transport.n = 1
        revision = registry.deregister("orders", done.id)
        assert revision == 0 if not before else revision > done.revision  # 0: gone, when it was asked again
        assert registry.load()[0] == []


def test_an_id_is_found_without_a_mirror_and_leaves_no_key_behind(etcd_cluster: EtcdCluster) -> None:
    """A replica that never watched an instance finds it by its id (registry-ids/), and a
    replaced, re-ttled or deregistered instance leaves no key of its own in etcd."""
    options = parse_etcd_url(_url(etcd_cluster))
    with EtcdRegistry(options) as here, EtcdRegistry(options) as elsewhere:
        first = here.register("orders", "127.0.0.1:8001", labels={}, weight=1, ttl=30)
        assert elsewhere.heartbeat("orders", first.id) == (30, None)
        second = here.register("orders", "127.0.0.1:8001", labels={"v": "2"}, weight=1, ttl=30)
        for call in (elsewhere.heartbeat, elsewhere.deregister):
            with pytest.raises(KeyError):
                call("orders", first.id)
        with pytest.raises(KeyError):
            elsewhere.heartbeat("payments", second.id)
        ttl, revision = elsewhere.heartbeat("orders", second.id, 20)
        assert ttl == 20 and revision is not None and elsewhere.heartbeat("orders", second.id) == (20, None)

        def ids() -> list[bytes]:
            with EtcdClient(options) as etcd:
                return [kv.key for kv in etcd.range(here.ids, prefix_end(here.ids), keys_only=True)]

        assert ids() == [here.id_key("orders", second.id)]  # the replaced one's went with its lease
        assert elsewhere.deregister("orders", second.id) > revision
        assert here.load()[0] == [] and ids() == []
