"""Filters and stacks: each concern of the client side is one filter composed onto a service.

In Finagle's terms a `Service` is a function from a request to a response and a `Filter` wraps
one. Here the request travels as a `Call`, and one filter object serves both httpx clients:
most concerns derive from `Stage` and write `enter`/`leave` once; the few that steer control
flow (retries, hedging) are thin sync and async drivers over one decision object without IO.

Nothing here knows HTTP: what the filters need of a protocol's responses (status, closing,
a hook for when the body is done) comes through the `Wire` on the call.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

if TYPE_CHECKING:
    from meshlib.endpoint import Endpoint
    from meshlib.resilience.classify import Failure
    from meshlib.routing import CompiledRoute
    from meshlib.rules import RedirectSpec
    from meshlib.snapshot import ServicePlan

Response = Any
Service = Callable[["Call"], Response]
Entered = tuple["Stage", Any, Any]
"""A stage the chain entered, the state its `enter` returned, and its bound `leave` (None for a
stage that only translates errors: nothing to call on success)."""
AsyncService = Callable[["Call"], Awaitable[Response]]


class Wire(Protocol):
    """What the protocol-neutral filters need to know about one protocol's responses."""

    def status(self, response: Response) -> int:
        """The response's status as an HTTP status code (gRPC maps its codes onto these)."""
        ...

    def on_close(self, response: Response, fn: Callable[[], None]) -> None:
        """Run `fn` once when the response body is finished with (read, closed or failed)."""
        ...

    def open(self, response: Response) -> bool:
        """Is the response's final status still to come? True for a stream whose status comes at
        its end (gRPC's trailers); the stages that judge a status (health, stats, spans) then
        wait for `on_end`, so a failure late in a stream counts, and counts once."""
        ...

    def on_end(self, response: Response, fn: Callable[[BaseException | None], None]) -> None:
        """Run `fn` once when an open response ends, its final status then read by `status`;
        `fn` gets an `Abandoned` when the caller gave it up (cancelled, stopped reading)."""
        ...

    def on_failure(self, response: Response, fn: Callable[[BaseException], None]) -> bool:
        """Run `fn` once with the error if reading the rest of a response fails later (a
        connection reset mid-body, before `on_close` runs); False when nothing is left that
        could fail (then `fn` is never run). An open response says how it ended instead."""
        ...

    def close(self, response: Response) -> None: ...

    async def aclose(self, response: Response) -> None: ...

    def failure_kind(self, error: BaseException) -> Failure | None:
        """What kind of failure a protocol exception is (None: not one this wire knows)."""
        ...

    def body_size(self, request: Any) -> int | None:
        """Size of the request body if it is buffered (replayable), None if it streams."""
        ...

    def header(self, response: Response, name: str) -> str | None: ...

    def header_view(self, headers: Any) -> Mapping[str, str]:
        """The request's headers for reading by lowercase name (`.get`), as cheaply as the
        protocol allows: route matching and hashing read them, nothing writes through it."""
        ...

    def idempotent(self, call: Call, concurrent: bool = False) -> bool:
        """May this call be sent twice (`concurrent`: two copies at once, a hedge)? HTTP: only an
        idempotent method; gRPC: a route's retry or hedge policy is the owner's word on that, as
        in gRPC A6, and only unary calls are hedged."""
        ...

    def condition(self, response: Response) -> str | None:
        """The `retries.on` name of a response's protocol status (gRPC: `unavailable`, ...),
        None for a protocol with none (HTTP judges statuses)."""
        ...

    def rpc_attributes(
        self, call: Call, response: Response | None, error: BaseException | None = None
    ) -> dict[str, Any] | None:
        """Span attributes of an RPC protocol (OTel rpc conventions: `rpc.system`, `rpc.service`,
        `rpc.method`; with a response, its status; with the mesh's refusal instead of one, the
        status the caller gets), None where HTTP's conventions apply."""
        ...

    def copy_request(self, request: Any) -> Any:
        """An independent copy of a buffered request, for a concurrent attempt."""
        ...

    def synthesize(self, call: Call, status: int, reason: str) -> Response:
        """A response made up by the mesh (an injected fault), never sent by a peer."""
        ...

    def redirect(self, call: Call, spec: RedirectSpec) -> Response:
        """The mesh's own redirect answer to the call (the route's `redirect`), sent to no
        endpoint; a protocol that has no redirects refuses the call instead (raises)."""
        ...

    def mirror(self, call: Call, endpoint: Endpoint) -> bool:
        """Send a fire-and-forget copy of the call's request to `endpoint`; False if skipped
        (a streaming or large body, or too many copies already in flight)."""
        ...


class Abandoned(BaseException):
    """A streamed answer the caller gave up before its end: as for a cancelled attempt (a hedge
    that lost), no verdict on the endpoint; stats and spans count it as the status it ended with."""


class Call:
    """One logical request on its way through the stack (all its attempts).

    Only what several filters read lives here (a stage's own state is what its `enter` returns).
    Set by the transport: plan, wire, request, method, path, headers, source, deadline; by the
    route stage: route, subset, hash_key; per attempt: endpoint, attempt, forced, attempt_timeout.
    `tried` holds the addresses this request used; `span` is its span, parent of the attempts'.
    """

    __slots__ = (
        "attempt",
        "attempt_timeout",
        "deadline",
        "endpoint",
        "forced",
        "hash_key",
        "headers",
        "method",
        "path",
        "plan",
        "request",
        "route",
        "source",
        "span",
        "started",
        "subset",
        "tried",
        "wire",
    )

    def __init__(  # shells pass these by position: a class called with keywords costs ~3,500 more
        self,
        plan: ServicePlan,
        wire: Wire,
        request: Any,
        method: str,
        path: str,
        headers: Any,
        source: str | None,
        deadline: float | None = None,
    ) -> None:
        self.plan = plan
        self.wire = wire
        self.request = request
        self.method = method
        self.path = path
        self.headers = headers
        self.source = source
        self.deadline = deadline
        self.started = time.monotonic()
        self.route: CompiledRoute | None = None
        self.subset: str | None = None
        self.hash_key: str | None = None
        self.endpoint: Endpoint | None = None
        self.forced = False  # the picked endpoint is out (breaker, ejection) but used anyway: panic
        self.attempt = 0
        self.attempt_timeout: float | None = None
        self.tried: list[str] = []
        self.span: Any = None

    @property
    def service(self) -> str:
        return self.plan.name

    def fork(self, request: Any) -> Call:
        """A twin for a concurrent attempt (a hedge) with its own copy of the request.

        The twin shares `tried`, so it avoids the endpoints already used by this request.
        """
        twin = Call.__new__(Call)
        for name in Call.__slots__:
            setattr(twin, name, getattr(self, name))
        twin.request = request
        twin.headers = getattr(request, "headers", self.headers)
        twin.endpoint = None
        return twin


class Filter(Protocol):
    """One concern wrapped around the rest of the stack (`next`).

    `role` names it in `Stack.describe()` (with its docstring's first paragraph). The stack goes
    on without it (cheaper than a `handle` that only calls `next`) where the compiled route's
    policy it `needs` (`"retry"`: `CompiledRoute.retry`) is None, or its `active(call)` is False.
    """

    role: str

    def handle(self, call: Call, next: Service) -> Response: ...

    async def handle_async(self, call: Call, next: AsyncService) -> Response: ...


class Stage:
    """A filter that acts before and after the rest of the stack, written once for both shells.

    `enter` may raise to refuse the call; what it returns (the stage's own state for the call)
    is handed back to `leave`, which sees the response or the error and must not raise. It runs
    when the response's headers are back (`call.wire.on_close` waits for the body; a stage that
    judges the status waits with `call.wire.on_end` while `call.wire.open(response)`).
    `translate` may replace an error with a clearer one.
    """

    role = "stage"
    needs: str | None = None  # the compiled route's policy this stage applies: skipped on a route without
    enter_needs: str | None = None  # the policy its `enter` alone applies: not entered without (leaves still)

    def enter(self, call: Call) -> Any:
        return None

    def leave(self, call: Call, state: Any, response: Response | None, error: BaseException | None) -> None:
        pass

    def translate(self, call: Call, error: BaseException) -> BaseException | None:
        return None

    def handle(self, call: Call, next: Service) -> Response:
        state = self.enter(call)
        try:
            response = next(call)
        except BaseException as exc:
            _unwind(call, [(self, state, None)], exc)
        self.leave(call, state, response, None)
        return response

    async def handle_async(self, call: Call, next: AsyncService) -> Response:
        state = self.enter(call)
        try:
            response = await next(call)
        except BaseException as exc:
            _unwind(call, [(self, state, None)], exc)
        self.leave(call, state, response, None)
        return response


class Stack:
    """An ordered list of filters, outermost first, built onto a terminal service.

    `why[i]` says why filter i sits where it does (printed by `describe`)."""

    def __init__(self, filters: Sequence[Filter], why: Sequence[str | None] = ()) -> None:
        self.filters = tuple(filters)
        self.why = tuple(why) + (None,) * (len(self.filters) - len(why))

    def build(self, terminal: Service) -> Service:
        return Chain(self.filters, terminal).run

    def build_async(self, terminal: AsyncService) -> AsyncService:
        return Chain(self.filters, terminal, asynchronous=True).run_async

    def __add__(self, other: Stack) -> Stack:
        return Stack(self.filters + other.filters, self.why + other.why)

    def describe(self, route: CompiledRoute | None = None) -> str:
        """The stack in order, outermost first: each filter's role, what it does (its docstring's
        first paragraph) and why it sits there; with `route`, the filters that route skips."""
        lines, skipped = (
            [f"client stack{f' for route {route.name!r}' if route else ''}, outermost first:"],
            [],
        )
        for i, (f, why) in enumerate(zip(self.filters, self.why, strict=True), 1):
            role, need = getattr(f, "role", type(f).__name__), getattr(f, "needs", None)
            mark = ""
            if route is not None and need and getattr(route, need) is None:
                skipped.append(role)
                mark = f" (skipped: no {need} on this route)"
            doc = " ".join((type(f).__doc__ or "").split("\n\n")[0].split())
            lines.append(f"{i:>3}. {role}{mark}: {doc}" + (f"\n       why here: {why}" if why else ""))
        if route is not None:
            lines.append(f"route {route.name!r} skips: {', '.join(skipped) or 'nothing'}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.describe()


class _Plan:
    """The part of a chain beneath its head, as one kind of route runs it: `items` are
    (control-flow filter, enter, leaving stage, active check), `nexts[i]` the continuation handed
    to the control-flow filter at i (the plan from i + 1 on)."""

    __slots__ = ("items", "nexts")

    def __init__(self, items: Sequence[tuple[Any, Any, Any, Any]], resume: Callable[..., Any]) -> None:
        self.items = tuple(items)
        self.nexts = tuple(partial(resume, plan=self, start=i + 1) for i in range(len(self.items)))

    def enter(self, call: Call, start: int, entered: list[Entered]) -> int | None:
        """Enter the stages from `start` on (each added to `entered`) up to the first active
        control-flow filter: its index, or None when the terminal comes next."""
        items = self.items
        for i in range(start, len(items)):
            flow, enter, stage, active = items[i]  # a stage's `active` is its leave (None: translate only)
            if flow is None:
                state = enter(call) if enter is not None else None
                if stage is not None:
                    entered.append((stage, state, active))
            elif active is None or active(call):
                return i
        return None


class Chain:
    """A stack run as one loop rather than one nested call per filter.

    The result is what nesting each filter's `handle` around the next would give (`Stage.handle`
    is the reference): stages enter in order and leave in reverse order, each given back the
    state its `enter` returned; an error passes every stage that entered, outermost last, and
    each may `translate` it. What it saves is the cost of a frame (a coroutine, in the async
    shell) and a try block per filter per request: stages run inline, their no-op hooks are not
    called at all, and a control-flow filter (retry, hedge, fault) whose route policy is absent
    (`needs`) or whose `active(call)` says False is skipped as if it were not in the stack.
    Those that are active get the rest of the chain as their `next`.

    The head of the stack (the stages up to the first filter that `needs` a policy or steers
    control flow: stats, telemetry, route, deadline) runs alike for every call. What follows is
    run from a `_Plan` made once per set of policies a route has (`CompiledRoute.policies`): a
    filter that `needs` a policy the route lacks is not in it at all, so a plain route pays
    nothing for fault, mirror, bulkhead, hedge and retry, not even a check. A stage may name a
    `needs` too (it must then do nothing on a route without that policy), or an `enter_needs`:
    the policy its `enter` alone applies (health's admission needs a breaker; its `leave` judges
    every answer). A call whose route says nothing of its policies runs the general plan, which
    asks each control-flow filter per call and enters every stage.
    """

    __slots__ = ("_general", "_head", "_plans", "_resume", "_tail", "_terminal")

    def __init__(self, filters: Sequence[Filter], terminal: Any, *, asynchronous: bool = False) -> None:
        self._terminal = terminal
        items: list[tuple[Any, Any, Any, Any, str | None, str | None]] = []
        for f in filters:
            need = getattr(f, "needs", None)
            if isinstance(f, Stage):
                kind = type(f)
                enter = f.enter if kind.enter is not Stage.enter else None
                leave = f.leave if kind.leave is not Stage.leave else None
                unwinds = leave is not None or kind.translate is not Stage.translate
                items.append(
                    (None, enter, f if unwinds else None, leave, need, getattr(f, "enter_needs", None))
                )
            else:
                active = attrgetter(f"route.{need}") if need else getattr(f, "active", None)
                items.append((f, None, None, active, need, None))
        split = 0
        while split < len(items) and items[split][0] is None and items[split][4] is None:
            split += 1
        self._head = tuple(
            (enter, stage, leave) for _, enter, stage, leave, _, _ in items[:split] if enter or stage
        )
        self._tail = items[split:]
        self._resume = self._resume_async if asynchronous else self._resume_sync
        self._general = _Plan([item[:4] for item in self._tail], self._resume)
        self._plans: dict[frozenset[str] | None, _Plan] = {}  # None: never stored (the general plan)

    def _plan(self, route: Any) -> _Plan:
        """The plan for a route: made on the first call of a route with its policies."""
        policies = getattr(route, "policies", None)
        if policies is None:
            return self._general
        plan = self._plans.get(policies)
        if plan is None:
            known = getattr(type(route), "POLICIES", ())
            items = []
            for flow, enter, stage, active, need, enter_need in self._tail:
                if need is not None and need in known:
                    if need not in policies:
                        continue  # the route lacks the policy: the filter is not in this plan
                    if flow is not None:
                        active = None  # always active where its policy is
                if enter_need is not None and enter_need in known and enter_need not in policies:
                    enter = None  # nothing for the stage's enter to do on this route; it still leaves
                items.append((flow, enter, stage, active))
            plan = self._plans.setdefault(policies, _Plan(items, self._resume))
        return plan

    def run(self, call: Call) -> Response:
        entered: list[Entered] = []
        try:
            for enter, stage, leave in self._head:
                state = enter(call) if enter is not None else None
                if stage is not None:
                    entered.append((stage, state, leave))
            route = getattr(call, "route", None)
            plan = self._plans.get(getattr(route, "policies", None)) or self._plan(route)
            i = plan.enter(call, 0, entered)
            response = self._terminal(call) if i is None else plan.items[i][0].handle(call, plan.nexts[i])
        except BaseException as exc:
            _unwind(call, entered, exc)
        for _, state, leave in reversed(entered):
            if leave is not None:  # None: a stage that only translates errors
                leave(call, state, response, None)
        return response

    def _resume_sync(self, call: Call, plan: _Plan, start: int) -> Response:
        """The plan from `start` on: the `next` of a control-flow filter."""
        entered: list[Entered] = []
        try:
            i = plan.enter(call, start, entered)
            response = self._terminal(call) if i is None else plan.items[i][0].handle(call, plan.nexts[i])
        except BaseException as exc:
            _unwind(call, entered, exc)
        for _, state, leave in reversed(entered):
            if leave is not None:  # None: a stage that only translates errors
                leave(call, state, response, None)
        return response

    async def run_async(self, call: Call) -> Response:
        entered: list[Entered] = []
        try:
            for enter, stage, leave in self._head:
                state = enter(call) if enter is not None else None
                if stage is not None:
                    entered.append((stage, state, leave))
            route = getattr(call, "route", None)
            plan = self._plans.get(getattr(route, "policies", None)) or self._plan(route)
            i = plan.enter(call, 0, entered)
            if i is None:
                response = await self._terminal(call)
            else:
                response = await plan.items[i][0].handle_async(call, plan.nexts[i])
        except BaseException as exc:
            _unwind(call, entered, exc)
        for _, state, leave in reversed(entered):
            if leave is not None:  # None: a stage that only translates errors
                leave(call, state, response, None)
        return response

    async def _resume_async(self, call: Call, plan: _Plan, start: int) -> Response:
        entered: list[Entered] = []
        try:
            i = plan.enter(call, start, entered)
            if i is None:
                response = await self._terminal(call)
            else:
                response = await plan.items[i][0].handle_async(call, plan.nexts[i])
        except BaseException as exc:
            _unwind(call, entered, exc)
        for _, state, leave in reversed(entered):
            if leave is not None:  # None: a stage that only translates errors
                leave(call, state, response, None)
        return response


def _unwind(call: Call, entered: list[Entered], exc: BaseException) -> NoReturn:
    """Let the stages that entered see `exc`, innermost first, and raise what is left of it."""
    error = exc
    for stage, state, _ in reversed(entered):
        stage.leave(call, state, None, error)
        replacement = stage.translate(call, error)
        if replacement is not None:
            replacement.__cause__ = error
            replacement.__suppress_context__ = True
            error = replacement
    if error is exc:
        raise exc
    raise error
