"""The registry while etcd has no quorum: a replica answers every registry change it cannot make
with a 503 (Retry-After) well within the time its client waits, and a registered process stays
on its replica (watch open, no move, one WARNING) until etcd takes its heartbeats again. Real
control services on 127.0.0.1 over a real 3-member etcd cluster of the module's own, two of
whose members are killed (and started again before the test ends)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import meshlib
from meshlib.control.etcd_client import parse_etcd_url
from meshlib.control.registration import beat_timeout
from meshlib.testing import bind
from tests.conftest import wait_until
from tests.control import Control
from tests.control.etcd_cluster import EtcdCluster


@pytest.fixture
def quorum(etcd_cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The cluster; the test calls `lose()` to kill two of its three members (no leader, no
    writes, keepalives hang), and they are running and healthy again when it ends."""
    yield etcd_cluster
    for member in etcd_cluster.members:
        if not member.running:
            member.start()
    etcd_cluster.wait_healthy()


def lose_quorum(cluster: EtcdCluster) -> None:
    """Kill two members, and wait until the third knows it has no leader (a leader that lost
    its quorum leads on for up to an election timeout)."""
    for member in cluster.members[:2]:
        cluster.kill(member)
    wait_until(lambda: not cluster.members[2].healthy(), 5.0, "the last member without a leader")


def restore(cluster: EtcdCluster) -> None:
    for member in cluster.members[:2]:
        member.start()
    cluster.wait_healthy()


def store(cluster: EtcdCluster) -> str:
    return f"{cluster.endpoints}/test-{uuid.uuid4().hex[:12]}"


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    reply = call()
    return reply, time.monotonic() - start


def test_a_replica_without_etcd_answers_registry_changes_with_a_prompt_503(
    quorum: EtcdCluster, tmp_path: Path
) -> None:
    c = Control(tmp_path / "c", etcd=parse_etcd_url(store(quorum)))
    try:
        short = c.http.post("/v1/registry/orders", json={"address": "127.0.0.1:8001", "ttl": 3}).json()["id"]
        long = c.http.post("/v1/registry/orders", json={"address": "127.0.0.1:8002", "ttl": 30}).json()["id"]
        assert c.plane.etcd_registry is not None
        c.plane.etcd_registry.write_timeout = 1.0  # registrations: 1 s of retries, not 3
        lose_quorum(quorum)
        # a heartbeat: within half of what its process waits (a third of the TTL, 1 s here). A
        # leader that lost its quorum renews leases (no raft write) until it steps down: until
        # then a heartbeat may still land
        deadline = time.monotonic() + 10.0
        while True:
            reply, took = timed(lambda: c.http.put(f"/v1/registry/orders/{short}"))
            assert took < beat_timeout(3), f"{took:.2f}s"
            if reply.status_code != 200 or time.monotonic() > deadline:
                break
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1", reply.text
        # the next ones, right after: refused at once, not each after its own wait for etcd
        reply, took = timed(lambda: c.http.put(f"/v1/registry/orders/{long}"))
        assert reply.status_code == 503 and took < 0.5, (reply.status_code, f"{took:.2f}s")
        # a registration and a deregistration: within the registry's write timeout
        for call in (
            lambda: c.http.post("/v1/registry/orders", json={"address": "127.0.0.1:8003"}),
            lambda: c.http.delete(f"/v1/registry/orders/{long}"),
        ):
            reply, took = timed(call)
            assert reply.status_code == 503 and reply.headers["retry-after"] == "1", reply.text
            assert took < 2.0, f"{took:.2f}s"
        # the registry as last seen is still listed, without waiting for etcd's time left
        reply, took = timed(lambda: c.http.get("/v1/registry/orders"))
        assert reply.status_code == 200 and {i["id"] for i in reply.json()["orders"]} == {short, long}
        assert took < 2.0, f"{took:.2f}s"
        restore(quorum)
        wait_until(lambda: c.http.put(f"/v1/registry/orders/{long}").status_code == 200, 20.0, "etcd back")
        # the 3 s lease may have run out while the cluster came back (a new leader gives every
        # lease its TTL again): kept, or gone, never a 503 once etcd answers
        assert c.http.put(f"/v1/registry/orders/{short}").status_code in (200, 404)
    finally:
        c.stop()


def test_a_registered_process_stays_on_its_replica_while_etcd_has_no_quorum(
    quorum: EtcdCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Open watch streams stay open during an etcd outage: the heartbeats' 503s move nothing,
    the process logs one WARNING for them, and the same instance heartbeats again once etcd
    is back."""
    monkeypatch.setenv("MESH_TELEMETRY_INTERVAL", "0")
    caplog.set_level(logging.DEBUG, logger="meshlib.control")
    url = store(quorum)
    a = Control(tmp_path / "a", etcd=parse_etcd_url(url))
    b = Control(tmp_path / "b", etcd=parse_etcd_url(url))
    sock = bind()
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    try:
        with meshlib.Mesh("orders", control=[a.url, b.url], cache_dir=tmp_path / "cache") as m:
            link = m.link
            assert link is not None and link.subscriber is not None
            assert m.wait_for_control(10)
            registration = m.register(address, ttl=3)
            wait_until(registration.registered.is_set, 10.0, "registered")
            instance = registration.instance_id
            watching = link.subscriber.watching
            switches = link.endpoints.switches
            assert watching == a.url
            lose_quorum(quorum)

            def refused() -> int:
                return sum("still cannot take orders" in r.getMessage() for r in caplog.records)

            def settled() -> bool:  # three heartbeats refused (~3 s of outage at ttl 3), or a move
                return refused() >= 3 or link.endpoints.switches != switches

            wait_until(settled, 15.0, "three heartbeats refused")
            assert link.endpoints.switches == switches and link.subscriber.watching == watching
            assert registration.url == a.url
            restore(quorum)
            wait_until(lambda: "takes the heartbeats of orders" in caplog.text, 15.0, "a heartbeat landing")
            assert link.endpoints.switches == switches and link.subscriber.watching == watching
            assert registration.instance_id == instance  # the lease outlived the outage: the same id
    finally:
        sock.close()
        for c in (a, b):
            c.stop()
    mine = [r for r in caplog.records if r.name == "meshlib.control" and address in r.getMessage()]
    warnings = [r.getMessage() for r in mine if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"registry at {a.url} cannot take orders" in warnings[0], warnings
    moves = [r.getMessage() for r in caplog.records if "switching to" in r.getMessage()]
    assert not moves, moves
