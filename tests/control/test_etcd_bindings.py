"""Client bindings shared by control replicas on etcd: a client id bound on one replica is its
service's on every replica (nobody else can take it there, the client itself keeps it when it
moves), two replicas binding one new id at once end with the same owner, a dropped binding
leaves etcd, and a restart keeps them. Real replicas on 127.0.0.1 over a real 3-member etcd."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from meshlib.control import ControlPlane, ControlSettings, security_api
from meshlib.control.binding import ClientTaken
from meshlib.control.etcd_bindings import SharedClientBindings
from meshlib.control.etcd_client import EtcdOptions
from meshlib.control.security_api import Identity
from tests.control import wait_for
from tests.control.etcd_cluster import EtcdCluster
from tests.control.test_etcd_security import Replica, poll, stored

ORDERS, PAYMENTS = Identity("orders", "token"), Identity("payments", "token")


@pytest.fixture
def replicas(tmp_path: Path, etcd: EtcdOptions) -> Iterator[Callable[..., Replica]]:
    started: list[Replica] = []

    def start(name: str, **options: Any) -> Replica:
        started.append(Replica(tmp_path / name, etcd, **options))
        return started[-1]

    yield start
    for r in started:
        r.stop()


@asynccontextmanager
async def plane(data_dir: Path, etcd: EtcdOptions) -> AsyncIterator[ControlPlane]:
    """A replica's plane without HTTP, its security watch and binding writer running."""
    p = ControlPlane(ControlSettings(data_dir, security=True, etcd=etcd))
    task = asyncio.create_task(security_api.run_shared(p))
    try:
        yield p
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        p.close()


def bindings(etcd: EtcdOptions) -> dict[str, str]:
    prefix = b"security/clients/"
    return {k[len(prefix) :].decode(): v.decode() for k, v in stored(etcd).items() if k.startswith(prefix)}


async def in_etcd(
    etcd: EtcdOptions, predicate: Callable[[dict[str, str]], bool], what: str
) -> dict[str, str]:
    """The bindings in etcd once `predicate` holds (read off the loop, which must keep running)."""
    deadline = time.monotonic() + 2.0
    while not predicate(found := await asyncio.to_thread(bindings, etcd)):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within 2s: {what} (etcd holds {found})")
        await asyncio.sleep(0.01)
    return found


def test_a_client_id_bound_on_one_replica_is_its_services_on_every_replica(
    replicas: Callable[..., Replica], etcd: EtcdOptions
) -> None:
    a, b = replicas("a"), replicas("b")
    orders, payments = a.token("orders"), a.token("payments")
    assert a.ack(orders, client="c-1") == 204  # c-1 is now orders'
    poll(lambda: b.plane.clients.owner("c-1") == "orders", 3.0, "the binding on B")  # etcd, loaded machine
    assert b.ack(payments, client="c-1", service="payments") == 403  # nobody else takes it on B
    assert b.ack(orders, client="c-1") == 204  # the client itself, moved to B, keeps it
    assert bindings(etcd) == {"c-1": "orders"}
    # a restart of every replica keeps it
    a.stop()
    b.stop()
    c3 = replicas("c")
    assert c3.plane.clients.owner("c-1") == "orders"
    assert c3.ack(payments, client="c-1", service="payments") == 403


async def test_two_replicas_binding_one_new_id_at_once_agree_on_its_owner(
    tmp_path: Path, etcd: EtcdOptions
) -> None:
    async with plane(tmp_path / "a", etcd) as a, plane(tmp_path / "b", etcd) as b:
        # both bind "x" before either has written: each replica answers from memory at once
        assert a.clients.claim(ORDERS, "x", None) == "orders"
        assert b.clients.claim(PAYMENTS, "x", None) == "payments"
        owner = (await in_etcd(etcd, lambda b: "x" in b, "the binding written"))["x"]
        await wait_for(
            lambda: a.clients.owner("x") == b.clients.owner("x") == owner, 2.0, "one owner on both"
        )
        loser = PAYMENTS if owner == "orders" else ORDERS
        for p in (a, b):
            with pytest.raises(ClientTaken):
                p.clients.claim(loser, "x", None)
            assert p.clients.claim(Identity(owner, "token"), "x", None) == owner


async def test_a_dropped_binding_leaves_etcd(tmp_path: Path, etcd: EtcdOptions) -> None:
    """Each replica keeps `per_service` bindings per service; the one that drops a binding
    deletes it in etcd, so etcd stays within the bound too, and the others follow."""
    async with plane(tmp_path / "a", etcd) as a, plane(tmp_path / "b", etcd) as b:
        assert isinstance(a.clients, SharedClientBindings) and isinstance(b.clients, SharedClientBindings)
        a.clients.per_service = b.clients.per_service = 2
        for client in ("c-1", "c-2"):
            a.clients.claim(ORDERS, client, None)
        await in_etcd(etcd, lambda found: len(found) == 2, "two bindings")
        await wait_for(lambda: len(b.clients) == 2, 2.0, "two bindings on B")
        a.clients.claim(ORDERS, "c-3", None)  # c-1, the least recently used, is dropped
        await in_etcd(etcd, lambda found: found == {"c-2": "orders", "c-3": "orders"}, "c-1 deleted")
        await wait_for(lambda: b.clients.owner("c-1") is None, 2.0, "c-1 gone from B")
        assert b.clients.owner("c-2") == b.clients.owner("c-3") == "orders"
        # a dropped client binds again when it comes back
        assert b.clients.claim(ORDERS, "c-1", None) == "orders"
        await in_etcd(etcd, lambda found: found.get("c-1") == "orders", "c-1 bound again")


async def test_bindings_written_while_etcd_was_unreachable_land_once_it_is_back(
    tmp_path: Path, etcd: EtcdOptions, etcd_cluster: EtcdCluster
) -> None:
    """A replica keeps answering from memory; its new bindings are written when etcd answers."""
    async with plane(tmp_path / "a", etcd) as a:
        members = list(etcd_cluster.members)
        for m in members:
            m.kill()
        try:
            assert a.clients.claim(ORDERS, "offline", None) == "orders"
            with pytest.raises(ClientTaken):
                a.clients.claim(PAYMENTS, "offline", None)
        finally:
            for m in members:
                await asyncio.to_thread(m.start)
            await asyncio.to_thread(etcd_cluster.wait_healthy)
        await in_etcd(etcd, lambda found: found.get("offline") == "orders", "written after the outage")
