"""Prequal's pool and hot-cold rule against the paper's description, without a socket.

Answers are added to the pool by hand (as the prober would); a recording prober stands for the
one that sends them (meshlib/http/probes.py has its own tests against real servers).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

import pytest

from meshlib.balancing import make_balancer
from meshlib.balancing.prequal import (
    Prequal,
    PrequalOptions,
    ProbeHub,
    ProbePool,
    reuse_budget,
)
from meshlib.endpoint import Endpoint, LoadBook
from meshlib.rules.loading import parse_documents
from meshlib.snapshot import Snapshot
from tests.clock import Clock as FakeClock


def endpoints(n: int, weights: Sequence[int] | None = None) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:80", weight=weights[i] if weights else 1) for i in range(n)]


class Recorder:
    """A prober that only writes down what it is asked."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def probe(self, pool: ProbePool, targets: Sequence[Endpoint], options: PrequalOptions) -> None:
        self.asked.append([e.address for e in targets])


def balancer(
    eps: list[Endpoint], clock: FakeClock | None = None, seed: int = 1, **options: object
) -> Prequal:
    opts = PrequalOptions(**({"remove_per_query": 0.0} | options))  # type: ignore[arg-type]
    return Prequal(eps, rng=random.Random(seed), prequal=opts, clock=clock)


def feed(b: Prequal, *answers: tuple[int, int, float]) -> None:
    """(endpoint index, rif, latency) answers, in arrival order."""
    for i, rif, latency in answers:
        b.pool.add(b.endpoints[i].address, rif, latency, b.options.pool_size)


def test_a_cold_probe_with_the_lowest_latency_wins_over_a_faster_hot_one() -> None:
    eps = endpoints(3)
    b = balancer(eps, q_rif=0.5)
    # RIFs 2, 3, 10: the median (3) splits them; 0 and 1 are cold, 2 is hot
    feed(b, (0, 2, 0.050), (1, 3, 0.010), (2, 10, 0.001))
    assert b.pick() is eps[1]  # the cold one with the lower latency, not the fastest (hot) one


def test_when_every_pooled_probe_is_hot_the_lowest_expected_latency_wins() -> None:
    """The paper takes the lowest RIF among hot answers; here the latency each answer gives
    for one more request, carried to the RIF as of now: a server idle only because it is slow
    is not the pick whenever the others are busy (the slow-backend scenario)."""
    eps = endpoints(4)
    b = balancer(eps, q_rif=0.25)
    feed(b, (0, 0, 0.001), (1, 0, 0.001), (2, 5, 0.5), (3, 8, 0.0001))
    b.pool.fail(eps[0].address)  # their RIFs stay in the recent history, their answers leave
    b.pool.fail(eps[1].address)
    # recent RIFs 0, 0, 5, 8: the threshold is 0, so both pooled answers are hot
    assert b.pick() is eps[3]  # more in flight, but 0.1 ms for the next request against 500 ms
    feed(b, (2, 5, 0.001))  # equal expected latencies: the lower RIF
    b.pool.fail(eps[3].address)
    feed(b, (3, 8, 0.001))
    assert b.pick() is eps[2]


def test_each_pick_counts_itself_on_the_answer_it_used() -> None:
    """The caller's own request is load the answer did not see: two equal cold answers take
    turns instead of one taking every pick until the next probe."""
    eps = endpoints(2)
    b = balancer(eps, q_rif=1.0)
    feed(b, (0, 1, 0.010), (1, 1, 0.010))
    picks = [b.pick() for _ in range(3)]
    assert picks[0] is not picks[1]
    rifs = sorted(p.current() for p in b.pool.probes())
    assert rifs == [2, 3]


def test_the_callers_own_requests_since_the_answer_correct_its_rif() -> None:
    """With the caller's load record, what it sent and got back since the answer is known
    exactly: the answered RIF moves with it, down as well as up."""
    eps = endpoints(2)
    b = balancer(eps, q_rif=1.0)
    eps[0].load.outstanding = 2  # two of the five requests in flight there are this caller's
    b.pool.add(eps[0].address, 5, 0.010, 16, load=eps[0].load)
    b.pool.add(eps[1].address, 4, 0.010, 16, load=eps[1].load)
    assert b.pick() is eps[1]  # both cold (q_rif 1), equal latency: the lower RIF, 4 against 5
    eps[0].load.outstanding = 0  # both came back
    (a,) = [p for p in b.pool.probes() if p.address == eps[0].address]
    assert a.current() == 3
    assert b.pick() is eps[0]  # 3 against 4 (the pipeline would have started the pick: not here)
    eps[0].load.start()
    assert a.current() == 4


def test_an_answer_serves_at_most_its_reuse_budget() -> None:
    eps = endpoints(2)
    b = balancer(eps, reuse_budget=2, q_rif=1.0)
    feed(b, (0, 0, 0.001), (1, 50, 0.9))
    assert [b.pick(), b.pick()] == [eps[0], eps[0]]
    assert [p.address for p in b.pool.probes()] == [eps[1].address]  # worn out after two uses
    assert b.pick() is eps[1]


def test_reuse_budget_follows_from_the_probe_and_removal_rates() -> None:
    opts = PrequalOptions(probes_per_query=1.0, pool_size=16, remove_per_query=0.25)
    # 100 endpoints: 84% of answers add to the pool, a quarter leaves per pick: 1.1 / 0.59 -> 2
    assert reuse_budget(opts, 100) == 2
    # as many endpoints as the pool holds: an answer only replaces one, nothing bounds reuse but age
    assert reuse_budget(opts, 16) == math.inf
    assert reuse_budget(PrequalOptions(probes_per_query=3.0, remove_per_query=0.0), 1000) == 1
    assert reuse_budget(PrequalOptions(reuse_budget=5), 1000) == 5


def test_answers_older_than_max_age_are_not_used() -> None:
    clock = FakeClock()
    eps = endpoints(2)
    b = balancer(eps, clock=clock, max_age=1.0)
    eps[0].load.outstanding = 5  # the fallback would take eps[1]
    feed(b, (0, 0, 0.001))
    assert b.pick() is eps[0]
    clock.advance(1.5)
    assert b.pick() is eps[1]  # the answer is stale: least request on local figures
    assert len(b.pool) == 0


def test_the_pool_keeps_one_answer_per_endpoint_and_drops_the_oldest_when_full() -> None:
    clock = FakeClock()
    eps = endpoints(20)
    b = balancer(eps, clock=clock, pool_size=16)
    for i in range(20):
        feed(b, (i, i, 0.01))
        clock.advance(0.001)
    kept = {p.address for p in b.pool.probes()}
    assert kept == {e.address for e in eps[4:]}
    feed(b, (10, 99, 0.5))  # a newer answer of the same endpoint replaces its older one
    assert len(b.pool) == 16
    assert [p.rif for p in b.pool.probes() if p.address == eps[10].address] == [99]


def test_the_worst_answer_leaves_a_full_pool_at_the_removal_rate() -> None:
    eps = endpoints(5)
    b = balancer(eps, remove_per_query=1.0, q_rif=0.5, pool_size=4)
    # recent RIFs 1, 2, 6, 9: the threshold is 6, only 9 is hot and goes
    feed(b, (0, 1, 0.002), (1, 2, 0.001), (2, 6, 0.300), (3, 9, 0.001))
    assert b.pick() is eps[1]
    assert {p.address for p in b.pool.probes()} == {eps[0].address, eps[1].address, eps[2].address}
    assert b.pick() in (eps[0], eps[1])
    assert len(b.pool) == 3  # not full: nothing more leaves
    feed(b, (4, 1, 0.003))  # full again; RIFs 1, 2, 6, 9, 1: threshold 6, none hot
    b.pick()
    assert eps[2].address not in {p.address for p in b.pool.probes()}  # the slowest leaves


def test_a_pool_with_room_keeps_its_worst_answer() -> None:
    """With fewer endpoints than the pool holds, removing the worst would leave the best alone,
    used pick after pick until the next answer: it stays, and the counted picks turn the best hot."""
    eps = endpoints(2)
    b = balancer(eps, remove_per_query=1.0, q_rif=0.5)
    feed(b, (0, 1, 0.001), (1, 1, 0.050))
    picks = Counter(b.pick() for _ in range(4))
    assert len(b.pool) == 2
    assert picks[eps[1]] >= 1  # once the fast one's counted picks make it hot


def test_a_failed_probe_takes_its_endpoint_out_of_the_pool() -> None:
    eps = endpoints(2)
    b = balancer(eps)
    feed(b, (0, 0, 0.001), (1, 9, 0.9))
    b.pool.fail(eps[0].address)
    assert b.pool.failed == 1
    assert b.pick() is eps[1]


def test_excluded_endpoints_are_not_picked_from_the_pool() -> None:
    eps = endpoints(3)
    b = balancer(eps)
    feed(b, (0, 0, 0.001), (1, 4, 0.2))
    assert b.pick(exclude={eps[0].address}) is eps[1]
    assert b.pick(exclude={eps[0].address, eps[1].address}) is eps[2]  # fallback, still excluding
    assert b.pick(exclude={e.address for e in eps}) is None


def test_an_empty_pool_falls_back_to_the_less_loaded_of_two() -> None:
    eps = endpoints(2)
    eps[0].load.outstanding = 10
    b = balancer(eps)
    assert Counter(b.pick() for _ in range(200)) == Counter({eps[1]: 200})


def test_the_prober_is_asked_for_probes_per_query_random_endpoints() -> None:
    eps = endpoints(10, weights=[0] + [1] * 9)
    hub = ProbeHub()
    recorder = hub.probers["http"] = Recorder()
    b = Prequal(
        eps, rng=random.Random(3), hub=hub, service="orders", prequal=PrequalOptions(probes_per_query=2)
    )
    for _ in range(500):
        b.pick()
    assert all(len(set(asked)) == 2 for asked in recorder.asked) and len(recorder.asked) == 500
    seen = Counter(a for asked in recorder.asked for a in asked)
    assert eps[0].address not in seen  # weight 0: never probed
    assert min(seen.values()) > 1000 / 9 * 0.6  # uniform over the other nine

    recorder.asked.clear()
    half = Prequal(eps, rng=random.Random(4), hub=hub, prequal=PrequalOptions(probes_per_query=0.5))
    for _ in range(1000):
        half.pick()
    assert len(recorder.asked) == pytest.approx(500, abs=80)  # a fraction is a probability


def test_the_pool_outlives_snapshots_and_the_rules_reach_the_balancer() -> None:
    docs = [
        {
            "kind": "Endpoints",
            "service": "orders",
            "endpoints": [{"address": "10.0.0.1:80"}, {"address": "10.0.0.2:80"}],
        },
        {
            "kind": "Destination",
            "service": "orders",
            "load_balancer": "prequal",
            "prequal": {"pool_size": 4, "q_rif": 0.5},
        },
    ]
    rules = parse_documents(docs)
    loads = LoadBook()
    first = Snapshot(rules, loads=loads).plan("orders")
    assert first is not None
    b = first.balancer(None)
    assert isinstance(b, Prequal) and b.options.pool_size == 4 and b.options.q_rif == 0.5
    b.pool.add("10.0.0.2:80", 0, 0.001, 4)
    again = Snapshot(rules, loads=loads).with_rules(rules, "2").plan("orders")
    assert again is not None
    b2 = again.balancer(None)
    assert b2 is not b and isinstance(b2, Prequal) and b2.pool is b.pool
    assert b2.pick().address == "10.0.0.2:80"  # type: ignore[union-attr]


def test_make_balancer_builds_prequal_without_a_hub() -> None:
    eps = endpoints(2)
    b = make_balancer("prequal", eps, rng=random.Random(1))
    assert isinstance(b, Prequal) and b.pick() in eps
