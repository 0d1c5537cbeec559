"""meshlib.stalls: the wait every endpoint shared is taken out of each answer, and only that."""

from __future__ import annotations

import math

import pytest

from meshlib.endpoint import EndpointLoad, LoadBook

T = 1000.0


def loads(n: int) -> list[EndpointLoad]:
    book = LoadBook()
    out = [book.get(f"10.0.0.{i}:80") for i in range(n)]
    for load in out:
        load.observe(0.002, now=T)
    return out


def test_one_endpoint_late_alone_keeps_its_peak() -> None:
    a, b = loads(2)
    # three requests in flight on a alone, all 500 ms late: nothing else was overdue with them
    for k in range(3):
        a.observe(0.500, now=T + 0.6 + k * 0.001)
    assert a.latency(T + 0.602) == pytest.approx(0.500, rel=0.01)
    assert b.stalls.end == 0.0  # no common stall was recorded


def test_a_stall_is_taken_back_from_the_first_endpoint_and_out_of_the_others() -> None:
    a, b, c = loads(3)
    # nothing answers between T and T + 1; then a, b and c answer, each having waited through it
    a.observe(1.001, now=T + 1.0)
    assert a.latency(T + 1.0) == pytest.approx(1.001)  # a peak, until another endpoint shares it
    b.observe(1.001, now=T + 1.0001)
    assert a.latency(T + 1.0001) < 0.003  # taken back
    assert b.latency(T + 1.0001) < 0.003
    # the stall: from when b was overdue (it answers in 2 ms) to a's answer, nothing answering
    assert a.stalls.start == pytest.approx(T + 0.0011, abs=1e-9)
    assert a.stalls.end == pytest.approx(T + 1.0, abs=1e-9)
    # a long request that spanned the stall: only its time outside it counts
    c.observe(1.5, now=T + 1.2)
    assert c.latency(T + 1.2) == pytest.approx(1.5 - 0.9989, abs=1e-9)


def test_endpoints_with_no_estimate_yet_make_no_stall() -> None:
    book = LoadBook()
    a, b = book.get("10.0.0.1:80"), book.get("10.0.0.2:80")
    a.observe(0.300, now=T)  # first answers of two new endpoints, in flight together
    b.observe(0.300, now=T + 0.001)
    assert a.latency(T + 0.001) == pytest.approx(0.300, rel=0.01)
    assert b.latency(T + 0.001) == pytest.approx(0.300)


def test_loads_made_alone_share_nothing() -> None:
    a, b = EndpointLoad(), EndpointLoad()
    for load in (a, b):
        load.observe(0.002, now=T)
    a.observe(1.001, now=T + 1.0)
    b.observe(1.001, now=T + 1.0001)
    assert a.latency(T + 1.0001) == pytest.approx(1.001, rel=0.01)
    assert b.latency(T + 1.0001) == pytest.approx(1.001)


def test_an_answer_late_only_by_the_stall_does_not_lower_the_average() -> None:
    a, b, c = loads(3)
    c.observe(0.020, now=T + 0.001)  # c is slower: 20 ms
    a.observe(1.001, now=T + 1.0)
    b.observe(1.001, now=T + 1.0001)  # the stall is found
    # c's request spanned it; without the stall it took ~1 ms, but its server was stopped too:
    # that says nothing about c, so its 20 ms stand (decayed for the time, as before)
    c.observe(1.01, now=T + 1.002)
    assert c.latency(T + 1.002) == pytest.approx(0.020 * math.exp(-1.001 / 10))


def test_a_stall_found_next_to_the_last_one_is_taken_out_with_it() -> None:
    a, b, c = loads(3)
    a.observe(0.101, now=T + 0.100)  # a 100 ms stall from T, found by a and b
    b.observe(0.101, now=T + 0.1001)
    # the burst after it: c and a answer later still, overdue together again past its end
    c.observe(0.106, now=T + 0.105)
    a.observe(0.107, now=T + 0.106)
    assert a.stalls.count == 2
    assert a.stalls.start < T + 0.002 and a.stalls.end > T + 0.104  # one stretch, merged
    for load in (a, b, c):  # each keeps its 2 ms and what came after the stretch, not 100 ms
        assert load.latency(T + 0.106) < 0.0035
