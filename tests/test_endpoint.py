"""EndpointLoad's latency figures: the peak EWMA's are in tests/balancing/test_peak_ewma.py."""

from __future__ import annotations

from meshlib.endpoint import RECENT, EndpointLoad


def test_recent_rtt_is_the_median_of_the_latest_answers() -> None:
    load = EndpointLoad()
    assert load.recent_rtt() == 0.0  # nothing answered yet
    for rtt in (0.010, 0.012, 0.500, 0.011, 0.009):  # one spike (a connection's setup, a pause)
        load.observe(rtt)
    assert load.recent_rtt() == 0.011  # says nothing about the endpoint: not its figure
    assert load.latency() >= 0.4  # where the peak EWMA holds it
    for _ in range(RECENT // 2 + 1):  # slower for good: a majority of the latest answers say so
        load.observe(1.0)
    assert load.recent_rtt() == 1.0
    for _ in range(RECENT):  # only the latest RECENT count
        load.observe(0.02)
    assert load.recent_rtt() == 0.02


def test_waited_is_how_long_the_oldest_request_still_waiting_has_waited() -> None:
    load = EndpointLoad()
    assert load.waited(100.0) == 0.0  # nothing sent
    load.start(10.0)
    load.start(11.0)
    load.start(12.0)
    assert load.waited(13.0) == 3.0
    # the request sent at 12.0 answers first: the oldest stamp goes, whichever request answered,
    # so what is left (11.0) is still no older than the oldest waiting (10.0): a lower bound
    load.observe(1.0, 13.0)
    load.finish()
    assert load.waited(13.5) == 2.5
    load.observe(3.5, 13.5)  # the one sent at 10.0
    load.finish()
    assert load.waited(14.0) == 2.0  # the 12.0 stamp left; the one sent at 11.0 has waited 3.0
    load.observe(3.0, 14.0)
    assert load.waited(20.0) == 0.0  # every answer in (its stream may still be open)
    load.finish()
    assert load.waited(20.0) == 0.0


def test_a_stamp_whose_answer_never_came_goes_with_the_last_request() -> None:
    load = EndpointLoad()
    load.start(10.0)  # no answer observed for it (a transport's early failure, say)
    load.finish()
    assert load.waited(100.0) == 0.0
    load.start(100.0)
    assert load.waited(101.0) == 1.0  # not 91: the lost stamp is gone
