"""The control plane on an etcd store (`ControlSettings(etcd=...)`): the rules outlive the data
dir, two replicas applying on one store lose nothing, every replica's subscribers hear of every
version whoever committed it, and a subscriber resumes on another replica. Real control services on 127.0.0.1
over a real 3-member etcd cluster (tests/control/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from meshlib.control import ControlPlane, ControlSettings
from meshlib.control import plane as plane_module
from meshlib.control.etcd_client import EtcdClient, parse_etcd_url
from meshlib.control.etcd_store import EtcdStore
from meshlib.control.stream import STEP
from meshlib.control.subscriber import ControlState, Subscriber
from meshlib.rules import parse_documents
from tests.control import DESTINATION, ROUTE, Control, Watcher, wait_for
from tests.control.etcd_cluster import EtcdCluster

PAYMENTS = {"kind": "Destination", "service": "payments", "subsets": {"v1": {"version": "v1"}}}


def _etcd(cluster: EtcdCluster) -> str:
    return f"{cluster.endpoints}/test-{uuid.uuid4().hex[:12]}"


def test_rules_live_in_etcd_not_in_the_data_dir(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    url = _etcd(etcd_cluster)
    first = Control(tmp_path / "a", etcd=parse_etcd_url(url))
    try:
        assert first.apply([DESTINATION, ROUTE]).json() == {"version": 1, "changed": True}
    finally:
        first.stop()
    assert not (tmp_path / "a" / "rules.db").exists()
    second = Control(tmp_path / "b", etcd=parse_etcd_url(url))  # another machine, same etcd
    try:
        assert second.plane.version == 1
        assert second.http.get("/v1/config", headers=second.admin).json()["version"] == 1
        assert sorted(d.kind for d in second.plane.rules.documents) == ["Destination", "Route"]
    finally:
        second.stop()


def test_two_replicas_applying_lose_no_change(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    """A commits version 1, then B commits on top of it: each version reaches B's subscribers
    once (from B's watch, or from the store refusing B's stale commit), at its commit's position."""
    url = _etcd(etcd_cluster)
    a = Control(tmp_path / "a", etcd=parse_etcd_url(url))
    b = Control(tmp_path / "b", etcd=parse_etcd_url(url))
    try:
        start = b.plane.hub.event_id()
        assert a.apply([DESTINATION]).json() == {"version": 1, "changed": True}
        assert b.apply([PAYMENTS]).json() == {"version": 2, "changed": True}
        assert sorted(d.service for d in b.plane.rules.documents) == ["orders", "payments"]
        events = b.plane.hub.replay_after(start) or []
        assert [e.kind for e in events] == ["rules", "rules"]
        with EtcdStore(url) as store:
            version, rules = store.current()
            assert version == 2 and sorted(d.service for d in rules.documents) == ["orders", "payments"]
            assert [i.version for i in store.history()] == [2, 1, 0]
            assert b.plane.hub.revision == store.head().revision * STEP
    finally:
        a.stop()
        b.stop()


async def test_a_replica_behind_takes_the_newer_version_before_committing(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    """No watch running (a plane without its app): the store refuses the stale commit, the
    replica reads the version committed elsewhere, publishes it, and applies on top of it."""
    url = _etcd(etcd_cluster)
    plane = ControlPlane(ControlSettings(tmp_path / "p", etcd=parse_etcd_url(url)))
    try:
        start = plane.hub.event_id()
        with EtcdStore(url) as other:
            other.commit(parse_documents([DESTINATION]), "elsewhere")
        assert (await plane.apply([PAYMENTS], message=None))["version"] == 2
        assert sorted(d.service for d in plane.rules.documents) == ["orders", "payments"]
        events = plane.hub.replay_after(start) or []
        assert [json.loads(e.wire.split(b"data: ")[1])["version"] for e in events] == [1, 2]
        assert plane.applies_total == 1
    finally:
        plane.close()


async def test_an_apply_on_one_replica_reaches_the_subscribers_of_the_others(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    url = _etcd(etcd_cluster)
    a, b, c = (Control(tmp_path / n, etcd=parse_etcd_url(url)) for n in "abc")
    try:
        async with Watcher(b.url, "on-b") as wb, Watcher(c.url, "on-c") as wc:
            await wb.next_event("snapshot")
            await wc.next_event("snapshot")
            started = time.monotonic()
            assert (await asyncio.to_thread(a.apply, [DESTINATION, ROUTE])).json()["version"] == 1
            # through etcd's watch to both replicas: 4 s, not 2, for a machine under CI's load
            on_b = await wb.next_event("rules", version=1, timeout=4.0)
            on_c = await wc.next_event("rules", version=1, timeout=4.0)
            assert time.monotonic() - started < 4.0
            assert on_b == on_c and len(on_b["documents"]) == 2
            assert wb.events[-1].id == wc.events[-1].id == f"{a.plane.hub.epoch}:{on_b['revision']}"
        assert b.plane.applies_total == c.plane.applies_total == 0  # they only watched
        assert b.plane.version == c.plane.version == 1
    finally:
        for x in (a, b, c):
            x.stop()


async def test_concurrent_applies_on_two_replicas_reach_every_subscriber_in_order(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    url = _etcd(etcd_cluster)
    a, b, c = (Control(tmp_path / n, etcd=parse_etcd_url(url)) for n in "abc")
    services = [f"svc-{i}" for i in range(6)]

    def doc(service: str) -> dict[str, Any]:
        return {"kind": "Destination", "service": service, "subsets": {"v1": {"version": "v1"}}}

    try:
        watchers = [Watcher(x.url, f"w-{i}") for i, x in enumerate((a, b, c))]
        for w in watchers:
            await w.__aenter__()
        try:
            results = await asyncio.gather(
                *(asyncio.to_thread(x.apply, [doc(s)]) for x, s in zip((a, b) * 3, services, strict=True))
            )
            assert sorted(r.json()["version"] for r in results) == list(range(1, 7))
            for w in watchers:
                last = await w.next_event("rules", version=6, timeout=2.0)
                assert sorted(d["service"] for d in last["documents"]) == services
                versions = [e["version"] for e in w.of("rules")]
                revisions = [e["revision"] for e in w.of("rules")]
                assert versions == sorted(set(versions)) and revisions == sorted(set(revisions))
        finally:
            for w in watchers:
                await w.__aexit__(None, None, None)
        with EtcdStore(url) as store:
            assert [i.version for i in store.history()] == [6, 5, 4, 3, 2, 1, 0]
    finally:
        for x in (a, b, c):
            x.stop()


async def test_a_subscriber_resumes_on_another_replica(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    """Its Last-Event-ID from A means the same on B: nothing to resend when nothing changed,
    the missed versions (the latest rule set) when something did, never a snapshot."""
    url = _etcd(etcd_cluster)
    a, b = (Control(tmp_path / n, etcd=parse_etcd_url(url)) for n in "ab")
    try:
        await asyncio.to_thread(a.apply, [DESTINATION])
        await wait_for(lambda: b.plane.version == 1, 5.0, "B at version 1")
        async with Watcher(a.url, "mover") as w:
            await w.next_event("snapshot", version=1)
            last_id = w.events[-1].id
        async with Watcher(b.url, "mover", last_event_id=last_id) as w:
            await asyncio.to_thread(a.apply, [ROUTE])  # the next change, whoever commits it
            await w.next_event("rules", version=2)
            assert [e.event for e in w.events] == ["rules"]  # no snapshot before it
            last_id = w.events[-1].id
        await asyncio.to_thread(a.apply, [PAYMENTS])  # missed while away
        await asyncio.to_thread(a.apply, [{**PAYMENTS, "max_concurrent_requests": 7}])
        await wait_for(lambda: b.plane.version == 4, 5.0, "B at version 4")
        async with Watcher(b.url, "mover", last_event_id=last_id) as w:
            latest = await w.next_event("rules", version=4)
            assert {e.event for e in w.events} == {"rules"}
            assert [e["version"] for e in w.of("rules")] in ([3, 4], [4])
            assert {d["service"] for d in latest["documents"]} == {"orders", "payments"}
        async with Watcher(b.url, "new", last_event_id=f"{a.plane.hub.epoch}:1") as w:  # before B's time
            assert (await w.next_event("snapshot"))["version"] == 4
    finally:
        a.stop()
        b.stop()


async def test_a_replica_started_after_registrations_serves_their_position(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    """A replica started after the registry changed (since the last rules commit) serves the
    position of that change, not the rules head's: a client whose last event was a registration
    or a deregistration resumes there with nothing resent, and one that missed a deregistration
    the new replica read past gets that one event, not a snapshot."""
    url = _etcd(etcd_cluster)
    a = Control(tmp_path / "a", etcd=parse_etcd_url(url))
    b: Control | None = None
    try:
        await asyncio.to_thread(a.apply, [DESTINATION])
        register = lambda address: a.http.post("/v1/registry/orders", json={"address": address})  # noqa: E731
        gone = (await asyncio.to_thread(register, "127.0.0.1:8001")).json()["id"]
        await asyncio.to_thread(register, "127.0.0.1:8002")
        registered = a.plane.hub.event_id()
        reply = await asyncio.to_thread(a.http.delete, f"/v1/registry/orders/{gone}")
        assert reply.status_code == 204
        await wait_for(lambda: a.plane.hub.event_id() != registered, 2.0, "the deregistration on A")
        latest = a.plane.hub.event_id()
        b = Control(tmp_path / "b", etcd=parse_etcd_url(url))  # a replica (re)started now
        await wait_for(lambda: b is not None and b.plane.hub.event_id() == latest, 2.0, "B at A's position")
        assert b.plane.hub.replay_after(latest) == []
        missed = b.plane.hub.replay_after(registered) or []
        assert [(e.kind, e.revision) for e in missed] == [("endpoint", int(latest.rpartition(":")[2]))]
        assert b'"address":"127.0.0.1:8001","endpoint":null' in missed[0].wire
    finally:
        a.stop()
        if b is not None:
            b.stop()


async def _registered_then_one_gone(a: Control) -> tuple[str, str]:
    """Two instances registered on A, then the first deregistered: A's positions after the
    registrations and after the deregistration."""
    register = lambda address: a.http.post("/v1/registry/orders", json={"address": address})  # noqa: E731
    gone = (await asyncio.to_thread(register, "127.0.0.1:8001")).json()["id"]
    await asyncio.to_thread(register, "127.0.0.1:8002")
    registered = a.plane.hub.event_id()
    assert (await asyncio.to_thread(a.http.delete, f"/v1/registry/orders/{gone}")).status_code == 204
    await wait_for(lambda: a.plane.hub.event_id() != registered, 2.0, "the deregistration on A")
    return registered, a.plane.hub.event_id()


async def test_a_replica_started_past_the_replay_limit_serves_from_its_read(
    etcd_cluster: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more history since the newest registry key than a start reads again, the replica
    serves from the revision it read the store at: a client from before it (which may have
    missed a deregistration) gets a snapshot, never a resume that would keep the dead instance."""
    url = _etcd(etcd_cluster)
    a = Control(tmp_path / "a", etcd=parse_etcd_url(url))
    try:
        await asyncio.to_thread(a.apply, [DESTINATION])
        registered, latest = await _registered_then_one_gone(a)
        monkeypatch.setattr(plane_module, "REPLAY_LIMIT", -1)
        plane = ControlPlane(ControlSettings(tmp_path / "b", etcd=parse_etcd_url(url)))
        try:
            assert plane.hub.revision >= int(latest.rpartition(":")[2]) and plane.hub.buffered() == 0
            assert plane.hub.replay_after(registered) is None  # a snapshot
        finally:
            plane.close()
    finally:
        a.stop()


async def test_a_start_whose_replay_was_compacted_serves_from_the_read_again(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    """etcd compacted the history a starting replica meant to read again (the deregistrations
    since the newest key): it reads the store again and serves from there, so a client from
    before gets a snapshot."""
    url = _etcd(etcd_cluster)
    a = Control(tmp_path / "a", etcd=parse_etcd_url(url))
    task = None
    plane = None
    try:
        await asyncio.to_thread(a.apply, [DESTINATION])
        registered, latest = await _registered_then_one_gone(a)
        plane = ControlPlane(ControlSettings(tmp_path / "b", etcd=parse_etcd_url(url)))
        assert plane.hub.event_id() == registered  # the newest key's position, its replay to come
        with EtcdStore(url) as other:
            _, revision = other.commit_at(parse_documents([DESTINATION, ROUTE]), "two")
            EtcdClient(other.options).call(
                "/v3/kv/compaction", {"revision": str(revision), "physical": True}, write=True
            )
        task = asyncio.create_task(plane.run_store_watch())
        await wait_for(
            lambda: plane is not None and plane.version == 2, 5.0, "version 2 after the compaction"
        )
        await wait_for(
            lambda: plane is not None and plane.hub.replay_after(latest) is None, 2.0, "the start forgotten"
        )
        assert plane.hub.replay_after(registered) is None
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if plane is not None:
            plane.close()
        a.stop()


async def test_replicas_outlive_an_etcd_leader(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    """The leader killed: both replicas keep serving their rules; the next apply lands after
    the election and reaches the other replica's subscribers."""
    url = _etcd(etcd_cluster)
    a, b = (Control(tmp_path / n, etcd=parse_etcd_url(url)) for n in "ab")
    leader = etcd_cluster.leader()
    try:
        await asyncio.to_thread(a.apply, [DESTINATION])
        await wait_for(lambda: b.plane.version == 1, 5.0, "B at version 1")
        async with Watcher(b.url, "w") as w:
            await w.next_event("snapshot", version=1)
            etcd_cluster.kill(leader)
            for x in (a, b):
                reply = await asyncio.to_thread(x.http.get, "/v1/config", headers=x.admin)
                assert reply.status_code == 200 and reply.json()["version"] == 1
            assert (await asyncio.to_thread(a.apply, [ROUTE])).json()["version"] == 2
            await w.next_event("rules", version=2, timeout=5.0)
    finally:
        a.stop()
        b.stop()
        await asyncio.to_thread(etcd_cluster.restart, leader)


async def test_a_watch_that_lost_its_place_reads_the_rules_again(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    """The revision to watch from is compacted away: the replica reads the head, serves it, and
    watches on from there (no crash, nothing missed after it)."""
    url = _etcd(etcd_cluster)
    plane = ControlPlane(ControlSettings(tmp_path / "p", etcd=parse_etcd_url(url)))
    task = None
    try:
        with EtcdStore(url) as other:
            other.commit(parse_documents([DESTINATION]), "one")
            _, revision = other.commit_at(parse_documents([DESTINATION, ROUTE]), "two")
            EtcdClient(other.options).call(
                "/v3/kv/compaction", {"revision": str(revision), "physical": True}, write=True
            )
            task = asyncio.create_task(plane.run_store_watch())
            await wait_for(lambda: plane.version == 2, 5.0, "version 2 read after the compaction")
            assert plane.hub.revision == revision * STEP
            await asyncio.to_thread(other.commit, parse_documents([PAYMENTS]), "three")
            await wait_for(lambda: plane.version == 3, 5.0, "version 3 watched")
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        plane.close()


async def test_etcd_gone_keeps_the_last_rules_with_one_warning(tmp_path: Path) -> None:
    """A one-member cluster stopped under a replica: it serves what it has, says so once for
    the whole outage, and takes the next version once etcd is back."""
    records, logger = _Warnings(), logging.getLogger("meshlib.control")
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)  # to count the retries that say nothing above DEBUG
    with EtcdCluster(tmp_path / "etcd", 1) as cluster:
        url = f"{cluster.endpoints}/outage"
        plane = ControlPlane(ControlSettings(tmp_path / "p", etcd=parse_etcd_url(url)))
        task = asyncio.create_task(plane.run_store_watch())
        try:
            with EtcdStore(url) as other:
                other.commit(parse_documents([DESTINATION]), "one")
                await wait_for(lambda: plane.version == 1, 5.0, "version 1")
                cluster.members[0].kill()
                await wait_for(lambda: records.messages, 5.0, "a warning")
                retries = await _count_failures(lambda: len(records.debug), 4)
                assert retries >= 4 and plane.version == 1 and len(plane.rules.documents) == 1
                await asyncio.to_thread(cluster.members[0].start)
                await asyncio.to_thread(cluster.wait_healthy)
                await asyncio.to_thread(other.commit, parse_documents([DESTINATION, ROUTE]), "two")
                await wait_for(lambda: plane.version == 2, 5.0, "version 2 after the outage")
            assert len(records.messages) == 1, records.messages
        finally:
            logger.removeHandler(records)
            logger.setLevel(level)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            plane.close()


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.debug: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())
        elif record.levelno == logging.DEBUG and "failed again" in record.getMessage():
            self.debug.append(record.getMessage())


async def _count_failures(count: Any, at_least: int) -> int:
    await wait_for(lambda: count() >= at_least, 5.0, f"{at_least} failed retries")
    return int(count())


async def test_the_client_moved_to_another_replica_gets_only_the_next_version(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    """meshlib's own subscriber, its state from A, reconnects to B: its sink sees the next
    version only (a snapshot would hand it the state it has again first)."""
    url = _etcd(etcd_cluster)
    a, b = (Control(tmp_path / n, etcd=parse_etcd_url(url)) for n in "ab")
    seen: list[tuple[str, int, int]] = []

    def sink(state: ControlState) -> None:
        seen.append((state.epoch, state.revision, state.version))

    try:
        await asyncio.to_thread(a.apply, [DESTINATION])
        on_a = Subscriber(a.url, service="checkout", client_id="c", sink=sink)
        task = asyncio.create_task(on_a.run())
        await wait_for(lambda: on_a.state is not None and on_a.state.version == 1, 5.0, "the state from A")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await wait_for(lambda: b.plane.version == 1, 5.0, "B at version 1")
        del seen[:]
        on_b = Subscriber(b.url, service="checkout", client_id="c", sink=sink, state=on_a.state)
        task = asyncio.create_task(on_b.run())
        await wait_for(on_b.connected.is_set, 5.0, "the stream to B")
        await asyncio.to_thread(a.apply, [ROUTE])
        await wait_for(lambda: on_b.state is not None and on_b.state.version == 2, 5.0, "version 2 on B")
        assert seen == [(a.plane.hub.epoch, b.plane.hub.revision, 2)]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        a.stop()
        b.stop()
