"""The control service's registry and the providers as equal sources of one Snapshot, with the
precedence of docs/discovery.md: a `discovery:` block, then the registry, then the default."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

import meshlib
from meshlib.rules import EndpointSpec, parse_documents
from meshlib.testing import serve
from tests.conftest import Fleet, wait_until
from tests.control.test_mesh_control import Control, control, register  # noqa: F401  # fixture
from tests.discovery.fake import FakeProvider

pytestmark = pytest.mark.usefixtures("provider_kinds")


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


def test_a_kubernetes_block_through_the_runner_survives_an_api_server_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The real Kubernetes provider (against tests/discovery/kube_apiserver.py), named by a
    `discovery:` block and run by the runner: traffic reaches the slice's pods, follows a change,
    and keeps flowing on the last good set while the API server is gone."""
    from tests.backend import Backend
    from tests.discovery.kube_apiserver import KubeApiServer, endpoint, endpoint_slice, port
    from tests.discovery.test_kubernetes import kubeconfig

    apiserver = KubeApiServer().start()
    one, two = Backend("one"), Backend("two")
    a = serve(one, host="127.0.0.2")  # two "pods" on one port: 127.0.0.2 and .3 are loopback too
    b = serve(two, host="127.0.0.3", port=a.port)
    ports = [port(a.port, "http")]
    config = kubeconfig(tmp_path, apiserver.kubeconfig())
    mesh = meshlib.Mesh("checkout", discovery=f"kubernetes://{config}")
    mesh.discovery.backoff_base = 0.05
    caplog.set_level(logging.INFO, logger="meshlib.discovery")
    try:
        apiserver.apply(endpoint_slice("web-a1", "web", [endpoint("127.0.0.2")], ports))
        block = {"provider": "kubernetes", "name": "web", "options": {"port": "http"}}
        mesh.apply_rules(
            parse_documents([{"kind": "Endpoints", "service": "orders", "discovery": block}]), "k8s"
        )
        assert mesh.wait_for_discovery("orders", timeout=10)
        with mesh.sync_client(timeout=5) as client:
            assert {client.get("http://orders/whoami").json()["name"] for _ in range(10)} == {"one"}
            both = [endpoint("127.0.0.2"), endpoint("127.0.0.3")]
            apiserver.apply(endpoint_slice("web-a1", "web", both, ports))
            wait_until(lambda: len(labels(mesh)) == 2, what="the second pod")
            served = Counter(client.get("http://orders/whoami").json()["name"] for _ in range(40))
            assert served["one"] >= 10 and served["two"] >= 10, served

            apiserver.stop()
            watch = mesh.discovery.watches()["orders"]
            wait_until(lambda: watch.failing_since is not None, what="the watch to fail")
            served = Counter(client.get("http://orders/whoami").json()["name"] for _ in range(40))
            assert served["one"] >= 10 and served["two"] >= 10, served  # the last good set
        records = [r for r in caplog.records if r.name == "meshlib.discovery"]
        warnings = [r for r in records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "keeping its last 2 endpoints" in warnings[0].getMessage()
    finally:
        mesh.close()
        apiserver.stop()
        a.stop()
        b.stop()
