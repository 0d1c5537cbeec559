from __future__ import annotations

import random
import threading

import pytest

from meshlib.balancing import (
    BALANCERS,
    NOTHING,
    Balancer,
    LeastRequest,
    PeakEwma,
    Random,
    RingHash,
    RoundRobin,
    WeightedRoundRobin,
    make_balancer,
)
from meshlib.endpoint import Endpoint

NAMES = sorted(BALANCERS)


def endpoints(*weights: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:80", weight=w) for i, w in enumerate(weights)]


def test_registry_names_the_balancers() -> None:
    expected = {
        "round_robin": RoundRobin,
        "random": Random,
        "least_request": LeastRequest,
        "peak_ewma": PeakEwma,
        "ring_hash": RingHash,
        "weighted_round_robin": WeightedRoundRobin,
    }
    assert expected.items() <= BALANCERS.items()  # and those of issue 17's other balancers


@pytest.mark.parametrize("name", NAMES)
def test_make_balancer_builds_a_balancer(name: str) -> None:
    eps = endpoints(1, 2, 3)
    balancer = make_balancer(name, eps, rng=random.Random(1))
    assert isinstance(balancer, BALANCERS[name])
    assert isinstance(balancer, Balancer)
    assert list(balancer.endpoints) == eps
    assert balancer.pick() in eps
    assert balancer.pick("some-key", NOTHING) in eps


def test_make_balancer_passes_options() -> None:
    ring = make_balancer("ring_hash", endpoints(1, 1), vnodes_per_weight=7)
    assert isinstance(ring, RingHash)
    assert ring.ring_size == 14


def test_unknown_name_is_a_value_error_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'least_conn'.*least_request.*round_robin"):
        make_balancer("least_conn", endpoints(1))


@pytest.mark.parametrize("name", NAMES)
def test_empty_set_gives_none(name: str) -> None:
    balancer = make_balancer(name, [], rng=random.Random(1))
    assert balancer.pick() is None
    assert balancer.pick("key") is None
    assert balancer.pick("key", {"10.0.0.1:80"}) is None


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [1, 2, 5])
def test_all_excluded_gives_none(name: str, size: int) -> None:
    eps = endpoints(*range(1, size + 1))
    balancer = make_balancer(name, eps, rng=random.Random(1))
    everything = {ep.address for ep in eps}
    for key in (None, "k1", "k2"):
        assert balancer.pick(key, everything) is None
    assert balancer.pick() in eps  # and it still works afterwards


@pytest.mark.parametrize("name", NAMES)
def test_only_the_allowed_endpoint_is_returned(name: str) -> None:
    eps = endpoints(5, 1, 5, 5)
    balancer = make_balancer(name, eps, rng=random.Random(2))
    allowed = eps[1]
    exclude = {ep.address for ep in eps if ep is not allowed}
    for i in range(50):
        assert balancer.pick(f"key-{i}" if i % 2 else None, exclude) is allowed


@pytest.mark.parametrize("name", NAMES)
def test_excluded_addresses_are_never_picked(name: str) -> None:
    eps = endpoints(1, 2, 3, 4, 5, 6)
    balancer = make_balancer(name, eps, rng=random.Random(3))
    exclude = frozenset({eps[1].address, eps[4].address})
    for i in range(500):
        ep = balancer.pick(f"key-{i}" if i % 2 else None, exclude)
        assert ep is not None
        assert ep.address not in exclude


@pytest.mark.parametrize("name", NAMES)
def test_picks_from_several_threads(name: str) -> None:
    eps = endpoints(*[1] * 20)
    balancer = make_balancer(name, eps, rng=random.Random(4))
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(2000):
                ep = balancer.pick(f"k{n}-{i}", {eps[i % 20].address})
                assert ep is not None
                assert ep.address != eps[i % 20].address
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
