"""Filters and stacks: each concern of the client side is one filter composed onto a service.

In Finagle's terms a `Service` is a function from a request to a response and a `Filter` wraps
one. Here the request travels as a `Call` (the per-request state every filter reads and adds
to), and each filter has a sync and an async entry point so that one filter object serves both
httpx clients. Most concerns only need to act before and after the rest of the stack: they
derive from `Stage` and write `enter`/`leave` once; the few that steer control flow (retries,
hedging) implement both entry points over the same synchronous policy.

Nothing here knows HTTP: what the filters need of a protocol's responses (status, closing,
a hook for when the body is done) comes through the `Wire` on the call.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from meshlib.endpoint import Endpoint
    from meshlib.resilience.classify import Failure
    from meshlib.routing import CompiledRoute
    from meshlib.snapshot import ServicePlan, Snapshot

Response = Any
Service = Callable[["Call"], Response]
AsyncService = Callable[["Call"], Awaitable[Response]]


class Wire(Protocol):
    """What the protocol-neutral filters need to know about one protocol's responses."""

    def status(self, response: Response) -> int:
        """The response's status as an HTTP status code (gRPC maps its codes onto these)."""
        ...

    def on_close(self, response: Response, fn: Callable[[], None]) -> None:
        """Run `fn` once when the response body is finished with (read, closed or failed)."""
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

    def copy_request(self, request: Any) -> Any:
        """An independent copy of a buffered request, for a concurrent attempt."""
        ...

    def synthesize(self, call: Call, status: int, reason: str) -> Response:
        """A response made up by the mesh (an injected fault), never sent by a peer."""
        ...

    def mirror(self, call: Call, endpoint: Endpoint) -> bool:
        """Send a fire-and-forget copy of the call's request to `endpoint`; False if skipped
        (a streaming or large body, or too many copies already in flight)."""
        ...


class Call:
    """One logical request on its way through the stack (all its attempts).

    Set by the transport: snapshot, plan, wire, request, method, path, headers, source.
    Set by the route stage: route, subset, hash_key. Set per attempt by the pick stage:
    endpoint, attempt; `tried` collects the addresses already used by this request.
    """

    __slots__ = (
        "admission",
        "attempt",
        "attempt_span",
        "attempt_started",
        "attempt_timeout",
        "bulkhead",
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
        "snapshot",
        "source",
        "span",
        "started",
        "subset",
        "tried",
        "wire",
    )

    def __init__(
        self,
        *,
        snapshot: Snapshot,
        plan: ServicePlan,
        wire: Wire,
        request: Any,
        method: str,
        path: str,
        headers: Any,
        source: str | None,
        deadline: float | None = None,
    ) -> None:
        self.snapshot = snapshot
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
        self.attempt_started = self.started
        self.attempt_timeout: float | None = None
        self.bulkhead: Any = None
        self.admission: Any = None
        self.tried: list[str] = []
        self.span: Any = None  # the request's and the current attempt's spans (meshlib.telemetry)
        self.attempt_span: Any = None

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

    A filter may also define `active(call) -> bool`: False means it has nothing to do for this
    call, and the stack goes on without it (cheaper than a `handle` that only calls `next`).
    """

    def handle(self, call: Call, next: Service) -> Response: ...

    async def handle_async(self, call: Call, next: AsyncService) -> Response: ...


class Stage:
    """A filter that acts before and after the rest of the stack, written once for both shells.

    `enter` may raise to refuse the call. `leave` sees the response or the error and must not
    raise; it runs when the response's headers are back (use `call.wire.on_close` for work
    that must wait for the body). `translate` may replace an error with a clearer one.
    """

    def enter(self, call: Call) -> None:
        pass

    def leave(self, call: Call, response: Response | None, error: BaseException | None) -> None:
        pass

    def translate(self, call: Call, error: BaseException) -> BaseException | None:
        return None

    def handle(self, call: Call, next: Service) -> Response:
        self.enter(call)
        try:
            response = next(call)
        except BaseException as exc:
            self.leave(call, None, exc)
            replacement = self.translate(call, exc)
            if replacement is not None:
                raise replacement from exc
            raise
        self.leave(call, response, None)
        return response

    async def handle_async(self, call: Call, next: AsyncService) -> Response:
        self.enter(call)
        try:
            response = await next(call)
        except BaseException as exc:
            self.leave(call, None, exc)
            replacement = self.translate(call, exc)
            if replacement is not None:
                raise replacement from exc
            raise
        self.leave(call, response, None)
        return response


class Stack:
    """An ordered list of filters, outermost first, built onto a terminal service."""

    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = tuple(filters)

    def build(self, terminal: Service) -> Service:
        return Chain(self.filters, terminal).run

    def build_async(self, terminal: AsyncService) -> AsyncService:
        return Chain(self.filters, terminal, asynchronous=True).run_async

    def __add__(self, other: Stack) -> Stack:
        return Stack(self.filters + other.filters)


_MISSING = object()


class Chain:
    """A stack run as one loop rather than one nested call per filter.

    The result is what nesting each filter's `handle` around the next would give (`Stage.handle`
    is the reference): stages enter in order and leave in reverse order, an error passes every
    stage that entered, outermost last, and each may `translate` it. What it saves is the cost
    of a frame (a coroutine, in the async shell) and a try block per filter per request:
    stages run inline, their no-op hooks are not called at all, and a control-flow filter
    (retry, hedge, fault) with an `active(call)` method that says False is skipped as if it
    were not in the stack. Those that are active get the rest of the chain as their `next`.
    """

    __slots__ = ("_items", "_next", "_terminal")

    def __init__(self, filters: Sequence[Filter], terminal: Any, *, asynchronous: bool = False) -> None:
        self._terminal = terminal
        items: list[tuple[Any, Any, Any, Any]] = []
        for f in filters:
            if isinstance(f, Stage):
                kind = type(f)
                enter = f.enter if kind.enter is not Stage.enter else None
                leaves = kind.leave is not Stage.leave or kind.translate is not Stage.translate
                items.append((None, enter, f if leaves else None, None))
            else:
                items.append((f, None, None, getattr(f, "active", None)))
        self._items = tuple(items)
        run = self.run_async if asynchronous else self.run
        # the continuation handed to the filter at position i: the chain from i + 1 on
        self._next = tuple(partial(run, start=i + 1) for i in range(len(items)))

    def run(self, call: Call, start: int = 0) -> Response:
        items = self._items
        entered: list[Stage] = []
        response: Response = _MISSING
        try:
            for i in range(start, len(items)):
                flow, enter, stage, active = items[i]
                if flow is None:
                    if enter is not None:
                        enter(call)
                    if stage is not None:
                        entered.append(stage)
                elif active is None or active(call):
                    response = flow.handle(call, self._next[i])
                    break
            if response is _MISSING:
                response = self._terminal(call)
        except BaseException as exc:
            _unwind(call, entered, exc)
        for stage in reversed(entered):
            stage.leave(call, response, None)
        return response

    async def run_async(self, call: Call, start: int = 0) -> Response:
        items = self._items
        entered: list[Stage] = []
        response: Response = _MISSING
        try:
            for i in range(start, len(items)):
                flow, enter, stage, active = items[i]
                if flow is None:
                    if enter is not None:
                        enter(call)
                    if stage is not None:
                        entered.append(stage)
                elif active is None or active(call):
                    response = await flow.handle_async(call, self._next[i])
                    break
            if response is _MISSING:
                response = await self._terminal(call)
        except BaseException as exc:
            _unwind(call, entered, exc)
        for stage in reversed(entered):
            stage.leave(call, response, None)
        return response


def _unwind(call: Call, entered: list[Stage], exc: BaseException) -> None:
    """Let the stages that entered see `exc`, innermost first, and raise what is left of it."""
    error = exc
    for stage in reversed(entered):
        stage.leave(call, None, error)
        replacement = stage.translate(call, error)
        if replacement is not None:
            replacement.__cause__ = error
            replacement.__suppress_context__ = True
            error = replacement
    if error is exc:
        raise exc
    raise error
