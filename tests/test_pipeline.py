"""The Chain runs a stack as nesting each filter's `handle` would, and skips inactive filters."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest

from meshlib.pipeline import Call, Stack, Stage


class Recorder(Stage):
    def __init__(self, name: str, log: list[str], *, fail_enter: bool = False, translate_to: Any = None):
        self.name, self.log, self.fail_enter, self.translate_to = name, log, fail_enter, translate_to

    def enter(self, call: Call) -> None:
        self.log.append(f"enter {self.name}")
        if self.fail_enter:
            raise ValueError(f"{self.name} refused")

    def leave(self, call: Call, state: Any, response: Any, error: BaseException | None) -> None:
        self.log.append(f"leave {self.name} {response!r} {type(error).__name__ if error else None}")

    def translate(self, call: Call, error: BaseException) -> BaseException | None:
        return self.translate_to(error) if self.translate_to else None


class EnterOnly(Stage):
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def enter(self, call: Call) -> None:
        self.log.append("enter-only")


class Flow:
    """A control-flow filter (like retry) that calls the rest twice when active."""

    def __init__(self, log: list[str], on: bool) -> None:
        self.log, self.on = log, on

    def active(self, call: Call) -> bool:
        return self.on

    def handle(self, call: Call, next: Any) -> Any:
        self.log.append("flow")
        next(call)
        return next(call)

    async def handle_async(self, call: Call, next: Any) -> Any:
        self.log.append("flow")
        await next(call)
        return await next(call)


def nested(filters: list[Any], terminal: Any) -> Any:
    """The reference: each filter's own `handle` wrapped around the next."""
    service = terminal
    for f in reversed(filters):
        service = functools.partial(f.handle, next=service)
    return service


def both(make: Any, terminal: Any) -> tuple[list[str], list[str], Any, Any]:
    """Run `make(log)`'s filters through the Chain and through nesting; the two logs and results."""
    outcomes = []
    for runner in ("chain", "nested"):
        log: list[str] = []
        filters = make(log)
        service = Stack(filters).build(terminal(log)) if runner == "chain" else nested(filters, terminal(log))
        try:
            outcomes.append((log, service(None), None))
        except Exception as exc:
            outcomes.append((log, None, exc))
    (log1, r1, e1), (log2, r2, e2) = outcomes
    return log1, log2, (r1, e1), (r2, e2)


def ok(log: list[str]) -> Any:
    def terminal(call: Any) -> str:
        log.append("terminal")
        return "response"

    return terminal


def boom(log: list[str]) -> Any:
    def terminal(call: Any) -> str:
        log.append("terminal")
        raise KeyError("down")

    return terminal


def test_order_of_enter_and_leave_matches_nesting() -> None:
    log1, log2, (r1, e1), (r2, _) = both(
        lambda log: [Recorder("a", log), EnterOnly(log), Recorder("b", log)], ok
    )
    assert (
        log1
        == log2
        == [
            "enter a",
            "enter-only",
            "enter b",
            "terminal",
            "leave b 'response' None",
            "leave a 'response' None",
        ]
    )
    assert r1 == r2 == "response" and e1 is None


def test_an_enter_that_raises_is_seen_by_the_stages_outside_it_only() -> None:
    log1, log2, (_, e1), (_, e2) = both(
        lambda log: [Recorder("a", log), Recorder("b", log, fail_enter=True), Recorder("c", log)], ok
    )
    assert log1 == log2 == ["enter a", "enter b", "leave a None ValueError"]
    assert type(e1) is type(e2) is ValueError


def test_translations_chain_from_the_inside_out() -> None:
    def make(log: list[str]) -> list[Any]:
        return [
            Recorder("outer", log, translate_to=lambda e: RuntimeError(f"outer saw {type(e).__name__}")),
            Recorder("inner", log, translate_to=lambda e: TimeoutError("inner")),
        ]

    log1, log2, (_, e1), (_, e2) = both(make, boom)
    assert log1 == log2
    assert log1[-2:] == ["leave inner None KeyError", "leave outer None TimeoutError"]
    assert str(e1) == str(e2) == "outer saw TimeoutError"
    assert isinstance(e1.__cause__, TimeoutError) and isinstance(e1.__cause__.__cause__, KeyError)


@pytest.mark.parametrize("on", [True, False])
def test_a_flow_filter_runs_the_rest_when_active_and_is_skipped_when_not(on: bool) -> None:
    log: list[str] = []
    service = Stack([Recorder("a", log), Flow(log, on), Recorder("b", log)]).build(ok(log))
    assert service(None) == "response"
    runs = 2 if on else 1
    assert log.count("flow") == (1 if on else 0)
    assert log.count("terminal") == runs and log.count("enter b") == runs
    assert log.count("enter a") == 1 and log[-1] == "leave a 'response' None"


def test_async_chain_matches_the_sync_one() -> None:
    sync_log: list[str] = []
    Stack([Recorder("a", sync_log), Flow(sync_log, True), Recorder("b", sync_log)]).build(ok(sync_log))(None)

    async_log: list[str] = []

    async def terminal(call: Any) -> str:
        async_log.append("terminal")
        return "response"

    service = Stack([Recorder("a", async_log), Flow(async_log, True), Recorder("b", async_log)]).build_async(
        terminal
    )
    assert asyncio.run(service(None)) == "response"
    assert async_log == sync_log


class Stateful(Stage):
    """A stage whose per-call state is what `enter` returned (a fresh token per entry)."""

    def __init__(self, log: list[str]) -> None:
        self.log, self.entries = log, 0

    def enter(self, call: Call) -> str:
        self.entries += 1
        return f"token-{self.entries}"

    def leave(self, call: Call, state: Any, response: Any, error: BaseException | None) -> None:
        self.log.append(f"leave with {state}")


def test_each_entry_gets_back_the_state_its_enter_returned() -> None:
    log1, log2, (r1, _), (r2, _) = both(lambda log: [Stateful(log), Recorder("a", log)], boom)
    assert log1 == log2
    assert log1[-1] == "leave with token-1" and r1 is r2 is None
    # beneath a filter that runs the rest twice, each run leaves with its own entry's state
    log: list[str] = []
    Stack([Flow(log, True), Stateful(log)]).build(ok(log))(None)
    assert [line for line in log if line.startswith("leave")] == ["leave with token-1", "leave with token-2"]


def test_a_translating_stage_run_alone_matches_the_chain() -> None:
    def make(log: list[str]) -> list[Any]:
        return [Recorder("only", log, translate_to=lambda e: TimeoutError("clearer"))]

    log1, log2, (_, e1), (_, e2) = both(make, boom)
    assert log1 == log2 and type(e1) is type(e2) is TimeoutError
    assert isinstance(e1.__cause__, KeyError) and e1.__suppress_context__


# -- the stack explains itself -----------------------------------------------------------------

RULES = """
kind: Endpoints
service: api
endpoints: [{address: "127.0.0.1:9"}]
---
kind: Route
service: api
routes:
  - name: retried
    match: {path: {prefix: /r}}
    retries: {attempts: 3}
  - name: everything
    match: {path: {prefix: /e}}
    hedge: {delay: 50ms}
    fault: {abort: {percent: 0, status: 503}}
    mirror: {percent: 0}
---
kind: Endpoints
service: capped
endpoints: [{address: "127.0.0.1:9"}]
---
kind: Destination
service: capped
max_concurrent_requests: 2
"""

ORDER = [
    "stats",
    "request-telemetry",
    "route",
    "redirect",
    "deadline",
    "fault",
    "mirror-telemetry",
    "mirror",
    "egress-limit",
    "bulkhead",
    "hedge",
    "retry",
    "attempt-timeout",
    "pick",
    "attempt-telemetry",
    "health",
]


@pytest.fixture
def mesh(tmp_path: Any) -> Any:
    import meshlib

    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    mesh = meshlib.Mesh("caller", config=str(path))
    yield mesh
    mesh.close()


def roles(text: str) -> list[str]:
    """The roles of a description's numbered lines, in order."""
    numbered = [line.split(". ", 1)[1] for line in text.splitlines() if ". " in line[:6]]
    return [line.split(":")[0].split(" (")[0] for line in numbered]


def test_the_stack_prints_its_order_each_slot_with_what_it_does_and_why_it_is_there(mesh: Any) -> None:
    text = mesh.stack.describe()
    assert repr(mesh.stack) == text
    assert roles(text) == ORDER == [f.role for f in mesh.stack.filters]
    assert text.count("why here: ") == len(ORDER)
    assert "1. stats: Counts each request once" in text
    assert "skip" not in text  # no route given: nothing is said to be skipped


def test_describe_route_names_the_filters_that_route_skips(mesh: Any) -> None:
    plan = mesh.snapshot.plans["api"]
    retried, everything = plan.routes.routes
    text = mesh.stack.describe(retried)
    assert roles(text) == ORDER
    assert "fault (skipped: no fault on this route)" in text
    assert text.splitlines()[-1] == (
        "route 'retried' skips: redirect, fault, mirror-telemetry, mirror, egress-limit, bulkhead, hedge"
    )
    assert mesh.stack.describe(everything).splitlines()[-1] == (
        "route 'everything' skips: redirect, egress-limit, bulkhead, retry"
    )
    assert mesh.stack.describe(plan.routes.default).splitlines()[-1] == (
        "route 'default' skips: redirect, fault, mirror-telemetry, mirror, egress-limit, bulkhead, "
        "hedge, retry"
    )
    # the Destination's cap is a policy of each of its routes
    capped = mesh.snapshot.plans["capped"].routes.default
    assert capped.bulkhead == 2 and "bulkhead" in capped.policies
    assert mesh.stack.describe(capped).splitlines()[-1] == (
        "route 'default' skips: redirect, fault, mirror-telemetry, mirror, egress-limit, hedge, retry"
    )


def test_what_describe_says_is_skipped_is_what_the_chain_skips(mesh: Any) -> None:
    """A request on a route without retries is sent once; on the route with retries, three times."""
    import httpx

    sent: list[str] = []

    def unavailable(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return httpx.Response(503)

    with mesh.sync_client(transport=httpx.MockTransport(unavailable)) as client:
        assert client.get("http://api/e").status_code == 503
        assert client.get("http://api/r").status_code == 503
    assert sent == ["/e", "/r", "/r", "/r"]


# -- one plan per set of route policies --------------------------------------------------------


class Retrying(Flow):
    """A control-flow filter that applies the route's `retry` policy (runs the rest twice)."""

    needs = "retry"


class Mirroring(Recorder):
    """A stage that applies the route's `mirror` policy (nothing to do without one)."""

    needs = "mirror"


class Route:
    POLICIES = ("mirror", "retry")

    def __init__(self, *policies: str) -> None:
        self.policies = frozenset(policies)
        self.mirror = "m" if "mirror" in policies else None
        self.retry = "r" if "retry" in policies else None


class Call_:
    def __init__(self, route: Any) -> None:
        self.route = route


@pytest.mark.parametrize("policies", [(), ("mirror",), ("retry",), ("mirror", "retry")])
def test_a_route_runs_the_filters_of_the_policies_it_has_and_no_other(policies: tuple[str, ...]) -> None:
    log: list[str] = []
    stack = Stack([Recorder("head", log), Retrying(log, True), Mirroring("mirror", log)])
    service = stack.build(ok(log))
    for _ in range(2):  # the second call of the same policies runs the plan made by the first
        log.clear()
        assert service(Call_(Route(*policies))) == "response"
        runs = 2 if "retry" in policies else 1
        assert log.count("flow") == runs - 1
        assert log.count("terminal") == runs
        assert log.count("enter mirror") == (runs if "mirror" in policies else 0)
        assert log[0] == "enter head" and log[-1] == "leave head 'response' None"


def test_a_route_that_names_no_policies_runs_the_general_plan() -> None:
    """Without `policies` each control-flow filter is asked per call (its route field), and a
    stage that needs a policy runs as any other."""
    log: list[str] = []
    route = Route("retry")
    del route.policies
    service = Stack([Recorder("head", log), Retrying(log, True), Mirroring("mirror", log)]).build(ok(log))
    assert service(Call_(route)) == "response"
    assert log.count("flow") == 1 and log.count("enter mirror") == 2


def test_async_plans_match_the_sync_ones() -> None:
    sync_log: list[str] = []
    filters = [Recorder("head", sync_log), Retrying(sync_log, True), Mirroring("mirror", sync_log)]
    Stack(filters).build(ok(sync_log))(Call_(Route("retry")))

    async_log: list[str] = []

    async def terminal(call: Any) -> str:
        async_log.append("terminal")
        return "response"

    filters = [Recorder("head", async_log), Retrying(async_log, True), Mirroring("mirror", async_log)]
    service = Stack(filters).build_async(terminal)
    assert asyncio.run(service(Call_(Route("retry")))) == "response"
    assert async_log == sync_log and "enter mirror" not in sync_log


class Admitting(Recorder):
    """A stage whose `enter` applies the route's `mirror` policy while its `leave` always has work."""

    enter_needs = "mirror"


@pytest.mark.parametrize("policies", [(), ("mirror",)])
def test_a_stage_whose_enter_needs_a_policy_still_leaves_without_it(policies: tuple[str, ...]) -> None:
    log: list[str] = []
    service = Stack([Recorder("head", log), Retrying(log, False), Admitting("admit", log)]).build(ok(log))
    assert service(Call_(Route(*policies))) == "response"
    assert log.count("enter admit") == (1 if policies else 0)
    assert log.count("leave admit 'response' None") == 1
