"""Snapshot: what it sets on the load records that outlive it."""

from __future__ import annotations

from meshlib.balancing import WeightedRoundRobin
from meshlib.endpoint import DEFAULT_DECAY_S
from meshlib.rules import RuleSet, parse_documents
from meshlib.snapshot import Snapshot

A, B = "127.0.0.1:9001", "127.0.0.1:9002"


def rules(**destination: object) -> RuleSet:
    docs: list[dict[str, object]] = [
        {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": A}]},
        {"kind": "Endpoints", "service": "users", "endpoints": [{"address": B}]},
    ]
    if destination:
        docs.append({"kind": "Destination", "service": "orders", **destination})
    return parse_documents(docs)


def test_the_destinations_peak_ewma_decay_is_set_on_its_endpoints_loads() -> None:
    snap = Snapshot(rules(load_balancer="peak_ewma", peak_ewma={"decay": "3s"}))
    assert snap.loads.get(A).decay == 3.0
    assert snap.loads.get(B).decay == DEFAULT_DECAY_S  # another service: its own (the default)
    # the load records outlive the Snapshot: a rules change without the option sets the default back
    later = snap.with_rules(rules(load_balancer="peak_ewma"), "2")
    assert later.loads.get(A) is snap.loads.get(A)
    assert later.loads.get(A).decay == DEFAULT_DECAY_S


def test_the_destinations_weighted_round_robin_spec_reaches_its_balancer() -> None:
    snap = Snapshot(
        rules(load_balancer="weighted_round_robin", weighted_round_robin={"blackout_period": "2s"})
    )
    plan = snap.plan("orders")
    assert plan is not None and plan.load_reports  # the pick stage reads reports for it
    balancer = plan.balancer(None)
    assert isinstance(balancer, WeightedRoundRobin) and balancer.blackout == 2.0
    other = snap.plan("users")
    assert other is not None and not other.load_reports  # round robin: no report is read
