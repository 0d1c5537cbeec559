"""The etcd watch over the JSON gateway: events in order, a member killed under the watch
(nothing lost, nothing twice), compaction. Against the module's real 3-member cluster."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from meshlib.control.etcd_client import EtcdClient, EtcdOptions, prefix_end
from meshlib.control.etcd_watch import EtcdCompacted, WatchBatch, watch
from tests.control.etcd_cluster import EtcdCluster


def _prefix() -> bytes:
    return f"/watch-{uuid.uuid4().hex[:12]}/".encode()


async def _collect(batches: AsyncIterator[WatchBatch], into: list[tuple[str, bytes, bytes, int]]) -> None:
    async for batch in batches:
        for e in batch.events:
            into.append((e.kind, e.kv.key, e.kv.value, e.kv.mod_revision))
        assert batch.revision == batch.events[-1].kv.mod_revision


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_puts_and_deletes_arrive_in_order(etcd_cluster: EtcdCluster) -> None:
    prefix = _prefix()
    options = EtcdOptions(endpoints=tuple(etcd_cluster.urls))
    writer = EtcdClient(options)
    start = writer.put(prefix + b"before", b"0") + 1  # watch from the next revision on
    seen: list[tuple[str, bytes, bytes, int]] = []
    task = asyncio.create_task(
        _collect(watch(options, prefix, prefix_end(prefix), start_revision=start), seen)
    )
    try:
        revisions = [await asyncio.to_thread(writer.put, prefix + b"k%d" % i, b"v%d" % i) for i in range(3)]
        writer.txn([], [{"request_delete_range": {"key": _b64(prefix + b"k0")}}])
        await asyncio.to_thread(writer.put, b"/elsewhere", b"x")  # outside the prefix: not seen
        await _until(lambda: len(seen) == 4, "4 events")
        assert seen[:3] == [("put", prefix + b"k%d" % i, b"v%d" % i, revisions[i]) for i in range(3)]
        assert seen[3][:2] == ("delete", prefix + b"k0") and seen[3][3] > revisions[2]
    finally:
        task.cancel()
        writer.close()


async def test_a_member_killed_under_the_watch_loses_nothing(etcd_cluster: EtcdCluster) -> None:
    """The watch stream is on a follower; it is killed while writes go on through the others:
    the watch moves to another member and resumes after the last event it delivered."""
    prefix = _prefix()
    leader = etcd_cluster.leader()
    victim = next(m for m in etcd_cluster.members if m is not leader)
    others = tuple(m.url for m in etcd_cluster.members if m is not victim)
    writer = EtcdClient(EtcdOptions(endpoints=others))
    seen: list[tuple[str, bytes, bytes, int]] = []
    options = EtcdOptions(endpoints=(victim.url, *others))
    task = asyncio.create_task(
        _collect(watch(options, prefix, prefix_end(prefix), start_revision=writer.put(b"/x", b"") + 1), seen)
    )
    try:
        for i in range(5):
            await asyncio.to_thread(writer.put, prefix + b"%02d" % i, b"")
        await _until(lambda: len(seen) == 5, "the events before the kill")
        etcd_cluster.kill(victim)
        for i in range(5, 20):
            await asyncio.to_thread(writer.put, prefix + b"%02d" % i, b"")
        await _until(lambda: len(seen) == 20, "the events after the kill")
        assert [key for _, key, _, _ in seen] == [prefix + b"%02d" % i for i in range(20)]
        revisions = [r for *_, r in seen]
        assert revisions == sorted(set(revisions))
    finally:
        task.cancel()
        writer.close()
        await asyncio.to_thread(etcd_cluster.restart, victim)


async def test_a_compacted_start_revision_says_so(etcd_cluster: EtcdCluster) -> None:
    prefix = _prefix()
    options = EtcdOptions(endpoints=tuple(etcd_cluster.urls))
    with EtcdClient(options) as c:
        old = c.put(prefix + b"a", b"1")
        now = c.put(prefix + b"a", b"2")
        c.call("/v3/kv/compaction", {"revision": str(now), "physical": True}, write=True)
    with pytest.raises(EtcdCompacted) as compacted:
        async for _ in watch(options, prefix, prefix_end(prefix), start_revision=old):
            pass
    assert compacted.value.revision == now


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
