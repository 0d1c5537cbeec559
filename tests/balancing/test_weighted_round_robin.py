from __future__ import annotations

import random
from collections import Counter

import pytest

from meshlib.balancing import make_balancer
from meshlib.balancing.orca import LoadReport
from meshlib.balancing.weighted_round_robin import (
    LATENCY_NOISE_S,
    MAX_RATIO,
    WeightedRoundRobin,
    latency_scaled,
    load_weight,
    report_weight,
    schedule_weights,
)
from meshlib.endpoint import Endpoint, EndpointLoad
from meshlib.rules.models import WeightedRoundRobinSpec
from tests.clock import Clock


def endpoints(*weights: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:80", weight=w) for i, w in enumerate(weights)]


def spec(**fields: object) -> WeightedRoundRobinSpec:
    defaults: dict[str, object] = {"blackout_period": "0s", "weight_update_period": "100ms"}
    return WeightedRoundRobinSpec.model_validate({**defaults, **fields})


def report(qps: float, cpu: float = 0.0, app: float = 0.0, eps: float = 0.0) -> LoadReport:
    return LoadReport(cpu_utilization=cpu, application_utilization=app, rps_fractional=qps, eps=eps)


def counts(balancer: WeightedRoundRobin, n: int) -> Counter[str]:
    picked = (balancer.pick() for _ in range(n))
    return Counter(ep.address for ep in picked if ep is not None)


# A58's formula: weight = qps / (utilization + eps/qps * error_utilization_penalty)


def test_the_formula() -> None:
    assert report_weight(report(100.0, cpu=0.5)) == pytest.approx(200.0)
    # 10 errors in 100 queries at penalty 1 weigh as 0.1 of utilization: 100 / (0.5 + 0.1)
    assert report_weight(report(100.0, cpu=0.5, eps=10.0)) == pytest.approx(100.0 / 0.6)
    assert report_weight(report(100.0, cpu=0.5, eps=10.0), penalty=0.0) == pytest.approx(200.0)
    assert report_weight(report(100.0, cpu=0.5, eps=10.0), penalty=5.0) == pytest.approx(100.0)


def test_the_applications_utilization_wins_over_the_cpus() -> None:
    assert report_weight(report(100.0, cpu=0.9, app=0.25)) == pytest.approx(400.0)
    assert report_weight(report(100.0, cpu=0.9, app=0.0)) == pytest.approx(100.0 / 0.9)


@pytest.mark.parametrize("empty", [report(0.0, cpu=0.5), report(100.0), report(0.0)])
def test_a_report_without_rate_or_utilization_weighs_nothing_and_is_not_kept(empty: LoadReport) -> None:
    assert report_weight(empty) == 0.0
    load = EndpointLoad()
    load.take_report(empty, 5.0)
    assert (load.report, load.reported, load.reported_since) == (None, 0.0, 0.0)


def test_blackout_then_weight_then_expiry_then_blackout_again() -> None:
    load = EndpointLoad()
    args = {"blackout": 10.0, "expiration": 180.0}
    load.take_report(report(100.0, cpu=0.5), 1000.0)
    assert load_weight(load, 1000.0, **args) == 0.0  # reports for less than the blackout period
    load.take_report(report(100.0, cpu=0.5), 1009.0)
    assert load_weight(load, 1009.9, **args) == 0.0
    assert load_weight(load, 1010.0, **args) == pytest.approx(200.0)
    load.take_report(report(50.0, cpu=0.5), 1100.0)
    assert load_weight(load, 1100.0, **args) == pytest.approx(100.0)  # the latest report counts
    assert load_weight(load, 1279.9, **args) == pytest.approx(100.0)
    assert load_weight(load, 1280.0, **args) == 0.0  # none for the expiration period: forgotten
    load.take_report(report(50.0, cpu=0.5), 1300.0)  # reports again: the blackout starts over
    assert load_weight(load, 1305.0, **args) == 0.0
    assert load_weight(load, 1310.0, **args) == pytest.approx(100.0)


def test_endpoints_without_weight_take_the_mean_of_the_known_ones() -> None:
    assert schedule_weights([100.0, 300.0, 0.0], [1, 1, 1]) == [100.0, 300.0, 200.0]
    # fewer than two known: the configured weights, as round robin
    assert schedule_weights([100.0, 0.0, 0.0], [1, 2, 3]) == [1.0, 2.0, 3.0]
    # held within MAX_RATIO of the median: an utilization near zero, one swamped
    assert schedule_weights([1.0, 1.0, 1.0e6], [1, 1, 1]) == [1.0, 1.0, MAX_RATIO]
    assert schedule_weights([10.0, 10.0, 1.0e-6], [1, 1, 1]) == [10.0, 10.0, 10.0 / MAX_RATIO]


# EDF: each endpoint a job of period 1/weight, first deadlines random within one period


def test_picks_follow_the_reported_weights() -> None:
    clock = Clock()
    eps = endpoints(1, 1, 1)
    for ep, qps in zip(eps, (100.0, 200.0, 400.0), strict=True):
        ep.load.take_report(report(qps, cpu=0.5), clock.now)
    wrr = WeightedRoundRobin(eps, rng=random.Random(7), weighted_round_robin=spec(), clock=clock)
    seen = counts(wrr, 7000)
    assert seen == {eps[0].address: 1000, eps[1].address: 2000, eps[2].address: 4000}  # EDF: exact
    assert wrr.weights() == {eps[0].address: 200.0, eps[1].address: 400.0, eps[2].address: 800.0}


def test_edf_interleaves_instead_of_bursting() -> None:
    clock = Clock()
    eps = endpoints(1, 1)
    eps[0].load.take_report(report(300.0, cpu=1.0), clock.now)
    eps[1].load.take_report(report(100.0, cpu=1.0), clock.now)
    wrr = WeightedRoundRobin(eps, rng=random.Random(3), weighted_round_robin=spec(), clock=clock)
    order = [wrr.pick() for _ in range(400)]
    for i in range(0, 400, 4):  # every window of one period of the slow one: 3 and 1
        window = Counter(order[i : i + 4])
        assert window[eps[1]] <= 2 and window[eps[0]] >= 2


def test_without_reports_it_is_round_robin_on_the_configured_weights() -> None:
    eps = endpoints(1, 1, 2)
    wrr = WeightedRoundRobin(eps, rng=random.Random(1), weighted_round_robin=spec(), clock=Clock())
    seen = counts(wrr, 400)
    assert seen == {eps[0].address: 100, eps[1].address: 100, eps[2].address: 200}


def test_a_weight_zero_endpoint_takes_nothing_unless_all_have_it() -> None:
    eps = endpoints(1, 0, 1)
    wrr = WeightedRoundRobin(eps, rng=random.Random(1), clock=Clock())
    assert eps[1].address not in counts(wrr, 100)
    assert set(counts(WeightedRoundRobin(endpoints(0, 0), clock=Clock()), 10)) == {
        "10.0.0.0:80",
        "10.0.0.1:80",
    }


def test_the_schedule_follows_new_reports_every_update_period() -> None:
    clock = Clock()
    eps = endpoints(1, 1)
    for ep in eps:
        ep.load.take_report(report(100.0, cpu=0.5), clock.now)
    wrr = WeightedRoundRobin(eps, rng=random.Random(1), weighted_round_robin=spec(), clock=clock)
    assert counts(wrr, 1000)[eps[0].address] == 500
    eps[0].load.take_report(report(100.0, cpu=0.125), clock.now)  # now 4 times the other's weight
    assert counts(wrr, 1000)[eps[0].address] == 500  # the schedule holds for the update period
    clock.advance(0.1)
    assert counts(wrr, 1000)[eps[0].address] == pytest.approx(800, abs=2)


def test_weights_survive_a_new_balancer_on_the_same_loads() -> None:
    """A new Snapshot builds a new balancer over Endpoints sharing the old loads: no blackout again."""
    clock = Clock()
    eps = endpoints(1, 1)
    eps[0].load.take_report(report(300.0, cpu=1.0), clock.now)
    eps[1].load.take_report(report(100.0, cpu=1.0), clock.now)
    clock.advance(10.0)
    options = spec(blackout_period="10s")
    first = WeightedRoundRobin(eps, weighted_round_robin=options, clock=clock)
    again = [Endpoint(ep.address, weight=1, load=ep.load) for ep in eps]
    second = WeightedRoundRobin(again, weighted_round_robin=options, clock=clock)
    assert first.weights() == second.weights() == {eps[0].address: 300.0, eps[1].address: 100.0}


def test_an_excluded_endpoint_is_skipped_and_comes_back_without_a_burst() -> None:
    clock = Clock()
    eps = endpoints(1, 1, 1)
    wrr = WeightedRoundRobin(eps, rng=random.Random(2), clock=clock)
    out = {eps[0].address}
    assert all(wrr.pick(exclude=out) is not eps[0] for _ in range(300))
    back = [wrr.pick() for _ in range(6)]
    assert back.count(eps[0]) <= 3  # at most one extra pick after its long absence
    assert wrr.pick(exclude={ep.address for ep in eps}) is None


def test_made_by_name_with_the_destinations_spec() -> None:
    balancer = make_balancer(
        "weighted_round_robin", endpoints(1, 1), weighted_round_robin=spec(error_utilization_penalty=2.5)
    )
    assert isinstance(balancer, WeightedRoundRobin)
    assert (balancer.blackout, balancer.update, balancer.penalty, balancer.expiration) == (
        0.0,
        0.1,
        2.5,
        180.0,
    )
    default = make_balancer("weighted_round_robin", endpoints(1))
    assert isinstance(default, WeightedRoundRobin)
    assert (default.blackout, default.update, default.penalty, default.tolerance) == (10.0, 1.0, 1.0, 2.0)


# Not A58's: latency the caller sees, and requests piling up on an endpoint


def test_an_endpoint_slower_than_the_tolerance_is_cut_by_the_square_of_as_much() -> None:
    w = [20.0, 20.0, 20.0, 20.0]
    # 10x slower than the median, tolerance 2: cut to (2 x 0.1 / 1.0) ** 2 of its weight
    assert latency_scaled(w, [0.1, 0.1, 0.1, 1.0], 2.0) == pytest.approx([20.0, 20.0, 20.0, 0.8])
    # within the tolerance (and the noise allowance above it): untouched
    assert latency_scaled(w, [0.1, 0.1, 0.1, 0.2 + LATENCY_NOISE_S], 2.0) == w
    assert latency_scaled(w, [0.001, 0.001, 0.001, 0.006], 2.0) == w  # 6x, but 4 ms: noise
    # never below 1/MAX_RATIO**2 of its weight (it must still get answers to show it has recovered)
    floor = 20.0 / MAX_RATIO**2
    assert latency_scaled(w, [0.1, 0.1, 0.1, 100.0], 2.0) == pytest.approx([20.0, 20.0, 20.0, floor])
    # one slow endpoint of two is still the slow one (the lower middle is the median)
    assert latency_scaled([5.0, 5.0], [0.1, 1.0], 2.0) == pytest.approx([5.0, 0.2])
    # off, or too little known: A58 as written
    assert latency_scaled(w, [0.1, 0.1, 0.1, 1.0], 0.0) == w
    assert latency_scaled(w, [0.0, 0.0, 0.0, 1.0], 2.0) == w


def answered(load: EndpointLoad, rtt: float, n: int = 8) -> None:
    for _ in range(n):
        load.observe(rtt)


def same_capacity(clock: Clock, *rtts: float) -> list[Endpoint]:
    """Four endpoints reporting the same capacity, each having answered at its `rtts` (if any)."""
    eps = endpoints(1, 1, 1, 1)
    for ep, rtt in zip(eps, rtts or (None,) * 4, strict=True):
        ep.load.take_report(report(10.0, app=0.5), clock.now)
        if rtt is not None:
            answered(ep.load, rtt)
    return eps


@pytest.mark.parametrize(("tolerance", "slow_share"), [(2.0, 0.8 / 60.8), (0.0, 1 / 4)])
def test_a_slow_endpoint_with_spare_capacity_keeps_little_traffic(
    tolerance: float, slow_share: float
) -> None:
    # four endpoints reporting the same capacity; the last answers 10x slower: A58 alone gives it
    # a quarter of the traffic, the latency cut 0.8 / (20 + 20 + 20 + 0.8)
    clock = Clock()
    eps = same_capacity(clock, 0.1, 0.1, 0.1, 1.0)
    options = spec(latency_tolerance=tolerance)
    wrr = WeightedRoundRobin(eps, rng=random.Random(5), weighted_round_robin=options, clock=clock)
    assert counts(wrr, 6400)[eps[3].address] == pytest.approx(6400 * slow_share, abs=2)
    # it answers fast again: its weight comes back with its latest answers
    answered(eps[3].load, 0.1)
    clock.advance(0.1)
    assert counts(wrr, 6400)[eps[3].address] == pytest.approx(1600, abs=2)


def test_latency_does_not_weigh_in_a58s_round_robin_fallback() -> None:
    eps = endpoints(1, 1)  # no reports: round robin on the configured weights, whatever the latency
    answered(eps[0].load, 1.0)
    answered(eps[1].load, 0.1)
    wrr = WeightedRoundRobin(eps, rng=random.Random(1), weighted_round_robin=spec(), clock=Clock())
    assert counts(wrr, 100) == {eps[0].address: 50, eps[1].address: 50}


def test_a_pick_passes_over_an_endpoint_holding_more_than_its_share_in_flight() -> None:
    clock = Clock()
    eps = same_capacity(clock)
    for ep in eps:
        ep.load.outstanding = 1
    wrr = WeightedRoundRobin(eps, rng=random.Random(5), weighted_round_robin=spec(), clock=clock)
    assert counts(wrr, 400)[eps[0].address] == 100  # one each in flight: the schedule as it is
    # answers stopped coming from the first: its requests pile up past 2 x its share (1 each of
    # the others' requests, per unit of weight) + 1 = 3; it gets nothing until they come back
    eps[0].load.outstanding = 4
    assert eps[0].address not in counts(wrr, 400)
    eps[0].load.outstanding = 3
    assert counts(wrr, 400)[eps[0].address] >= 100  # back, its place kept (a period's lag at most)
    # the only one not excluded is piled up: it is picked (passing over is never a refusal)
    eps[0].load.outstanding = 50
    others = {ep.address for ep in eps[1:]}
    assert all(wrr.pick(exclude=others) is eps[0] for _ in range(10))
    # A58 as written: no passing over
    a58 = WeightedRoundRobin(
        eps, rng=random.Random(5), weighted_round_robin=spec(latency_tolerance=0), clock=clock
    )
    assert counts(a58, 400)[eps[0].address] == 100


@pytest.mark.parametrize(("tolerance", "slow_share"), [(2.0, 0.8 / 60.8), (0.0, 1 / 4)])
def test_a_request_waiting_long_cuts_its_endpoint_before_any_slow_answer(
    tolerance: float, slow_share: float
) -> None:
    clock = Clock()
    eps = same_capacity(clock, 0.1, 0.1, 0.1, 0.1)  # all answered fast so far
    options = spec(latency_tolerance=tolerance)
    wrr = WeightedRoundRobin(eps, rng=random.Random(5), weighted_round_robin=options, clock=clock)
    assert counts(wrr, 6400)[eps[3].address] == 1600
    # the last slows down: a request sent to it has waited 1 s, its answer not come yet, every
    # answer it gave still fast; it weighs as 10x slower than the median already (A58: untouched)
    eps[3].load.start(clock.now)
    clock.advance(1.0)
    assert eps[3].load.recent_rtt() == 0.1
    assert counts(wrr, 6400)[eps[3].address] == pytest.approx(6400 * slow_share, abs=2)
    # the answer comes, and then it answers fast again: its whole weight is back
    eps[3].load.observe(1.0, clock.now)
    eps[3].load.finish()
    answered(eps[3].load, 0.1)
    clock.advance(0.1)
    assert counts(wrr, 6400)[eps[3].address] == 1600


def test_requests_waiting_a_usual_time_cut_nothing() -> None:
    clock = Clock()
    eps = same_capacity(clock, 0.1, 0.1, 0.1, 0.1)
    for ep in eps:
        ep.load.start(clock.now)  # one request in flight each, as long as their usual latency
    clock.advance(0.1)
    wrr = WeightedRoundRobin(eps, rng=random.Random(5), weighted_round_robin=spec(), clock=clock)
    assert set(wrr.weights().values()) == {20.0}


def test_a_request_waiting_long_weighs_its_endpoint_anew_before_the_update_period() -> None:
    clock = Clock()
    eps = same_capacity(clock, 0.1, 0.1, 0.1, 0.1)
    options = spec(weight_update_period="10s")
    wrr = WeightedRoundRobin(eps, rng=random.Random(5), weighted_round_robin=options, clock=clock)
    assert counts(wrr, 6400)[eps[3].address] == 1600
    eps[3].load.start(clock.now)
    clock.advance(0.5)  # 5x the median, long before the schedule's next update: cut by (2/5) ** 2
    assert counts(wrr, 6400)[eps[3].address] == pytest.approx(6400 * 3.2 / 63.2, abs=4)
