"""The control service's registry and the providers as equal sources of one Snapshot, with the
precedence of docs/discovery.md: a `discovery:` block, then the registry, then the default."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import meshlib
from meshlib.rules import EndpointSpec
from tests.conftest import Fleet, wait_until
from tests.control.test_mesh_control import Control, control, register  # noqa: F401  # fixture
from tests.discovery.fake import FakeProvider


def labels(mesh: meshlib.Mesh) -> dict[str, dict[str, str]]:
    plan = mesh.snapshot.plan("orders")
    return {e.address: dict(e.labels) for e in plan.endpoints} if plan else {}


def test_registry_and_providers_merge_in_precedence_order(
    control: Control,  # noqa: F811
    fleet: Fleet,
    tmp_path: Path,
) -> None:
    (_, a), (_, b), (_, c) = fleet.start("a"), fleet.start("b"), fleet.start("c")
    register(control, a.address, "v1")
    fake = FakeProvider()
    mesh = meshlib.Mesh("checkout", control=control.url, cache_dir=tmp_path / "cache", discovery=[fake])
    try:
        assert mesh.wait_for_control(10)
        fake.send("orders", [a.address, b.address])  # the default provider: looked up by mesh name
        assert mesh.wait_for_discovery("orders", timeout=5)
        wait_until(lambda: set(labels(mesh)) == {a.address, b.address}, what="registry and default merged")
        assert labels(mesh)[a.address] == {"version": "v1"}  # the registry wins over the default
        with mesh.sync_client(timeout=5) as client:
            served = Counter(client.get("http://orders/whoami").json()["name"] for _ in range(40))
            assert served["a"] >= 10 and served["b"] >= 10, served

            block = {"provider": "fake", "name": "orders-block"}
            r = control.apply([{"kind": "Endpoints", "service": "orders", "discovery": block}])
            assert r.status_code == 200, r.text
            fake.send("orders-block", [EndpointSpec(address=a.address, labels={"from": "block"}), c.address])
            wait_until(lambda: set(labels(mesh)) == {a.address, c.address}, what="the block's set")
            assert labels(mesh)[a.address] == {"from": "block"}  # the block wins over the registry
            served = Counter(client.get("http://orders/whoami").json()["name"] for _ in range(40))
            assert served["a"] >= 10 and served["c"] >= 10 and not served["b"], served
        assert mesh.snapshot.instances["orders"].get(a.address)  # the registry's ids kept
    finally:
        mesh.close()
    assert fake.closed
