"""A crashed instance that comes back is used again at once, end to end, with real uvicorn
backends killed and restarted on the same port (a `kill -9` and a supervisor's restart).

Each test failed before: the returned instance stayed out for a full `open_for` (and its
ejection), and a subset whose only instance was out failed every request meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import meshlib
from meshlib.testing import RunningServer, bind, serve
from tests.backend import Backend
from tests.conftest import Fleet, wait_until, write_rules
from tests.control.test_mesh_control import Control

URL = "http://orders/whoami"
# The rules README.md showed when restarted instances stayed dark for 30 s: they must be safe now.
BREAKER = {"consecutive_failures": 5, "open_for": "30s"}
OUTLIERS = {"consecutive_5xx": 5, "base_ejection": "30s", "max_ejection_percent": 50}


# A retry for every request: in panic mode two thirds of first attempts meet a dead instance.
RETRIES = {
    "attempts": 3,
    "on": ["connect-failure"],
    "backoff": {"base": "1ms", "max": "5ms"},
    "budget": {"percent": 100, "min_per_second": 1000},
}


def restart(fleet: Fleet, backend: Backend, port: int) -> RunningServer:
    """A new server for `backend` on the port a killed one had."""
    server = serve(backend, sock=bind(port=port))
    fleet.servers.append(server)
    return server


def destination(**extra: object) -> dict:
    return {
        "kind": "Destination",
        "service": "orders",
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "circuit_breaker": BREAKER,
        "outlier_detection": OUTLIERS,
        **extra,
    }


def route(subset: str, **extra: object) -> dict:
    return {"kind": "Route", "service": "orders", "routes": [{"to": [{"subset": subset}], **extra}]}


def outcome(client: httpx.Client) -> str:
    """Who answered, or the kind of failure."""
    try:
        r = client.get(URL)
    except meshlib.CircuitOpenError:
        return "circuit-open"
    except httpx.TransportError:
        return "connect-error"
    return r.json()["name"] if r.status_code == 200 else str(r.status_code)


def first(client: httpx.Client, wanted: Callable[[str], bool], timeout: float, what: str) -> float:
    """Send requests back to back until one's outcome is `wanted`; the seconds that took."""
    started = time.monotonic()
    seen: list[str] = []
    while not wanted(seen[-1] if seen else ""):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"no {what} after {timeout}s; last outcomes {seen[-10:]}")
        seen.append(outcome(client))
    return time.monotonic() - started


def test_a_subsets_only_instance_serves_again_as_soon_as_it_is_back(tmp_path: Path, fleet: Fleet) -> None:
    _, v1 = fleet.start("v1", {"version": "v1"})
    v2_backend, v2 = fleet.start("v2", {"version": "v2"})
    cfg = write_rules(
        tmp_path / "mesh.yaml",
        [
            {"kind": "Endpoints", "service": "orders", "endpoints": [
                {"address": v1.address, "labels": {"version": "v1"}},
                {"address": v2.address, "labels": {"version": "v2"}},
            ]},
            destination(),
            route("v2"),  # 100% of the traffic on v2's one instance
        ],
    )  # fmt: skip
    with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.sync_client(timeout=5) as client:
        assert outcome(client) == "v2"
        v2.kill()
        failures = [outcome(client) for _ in range(12)]
        assert set(failures) <= {"connect-error"}, failures  # tried (panic), never refused unsent
        assert mesh.resilience.breakers.states()[v2.address] == "open"
        assert mesh.stats.counter("panic", "orders") > 0

        restart(fleet, v2_backend, v2.port)
        took = first(client, lambda o: o == "v2", 10.0, "answer from the restarted v2")
        assert took < 2.0, took  # was ~30 s: every request refused with CircuitOpenError meanwhile
        assert [outcome(client) for _ in range(5)] == ["v2"] * 5
        assert mesh.resilience.breakers.states()[v2.address] == "closed"


def test_two_of_three_instances_killed_the_pool_stays_in_use(tmp_path: Path, fleet: Fleet) -> None:
    v1 = [fleet.start(f"v1-{i}", {"version": "v1"}) for i in range(3)]
    fleet.start("v2", {"version": "v2"})
    endpoints = [
        {"address": s.address, "labels": dict(fleet.backends[s.address].labels)} for s in fleet.servers
    ]
    cfg = write_rules(
        tmp_path / "mesh.yaml",
        [
            {"kind": "Endpoints", "service": "orders", "endpoints": endpoints},
            destination(),
            route("v1", retries=RETRIES),
        ],
    )
    with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.sync_client(timeout=5) as client:
        assert {outcome(client) for _ in range(9)} == {"v1-0", "v1-1", "v1-2"}
        (b0, s0), (b1, s1), _ = v1
        s0.kill()
        s1.kill()  # within the window: both out at once
        outcomes = [outcome(client) for _ in range(60)]
        # every request reached the one left (retries went past the dead), none was refused
        assert outcomes == ["v1-2"] * 60, outcomes
        breakers = mesh.resilience.breakers.states()
        assert breakers[s0.address] == breakers[s1.address] == "open"
        # one v1 of three usable is below the panic threshold: the dead ones are still tried
        panics = mesh.stats.counter("panic", "orders")

        restart(fleet, b0, s0.port)
        restart(fleet, b1, s1.port)
        back = time.monotonic()
        wait_until(
            lambda: {"v1-0", "v1-1"} <= {outcome(client) for _ in range(6)},
            timeout=10,
            what="both restarted instances to answer",
        )
        took = time.monotonic() - back
        assert took < 2.0, took  # was ~30 s (their breakers' open_for)
        assert panics > 0


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    c = Control(tmp_path / "control")
    yield c
    if c.server is not None:
        c.stop()


def register(control: Control, address: str) -> str:
    r = httpx.post(
        f"{control.url}/v1/registry/orders", json={"address": address, "labels": {"version": "v1"}, "ttl": 30}
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_a_new_process_registered_at_the_address_closes_its_breaker(
    tmp_path: Path, fleet: Fleet, control: Control
) -> None:
    a_backend, a = fleet.start("a", {"version": "v1"})
    fleet.start("b", {"version": "v1"})
    b = fleet.servers[-1]
    # rules any version accepts: the breaker alone (two endpoints: one may be out, no panic)
    rules = [{"kind": "Destination", "service": "orders", "circuit_breaker": BREAKER}]
    assert control.apply(rules).is_success
    old_id = register(control, a.address)
    register(control, b.address)
    mesh = meshlib.Mesh("checkout", control=control.url, cache_dir=tmp_path / "cache")
    try:
        plan = lambda: mesh.snapshot.plan("orders")  # noqa: E731
        wait_until(lambda: plan() is not None and len(plan().endpoints) == 2, what="both instances")
        breakers = mesh.resilience.breakers
        with mesh.sync_client(timeout=5) as client:
            a.kill()
            outcomes: list[str] = []
            while breakers.states().get(a.address) != "open":
                outcomes.append(outcome(client))
                assert len(outcomes) < 40, outcomes
            # no more requests from here on: nothing but the re-registration may close it
            restart(fleet, a_backend, a.port)
            new_id = register(control, a.address)  # the restarted process announces itself
            assert new_id != old_id
            wait_until(
                lambda: mesh.snapshot.instances.get("orders", {}).get(a.address) == new_id,
                what="the new instance id to reach the client",
            )
            assert breakers.states()[a.address] == "closed"  # was open for another ~30 s
            names = {outcome(client) for _ in range(6)}
            assert names == {"a", "b"}, names
    finally:
        mesh.close()
