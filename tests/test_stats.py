"""Traffic counters: bounded however many names callers claim."""

from __future__ import annotations

import pytest

from meshlib.stats import MAX_EDGES, OTHER, TrafficStats


def test_peers_past_the_cap_share_one_edge() -> None:
    stats = TrafficStats()
    for i in range(MAX_EDGES + 500):
        stats.record("in", f"caller-{i}", None, 200, 0.001)
    edges = stats.edges()
    assert len(edges) == MAX_EDGES + 1  # the cap, plus the shared one
    assert edges["in", OTHER, ""].total == 500
    stats.record("in", "caller-7", None, 503, 0.002)  # a peer seen before the cap keeps its edge
    assert stats.edge("in", "caller-7").by_class == {"2xx": 1, "5xx": 1}


def test_subjects_of_a_counter_past_the_cap_share_one() -> None:
    stats = TrafficStats()
    for i in range(MAX_EDGES + 300):  # an app asked to call ever new hosts it may not reach
        stats.count("outbound_blocked", f"host-{i}.example")
    blocked = {s: n for (name, s), n in stats.counters.items() if name == "outbound_blocked"}
    assert len(blocked) == MAX_EDGES + 1
    assert blocked[OTHER] == 300 and sum(blocked.values()) == MAX_EDGES + 300  # nothing lost
    stats.count("outbound_blocked", "host-3.example")  # seen before the cap: still its own
    assert stats.counter("outbound_blocked", "host-3.example") == 2
    stats.count("retries", "orders")  # the cap is per counter name
    assert stats.counter("retries", "orders") == 1
    stats.reset()
    stats.count("outbound_blocked", "new.example")
    assert stats.counter("outbound_blocked", "new.example") == 1


def test_status_classes_and_histogram() -> None:
    stats = TrafficStats()
    for status, seconds in [(200, 0.0005), (201, 0.02), (503, 0.3), (None, 2.0)]:
        stats.record("out", "orders", "v1", status, seconds)
    edge = stats.edge("out", "orders", "v1")
    assert edge.by_class == {"2xx": 2, "5xx": 1, "error": 1}
    assert edge.failures == 2 and edge.total == 4
    assert sum(edge.buckets["2xx"]) == 2 and edge.buckets["2xx"][0] == 1  # 0.5 ms: the first bucket


def test_a_class_seen_before_counts_on_the_same_buckets_and_sums() -> None:
    stats = TrafficStats()
    for seconds in (0.0005, 0.001, 0.0011, 0.3):  # the first bound itself belongs to the first bucket
        stats.record("in", "checkout", None, 204, seconds)
    edge = stats.edge("in", "checkout")
    assert edge.by_class == {"2xx": 4} and edge.buckets["2xx"][:3] == [2, 1, 0]
    assert edge.buckets["2xx"][8] == 1 and edge.sums["2xx"] == pytest.approx(0.3026)
    assert list(edge.latencies) == [0.0005, 0.001, 0.0011, 0.3]


def test_codes_of_one_class_add_up_in_every_reading() -> None:
    stats = TrafficStats()
    for status, seconds in [(200, 0.0005), (204, 0.02), (201, 0.02), (404, 0.3), (None, 2.0)]:
        stats.record("out", "orders", "v1", status, seconds)
    edge = stats.edge("out", "orders", "v1")
    assert edge.by_class == {"2xx": 3, "4xx": 1, "error": 1} and edge.total == 5
    assert edge.sums["2xx"] == pytest.approx(0.0405) and edge.sums["error"] == 2.0
    assert edge.buckets["2xx"][0] == 1 and edge.buckets["2xx"][4] == 2 and sum(edge.buckets["2xx"]) == 3
    assert edge.failures == 1  # no response; a 404 is not the server failing


@pytest.mark.parametrize("past_the_cap", [False, True])
def test_record_in_counts_as_record_does(past_the_cap: bool) -> None:
    by_record, by_record_in = TrafficStats(), TrafficStats()
    for stats in (by_record, by_record_in):
        stats.max_edges = 3 if past_the_cap else MAX_EDGES
        stats.record("out", "payments", None, 200, 0.001)  # an edge of the other direction
    calls = [(f"caller-{i % 5}", (200, 503, None)[i % 3], 0.0004 * i) for i in range(40)]
    for peer, status, seconds in calls:
        by_record.record("in", peer, None, status, seconds)
        by_record_in.record_in(peer, status, seconds)
    seen = [
        {key: (e.by_class, e.sums, e.buckets, list(e.latencies)) for key, e in stats.edges().items()}
        for stats in (by_record, by_record_in)
    ]
    assert seen[0] == seen[1]
    assert len(seen[0]) == (5 if past_the_cap else 6)  # past it: three callers, then the shared one
    if past_the_cap:
        assert by_record_in.edge("in", OTHER).total == 16  # callers 3 and 4: eight requests each


def test_callers_past_the_cap_leave_the_calls_made_their_own_edges() -> None:
    """Each direction has its own cap: made-up caller names cannot push this process's own
    calls into the shared edge."""
    stats = TrafficStats()
    stats.max_edges = 3
    for i in range(10):
        stats.record_in(f"made-up-{i}", 200, 0.001)
    stats.record("out", "payments", "v1", 200, 0.001)
    stats.record("out", "orders", None, 503, 0.001)
    assert stats.edge("out", "payments", "v1").total == 1
    assert stats.edge("out", "orders").by_class == {"5xx": 1}
    assert stats.edge("in", OTHER).total == 7
    assert stats.edge("out", OTHER).total == 0


def test_record_in_after_a_reset_counts_on_a_listed_edge() -> None:
    stats = TrafficStats()
    stats.record_in("checkout", 200, 0.001)
    stats.reset()
    stats.record_in("checkout", 200, 0.001)
    assert stats.edges()["in", "checkout", ""].total == 1
