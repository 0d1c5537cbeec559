"""Meshes subscribed to a real control service: rules and endpoints pushed, cached, survived."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import meshlib
from meshlib.asgi import MeshMiddleware
from meshlib.control.app import ControlSettings, create_app
from meshlib.testing import RunningServer, bind, serve
from tests.conftest import Fleet, wait_until


class Control:
    """The control service on 127.0.0.1, restartable on the same port and data dir."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.server: RunningServer | None = None
        self.port = 0
        self.start()
        self.token = (data / "admin.token").read_text().strip()

    def start(self) -> None:
        self.server = serve(create_app(ControlSettings(self.data, ping=0.5)), port=self.port, lifespan="on")
        self.port = self.server.port

    def stop(self) -> None:
        assert self.server is not None
        self.server.kill()
        self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def apply(self, docs: list[dict]) -> httpx.Response:
        return httpx.put(
            f"{self.url}/v1/config", json=docs, headers={"authorization": f"Bearer {self.token}"}
        )

    def version(self) -> int:
        return httpx.get(f"{self.url}/v1/config").json()["version"]


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    c = Control(tmp_path / "control")
    yield c
    if c.server is not None:
        c.stop()


def mesh(control: Control, tmp_path: Path, name: str = "checkout", **kw: object) -> meshlib.Mesh:
    return meshlib.Mesh(name, control=control.url, cache_dir=tmp_path / f"cache-{name}", **kw)


def orders_rules(v1: int, v2: int) -> list[dict]:
    return [
        {
            "kind": "Destination",
            "service": "orders",
            "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        },
        {
            "kind": "Route",
            "service": "orders",
            "routes": [{"to": [{"subset": "v1", "weight": v1}, {"subset": "v2", "weight": v2}]}],
        },
    ]


def register(control: Control, address: str, version: str, ttl: float = 30) -> str:
    body = {"address": address, "labels": {"version": version}, "ttl": ttl}
    r = httpx.post(f"{control.url}/v1/registry/orders", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture
def orders(fleet: Fleet, control: Control) -> dict[str, str]:
    """Three orders instances (v1, v1, v2) in the registry; returns address -> version."""
    out = {}
    for i, version in enumerate(("v1", "v1", "v2")):
        _, server = fleet.start(f"orders-{i}", {"version": version})
        register(control, server.address, version)
        out[server.address] = version
    return out


def addresses(m: meshlib.Mesh) -> set[str]:
    plan = m.snapshot.plan("orders")
    return {e.address for e in plan.endpoints} if plan is not None else set()


def versions_of(m: meshlib.Mesh, n: int) -> Counter:
    with m.sync_client(timeout=10) as c:
        return Counter(c.get("http://orders/whoami").json()["labels"]["version"] for _ in range(n))


def converged(meshes: list[meshlib.Mesh], version: int) -> bool:
    return all(m.snapshot.version == str(version) for m in meshes)


def test_weight_change_reaches_every_client_and_traffic_follows(control, orders, tmp_path) -> None:
    assert control.apply(orders_rules(100, 0)).status_code == 200
    meshes = [mesh(control, tmp_path, f"checkout{i}") for i in range(3)]
    try:
        v = control.version()
        wait_until(lambda: converged(meshes, v), what="first snapshot everywhere")
        for m in meshes:
            assert len(m.snapshot.plan("orders").endpoints) == 3  # from the registry
            assert versions_of(m, 30) == {"v1": 30}
        r = control.apply(orders_rules(0, 100))
        assert r.status_code == 200 and r.json()["version"] == v + 1
        wait_until(lambda: converged(meshes, v + 1), what="the new weights everywhere")
        for m in meshes:
            assert versions_of(m, 30) == {"v2": 30}
        # every client acked the version it applied
        for m in meshes:
            assert m.link is not None
            wait_until(lambda m=m: clients_ack(control, m.link.client_id) == v + 1, what="acks")
    finally:
        for m in meshes:
            m.close()


def clients_ack(control: Control, client_id: str) -> int | None:
    for c in httpx.get(f"{control.url}/v1/clients").json():
        if c["client"] == client_id:
            return c["version"]
    return None


def test_invalid_apply_changes_nothing_anywhere(control, orders, tmp_path) -> None:
    control.apply(orders_rules(100, 0))
    m = mesh(control, tmp_path)
    try:
        v = control.version()
        wait_until(lambda: converged([m], v))
        bad = orders_rules(50, 50)
        bad[1]["routes"][0]["to"][1]["subset"] = "v3"  # not defined by the Destination
        r = control.apply(bad)
        assert r.status_code == 422
        problem = r.json()["problems"][0]
        assert problem["field"] == "routes[0].to[1].subset" and "v3" in problem["reason"]
        assert control.version() == v
        assert m.snapshot.version == str(v)
        assert versions_of(m, 20) == {"v1": 20}
    finally:
        m.close()


def test_registry_ttl_expiry_removes_a_dead_instance_everywhere(control, orders, tmp_path, fleet) -> None:
    _, extra = fleet.start("orders-x", {"version": "v2"})
    register(control, extra.address, "v2", ttl=1)  # and never heartbeated again: a dead instance
    m = mesh(control, tmp_path)
    try:
        wait_until(lambda: len(addresses(m)) == 4, what="four instances")
        wait_until(lambda: len(addresses(m)) == 3, 5.0, "the dead one to expire")
        assert extra.address not in addresses(m)
    finally:
        m.close()


def test_control_down_and_back_clients_keep_serving_and_reconnect(control, orders, tmp_path) -> None:
    control.apply(orders_rules(100, 0))
    m = mesh(control, tmp_path)
    failures: list[BaseException] = []
    served = Counter()
    stop = threading.Event()

    def traffic() -> None:
        with m.sync_client(timeout=5) as c:
            while not stop.is_set():
                try:
                    served[c.get("http://orders/whoami").json()["labels"]["version"]] += 1
                except Exception as exc:
                    failures.append(exc)

    try:
        v = control.version()
        wait_until(lambda: converged([m], v))
        worker = threading.Thread(target=traffic)
        worker.start()
        wait_until(lambda: served.total() > 20)
        control.stop()
        before = served.total()
        wait_until(lambda: served.total() > before + 50, what="traffic while the control service is down")
        control.start()  # same port, same data dir: the rules are still there
        assert control.version() == v
        assert control.apply(orders_rules(0, 100)).json()["version"] == v + 1
        wait_until(lambda: converged([m], v + 1), 15.0, "reconnect and the new version")
        wait_until(lambda: served["v2"] > 20, what="traffic to follow")
        stop.set()
        worker.join(10)
        assert failures == []
    finally:
        stop.set()
        m.close()


def test_a_process_starts_on_its_cached_state_while_control_is_down(control, orders, tmp_path) -> None:
    control.apply(orders_rules(0, 100))
    first = mesh(control, tmp_path)
    v = control.version()
    wait_until(lambda: converged([first], v))
    first.close()
    cache = next((tmp_path / "cache-checkout").glob("*.json"))
    assert cache.stat().st_mode & 0o777 == 0o600
    assert json.loads(cache.read_text())["version"] == v
    control.stop()
    second = mesh(control, tmp_path)  # nothing answers at the control address now
    try:
        assert second.snapshot.version == str(v)
        assert versions_of(second, 10) == {"v2": 10}
    finally:
        second.close()


def test_serving_registers_and_shutdown_deregisters(control, tmp_path) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    def registry() -> list[dict]:
        return httpx.get(f"{control.url}/v1/registry/payments").json().get("payments", [])

    sock = bind()
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    app = Starlette(routes=[Route("/", lambda r: PlainTextResponse("hi"))])
    instance = mesh(control, tmp_path, "payments", labels={"version": "v9"}, address=address)
    app.add_middleware(MeshMiddleware, mesh=instance)
    server = serve(app, sock=sock, lifespan="on")  # the middleware registers on lifespan start-up
    try:
        wait_until(lambda: len(registry()) == 1, 5.0, "registration")
        assert registry()[0]["address"] == address and registry()[0]["labels"] == {"version": "v9"}
    finally:
        server.stop()  # lifespan shutdown: deregistered before the server is gone
    assert registry() == []
    instance.close()
