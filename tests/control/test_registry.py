"""Registry: register, heartbeat, deregister and expiry on an injected clock."""

from __future__ import annotations

import math

import pytest

from meshlib.control.registry import Instance, Registry, RegistryFull


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


def test_export_and_restore_keep_the_time_left(clock: Clock) -> None:
    """Saved with the wall-clock time of its expiry, an instance comes back with what it had
    left; an expired one does not come back; a file without expiries gives a full TTL."""
    registry = Registry(clock=clock)
    registry.register("orders", "h:1", ttl=10)
    registry.register("orders", "h:2", ttl=10)
    clock.now += 4
    registry.heartbeat("orders", registry.at("orders", "h:2").id)  # type: ignore[union-attr]
    saved = registry.export(wall=5000.0)
    assert sorted(item["expires_at"] for item in saved) == [5006.0, 5010.0]

    later = Registry(clock=clock)
    assert later.restore(saved, wall=5003.0) == 2  # down for 3 s: 3 and 7 s left
    assert sorted(i["expires_in"] for i in later.describe("orders")["orders"]) == [3.0, 7.0]
    assert Registry(clock=clock).restore(saved, wall=5006.0) == 1  # h:1 expired meanwhile
    assert Registry(clock=clock).restore(saved, wall=6000.0) == 0
    # a clock set back never gives more than a TTL; an old file (no expiry) gives a full one
    assert Registry(clock=clock).restore(saved, wall=1000.0) == 2
    old = Registry(clock=clock)
    assert old.restore([{k: v for k, v in i.items() if k != "expires_at"} for i in saved]) == 2
    assert [i["expires_in"] for i in old.describe("orders")["orders"]] == [10.0, 10.0]


def test_a_mirror_holds_what_it_is_given_and_never_expires_it(registry: Registry, clock: Clock) -> None:
    """`put`/`remove_at`, as a replica mirroring etcd uses them: the instance at an address is
    replaced whatever its id, an id seen at another address moves, and an instance whose
    `expires` is infinite is never reaped here (etcd's lease decides) and shows its TTL."""

    def mirrored(instance_id: str, address: str, ttl: float = 5.0) -> Instance:
        return Instance(instance_id, "orders", address, {}, 1, ttl, math.inf, lease=7)

    assert registry.put(mirrored("a", "h:1")) is None
    old = registry.put(mirrored("b", "h:1", ttl=8.0))
    assert old is not None and old.id == "a" and [i.id for i in registry.instances("orders")] == ["b"]
    assert registry.get("orders", "a") is None
    registry.put(mirrored("b", "h:2"))  # the same id elsewhere: a corrupt store, the last one wins
    assert [(i.address, i.id) for i in registry.instances("orders")] == [("h:2", "b")]
    assert registry.at("orders", "h:1") is None
    clock.now += 10_000
    assert registry.expire() == set() and registry.next_expiry() == math.inf
    assert registry.describe("orders")["orders"][0]["expires_in"] == 5.0
    gone = registry.remove_at("orders", "h:2")
    assert gone is not None and gone.id == "b" and len(registry) == 0
    assert registry.remove_at("orders", "h:2") is None and registry.all() == {}
