"""Registry: register, heartbeat, deregister and expiry on an injected clock."""

from __future__ import annotations

import pytest

from meshlib.control.registry import Registry, RegistryFull


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock: Clock) -> Registry:
    return Registry(clock=clock)


def test_register_lists_endpoints(registry: Registry) -> None:
    a = registry.register("orders", "127.0.0.1:8001", labels={"version": "v1"}, ttl=5)
    b = registry.register("orders", "127.0.0.1:8002", weight=3)
    assert a != b and len(registry) == 2
    assert registry.endpoints("orders") == [
        {"address": "127.0.0.1:8001", "labels": {"version": "v1"}, "weight": 1},
        {"address": "127.0.0.1:8002", "labels": {}, "weight": 3},
    ]
    assert registry.endpoints("payments") == []
    assert registry.all() == {"orders": registry.endpoints("orders")}
    described = registry.describe("orders")["orders"]
    assert [(d["id"], d["expires_in"]) for d in described] == [(a, 5.0), (b, 10.0)]
    assert registry.describe("payments") == {"payments": []}


def test_same_address_replaces_the_instance_under_a_new_id(registry: Registry) -> None:
    a = registry.register("orders", "127.0.0.1:8001", labels={"version": "v1"})
    again = registry.register("orders", "127.0.0.1:8001", labels={"version": "v2"})
    # one instance per address, but a new id: a new process answers there (clients close its
    # breaker), and the process it replaced can neither heartbeat nor deregister it
    assert again != a and len(registry) == 1
    assert registry.endpoints("orders")[0]["labels"] == {"version": "v2"}
    with pytest.raises(KeyError):
        registry.heartbeat("orders", a)
    with pytest.raises(KeyError):
        registry.deregister("orders", a)
    assert [i.id for i in registry.instances("orders")] == [again]
    other = registry.register("payments", "127.0.0.1:8001")
    assert other != a  # another service may share an address


def test_heartbeat_extends_life(registry: Registry, clock: Clock) -> None:
    a = registry.register("orders", "127.0.0.1:8001", ttl=2)
    clock.now += 1.5
    assert registry.heartbeat("orders", a).ttl == 2
    clock.now += 1.5
    assert registry.expire() == set()
    assert registry.heartbeat("orders", a, ttl=30).ttl == 30
    clock.now += 29
    assert registry.expire() == set() and len(registry) == 1


def test_expiry_removes_and_reports_services(registry: Registry, clock: Clock) -> None:
    a = registry.register("orders", "127.0.0.1:8001", ttl=1)
    registry.register("orders", "127.0.0.1:8002", ttl=5)
    registry.register("payments", "127.0.0.1:9001", ttl=1)
    assert registry.next_expiry() == clock.now + 1
    clock.now += 1
    assert registry.expire() == {"orders", "payments"}
    assert [e["address"] for e in registry.endpoints("orders")] == ["127.0.0.1:8002"]
    assert "payments" not in registry.all()
    with pytest.raises(KeyError):
        registry.heartbeat("orders", a)
    assert registry.expire(clock.now + 10) == {"orders"}
    assert len(registry) == 0 and registry.next_expiry() is None


def test_heartbeat_after_ttl_is_refused_even_before_reaping(registry: Registry, clock: Clock) -> None:
    a = registry.register("orders", "127.0.0.1:8001", ttl=1)
    clock.now += 1.01
    with pytest.raises(KeyError):
        registry.heartbeat("orders", a)
    assert registry.expire() == {"orders"}  # the reaper still reports it


def test_deregister_and_unknown_ids(registry: Registry) -> None:
    a = registry.register("orders", "127.0.0.1:8001")
    with pytest.raises(KeyError):
        registry.deregister("payments", a)  # the id belongs to another service
    with pytest.raises(KeyError):
        registry.heartbeat("orders", "nope")
    registry.deregister("orders", a)
    with pytest.raises(KeyError):
        registry.deregister("orders", a)
    assert registry.all() == {}


def test_limits(clock: Clock) -> None:
    registry = Registry(clock=clock, max_instances=2)
    registry.register("a", "h:1")
    registry.register("a", "h:2")
    registry.register("a", "h:2")  # an update needs no room
    with pytest.raises(RegistryFull):
        registry.register("a", "h:3")
    for ttl in (0, 0.5, 3601, float("inf")):
        with pytest.raises(ValueError):
            registry.register("a", "h:1", ttl=ttl)
