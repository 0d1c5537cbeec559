"""Which endpoints a pick may use when some are out, on a fake clock: panic mode, one budget for
breakers and ejections, probes of ejected endpoints, and endpoints that come back new.

The live counterparts (real servers killed and restarted) are in test_live_recovery.py.
"""

from __future__ import annotations

from typing import Any

from meshlib.resilience.state import Exclusion, ResilienceState
from meshlib.rules import parse_documents
from meshlib.snapshot import ServicePlan, Snapshot
from meshlib.stats import TrafficStats
from tests.clock import Clock

A, B, C, D = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"
QUIET = {"consecutive_5xx": 1000}  # outlier detection that never ejects by itself here


def snapshot(endpoints: dict[str, str], instances: dict[str, str] | None = None, **dest: Any) -> Snapshot:
    """`orders` with endpoints address -> version, subsets v1 and v2, and a Destination."""
    docs = [
        {"kind": "Endpoints", "service": "orders",
         "endpoints": [{"address": a, "labels": {"version": v}} for a, v in endpoints.items()]},
        {"kind": "Destination", "service": "orders",
         "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}}, **dest},
    ]  # fmt: skip
    return Snapshot(parse_documents(docs), instances={"orders": instances} if instances else None)


def state(clock: Clock) -> ResilienceState:
    return ResilienceState(TrafficStats(), clock=clock, jitter=lambda: 0.0)


def trip(s: ResilienceState, plan: ServicePlan, address: str) -> None:
    dest = plan.destination
    assert dest is not None and dest.circuit_breaker is not None
    breaker = s.breakers.get(address, dest.circuit_breaker)
    while breaker.state != "open":
        admission = breaker.admit(force=True)
        breaker.record(True, admission)


def eject(s: ResilienceState, plan: ServicePlan, address: str) -> None:
    dest = plan.destination
    assert dest is not None and dest.outlier_detection is not None
    s.exclusion(plan, [])  # the detector learns the pool
    detector = s.detector("orders", dest.outlier_detection)
    for _ in range(dest.outlier_detection.consecutive_5xx):
        detector.record(address, 503)
    assert detector.ejected(address)


def pick_view(s: ResilienceState, plan: ServicePlan, subset: str | None) -> Exclusion | None:
    view = s.exclusion(plan, [], plan.balancer(subset).endpoints)
    assert view is None or isinstance(view, Exclusion)
    return view


# --------------------------------------------------------------------------------------------
# Panic mode


def test_a_single_member_pool_whose_endpoint_is_out_is_still_tried() -> None:
    clock = Clock()
    s = state(clock)
    plan = snapshot({A: "v1", B: "v2"}, circuit_breaker={"consecutive_failures": 1}).plan("orders")
    assert plan is not None
    trip(s, plan, B)
    view = pick_view(s, plan, "v2")
    assert view is not None and view.panic and view.forced == {B}
    assert plan.balancer("v2").pick(None, view).address == B
    # the other subset is not in panic and does not see B at all
    assert pick_view(s, plan, "v1") is None or A not in pick_view(s, plan, "v1")  # type: ignore[operator]


def test_panic_threshold_zero_disables_panic_mode() -> None:
    clock = Clock()
    s = state(clock)
    plan = snapshot(
        {A: "v1", B: "v2"},
        circuit_breaker={"consecutive_failures": 1},
        outlier_detection={**QUIET, "max_ejection_percent": 100},  # the budget lets B go out too
        panic_threshold=0,
    ).plan("orders")
    assert plan is not None
    trip(s, plan, B)
    view = pick_view(s, plan, "v2")
    assert view is not None and B in view and not view.panic and not view.forced
    assert plan.balancer("v2").pick(None, view) is None  # the caller gets CircuitOpenError


def test_panic_when_usable_endpoints_fall_below_the_threshold_percent() -> None:
    clock = Clock()
    s = state(clock)
    pool = {A: "v1", B: "v1", C: "v1", D: "v1"}
    budget = {**QUIET, "max_ejection_percent": 100}
    plan = snapshot(pool, circuit_breaker={"consecutive_failures": 1}, outlier_detection=budget).plan(
        "orders"
    )
    assert plan is not None
    trip(s, plan, A)
    trip(s, plan, B)
    view = pick_view(s, plan, None)  # 2 of 4 usable: 50% is not below 50%
    assert view is not None and not view.panic and A in view and B in view
    trip(s, plan, C)
    view = pick_view(s, plan, None)  # 1 of 4: panic, every endpoint is used
    assert view is not None and view.panic and view.forced == {A, B, C}
    assert not any(a in view for a in pool)
    strict = snapshot(
        pool, circuit_breaker={"consecutive_failures": 1}, outlier_detection=budget, panic_threshold=80
    ).plan("orders")
    assert strict is not None
    s.breakers.reset(C)
    view = pick_view(s, strict, None)  # 2 of 4 usable is below 80%
    assert view is not None and view.panic and view.forced == {A, B}


def test_without_anything_out_the_check_is_free() -> None:
    clock = Clock()
    s = state(clock)
    plan = snapshot({A: "v1", B: "v2"}, circuit_breaker={}, outlier_detection={}).plan("orders")
    assert plan is not None
    assert s.exclusion(plan, [], plan.endpoints) is None
    assert s.exclusion(plan, [A], plan.endpoints) == frozenset({A})


# --------------------------------------------------------------------------------------------
# One budget for breakers and ejections


def test_breakers_and_ejections_share_max_ejection_percent() -> None:
    """The issue's case: v2 out, then both v1 instances' breakers open within `open_for`;
    at 50% of three endpoints one may be out, so both v1 instances stay in use."""
    clock = Clock()
    s = state(clock)
    plan = snapshot(
        {A: "v1", B: "v1", C: "v2"},
        circuit_breaker={"consecutive_failures": 1, "backoff": {"base": "30s"}},  # no probe due here
        outlier_detection={"consecutive_5xx": 2, "max_ejection_percent": 50, "base_ejection": "30s"},
    ).plan("orders")
    assert plan is not None
    eject(s, plan, C)
    clock.advance(1)
    trip(s, plan, A)
    clock.advance(1)
    trip(s, plan, B)
    view = pick_view(s, plan, "v1")
    assert view is not None and not view.panic
    assert A not in view and B not in view and view.forced == {A, B}  # over the budget: used
    assert C in pick_view(s, plan, None)  # type: ignore[operator]  # the ejection took the room


def test_the_first_breakers_out_stay_out() -> None:
    clock = Clock()
    s = state(clock)
    plan = snapshot(
        {A: "v1", B: "v1", C: "v1", D: "v1"},
        circuit_breaker={"consecutive_failures": 1, "backoff": {"base": "30s"}},
    ).plan("orders")  # no outlier_detection: the default accrual's 50%
    assert plan is not None
    for address in (C, A, B):
        trip(s, plan, address)
        clock.advance(1)
    view = pick_view(s, plan, None)
    assert view is not None and C in view and A in view and B not in view and view.forced == {B}


def test_an_ejected_endpoint_is_probed_when_its_breaker_is_due() -> None:
    clock = Clock()
    s = state(clock)
    plan = snapshot(
        {A: "v1", B: "v1", C: "v1"},
        circuit_breaker={"consecutive_failures": 1, "backoff": {"base": "1s"}},
        outlier_detection={"consecutive_5xx": 1, "max_ejection_percent": 100, "base_ejection": "30s"},
    ).plan("orders")
    assert plan is not None
    eject(s, plan, A)
    trip(s, plan, A)
    assert A in pick_view(s, plan, None)  # type: ignore[operator]
    clock.advance(1)  # the breaker's first backoff (jitter off here)
    view = pick_view(s, plan, None)
    assert view is None or A not in view  # picked normally: the breaker admits it as its trial


# --------------------------------------------------------------------------------------------
# An endpoint that comes back new


def test_a_new_instance_id_at_an_address_closes_its_breaker_and_ends_its_ejection() -> None:
    clock = Clock()
    s = state(clock)
    dest = {
        "circuit_breaker": {"consecutive_failures": 1},
        "outlier_detection": {"consecutive_5xx": 1, "max_ejection_percent": 100},
    }
    first = snapshot({A: "v1", B: "v1"}, {A: "id-1", B: "id-2"}, **dest)
    s.observe(first)
    plan = first.plan("orders")
    assert plan is not None
    trip(s, plan, A)
    eject(s, plan, A)
    s.observe(snapshot({A: "v1", B: "v1"}, {A: "id-1", B: "id-2"}, **dest))  # same process: nothing
    assert s.breakers.states()[A] == "open" and A in pick_view(s, plan, None)  # type: ignore[operator]
    s.observe(snapshot({A: "v1", B: "v1"}, {A: "id-3", B: "id-2"}, **dest))  # a new process
    assert s.breakers.states()[A] == "closed"
    assert pick_view(s, plan, None) is None


def test_an_endpoint_back_in_discovery_starts_afresh() -> None:
    clock = Clock()
    s = state(clock)
    dest = {"circuit_breaker": {"consecutive_failures": 1, "backoff": {"base": "30s"}}}
    both = snapshot({A: "v1", B: "v1"}, **dest)  # static endpoints: no instance ids
    s.observe(both)
    plan = both.plan("orders")
    assert plan is not None
    trip(s, plan, A)
    s.observe(snapshot({A: "v1", B: "v1"}, **dest))
    assert s.breakers.states()[A] == "open"
    s.observe(snapshot({B: "v1"}, **dest))  # gone from discovery
    s.observe(snapshot({A: "v1", B: "v1"}, **dest))  # and back
    assert s.breakers.states()[A] == "closed"
