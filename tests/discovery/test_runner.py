"""The discovery runner end to end: a real Mesh, real uvicorn backends, traffic flowing, and a
provider (tests/discovery/fake.py) whose answers and failures the test sends."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

import meshlib
from meshlib.errors import NoEndpointsError
from meshlib.rules import parse_documents
from tests.conftest import Fleet, wait_until
from tests.discovery.fake import FakeProvider

pytestmark = pytest.mark.usefixtures("provider_kinds")

URL = "http://orders/whoami"


def endpoints_doc(**discovery: object) -> dict:
    return {"kind": "Endpoints", "service": "orders", "discovery": {"provider": "fake", **discovery}}


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
def mesh(fake: FakeProvider) -> Iterator[meshlib.Mesh]:
    m = meshlib.Mesh("checkout", discovery=[fake])
    m.discovery.backoff_base = 0.02  # restarts within the test's patience
    m.discovery.hold = 0.5
    yield m
    m.close()


def rules(mesh: meshlib.Mesh, *docs: dict) -> None:
    mesh.apply_rules(parse_documents(docs), "test")


def addresses(mesh: meshlib.Mesh, service: str = "orders") -> set[str]:
    plan = mesh.snapshot.plan(service)
    return {e.address for e in plan.endpoints} if plan else set()


def spread(client: httpx.Client, fleet: Fleet, n: int = 40) -> Counter[str]:
    """Which backends answered `n` calls (by name)."""
    return Counter(client.get(URL).json()["name"] for _ in range(n))


def test_endpoints_appear_change_and_vanish_with_traffic(fleet: Fleet, fake: FakeProvider, mesh) -> None:
    (_, a), (_, b) = fleet.start("a"), fleet.start("b")
    rules(mesh, endpoints_doc(name="orders-svc", options={"port": 8080}))
    wait_until(lambda: fake.targets, what="the watch to start")
    target = fake.targets[0]
    assert (target.service, target.name, dict(target.options)) == ("orders", "orders-svc", {"port": 8080})
    with mesh.sync_client(timeout=5) as client:
        fake.send("orders-svc", [a.address])
        wait_until(lambda: addresses(mesh) == {a.address}, what="the first set")
        assert spread(client, fleet) == {"a": 40}

        fake.send("orders-svc", [a.address, b.address])
        wait_until(lambda: addresses(mesh) == {a.address, b.address}, what="the second endpoint")
        both = spread(client, fleet)
        assert both["a"] >= 10 and both["b"] >= 10, both  # round robin: 20/20

        fake.send("orders-svc", [b.address])
        wait_until(lambda: addresses(mesh) == {b.address}, what="a to vanish")
        assert spread(client, fleet) == {"b": 40}

        fake.send("orders-svc", [])  # a healthy watch says there are none: applied
        wait_until(lambda: addresses(mesh) == set(), what="the empty set")
        with pytest.raises(NoEndpointsError, match="answered no endpoints"):
            client.get(URL)


def test_a_failing_provider_keeps_the_last_good_set_warns_once_and_recovers(
    fleet: Fleet, fake: FakeProvider, mesh, caplog: pytest.LogCaptureFixture
) -> None:
    (_, a), (_, b) = fleet.start("a"), fleet.start("b")
    rules(mesh, endpoints_doc())
    fake.send("orders", [a.address, b.address])
    wait_until(lambda: addresses(mesh) == {a.address, b.address})
    caplog.set_level(logging.INFO, logger="meshlib.discovery")
    with mesh.sync_client(timeout=5) as client:
        for _ in range(4):
            fake.send("orders", ConnectionError("agent down"))
        wait_until(lambda: len(fake.targets) >= 5, what="four failures and restarts")
        watch = mesh.discovery.watches()["orders"]
        assert watch.failing_since is not None and "agent down" in (watch.error or "")
        served = spread(client, fleet)
        assert served["a"] >= 10 and served["b"] >= 10, served  # the last good set, both endpoints

        fake.send("orders", [b.address])
        wait_until(lambda: addresses(mesh) == {b.address}, what="recovery")
        assert spread(client, fleet) == {"b": 40}
    records = [r for r in caplog.records if r.name == "meshlib.discovery"]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one per outage, not one per failure
    assert "keeping its last 2 endpoints" in warnings[0].getMessage()
    assert [r for r in records if r.levelno == logging.INFO and "answers again" in r.getMessage()]


def test_an_empty_answer_after_an_outage_does_not_empty_the_pool(
    fleet: Fleet, fake: FakeProvider, mesh
) -> None:
    (_, a), (_, b) = fleet.start("a"), fleet.start("b")
    mesh.discovery.hold = 30.0  # longer than the test: only a non-empty answer may replace the set
    rules(mesh, endpoints_doc())
    fake.send("orders", [a.address])
    wait_until(lambda: addresses(mesh) == {a.address})
    with mesh.sync_client(timeout=5) as client:
        fake.send("orders", ConnectionError("agent restarting"))
        fake.send("orders", [])  # the restarted source answers before it knows its instances
        watch = mesh.discovery.watches()["orders"]
        wait_until(lambda: watch.held_since is not None, what="the empty answer to be held")
        assert addresses(mesh) == {a.address}
        assert spread(client, fleet, 20) == {"a": 20}

        fake.send("orders", [a.address, b.address])  # it knows them again
        wait_until(lambda: addresses(mesh) == {a.address, b.address})
        assert watch.held_since is None


def test_a_held_empty_answer_is_applied_once_it_has_stood(fleet: Fleet, fake: FakeProvider, mesh) -> None:
    _, a = fleet.start("a")
    rules(mesh, endpoints_doc())
    fake.send("orders", [a.address])
    wait_until(lambda: addresses(mesh) == {a.address})
    fake.send("orders", ConnectionError("down"))
    fake.send("orders", [])
    watch = mesh.discovery.watches()["orders"]
    wait_until(lambda: watch.held_since is not None)
    assert addresses(mesh) == {a.address}
    wait_until(lambda: addresses(mesh) == set(), timeout=5, what="the hold (0.5 s) to end")


def test_the_process_default_provider_looks_services_up_by_mesh_name(fleet: Fleet, fake, mesh) -> None:
    _, a = fleet.start("a")

    @mesh.call("orders")
    def who(client: httpx.Client) -> str:
        return client.get("/whoami").json()["name"]

    wait_until(lambda: [t.name for t in fake.targets] == ["orders"], what="a watch of the mesh name")
    assert not mesh.wait_for_discovery("orders", timeout=0.05)  # no answer yet
    fake.send("orders", [a.address])
    assert mesh.wait_for_discovery("orders", timeout=5)
    wait_until(lambda: addresses(mesh) == {a.address})
    assert who() == "a"


def test_the_default_looks_up_the_services_routes_are_about_not_the_inbound_ones(fake, mesh) -> None:
    rules(
        mesh,
        {"kind": "Destination", "service": "orders"},
        {"kind": "Authorization", "service": "checkout", "allow": [{"from": "web"}]},
        {"kind": "RateLimit", "service": "checkout", "requests_per_second": 10},
    )
    wait_until(lambda: fake.targets, what="a watch")
    assert set(mesh.discovery.watches()) == {"orders"}
    assert [t.name for t in fake.targets] == ["orders"]


def test_a_call_with_no_endpoints_starts_a_lookup_at_the_default(fleet: Fleet, fake, mesh) -> None:
    _, a = fleet.start("a")
    with mesh.sync_client(timeout=5) as client:
        with pytest.raises(NoEndpointsError, match="has not answered yet"):
            client.get("http://payments/whoami")
        fake.send("payments", [a.address])
        assert mesh.wait_for_discovery("payments", timeout=5)
        wait_until(lambda: addresses(mesh, "payments") == {a.address})
        assert client.get("http://payments/whoami").json()["name"] == "a"


def test_static_endpoints_win_and_the_default_is_not_asked(fleet: Fleet, fake, mesh) -> None:
    """A service with an `Endpoints` document is never looked up at the default; with both a
    list and a block, the listed entry wins its address."""
    (_, a), (_, b) = fleet.start("a"), fleet.start("b")
    rules(
        mesh,
        {"kind": "Endpoints", "service": "static", "endpoints": [{"address": a.address}]},
        {**endpoints_doc(), "endpoints": [{"address": a.address, "labels": {"from": "rules"}}]},
    )
    fake.send("orders", [a.address, b.address])
    wait_until(lambda: addresses(mesh) == {a.address, b.address})
    labels = {e.address: dict(e.labels) for e in mesh.snapshot.plan("orders").endpoints}
    assert labels[a.address] == {"from": "rules"}
    assert [t.name for t in fake.targets] == ["orders"]  # not "static"


def test_removing_the_block_stops_the_watch_and_drops_its_endpoints(fleet: Fleet, fake, mesh) -> None:
    _, a = fleet.start("a")
    rules(mesh, endpoints_doc())
    fake.send("orders", [a.address])
    wait_until(lambda: addresses(mesh) == {a.address})
    future = mesh.discovery.watches()["orders"].future
    rules(mesh, {"kind": "Endpoints", "service": "orders", "endpoints": []})
    wait_until(lambda: addresses(mesh) == set(), what="the discovered set to go")
    assert "orders" not in mesh.discovery.watches()
    wait_until(lambda: future is not None and future.done(), what="the watch to stop")


def test_a_changed_block_keeps_serving_until_the_new_watch_answers(fleet: Fleet, fake, mesh) -> None:
    (_, a), (_, b) = fleet.start("a"), fleet.start("b")
    rules(mesh, endpoints_doc(name="orders-v1"))
    fake.send("orders-v1", [a.address])
    wait_until(lambda: addresses(mesh) == {a.address})
    rules(mesh, endpoints_doc(name="orders-v2", options={"tag": "blue"}))
    wait_until(lambda: [t.name for t in fake.targets] == ["orders-v1", "orders-v2"], what="the new watch")
    assert dict(fake.targets[1].options) == {"tag": "blue"}
    with mesh.sync_client(timeout=5) as client:
        assert spread(client, fleet, 10) == {"a": 10}  # the old set, until the new watch answers
        fake.send("orders-v2", [b.address])
        wait_until(lambda: addresses(mesh) == {b.address})
        assert spread(client, fleet, 10) == {"b": 10}


def test_an_endpoint_back_in_discovery_is_used_at_once(fleet: Fleet, fake, mesh) -> None:
    """Reset-on-return (meshlib/resilience/state.py) holds for discovered pools: an ejected
    endpoint that leaves discovery and comes back starts afresh, not after its 30 s ejection."""
    (bad, a), (_, b) = fleet.start("a"), fleet.start("b")
    outliers = {"consecutive_5xx": 3, "base_ejection": "30s", "max_ejection_percent": 50}
    rules(mesh, endpoints_doc(), {"kind": "Destination", "service": "orders", "outlier_detection": outliers})
    fake.send("orders", [a.address, b.address])
    wait_until(lambda: addresses(mesh) == {a.address, b.address})
    bad.fail_status = 503
    with mesh.sync_client(timeout=5) as client:
        for _ in range(12):
            client.get(URL)
        assert spread(client, fleet, 20) == {"b": 20}  # a is ejected
        bad.fail_status = None
        assert spread(client, fleet, 20) == {"b": 20}  # and stays out while it is in discovery
        fake.send("orders", [b.address])
        wait_until(lambda: addresses(mesh) == {b.address})
        fake.send("orders", [a.address, b.address])
        wait_until(lambda: addresses(mesh) == {a.address, b.address})
        served = spread(client, fleet)
        assert served["a"] >= 10, served


def test_the_panic_threshold_applies_to_a_discovered_pool(fleet: Fleet, fake, mesh) -> None:
    (bad, a), (_, b) = fleet.start("a"), fleet.start("b")
    outliers = {"consecutive_5xx": 3, "base_ejection": "30s", "max_ejection_percent": 50}
    destination = {"kind": "Destination", "service": "orders", "outlier_detection": outliers}
    rules(mesh, endpoints_doc(), {**destination, "panic_threshold": 60})  # 1 of 2 left is too few
    fake.send("orders", [a.address, b.address])
    wait_until(lambda: addresses(mesh) == {a.address, b.address})
    bad.fail_status = 503
    with mesh.sync_client(timeout=5) as client:
        for _ in range(12):
            client.get(URL)
        served = spread(client, fleet)
        assert served["a"] >= 10, served  # panic: both used although a is ejected
        assert mesh.stats.counter("panic", "orders") > 0


def test_a_grpc_channel_names_its_service_to_the_default_provider(fake, mesh) -> None:
    """As `@mesh.call` does: the watch starts with the channel, not after a first RPC found no
    endpoints; an External's host is not a mesh service to look up."""
    from meshlib.rules import parse_documents

    mesh.apply_rules(parse_documents([{"kind": "External", "service": "api.example.com"}]), "1")
    mesh.grpc_channel("orders")
    mesh.grpc_aio_channel("payments")
    mesh.grpc_channel("api.example.com")
    mesh.grpc_channel("api.example.com:443")
    wait_until(lambda: {t.name for t in fake.targets} == {"orders", "payments"}, what="both watched")
    assert set(mesh.discovery.watches()) == {"orders", "payments"}
