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
