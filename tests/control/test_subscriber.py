"""Folding watch events into the client's state."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import httpx

from meshlib.control import ControlSettings, create_app
from meshlib.control.subscriber import ControlState, Subscriber, ack_delay, fold
from meshlib.testing import serve
from tests.control import wait_for


def snapshot() -> ControlState:
    state = fold(
        None, "snapshot", {"epoch": "e1", "revision": 3, "version": 2, "documents": [], "endpoints": {}}
    )
    assert state is not None
    return state


def test_rules_and_endpoints_events_move_the_revision_and_apply() -> None:
    state = fold(snapshot(), "rules", {"epoch": "e1", "revision": 4, "version": 3, "documents": []})
    assert state is not None and (state.revision, state.version) == (4, 3)
    state = fold(state, "endpoints", {"epoch": "e1", "revision": 5, "service": "orders", "endpoints": []})
    assert state is not None and state.revision == 5 and "orders" in state.endpoints


def test_endpoint_events_add_update_and_remove_one_instance_in_address_order() -> None:
    def endpoint(address: str, **labels: str) -> dict[str, Any]:
        return {"address": address, "labels": labels, "weight": 1}

    state: ControlState | None = snapshot()
    steps = [
        ("127.0.0.1:8002", endpoint("127.0.0.1:8002")),
        ("127.0.0.1:8001", endpoint("127.0.0.1:8001", v="1")),
        ("127.0.0.1:8001", endpoint("127.0.0.1:8001", v="2")),  # re-registered with new labels
        ("127.0.0.1:8002", None),
    ]
    for revision, (address, ep) in enumerate(steps, start=4):
        data = {"epoch": "e1", "revision": revision, "service": "orders", "address": address, "endpoint": ep}
        state = fold(state, "endpoint", data)
        assert state is not None and state.revision == revision
        if revision == 6:
            assert [e["address"] for e in state.endpoints["orders"]] == ["127.0.0.1:8001", "127.0.0.1:8002"]
    assert state is not None
    assert state.endpoints["orders"] == (endpoint("127.0.0.1:8001", v="2"),)
    gone = fold(
        state, "endpoint", {"epoch": "e1", "revision": 8, "service": "orders", "address": "127.0.0.1:8001"}
    )
    assert gone is not None and gone.endpoints["orders"] == ()


def test_instance_ids_are_folded_and_cached_and_optional() -> None:
    """The registry's instance ids (a new one at an address: a new process) travel beside the
    endpoints; a control service that sends none (an older one) means no ids."""
    assert snapshot().instances == {}
    state = fold(
        None,
        "snapshot",
        {"epoch": "e1", "revision": 3, "version": 2, "documents": [], "endpoints": {},
         "instances": {"orders": {"127.0.0.1:8001": "aa"}}},
    )  # fmt: skip
    assert state is not None and state.instances == {"orders": {"127.0.0.1:8001": "aa"}}
    state = fold(
        state,
        "endpoints",
        {"epoch": "e1", "revision": 4, "service": "orders",
         "endpoints": [{"address": "127.0.0.1:8001"}], "instances": {"127.0.0.1:8001": "bb"}},
    )  # fmt: skip
    assert state is not None and state.instances == {"orders": {"127.0.0.1:8001": "bb"}}
    assert ControlState.from_json(state.to_json()) == state  # the cache keeps them
    state = fold(state, "endpoints", {"epoch": "e1", "revision": 5, "service": "orders", "endpoints": []})
    assert state is not None and state.instances == {"orders": {}}
    came = {"epoch": "e1", "revision": 6, "service": "orders", "address": "127.0.0.1:8001"}
    state = fold(state, "endpoint", {**came, "endpoint": {"address": "127.0.0.1:8001"}, "id": "cc"})
    assert state is not None and state.instances == {"orders": {"127.0.0.1:8001": "cc"}}
    state = fold(state, "endpoint", {**came, "revision": 7, "endpoint": None})
    assert state is not None and state.instances == {"orders": {}} and state.endpoints["orders"] == ()
    assert (
        ControlState.from_json({"epoch": "e1", "revision": 1, "version": 1, "instances": 7}).instances == {}
    )


def test_other_event_kinds_move_the_revision_without_changing_anything_else() -> None:
    """A `bundle` event (or a kind added later) must not leave the acked revision behind,
    or the control service would list this client as stale."""
    before = snapshot()
    after = fold(before, "bundle", {"epoch": "e1", "revision": 4, "bundle": "PEM"})
    assert after is not None and after.revision == 4
    assert (after.version, after.documents, after.endpoints) == (
        before.version,
        before.documents,
        before.endpoints,
    )


def test_an_event_of_another_epoch_cannot_be_folded() -> None:
    assert fold(snapshot(), "bundle", {"epoch": "e2", "revision": 4}) is None


class FailingAcks:
    """The control app, but its first `failures` acks answer 503 (a restart, an overload)."""

    def __init__(self, app: Any, failures: int) -> None:
        self.app = app
        self.failures = failures
        self.refused = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/ack" and self.refused < self.failures:
            self.refused += 1
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)


async def test_a_failed_ack_is_sent_again_so_the_client_does_not_stay_stale(tmp_path: Path) -> None:
    app = create_app(ControlSettings(tmp_path, stale_after=0.3))
    plane = app.state.control
    wrapper = FailingAcks(app, failures=2)
    server = serve(wrapper, lifespan="on")
    applied: list[ControlState] = []

    def sink(state: ControlState) -> None:
        applied.append(state)

    sub = Subscriber(server.url, service="checkout", client_id="c1", sink=sink, ack_jitter=0.0)
    sub.ACK_RETRY = (0.05, 0.2)  # type: ignore[misc]
    task = asyncio.create_task(sub.run())
    try:
        await wait_for(lambda: applied, what="the snapshot applied")

        def record() -> dict | None:
            return next((c for c in plane.hub.clients() if c["client"] == "c1"), None)

        # no further change comes: only a retried ack can make the client current
        rec = await wait_for(
            lambda: (r := record()) and r["revision"] == plane.hub.revision and r, what="the ack"
        )
        assert wrapper.refused == 2
        assert not rec["stale"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.stop()


class HeldAcks:
    """The control app, holding the first ack until `release` is set; notes every ack's body."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.bodies: list[dict[str, Any]] = []
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/ack":
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            self.bodies.append(json.loads(body))
            if len(self.bodies) == 1:
                self.holding.set()
                await self.release.wait()
            replay = [{"type": "http.request", "body": body, "more_body": False}]

            async def again() -> Any:
                return replay.pop() if replay else await receive()

            await self.app(scope, again, send)
            return
        await self.app(scope, receive, send)


async def test_a_burst_of_events_is_acked_once_with_the_latest(tmp_path: Path) -> None:
    """While one ack is in flight three versions arrive: one ack follows it, the latest's, and
    the control service records that revision with the stream's epoch."""
    app = create_app(ControlSettings(tmp_path))
    plane = app.state.control
    held = HeldAcks(app)
    server = serve(held, lifespan="on")
    applied: list[ControlState] = []
    sub = Subscriber(server.url, service="checkout", client_id="c1", sink=applied.append, ack_jitter=0.0)
    task = asyncio.create_task(sub.run())
    token = (tmp_path / "admin.token").read_text().strip()
    try:
        await wait_for(held.holding.is_set, what="the snapshot's ack, held")
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {token}"}
        ) as admin:
            for port in (8001, 8002, 8003):
                doc = {
                    "kind": "Endpoints",
                    "service": "orders",
                    "endpoints": [{"address": f"127.0.0.1:{port}"}],
                }
                assert (await admin.put("/v1/config", json=[doc])).status_code == 200
        await wait_for(lambda: applied and applied[-1].version == 3, what="version 3 applied")
        held.release.set()
        await wait_for(lambda: len(held.bodies) == 2, what="the second ack")
        assert [b["version"] for b in held.bodies] == [0, 3]
        assert held.bodies[1]["epoch"] == plane.hub.epoch
        rec = await wait_for(
            lambda: plane.hub.clients()[0]["revision"] == plane.hub.revision and plane.hub.clients()[0]
        )
        assert rec["version"] == 3
        await asyncio.sleep(0.05)  # nothing else was pending: no third ack
        assert len(held.bodies) == 2
    finally:
        held.release.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.stop()


async def test_the_ack_delay_follows_the_control_services_hint(tmp_path: Path) -> None:
    from httpx_sse import ServerSentEvent

    sub = Subscriber("http://127.0.0.1:9", service="s", client_id="c", sink=lambda s: None)
    sub._ack_later = lambda: asyncio.sleep(0)  # type: ignore[method-assign]  # no ack is sent here
    snap = {"epoch": "e", "revision": 1, "version": 1, "documents": [], "endpoints": {}}
    await sub._on_event(ServerSentEvent(event="snapshot", data=json.dumps(snap)))
    assert sub._ack_window == 0.0
    for hint, taken in ((2.5, 2.5), ("9", 2.5), (-1, 2.5), (1e9, 2.5), (0.75, 0.75)):
        rules = {"epoch": "e", "revision": 2, "version": 2, "documents": [], "ack_window": hint}
        await sub._on_event(ServerSentEvent(event="rules", data=json.dumps(rules)))
        assert sub._ack_window == taken


def test_acks_of_a_wide_window_start_half_a_window_late_and_keep_its_width() -> None:
    """Within the first half window the push is still going out to the service's other streams:
    no ack lands then. The acks keep the window's width (the same rate at the service)."""
    own = [ack_delay(0.5, 0.0) for _ in range(2000)]
    assert min(own) >= 0.0 and max(own) <= 0.5 and min(own) < 0.05 and max(own) > 0.45
    wide = [ack_delay(0.5, 2.0) for _ in range(2000)]
    assert 1.0 <= min(wide) < 1.1 and 2.9 < max(wide) <= 3.0
    assert 1.9 < sum(wide) / len(wide) < 2.1


async def test_a_resume_with_nothing_new_counts_as_the_ack(tmp_path: Path) -> None:
    """A process that moves to a replica with no change since gets no event, so it sends no
    ack; its watch says its Last-Event-ID is what it applied, so the replica records it as
    acked (and never lists it as stale) without a request more."""
    app = create_app(ControlSettings(tmp_path, stale_after=0.2))
    plane = app.state.control
    server = serve(app, lifespan="on")
    applied: list[ControlState] = []
    first = Subscriber(server.url, service="checkout", client_id="c1", sink=applied.append, ack_jitter=0.0)
    task = asyncio.create_task(first.run())
    try:
        await wait_for(lambda: applied, what="the snapshot")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        moved = Subscriber(
            server.url, service="checkout", client_id="c2", sink=applied.append, state=applied[-1]
        )
        task = asyncio.create_task(moved.run())
        row = lambda: {r["client"]: r for r in plane.hub.clients()}.get("c2")  # noqa: E731
        await wait_for(lambda: row() and row()["connected"], what="the moved watch")
        assert (row()["revision"], row()["version"], row()["ok"]) == (plane.hub.revision, 0, True)
        await asyncio.sleep(0.3)  # past stale_after
        assert not row()["stale"] and moved.applied == 0  # nothing was sent, nothing to apply
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.stop()
