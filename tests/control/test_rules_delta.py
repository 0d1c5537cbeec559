"""`rules` events as deltas: the hub sends one only to a client holding its base, the client
rebuilds the whole rule set from it, and a delta that does not apply is refused, never guessed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshlib.control.rules_delta import expand
from meshlib.control.stream import Hub
from meshlib.control.subscriber import ControlState, Subscriber
from meshlib.headers import RULES_VERSION
from tests.control import Control, Watcher, wait_for


def route(service: str, subset: str = "v1") -> dict[str, Any]:
    return {"kind": "Route", "service": service, "routes": [{"to": [{"subset": subset}]}]}


def destination(service: str) -> dict[str, Any]:
    return {
        "kind": "Destination",
        "service": service,
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
    }


V1 = [destination("a"), destination("b"), route("a"), route("b")]
V2 = [destination("a"), destination("b"), route("a", "v2"), route("b")]  # one Route changed
V3 = [destination("a"), destination("b"), route("a", "v2"), route("b", "v2")]


def data_of(wire: bytes) -> dict[str, Any]:
    line = next(x for x in wire.split(b"\r\n") if x.startswith(b"data: "))
    return json.loads(line[len(b"data: ") :])


def test_the_hub_sends_the_delta_to_a_client_holding_its_base_and_the_whole_set_otherwise() -> None:
    hub = Hub(epoch="e")
    snapshot = hub.snapshot({"version": 1, "documents": V1, "endpoints": {}})
    takes, whole = (
        hub.open("d", None, None, None, lambda: snapshot, deltas=True)[0],
        hub.open("w", None, None, None, lambda: snapshot)[0],
    )
    for sub in (takes, whole):
        assert hub.wire(sub, snapshot) == snapshot.wire  # a snapshot is whole, and says the version
    event = hub.publish("rules", {"version": 2, "documents": V2}, base=(1, V1))
    delta = data_of(hub.wire(takes, event))
    assert delta["base"] == 1 and delta["version"] == 2
    assert delta["documents"] == [0, 1, route("a", "v2"), 3]  # unchanged ones by their index in V1
    assert data_of(hub.wire(whole, event))["documents"] == V2  # a client that did not ask
    assert len(event.delta or b"") < len(event.wire)

    # a client that holds another version (a coalesced burst, a skipped one) gets it whole
    late = hub.open("late", None, None, None, lambda: snapshot, deltas=True)[0]
    late.rules = 0
    assert data_of(hub.wire(late, event)) == data_of(event.wire)
    assert late.rules == 2  # and from then on holds it: the next delta is for it
    nxt = hub.publish("rules", {"version": 3, "documents": V3}, base=(2, V2))
    assert data_of(hub.wire(late, nxt))["documents"] == [0, 1, 2, route("b", "v2")]


def test_the_hub_makes_no_delta_without_a_base_or_anything_in_common() -> None:
    hub = Hub(epoch="e")
    assert hub.publish("rules", {"version": 1, "documents": V1}).delta is None  # no base given
    fresh = [route("c")]
    assert hub.publish("rules", {"version": 2, "documents": fresh}, base=(1, V1)).delta is None
    assert hub.publish("rules", {"version": 3, "documents": V1}, base=(2, fresh)).delta is None
    event = hub.publish("rules", {"version": 4, "documents": V2}, base=(3, V1))
    assert event.delta is not None and data_of(event.delta)["base"] == 3


async def test_a_coalesced_burst_goes_out_whole_and_a_resume_gets_deltas_from_the_version_it_names() -> None:
    hub = Hub(epoch="e")
    snap = lambda: hub.snapshot({"version": 1, "documents": V1, "endpoints": {}})  # noqa: E731
    live = hub.stream("live", None, None, None, snap, deltas=True)
    assert data_of(await anext(live))["version"] == 1  # the snapshot
    hub.publish("rules", {"version": 2, "documents": V2}, base=(1, V1))
    hub.publish("rules", {"version": 3, "documents": V3}, base=(2, V2))
    sent = data_of(await anext(live))  # only v3 goes out, and v2 (its base) never did
    assert sent["version"] == 3 and "base" not in sent and sent["documents"] == V3
    await live.aclose()

    # resumes from the revision of the snapshot: the client says it holds v1, v2's delta is for it
    resumed = hub.stream("r", None, None, "e:0", snap, deltas=True, rules=1)
    replayed = data_of(await anext(resumed))  # v2 coalesced away: v3 whole
    assert replayed["version"] == 3 and "base" not in replayed
    await resumed.aclose()
    one = hub.stream("one", None, None, "e:1", snap, deltas=True, rules=2)  # holds v2: v3's delta
    assert data_of(await anext(one)) == {
        "epoch": "e", "revision": 2, "version": 3, "base": 2, "documents": [0, 1, 2, route("b", "v2")],
    }  # fmt: skip
    await one.aclose()
    other = hub.stream("other", None, None, "e:1", snap, deltas=True, rules=7)  # a version it cannot base on
    assert "base" not in data_of(await anext(other))
    await other.aclose()


def test_expand_rebuilds_the_set_and_refuses_what_does_not_apply() -> None:
    held = ("e", 1, tuple(V1))
    delta = {"epoch": "e", "revision": 9, "version": 2, "base": 1, "documents": [0, 1, route("a", "v2"), 3]}
    assert expand(delta, held) == tuple(V2)
    assert expand(delta, None) is None
    assert expand({**delta, "base": 2}, held) is None  # another base
    assert expand({**delta, "epoch": "f"}, held) is None  # another store's version 1
    assert expand({**delta, "documents": [0, 4]}, held) is None  # out of range
    assert expand({**delta, "documents": [0, True]}, held) is None  # not an index
    assert expand({**delta, "documents": {"0": 1}}, held) is None


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    c = Control(tmp_path / "data", ping=0.2)
    yield c
    c.stop()


async def test_a_subscriber_takes_deltas_from_a_real_control_service_and_holds_the_whole_set(
    control: Control,
) -> None:
    assert control.apply(V1).status_code == 200
    states: list[ControlState] = []
    sub = Subscriber(control.url, service="checkout", client_id="c1", sink=lambda s: states.append(s) or None)
    task = asyncio.create_task(sub.run())
    async with Watcher(control.url, "raw", delta=True) as raw:  # what went over the wire
        try:
            await wait_for(lambda: states and states[-1].version == 1, what="the snapshot")
            await raw.next_event("snapshot")
            for version, docs in ((2, V2), (3, V3)):
                assert control.apply(docs).status_code == 200
                await wait_for(lambda v=version: states[-1].version == v, what=f"version {version}")
                assert list(states[-1].documents) == docs
                sent = await raw.next_event("rules", version=version)
                assert sent["base"] == version - 1 and sum(type(d) is int for d in sent["documents"]) == 3
            assert control.plane.hub.coalesced_total == 0
            await wait_for(
                lambda: any(c["client"] == "c1" and c["version"] == 3 for c in control.http.get(
                    "/v1/clients", headers=control.admin).json()),
                what="the ack of version 3",
            )  # fmt: skip
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_subscriber_holding_another_version_watches_again_and_gets_the_whole_set(
    control: Control, caplog: pytest.LogCaptureFixture
) -> None:
    """A delta the subscriber cannot apply (the server's idea of its version is wrong) is not
    applied: it watches again at once, without claiming a version, and gets the rules whole."""
    assert control.apply(V1).status_code == 200
    states: list[ControlState] = []
    sub = Subscriber(control.url, service="checkout", client_id="c2", sink=lambda s: states.append(s) or None)
    task = asyncio.create_task(sub.run())
    try:
        await wait_for(lambda: states and states[-1].version == 1, what="the snapshot")
        watches = control.plane.hub.subscribers
        sub._held = ("elsewhere", 1, ())  # as if it held another store's version 1
        with caplog.at_level("INFO", logger="meshlib.control"):
            assert control.apply(V2).status_code == 200
            await wait_for(lambda: states[-1].version == 2, what="version 2")
        assert list(states[-1].documents) == V2
        assert any("rules delta against version 1" in r.getMessage() for r in caplog.records)
        # the stream was replaced, not added to
        await wait_for(lambda: control.plane.hub.subscribers == watches, what="one stream")
        assert sub.url == control.url  # and on the same replica
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("held", ["abc", "-1", "1e3", "1.0", "9" * 20, "0x10"])
def test_a_watch_naming_a_malformed_rules_version_is_a_400_naming_the_header(
    control: Control, held: str
) -> None:
    r = control.http.get("/v1/watch?client=c1&delta=1", headers={RULES_VERSION: held})
    assert r.status_code == 400 and RULES_VERSION in r.json()["error"]
    assert control.plane.hub.clients() == [] or all(c["client"] != "c1" for c in control.plane.hub.clients())
