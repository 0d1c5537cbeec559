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
from collections.abc import Awaitable, Callable, Sequence
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
        "attempt_started",
        "attempt_timeout",
        "bulkhead",
        "deadline",
        "endpoint",
        "hash_key",
        "headers",
        "method",
        "path",
        "plan",
        "request",
        "route",
        "snapshot",
        "source",
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
        self.attempt = 0
        self.attempt_started = self.started
        self.attempt_timeout: float | None = None
        self.bulkhead: Any = None
        self.admission: Any = None
        self.tried: list[str] = []

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
    """One concern wrapped around the rest of the stack (`next`)."""

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
        service = terminal
        for f in reversed(self.filters):
            service = partial(f.handle, next=service)
        return service

    def build_async(self, terminal: AsyncService) -> AsyncService:
        service = terminal
        for f in reversed(self.filters):
            service = partial(f.handle_async, next=service)
        return service

    def __add__(self, other: Stack) -> Stack:
        return Stack(self.filters + other.filters)
