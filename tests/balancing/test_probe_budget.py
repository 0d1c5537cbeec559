"""The probe bounds every prober keeps, with a clock moved by hand."""

from __future__ import annotations

from meshlib.balancing.prequal import PrequalOptions, ProbePool
from meshlib.balancing.probe_budget import ProbeBudget
from meshlib.endpoint import Endpoint
from tests.clock import Clock

EPS = [Endpoint(f"10.0.0.{i}:80") for i in range(40)]


def test_one_probe_at_a_time_per_endpoint_until_it_is_done() -> None:
    clock = Clock()
    budget = ProbeBudget(clock=clock)
    pool = ProbePool("orders")
    options = PrequalOptions(max_probe_rate=1000)
    assert budget.admit(pool, EPS[:2], options) == EPS[:1]  # a new destination: one token
    clock.advance(1.0)  # the buckets fill
    assert budget.admit(pool, EPS[:3], options) == EPS[1:3]  # the first is still pending
    budget.done(pool, EPS[0])
    assert budget.admit(pool, EPS[:1], options) == [EPS[0]]
    assert pool.sent == 4 and budget.in_flight == 3


def test_a_destinations_rate_with_a_burst_of_a_tenth_of_a_second() -> None:
    clock = Clock()
    budget = ProbeBudget(clock=clock)
    pool, other = ProbePool("orders"), ProbePool("payments")
    options = PrequalOptions(max_probe_rate=50)
    sent = budget.admit(pool, EPS, options)
    assert len(sent) == 1  # the bucket starts with one token (a burst of five builds up)
    clock.advance(1.0)
    assert len(budget.admit(pool, EPS[1:], options)) == 5
    clock.advance(0.1)
    assert len(budget.admit(pool, EPS[6:], options)) == 5  # 50 a second
    assert len(budget.admit(other, EPS, options)) == 1  # another destination's own bucket


def test_the_process_bounds_hold_over_every_destination() -> None:
    clock = Clock()
    budget = ProbeBudget(max_rate=100, max_in_flight=3, clock=clock)
    pools = [ProbePool(f"s{i}") for i in range(5)]
    options = PrequalOptions(max_probe_rate=1000)
    clock.advance(1.0)
    admitted = [len(budget.admit(p, EPS, options)) for p in pools]
    assert sum(admitted) == 3  # at most three in flight, whoever asks
    for p in pools:
        for e in EPS:
            if e.address in p.pending:
                budget.done(p, e)
    assert budget.in_flight == 0
    clock.advance(1.0)
    budget.max_in_flight = 1000
    assert sum(len(budget.admit(p, EPS, options)) for p in pools) == 10  # 100 a second: a burst of 10
