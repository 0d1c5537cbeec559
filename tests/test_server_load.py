from __future__ import annotations

import pytest

from meshlib.balancing.orca import parse_report
from meshlib.server_load import SAMPLE_AGE_S, ServerLoad
from tests.clock import Clock


def make(cores: int = 2) -> tuple[ServerLoad, Clock, Clock]:
    clock, cpu = Clock(), Clock(0.0)
    return ServerLoad(clock=clock, cpu_clock=cpu, cores=cores), clock, cpu


def test_counts_requests_in_flight() -> None:
    load, _, _ = make()
    a = load.begin()
    b = load.begin()
    assert load.in_flight == 2
    load.end(a)
    assert load.in_flight == 1
    load.end(b)
    assert load.in_flight == 0


def test_latency_is_the_median_of_the_requests_that_ran_at_that_rif() -> None:
    load, clock, _ = make()
    assert load.latency() is None
    for seconds in (0.010, 0.030, 0.020):  # alone: RIF 1
        started = load.begin()
        clock.advance(seconds)
        load.end(started)
    stamps = [load.begin() for _ in range(4)]  # four together: RIF 4, 3, 2, 1 as they leave
    clock.advance(0.100)
    for started in stamps:
        load.end(started)
    assert load.latency(1) == pytest.approx(0.030)  # 0.010, 0.020, 0.030, 0.100: the upper median
    assert load.latency(4) == pytest.approx(0.100)
    assert load.latency(5) == pytest.approx(0.100)  # no class of its own yet: the nearest
    assert load.latency() == pytest.approx(load.latency(1))  # nothing in flight: as if alone


def test_with_nothing_recent_the_latest_latency_stands() -> None:
    load, clock, _ = make()
    assert load.latency(1) is None  # before the first request
    started = load.begin()
    clock.advance(0.05)
    load.end(started)
    started = load.begin()
    clock.advance(1.0)  # a slow one, in another class than the next
    with_two = load.begin()
    clock.advance(0.5)
    load.end(with_two)
    clock.advance(0.1)
    load.end(started)
    clock.advance(SAMPLE_AGE_S + 1)  # all old now: not "unknown", i.e. not as fast as a new server
    assert load.latency(1) == pytest.approx(1.6)  # the latest to end
    started = load.begin()
    clock.advance(0.02)
    load.end(started)
    assert load.latency(1) == pytest.approx(0.02)  # a recent one wins again


def test_cpu_and_rates_are_sampled_once_a_period() -> None:
    load, clock, cpu = make(cores=2)
    for i in range(30):
        load.end(load.begin(), failed=i < 3)
    cpu.advance(1.0)
    clock.advance(0.5)
    assert load.cpu_utilization() == 0.0  # not a period yet: the first sample stands
    clock.advance(0.5)
    assert load.cpu_utilization() == pytest.approx(0.5)  # 1 s of CPU in 1 s on 2 cores
    report = load.report()
    assert report.rps_fractional == pytest.approx(30.0)
    assert report.eps == pytest.approx(3.0)
    clock.advance(2.0)  # idle: nothing used, nothing served
    assert load.report().rps_fractional == 0.0
    assert load.cpu_utilization() == 0.0


def test_application_figures() -> None:
    load, _, _ = make()
    load.set_application_utilization(0.7)
    load.set_named_metric("queue", 3)
    load.begin()
    report = load.report()
    assert report.application_utilization == 0.7
    assert report.utilization == 0.7
    assert dict(report.named_metrics) == {"queue": 3.0, "rif": 1.0}
    with pytest.raises(ValueError):
        load.set_application_utilization(float("nan"))
    with pytest.raises(ValueError):
        load.set_application_utilization(-0.1)
    with pytest.raises(ValueError):
        load.set_named_metric("a=b", 1.0)
    with pytest.raises(ValueError):
        load.set_named_metric("ok", float("inf"))


def test_the_header_says_the_report() -> None:
    load, clock, cpu = make(cores=1)
    load.set_application_utilization(0.25)
    load.begin()
    assert parse_report(load.header()) == load.report()
    load.begin()
    assert parse_report(load.header()).named_metrics["rif"] == 2.0  # type: ignore[union-attr]
    cpu.advance(0.5)
    clock.advance(1.0)
    report = parse_report(load.header())
    assert report is not None and report.cpu_utilization == pytest.approx(0.5)
    load.set_application_utilization(0.0)  # taken back: the CPU's figure stands
    assert parse_report(load.header()).application_utilization == 0.0  # type: ignore[union-attr]
