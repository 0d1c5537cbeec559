"""Client records shared by replicas through etcd: a client acking on one replica shows in every
replica's `/v1/clients` with its revision and the replica it is on; a replica that stops (or
dies: its lease expires) drops out of the merge. Real control services on 127.0.0.1 over a
real 3-member etcd cluster (tests/control/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest

from meshlib.cli import main
from meshlib.control.etcd_client import EtcdClient, parse_etcd_url
from meshlib.control.etcd_clients import SharedClients, merge
from meshlib.control.stream import Hub
from tests.control import DESTINATION, Control, Watcher, wait_for
from tests.control.etcd_cluster import EtcdCluster


def _etcd(cluster: EtcdCluster) -> str:
    return f"{cluster.endpoints}/test-{uuid.uuid4().hex[:12]}"


def listed(control: Control) -> dict[str, dict[str, Any]]:
    return {r["client"]: r for r in control.http.get("/v1/clients").json()}


async def test_a_client_acking_on_one_replica_shows_on_the_other(
    etcd_cluster: EtcdCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _etcd(etcd_cluster)
    a, b = (Control(tmp_path / n, etcd=parse_etcd_url(url), stale_after=0.5) for n in "ab")
    try:
        await asyncio.to_thread(a.apply, [DESTINATION])
        await wait_for(lambda: b.plane.version == 1, 5.0, "B at version 1")
        async with Watcher(a.url, "on-a") as wa, Watcher(b.url, "mute-on-b") as wb:
            snap = await wa.next_event("snapshot")
            await wb.next_event("snapshot")
            ack = {"client": "on-a", "revision": snap["revision"], "version": 1, "epoch": a.plane.hub.epoch}
            assert (await asyncio.to_thread(a.http.post, "/v1/ack", json=ack)).status_code == 204

            def on_b() -> dict[str, Any] | None:
                row = listed(b).get("on-a")
                return row if row and row["revision"] == snap["revision"] else None

            row = await wait_for(on_b, 5.0, "A's client with its revision in B's view")
            assert row["replica"] == a.plane.replica_id != b.plane.replica_id
            assert row["connected"] is True and row["version"] == 1 and row["stale"] is False
            # the client on B never acks: stale in B's own view, and in A's from B's records
            await wait_for(
                lambda: listed(a).get("mute-on-b", {}).get("stale"), 5.0, "B's mute client stale on A"
            )
            assert listed(a)["mute-on-b"]["replica"] == b.plane.replica_id
            assert listed(b)["mute-on-b"]["stale"] is True
            # `meshlib status` on either replica lists both clients with their replica
            assert await asyncio.to_thread(main, ["status", "--control", a.url]) == 0
            out = capsys.readouterr().out.splitlines()
            assert out[1].split()[-1] == "REPLICA"
            assert next(line for line in out if line.startswith("on-a ")).split()[-1] == a.plane.replica_id
            mute = next(line for line in out if line.startswith("mute-on-b "))
            assert mute.split()[-2:] == ["stale", b.plane.replica_id]
    finally:
        a.stop()
        try:
            # A stopped cleanly: its lease is revoked and its client leaves B's view at once
            await wait_for(lambda: "on-a" not in listed(b), 3.0, "A's client gone from B's view")
            assert "mute-on-b" in listed(b)  # B's own (disconnected now) is still there
        finally:
            b.stop()


async def test_the_records_of_a_replica_that_died_expire_with_its_lease(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    options = parse_etcd_url(_etcd(etcd_cluster))
    hub = Hub()
    hub.ack("c1", service="s", revision=0, version=0, ok=True, error=None)
    dead = SharedClients(options, "dead", hub, ttl=1)
    alive = SharedClients(options, "alive", Hub())
    try:
        assert await dead.flush() is True
        assert await dead.flush() is False  # nothing changed: no second write
        assert [r["client"] for r in await alive.merged()] == ["c1"]
        dead.release()  # the process is gone: no renewal, no revoke
        alive.interval = 0.0  # no cache: read etcd every time

        async def gone() -> bool:
            return not await alive.merged()

        deadline = time.monotonic() + 8.0
        while not await gone():
            assert time.monotonic() < deadline, "the dead replica's records outlived its lease"
            await asyncio.sleep(0.1)
    finally:
        alive.release()


async def test_records_are_written_again_after_the_lease_was_lost(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    options = parse_etcd_url(_etcd(etcd_cluster))
    hub = Hub()
    hub.ack("c1", service="s", revision=0, version=0, ok=True, error=None)
    shared = SharedClients(options, "r1", hub, ttl=3)
    with EtcdClient(options) as etcd:
        try:
            await shared.flush()
            etcd.revoke(shared._lease)  # as if it had expired while the replica was stalled
            assert etcd.get(shared.key) is None
            shared._renewed = 0.0  # due for renewal
            assert await shared.flush() is True
            kv = etcd.get(shared.key)
            assert kv is not None and kv.lease == shared._lease
            assert [r["client"] for r in json.loads(zlib.decompress(kv.value))["clients"]] == ["c1"]
        finally:
            await shared.close()
            assert etcd.get(shared.key) is None


def test_a_grpc_xds_client_on_one_replica_shows_on_the_other(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    """The xDS server's rows are shared as the watch streams' are: a real grpcio xDS client on
    A is listed by B with its acks per type and A's replica id, and leaves B's view when its
    stream ends."""
    pytest.importorskip("envoy.service.discovery.v3.ads_pb2_grpc")
    from tests.control.process import free_port
    from tests.control.xds.conftest import Servers, XdsClient, poll

    url, port, servers = _etcd(etcd_cluster), free_port(), Servers()
    a = Control(tmp_path / "a", etcd=parse_etcd_url(url), xds_port=port)
    b = Control(tmp_path / "b", etcd=parse_etcd_url(url))
    client = None
    try:
        body = {"address": servers.echo("v1"), "labels": {"version": "v1"}, "ttl": 60}
        assert a.http.post("/v1/registry/orders", json=body).status_code == 201
        client = XdsClient(f"127.0.0.1:{port}", "orders", tmp_path, "checkout-on-a", "checkout")
        assert client.calls(5, wait_for_ready=True) == ({"v1": 5}, {})

        def on_b() -> dict[str, Any] | None:
            row = listed(b).get("checkout-on-a")
            acked = row and all(row["xds"].get(t, {}).get("acked") for t in ("lds", "rds", "cds", "eds"))
            return row if acked else None

        row = poll(on_b, 5.0, "A's xDS client, with its acks, in B's view")
        assert row["replica"] == a.plane.replica_id != b.plane.replica_id
        assert (row["protocol"], row["service"], row["ok"], row["connected"]) == (
            "xds",
            "checkout",
            True,
            True,
        )
        client.close()
        poll(lambda: "checkout-on-a" not in listed(b), 5.0, "the ended stream gone from B")
        client = None
    finally:
        if client is not None:
            client.close()
        a.stop()
        b.stop()
        for server in servers.servers:
            server.stop(None)


def test_merge_shows_each_client_once() -> None:
    rows = [
        {"client": "b", "connected": False, "last_seen": 5.0, "replica": "r1"},
        {"client": "a", "connected": False, "last_seen": 9.0, "replica": "r1"},
        {"client": "a", "connected": True, "last_seen": 1.0, "replica": "r2"},  # moved to r2
        {"client": "b", "connected": False, "last_seen": 7.0, "replica": "r2"},
    ]
    assert [(r["client"], r["replica"]) for r in merge(rows)] == [("a", "r2"), ("b", "r2")]


def test_ten_thousand_records_fit_one_etcd_value() -> None:
    """The Hub keeps at most 10,000 clients; their records stay well under etcd's 1.5 MiB."""
    hub = Hub()
    for i in range(10_000):
        hub.ack(
            f"checkout-7f9c-{i:05d}",
            service="checkout",
            revision=123_000_000,
            version=42,
            ok=True,
            error=None,
        )
    options = parse_etcd_url("etcd://127.0.0.1:1")
    shared = SharedClients(options, "r", hub)
    try:
        assert len(shared.encode(hub.clients())) < 1 << 20
    finally:
        shared.release()


async def test_etcd_away_warns_once_and_the_records_come_back(tmp_path: Path) -> None:
    """A one-member cluster stopped under the writer: one WARNING for the whole outage, and once
    etcd is back the records are written again (with a new lease if the old one lapsed)."""
    records = _Records()
    logger = logging.getLogger("meshlib.control")
    logger.addHandler(records)
    with EtcdCluster(tmp_path / "etcd", 1) as cluster:
        options = parse_etcd_url(f"{cluster.endpoints}/outage")
        hub = Hub()
        hub.ack("c1", service="s", revision=0, version=0, ok=True, error=None)
        shared = SharedClients(options, "r1", hub, interval=0.05, ttl=3)
        task = asyncio.create_task(shared.run())
        try:
            await wait_for(lambda: shared.writes_total == 1, 5.0, "the first write")
            cluster.members[0].kill()
            hub.ack("c2", service="s", revision=0, version=0, ok=True, error=None)  # a change to write
            await wait_for(lambda: records.warnings, 5.0, "a warning")
            await asyncio.sleep(0.3)  # several more failed attempts
            assert len(records.warnings) == 1
            await asyncio.to_thread(cluster.members[0].start)
            await asyncio.to_thread(cluster.wait_healthy)
            await wait_for(lambda: shared.writes_total >= 2, 10.0, "the records written again")
            with EtcdClient(options) as etcd:
                kv = etcd.get(shared.key)
                assert kv is not None
                assert [r["client"] for r in json.loads(zlib.decompress(kv.value))["clients"]] == ["c1", "c2"]
            assert len(records.warnings) == 1
        finally:
            logger.removeHandler(records)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await shared.close()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.warnings.append(record.getMessage())
