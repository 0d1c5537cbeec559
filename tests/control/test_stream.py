"""Watch streams over a real server: snapshot, changes, resume, heartbeats, slow subscribers,
acks and stale clients; and the hub on its own."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshlib.control import ControlSettings, create_app
from meshlib.control.stream import STEP, Hub
from meshlib.testing import serve
from tests.control import DESTINATION, ROUTE, Control, Watcher, wait_for


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    c = Control(tmp_path / "data", ping=0.2, stale_after=0.3)
    yield c
    c.stop()


@pytest.fixture
async def http(control: Control):
    async with httpx.AsyncClient(base_url=control.url, headers=control.admin, timeout=10) as client:
        yield client


async def test_snapshot_first_then_rules_and_endpoints_events(
    control: Control, http: httpx.AsyncClient
) -> None:
    await http.put("/v1/config", json=[DESTINATION])
    epoch = control.plane.hub.epoch
    async with Watcher(control.url, "c1", "checkout") as w:
        assert w.status == 200
        snap = await w.next_event("snapshot")
        assert w.events[0].event == "snapshot" and w.events[0].id == f"{epoch}:1"
        assert snap == {
            "epoch": epoch,
            "revision": 1,
            "version": 1,
            "documents": [DESTINATION],
            "endpoints": {},
            "instances": {},
        }

        await http.put("/v1/config", json=[ROUTE])
        rules = await w.next_event("rules")
        assert rules == {"epoch": epoch, "revision": 2, "version": 2, "documents": [DESTINATION, ROUTE]}
        assert w.events[1].id == f"{epoch}:2"

        r = await http.post("/v1/registry/orders", json={"address": "127.0.0.1:8001", "labels": {"v": "1"}})
        ep = await w.next_event("endpoint")
        assert ep == {
            "epoch": epoch,
            "revision": 3,
            "service": "orders",
            "address": "127.0.0.1:8001",
            "endpoint": {"address": "127.0.0.1:8001", "labels": {"v": "1"}, "weight": 1},
            "id": r.json()["id"],  # a new id at an address: a new process
        }
        await http.delete(f"/v1/registry/orders/{r.json()['id']}")
        gone = await w.next_event("endpoint", revision=4)
        assert (gone["address"], gone["endpoint"]) == ("127.0.0.1:8001", None)
        # a heartbeat and an unchanged apply announce nothing
        await http.put("/v1/config", json=[ROUTE])
        r = await http.post("/v1/registry/orders", json={"address": "127.0.0.1:8001"})
        await http.put(f"/v1/registry/orders/{r.json()['id']}")
        await w.next_event("endpoint", revision=5)
        assert [e.id for e in w.events] == [f"{epoch}:{n}" for n in range(1, 6)]
        # a new subscriber's snapshot holds the registry too
        async with Watcher(control.url, "c2") as w2:
            snap2 = await w2.next_event("snapshot")
            assert snap2["revision"] == 5 and list(snap2["endpoints"]) == ["orders"]
    assert w.error is None


async def test_resume_replays_only_missed_events(control: Control, http: httpx.AsyncClient) -> None:
    epoch = control.plane.hub.epoch
    for i in range(3):
        await http.put("/v1/config", json=[{**DESTINATION, "max_concurrent_requests": 10 + i}])
    async with Watcher(control.url, "c1", last_event_id=f"{epoch}:1") as w:
        # two versions missed: the latest rule set is what is replayed (it holds the other)
        await w.next_event("rules", revision=3)
        assert [(e.event, e.id) for e in w.events] == [("rules", f"{epoch}:3")]
        assert w.data(0)["version"] == 3
        await http.put("/v1/config", json=[ROUTE])
        await w.next_event("rules", revision=4)
        assert [e.event for e in w.events] == ["rules", "rules"]
    # up to date: nothing is sent until the next change
    async with Watcher(control.url, "c2", last_event_id=f"{epoch}:4") as w:
        await http.post("/v1/registry/orders", json={"address": "127.0.0.1:8001"})
        await w.next_event("endpoint")
        assert [e.event for e in w.events] == ["endpoint"]
    for stale_id in ("0123456789abcdef:2", f"{epoch}:99", f"{epoch}:-1", f"{epoch}:x", "garbage", f"{epoch}"):
        async with Watcher(control.url, "c3", last_event_id=stale_id) as w:
            snap = await w.next_event("snapshot")
            assert snap["revision"] == 5 and w.events[0].id == f"{epoch}:5"


async def test_resume_past_the_buffer_gets_a_snapshot(tmp_path: Path) -> None:
    control = Control(tmp_path / "data", buffer_size=2)
    try:
        epoch = control.plane.hub.epoch
        async with httpx.AsyncClient(base_url=control.url) as http:
            for port in range(8001, 8005):
                await http.post("/v1/registry/orders", json={"address": f"127.0.0.1:{port}"})
        assert control.plane.hub.buffered() == 2
        async with Watcher(control.url, last_event_id=f"{epoch}:2") as w:  # 3 and 4 are buffered
            await wait_for(lambda: len(w.events) == 2)
            assert [e.id for e in w.events] == [f"{epoch}:3", f"{epoch}:4"]
        async with Watcher(control.url, last_event_id=f"{epoch}:1") as w:  # 2 is gone
            snap = await w.next_event("snapshot")
            assert len(snap["endpoints"]["orders"]) == 4
    finally:
        control.stop()


async def test_heartbeat_comments(control: Control) -> None:
    async with (
        httpx.AsyncClient(timeout=10) as http,
        http.stream("GET", f"{control.url}/v1/watch", params={"client": "p"}) as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        pings = 0
        async for line in r.aiter_lines():
            if line == ": ping":
                pings += 1
                if pings == 2:
                    break
    assert pings == 2


async def test_registry_expiry_reaches_subscribers(control: Control, http: httpx.AsyncClient) -> None:
    async with Watcher(control.url) as w:
        await w.next_event("snapshot")
        await http.post("/v1/registry/orders", json={"address": "127.0.0.1:8001", "ttl": 1})
        await http.post("/v1/registry/orders", json={"address": "127.0.0.1:8002", "ttl": 60})
        await w.next_event("endpoint", revision=2)
        gone = await w.next_event("endpoint", timeout=5, revision=3)
        assert (gone["address"], gone["endpoint"]) == ("127.0.0.1:8001", None)
        assert [i["address"] for i in (await http.get("/v1/registry/orders")).json()["orders"]] == [
            "127.0.0.1:8002"
        ]
        assert "meshlib_control_registry_instances 1" in (await http.get("/metrics")).text.splitlines()


async def test_acks_and_stale_clients(control: Control, http: httpx.AsyncClient) -> None:
    await http.put("/v1/config", json=[DESTINATION])
    async with (
        Watcher(control.url, "fast", "checkout") as fast,
        Watcher(control.url, "slow", "billing") as slow,
    ):
        snap = await fast.next_event("snapshot")
        await slow.next_event("snapshot")
        for client in ("fast", "slow"):
            ack = {"client": client, "revision": snap["revision"], "version": snap["version"], "ok": True}
            assert (await http.post("/v1/ack", json={**ack, "error": None})).status_code == 204

        def clients() -> dict[str, dict]:
            return {c["client"]: c for c in control.http.get("/v1/clients").json()}

        listed = (await http.get("/v1/clients")).json()
        assert [c["client"] for c in listed] == ["fast", "slow"]
        fast_row = listed[0]
        assert fast_row["service"] == "checkout" and fast_row["connected"] is True
        assert fast_row["revision"] == 1 and fast_row["version"] == 1 and fast_row["ok"] is True
        assert fast_row["stale"] is False and fast_row["error"] is None
        assert fast_row["peer"].startswith("127.0.0.1:")
        assert fast_row["connected_at"] <= fast_row["last_seen"]

        await http.put("/v1/config", json=[ROUTE])
        rules = await fast.next_event("rules")
        await http.post(
            "/v1/ack", json={"client": "fast", "revision": rules["revision"], "version": 2, "ok": True}
        )
        # slow never acks revision 2: stale once stale_after (0.3 s) has passed
        await wait_for(lambda: clients()["slow"]["stale"], 5, "slow to turn stale")
        rows = {c["client"]: c for c in (await http.get("/v1/clients")).json()}
        assert rows["slow"]["stale"] is True and rows["slow"]["revision"] == 1
        assert rows["fast"]["stale"] is False and rows["fast"]["revision"] == 2
        # a rejection is an ack: no longer stale, and the error is shown
        err = {"client": "slow", "revision": 2, "version": 2, "ok": False, "error": "cannot build snapshot"}
        await http.post("/v1/ack", json=err)
        row = clients()["slow"]
        assert row["stale"] is False and row["ok"] is False and row["error"] == "cannot build snapshot"
    # disconnected clients are remembered, not connected, never stale
    await wait_for(lambda: not any(c["connected"] for c in clients().values()), what="disconnects")
    assert sorted(clients()) == ["fast", "slow"]
    assert not any(c["stale"] for c in clients().values())


async def test_a_client_that_never_acks_turns_stale(control: Control) -> None:
    async with Watcher(control.url, "mute") as w:
        await w.next_event("snapshot")
        await wait_for(lambda: control.http.get("/v1/clients").json()[0]["stale"], 5, "stale")


def _slow_reader(url: str) -> socket.socket:
    """A watch stream on a socket with a tiny receive buffer that is then never read."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET /v1/watch?client=slow HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert sock.recv(64).startswith(b"HTTP/1.1 200")
    return sock


def _read_to_end_of_response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything up to the end of the chunked response (its last, empty chunk)."""
    sock.settimeout(timeout)
    data = bytearray()
    while not data.endswith(b"\r\n0\r\n\r\n"):
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def test_slow_subscriber_is_dropped_and_others_keep_up(tmp_path: Path) -> None:
    control = Control(tmp_path / "data", queue_size=8, buffer_size=32)
    hub = control.plane.hub
    slow = _slow_reader(control.url)
    try:
        async with (
            Watcher(control.url, "good") as good,
            httpx.AsyncClient(base_url=control.url, timeout=10) as http,
        ):
            await wait_for(lambda: hub.subscribers == 2)
            pad = {f"pad{i}": "x" * 250 for i in range(16)}  # about 4 KB an event
            port = 1000
            # each registration publishes an event until the slow reader's socket is full, its
            # queue fills, and the hub drops it
            while hub.dropped_total == 0:
                port += 1
                assert port < 3000, "the slow subscriber was never dropped"
                r = await http.post("/v1/registry/big", json={"address": f"127.0.0.1:{port}", "labels": pad})
                assert r.status_code == 201
                assert hub.queued() <= 2 * hub.queue_size
            assert hub.subscribers == 1 and hub.dropped_total == 1
            # publishing goes on; the good subscriber sees everything, nothing piles up anywhere
            for _ in range(20):
                port += 1
                await http.post("/v1/registry/big", json={"address": f"127.0.0.1:{port}"})
            await good.next_event("endpoint", revision=hub.revision)
            revisions = [e["revision"] for e in good.of("endpoint")]
            assert revisions == list(range(1, hub.revision + 1))
            assert hub.subscribers == 1 and hub.queued() <= hub.queue_size
            assert hub.buffered() == 32
            metrics = (await http.get("/metrics")).text
            assert "meshlib_control_subscribers_dropped_total 1" in metrics.splitlines()
            assert "meshlib_control_subscribers 1" in metrics.splitlines()
            rows = {c["client"]: c for c in (await http.get("/v1/clients")).json()}
            assert rows["slow"]["connected"] is False and rows["good"]["connected"] is True
            # once the slow reader reads again, its stream ends (it would reconnect and resume)
            tail = await asyncio.to_thread(_read_to_end_of_response, slow)
            assert b"event: endpoint" in tail
    finally:
        slow.close()
        control.stop()


# ---------------------------------------------------------------------------------------------
# The hub alone


def test_hub_revisions_buffer_and_replay() -> None:
    hub = Hub(epoch="e", buffer_size=3, queue_size=2)
    assert hub.replay_after("e:0") == []
    for i in range(5):
        hub.publish("endpoints", {"service": "s", "endpoints": [i]})
    assert hub.revision == 5 and hub.buffered() == 3
    assert [e.revision for e in hub.replay_after("e:2") or []] == [3, 4, 5]
    assert hub.replay_after("e:1") is None  # 2 was evicted
    assert hub.replay_after("e:5") == []
    for bad in (None, "", "e:6", "f:3", "e:", "e:1.5", "e:-1", "e:" + "9" * 30, ":3", "e:\uff13", "e:3:3"):
        assert hub.replay_after(bad) is None, bad
    wire = hub.replay_after("e:4")[0].wire  # type: ignore[index]
    assert wire.startswith(b"id: e:5\r\nevent: endpoints\r\ndata: {") and wire.endswith(b"\r\n\r\n")
    # no character of the data can end a line, whoever splits the lines
    odd = hub.publish(
        "endpoints", {"service": "s", "endpoints": [{"labels": {"a": "\n\r\x85\u2028\x1c\u00e9"}}]}
    )
    assert len(odd.wire.decode().splitlines()) == 4 and odd.wire.isascii()  # id, event, data, blank


def test_hub_buffer_is_bounded_by_bytes_too() -> None:
    """Many events of a few KB each: the buffer keeps the newest that fit in `buffer_bytes`
    (and always the newest one); a resume from before them gets a snapshot."""
    hub = Hub(epoch="e", buffer_size=1000, buffer_bytes=50_000)
    for i in range(200):
        hub.publish("endpoint", {"service": "s", "address": f"h:{i + 1}", "endpoint": {"pad": "x" * 4000}})
    assert 45_000 < hub.buffered_bytes() <= 50_000 and hub.buffered() == 12
    assert hub.buffered_bytes() == sum(len(e.wire) for e in hub.replay_after("e:188") or [])
    assert hub.replay_after("e:187") is None
    big = hub.publish("rules", {"version": 1, "documents": ["y" * 100_000]})
    assert hub.buffered() == 1 and hub.buffered_bytes() == len(big.wire)
    assert [e.revision for e in hub.replay_after("e:200") or []] == [201]


async def test_hub_drops_a_full_subscriber_without_waiting() -> None:
    hub = Hub(epoch="e", queue_size=2)
    snapshot = lambda: hub.snapshot({"version": 0, "documents": [], "endpoints": {}})  # noqa: E731
    a, first = hub.open("a", "svc", "1.2.3.4:5", None, snapshot)
    b, _ = hub.open("b", None, None, "e:0", snapshot)
    assert [e.kind for e in first] == ["snapshot"] and hub.subscribers == 2
    hub.publish("rules", {"version": 1, "documents": []})
    hub.publish("rules", {"version": 2, "documents": []})
    await b.queue.get()
    await b.queue.get()
    hub.publish("rules", {"version": 3, "documents": []})  # a's queue is full: a is dropped
    assert a.dropped and hub.dropped_total == 1 and hub.subscribers == 1
    assert a.queue.qsize() == 1 and a.queue.get_nowait() is None  # emptied, then told to end
    assert (await b.queue.get()).revision == 3
    hub.close_subscriber(a)  # the stream's own cleanup later: no double counting
    rows = {c["client"]: c for c in hub.clients()}
    assert rows["a"]["connected"] is False and rows["b"]["connected"] is True
    hub.close()
    assert b.queue.get_nowait() is None and hub.subscribers == 0


def test_hub_on_store_positions_resumes_what_every_replica_has() -> None:
    """Two replicas of one store: a `rules` event has the same id on both (its store revision),
    so a client resumes on the other; a position of one replica's own events is not the other's."""
    a = Hub(epoch="s", store_revision=7)
    b = Hub(epoch="s", store_revision=7)
    assert a.revision == b.revision == 7 * STEP
    assert b.replay_after(f"s:{7 * STEP}") == []  # up to date, whoever served it
    local = a.publish("endpoint", {"service": "x", "address": "h:1", "endpoint": None})
    assert local.revision == 7 * STEP + 1
    for hub in (a, b):
        hub.publish("rules", {"version": 2, "documents": []}, store_revision=9)
        hub.publish("rules", {"version": 3, "documents": []}, store_revision=12)
    assert a.event_id() == b.event_id() == f"s:{12 * STEP}"
    assert [e.revision for e in b.replay_after(f"s:{9 * STEP}") or []] == [12 * STEP]
    missed = b.replay_after(f"s:{7 * STEP}") or []
    assert [e.revision for e in missed] == [9 * STEP, 12 * STEP]
    assert b.published_at(7 * STEP + 1) == missed[0].published  # what an ack of 7 * STEP waits on
    assert b.replay_after(f"s:{7 * STEP + 1}") is None  # a's own event: b cannot place it
    assert [e.revision for e in a.replay_after(f"s:{7 * STEP + 1}") or []] == [9 * STEP, 12 * STEP]
    assert b.replay_after(f"s:{6 * STEP}") is None  # from before b started: a snapshot
    assert b.replay_after(f"t:{9 * STEP}") is None  # another store
    # a store event that cannot have its position (past it already) still rises, off the grid
    late = b.publish("rules", {"version": 4, "documents": []}, store_revision=11)
    assert late.revision == 12 * STEP + 1
    b.revision = 13 * STEP - 1
    assert (
        b.publish("endpoint", {"service": "x", "address": "h:1", "endpoint": None}).revision == 13 * STEP + 1
    )


async def test_a_client_ahead_of_the_replica_is_held_not_sent_an_older_snapshot() -> None:
    """A client resuming at a store position this replica has not reached (its watch of the
    store lags the replica the client came from) gets no snapshot of the older state: it is
    held, the events it has are skipped, and the first one after its position comes next."""
    hub = Hub(epoch="s", store_revision=7)
    snapshot = lambda: hub.snapshot({"version": 1, "documents": [], "endpoints": {}})  # noqa: E731
    held = hub.stream("mover", None, None, f"s:{9 * STEP}", snapshot)
    first = asyncio.create_task(anext(held))
    await wait_for(lambda: hub.subscribers == 1, what="the subscriber")
    assert hub.held_total == 1
    hub.publish("endpoint", {"service": "x", "address": "h:1", "endpoint": None}, store_revision=8)
    await asyncio.sleep(0.05)
    assert not first.done()  # the client's already
    hub.publish("bundle", {"bundle": "PEM"})  # this replica's own: the client cannot have it
    wire = await asyncio.wait_for(first, 2.0)
    assert wire.split(b"\r\n")[:2] == [f"id: s:{8 * STEP + 1}".encode(), b"event: bundle"]
    hub.publish("rules", {"version": 2, "documents": []}, store_revision=9)  # where the client is
    hub.publish("rules", {"version": 3, "documents": []}, store_revision=12)
    wire = await asyncio.wait_for(anext(held), 2.0)
    assert wire.split(b"\r\n")[:2] == [f"id: s:{12 * STEP}".encode(), b"event: rules"]
    await held.aclose()


async def test_a_client_ahead_for_too_long_gets_a_snapshot() -> None:
    """The hold is bounded: a replica that does not catch up within `ahead_wait` (cut off from
    the store, or an id of another history under the same epoch) sends its snapshot, and only
    what comes after that snapshot."""
    hub = Hub(epoch="s", store_revision=7, ahead_wait=0.1)
    snapshot = lambda: hub.snapshot({"version": 1, "documents": [], "endpoints": {}})  # noqa: E731
    held = hub.stream("mover", None, None, f"s:{20 * STEP}", snapshot)
    wire = await asyncio.wait_for(anext(held), 2.0)
    assert wire.split(b"\r\n")[:2] == [f"id: s:{7 * STEP}".encode(), b"event: snapshot"]
    hub.publish("rules", {"version": 2, "documents": []}, store_revision=8)
    wire = await asyncio.wait_for(anext(held), 2.0)
    assert wire.split(b"\r\n")[:2] == [f"id: s:{8 * STEP}".encode(), b"event: rules"]
    # not for a position of this replica's own events, another store, or a hub without positions
    assert hub.ahead_of(f"s:{30 * STEP + 1}") is None and hub.ahead_of(f"t:{30 * STEP}") is None
    assert Hub(epoch="s").ahead_of(f"s:{30 * STEP}") is None
    await held.aclose()


def test_a_resume_with_nothing_to_send_is_the_ack_of_a_client_that_says_it_applied_it() -> None:
    """A client that moved here with no change since sends no ack (no event, nothing to ack);
    meshlib's subscriber says its Last-Event-ID is what it applied (`?applied=1`), so the
    resume is its ack and it is not listed as stale. Without the flag (a reader that only
    received it), or with something to send, the resume acks nothing."""
    now = [0.0]
    hub = Hub(epoch="s", store_revision=7, stale_after=5.0, clock=lambda: now[0])
    hub.publish("rules", {"version": 3, "documents": []}, store_revision=8)
    snapshot = lambda: hub.snapshot({"version": 3, "documents": [], "endpoints": {}})  # noqa: E731
    current = f"s:{8 * STEP}"
    assert hub.open("mover", None, None, current, snapshot, applied=True)[1] == []
    assert hub.open("reader", None, None, current, snapshot)[1] == []
    assert len(hub.open("behind", None, None, f"s:{7 * STEP}", snapshot, applied=True)[1]) == 1
    now[0] = 10.0
    rows = {r["client"]: r for r in hub.clients()}
    assert (rows["mover"]["revision"], rows["mover"]["version"], rows["mover"]["ok"]) == (8 * STEP, 3, True)
    assert not rows["mover"]["stale"]
    assert rows["reader"]["revision"] is None and rows["reader"]["stale"]
    assert rows["behind"]["revision"] is None and rows["behind"]["stale"]


def test_hub_restarted_at_a_position_resumes_nothing_from_before_it() -> None:
    """`restart_at`: what came before the position may not all have been published (a replay
    etcd compacted away), so an id from before it gets a snapshot; later events still replay."""
    hub = Hub(epoch="s", store_revision=5)
    for at in (6, 8, 9):
        hub.publish("endpoint", {"service": "x", "address": "h:1", "endpoint": None}, store_revision=at)
    hub.restart_at(8)
    assert hub.replay_after(f"s:{5 * STEP}") is None and hub.replay_after(f"s:{6 * STEP}") is None
    assert [e.revision for e in hub.replay_after(f"s:{8 * STEP}") or []] == [9 * STEP]
    assert hub.revision == 9 * STEP and hub.buffered() == 1
    hub.restart_at(12)  # past everything published: the position moves on
    assert hub.revision == 12 * STEP and hub.replay_after(f"s:{12 * STEP}") == []
    assert hub.replay_after(f"s:{9 * STEP}") is None


async def test_hub_sends_a_late_subscriber_only_the_latest_rules() -> None:
    """A subscriber behind by several versions (queued, or in a replay) gets the last rule set,
    not each one; the endpoint events between them are deltas and all go out, in order."""
    hub = Hub(epoch="e")
    snapshot = lambda: hub.snapshot({"version": 0, "documents": [], "endpoints": {}})  # noqa: E731

    def burst() -> None:
        hub.publish("rules", {"version": 1, "documents": []})
        hub.publish("endpoint", {"service": "x", "address": "h:1", "endpoint": None})
        hub.publish("rules", {"version": 2, "documents": []})
        hub.publish("rules", {"version": 3, "documents": []})

    live = hub.stream("live", None, None, "e:0", snapshot)
    first = asyncio.create_task(anext(live))
    await wait_for(lambda: hub.subscribers == 1, what="the subscriber")
    burst()  # queued while the subscriber has not read any of it
    sent = [await first, await anext(live)]
    assert [w.split(b"\r\n")[:2] for w in sent] == [
        [b"id: e:2", b"event: endpoint"],
        [b"id: e:4", b"event: rules"],
    ]
    assert hub.coalesced_total == 2
    resumed = hub.stream("late", None, None, "e:0", snapshot)  # a replay of the same four
    assert [(await anext(resumed)).split(b"\r\n")[0] for _ in range(2)] == [b"id: e:2", b"id: e:4"]
    assert hub.coalesced_total == 4
    await live.aclose()
    await resumed.aclose()


def test_hub_forgets_old_clients_and_caps_records() -> None:
    now = [0.0]
    hub = Hub(epoch="e", forget_after=300, max_clients=2, clock=lambda: now[0])
    hub.ack("x", service=None, revision=1, version=1, ok=True, error=None)
    hub.ack("y", service=None, revision=1, version=1, ok=True, error=None)
    now[0] = 1.0
    hub.ack("z", service=None, revision=1, version=1, ok=True, error=None)  # evicts the oldest
    assert [c["client"] for c in hub.clients()] == ["y", "z"]
    now[0] = 302.0
    assert hub.clients() == []


async def test_concurrent_applies_are_serialised(control: Control, http: httpx.AsyncClient) -> None:
    async with Watcher(control.url) as w:
        await w.next_event("snapshot")
        docs = [{"kind": "RateLimit", "service": f"s{i}", "requests_per_second": i + 1} for i in range(10)]
        results = await asyncio.gather(*(http.put("/v1/config", json=[d]) for d in docs))
        assert sorted(r.json()["version"] for r in results) == list(range(1, 11))
        last = await w.next_event("rules", version=10)
        assert len(last["documents"]) == 10
        assert [e["version"] for e in w.of("rules")] == list(range(1, 11))
    stored = (await http.get("/v1/config")).json()["documents"]
    assert [d["service"] for d in stored] == sorted(d["service"] for d in docs)


async def test_a_client_that_stops_reading_is_closed_after_the_send_timeout(tmp_path: Path) -> None:
    control = Control(tmp_path / "data", send_timeout=0.5, ping=60.0)
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills up at once
        sock.connect(("127.0.0.1", int(control.url.rsplit(":", 1)[1])))
        sock.sendall(b"GET /v1/watch?client=stuck HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(1024)  # the headers, maybe more; then it reads no more
        await wait_for(lambda: control.plane.hub.subscribers == 1, what="the stream")
        big = [
            {
                "kind": "Endpoints",
                "service": f"svc{i}",
                "endpoints": [{"address": f"10.0.{j // 250}.{j % 250}:8080"} for j in range(500)],
            }
            for i in range(4)
        ]
        applied = 0
        while control.plane.hub.subscribers and applied < 200:
            for doc in big:
                doc["endpoints"].append({"address": f"10.1.0.{applied % 250}:{9000 + applied}"})
            assert (await asyncio.to_thread(control.apply, big)).status_code == 200
            applied += 1
        await wait_for(lambda: control.plane.hub.subscribers == 0, 5.0, "the stuck stream closed")
        assert control.plane.hub.dropped_total == 0  # closed by the send timeout, not the queue bound
        assert control.http.get("/healthz").status_code == 200
    finally:
        sock.close()
        control.stop()


class BodyIds:
    """Under the control app: notes the body object of every chunk sent on a watch stream."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/watch":
            return await self.app(scope, receive, send)

        async def noting(message: dict) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                self.bodies.append(message["body"])
            await send(message)

        await self.app(scope, receive, noting)


async def test_an_event_is_encoded_once_and_the_same_bytes_go_to_every_stream(tmp_path: Path) -> None:
    app = create_app(ControlSettings(tmp_path))
    plane = app.state.control
    noted = BodyIds(app)
    server = serve(noted, lifespan="on")
    token = (tmp_path / "admin.token").read_text().strip()
    try:
        async with Watcher(server.url, "one") as one, Watcher(server.url, "two") as two:
            await one.next_event("snapshot")
            await two.next_event("snapshot")
            async with httpx.AsyncClient(base_url=server.url) as admin:
                reply = await admin.put(
                    "/v1/config", json=[DESTINATION], headers={"Authorization": f"Bearer {token}"}
                )
                assert reply.status_code == 200
            await one.next_event("rules")
            await two.next_event("rules")
        (event,) = plane.hub.replay_after(f"{plane.hub.epoch}:0") or []
        sent = [b for b in noted.bodies if b"event: rules" in b]
        assert len(sent) == 2 and all(b is event.wire for b in sent)  # not a copy, not re-encoded
    finally:
        server.stop()


def test_events_ask_many_subscribers_to_spread_their_acks() -> None:
    """Past a thousand streams each event carries `ack_window`: the acks it brings, spread over
    it, stay a bounded load; never more than half of stale_after; small meshes see no field."""
    hub = Hub(stale_after=5.0)

    def data(event: Any) -> dict[str, Any]:
        return json.loads(event.wire.split(b"data: ")[1])

    snapshot = lambda: hub.snapshot({"version": 0})  # noqa: E731
    for i in range(400):
        hub.open(f"c{i}", None, None, None, snapshot)
    assert "ack_window" not in data(hub.publish("rules", {"version": 1}))
    for i in range(400, 1500):
        hub.open(f"c{i}", None, None, None, snapshot)
    assert data(hub.publish("rules", {"version": 2}))["ack_window"] == 1.5
    assert data(hub.snapshot({"version": 2}))["ack_window"] == 1.5
    for i in range(1500, 6000):
        hub.open(f"c{i}", None, None, None, snapshot)
    assert data(hub.publish("rules", {"version": 3}))["ack_window"] == 2.5


async def test_a_client_that_goes_away_is_unsubscribed_at_once(control: Control) -> None:
    port = int(control.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/watch?client=leaver HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"event: snapshot")
    assert control.plane.hub.subscribers == 1
    writer.close()
    await wait_for(lambda: control.plane.hub.subscribers == 0, 2.0, "the stream closed")
    assert [r["connected"] for r in control.plane.hub.clients()] == [False]


async def test_streams_end_when_the_server_is_told_to_exit(
    control: Control, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sse_starlette.sse import AppStatus

    async with httpx.AsyncClient(timeout=10) as http:
        async with http.stream("GET", f"{control.url}/v1/watch", params={"client": "x"}) as r:
            chunks = r.aiter_bytes()
            assert b"event: snapshot" in await anext(chunks)
            monkeypatch.setattr(AppStatus, "should_exit", True)  # what uvicorn's exit handler sets
            async with asyncio.timeout(3):
                rest = b"".join([chunk async for chunk in chunks])  # the stream ends, cleanly
        assert b"event:" not in rest and control.plane.hub.subscribers == 0
        # a watch that comes in meanwhile gets the headers and an empty stream
        reply = await http.get(f"{control.url}/v1/watch", params={"client": "late"})
        assert reply.status_code == 200 and reply.content == b""
