"""What the sync and asyncio channels share: an RPC made into a `Call`, the metadata split into
the Call's headers, the attempt's grpc timeout, and the mesh's own refusals as gRPC codes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

from meshlib.context import inbound
from meshlib.grpc.egress import check_refused, outside_plan
from meshlib.grpc.wire import EARLY, AttemptTimeout, GrpcOutcome, GrpcRequest, Metadata, refusal_code
from meshlib.headers import ATTEMPT, SOURCE, TIMEOUT
from meshlib.pipeline import Call
from meshlib.resilience.deadline import callers_deadline

_current_inbound = inbound.get  # bound once: `inbound.get()` makes a bound method per call

if TYPE_CHECKING:
    from meshlib.grpc.wire import GrpcWire
    from meshlib.mesh import Mesh


def split_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[dict[str, str], Metadata]:
    """The Call's headers (text entries by lowercase key, the first of repeated ones) and the
    rest (binary entries, repeats), sent as given after them."""
    headers: dict[str, str] = {}
    extra: list[tuple[str, str | bytes]] = []
    for key, value in metadata or ():
        key = key.lower()
        if isinstance(value, str) and not key.endswith("-bin") and key not in headers:
            headers[key] = value
        else:
            extra.append((key, value))
    return headers, tuple(extra)


def start(
    mesh: Mesh,
    wire: GrpcWire,
    service: str,
    kind: str,
    method: str,
    payload: Any,
    deserializer: Callable[[bytes], Any] | None,
    timeout: float | None,
    metadata: Iterable[tuple[str, str | bytes]] | None,
    credentials: grpc.CallCredentials | None,
    wait_for_ready: bool | None,
    compression: grpc.Compression | None,
    call_wanted: bool = True,
) -> Call:
    """The Call of one RPC: the full method name is its path, the metadata its headers, and
    its deadline the earlier of the caller's `timeout` and the inbound request's deadline.
    A target that is no mesh service is an External's port, or refused (`egress.outside_plan`);
    an External is never told the caller's mesh name."""
    snapshot = mesh.snapshot
    plan = snapshot.grpc_plan(service)
    if plan is None:
        plan = outside_plan(mesh, snapshot, service)
    if metadata:
        headers, extra = split_metadata(metadata)
    else:
        headers, extra = {}, ()
    if mesh.service and plan.external is None:
        headers[SOURCE] = mesh.service
    request = GrpcRequest(
        kind,
        method,
        payload,
        headers,
        extra,
        deserializer,
        credentials,
        wait_for_ready,
        compression,
        call_wanted,
    )
    ctx = _current_inbound()
    deadline = ctx.deadline if ctx is not None else None
    call = Call(plan, wire, request, "POST", method, headers, mesh.service, deadline)
    if timeout is not None:
        own = call.started + timeout
        if deadline is None or own < deadline:
            call.deadline = own
    return call


def attempt_metadata(call: Call, timeout: float | None) -> Metadata:
    """The attempt's metadata: the call's, the attempt number on a retry, and the budget as
    `x-mesh-timeout` in whole milliseconds, rounded down. grpc's own `grpc-timeout` may round
    up, and the server takes the smaller of both: so a budget never grows across a hop."""
    request: GrpcRequest = call.request
    if (timeout is None and call.attempt <= 1) or call.plan.external is not None:
        # the usual first try without a deadline; an External, never sent the mesh's headers
        return (*request.headers.items(), *request.extra) if request.extra else tuple(request.headers.items())
    more: list[tuple[str, str]] = []
    if call.attempt > 1:
        more.append((ATTEMPT, str(call.attempt)))
    if timeout is not None and TIMEOUT not in request.headers:
        more.append((TIMEOUT, str(max(1, int(timeout * 1000)))))
    return request.metadata(tuple(more))


def stream_timeout(call: Call) -> float | None:
    """A stream is held to the call's deadline, not a per-try timeout: once its first message
    is in it is the caller's for as long as the deadline allows."""
    if call.deadline is None:
        return None
    return max(0.001, call.deadline - time.monotonic())


def committed(call: Call, outcome: GrpcOutcome) -> GrpcOutcome:
    """A stream handed to the caller: it keeps the caller's own deadline, so that a stream that
    deadline ends is told apart from one the route's timeout or the server ends (`on_end`)."""
    outcome.deadline = callers_deadline(call)
    return outcome


def failed(call: Call, error: grpc.RpcError, started: float, timeout: float | None) -> GrpcOutcome:
    """A failed attempt as an outcome (its status is a response to the core), unless it was the
    attempt's own timeout that ended it, or an External's certificate refused: those are
    raised, a timeout and a refusal to the core."""
    has_status = callable(getattr(error, "code", None))  # grpc.Call, or grpc.aio.AioRpcError
    code = error.code() if has_status else grpc.StatusCode.UNKNOWN
    if code is grpc.StatusCode.UNAVAILABLE and call.plan.external is not None and has_status:
        check_refused(call, error.details())
    if (
        code is grpc.StatusCode.DEADLINE_EXCEEDED
        and timeout is not None
        and time.monotonic() >= started + timeout - EARLY
    ):
        raise AttemptTimeout(error) from error
    if has_status:
        e: Any = error
        return GrpcOutcome(
            code,
            e.details(),
            rpc=error,
            initial=tuple(e.initial_metadata() or ()),
            trailing=tuple(e.trailing_metadata() or ()),
        )
    return GrpcOutcome(code, str(error), rpc=error)


def refusal(error: BaseException) -> GrpcOutcome | None:
    """The mesh's own refusal (no endpoint, open breaker, deadline, bulkhead) as the status the
    caller sees; None for an error that is not the mesh's."""
    code = refusal_code(error)
    if code is None:
        return None
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return GrpcOutcome(code, str(error) or "deadline exceeded")
    return GrpcOutcome(code, str(error))


class RpcResult(grpc.RpcError, grpc.Call, grpc.Future):
    """A finished RPC as grpc hands one back: the `call` of `with_call`, and the error raised
    when its status is not OK (a grpc.RpcError with code() and details())."""

    def __init__(self, outcome: GrpcOutcome) -> None:
        super().__init__(outcome.details or outcome.code.name)
        self.outcome = outcome

    @property
    def ok(self) -> bool:
        return self.outcome.code is grpc.StatusCode.OK

    def value(self) -> Any:
        if not self.ok:
            raise self
        return self.outcome.value

    def code(self) -> grpc.StatusCode:
        return self.outcome.code

    def details(self) -> str | None:
        return self.outcome.details

    def initial_metadata(self) -> Metadata:
        return self.outcome.initial

    def trailing_metadata(self) -> Metadata:
        return self.outcome.trailing

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def cancelled(self) -> bool:
        return self.outcome.code is grpc.StatusCode.CANCELLED

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        return self.value()

    def exception(self, timeout: float | None = None) -> grpc.RpcError | None:
        return None if self.ok else self

    def traceback(self, timeout: float | None = None) -> Any:
        return None if self.ok else self.__traceback__

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    def __str__(self) -> str:
        return f"<RPC ended with status {self.outcome.code.name}: {self.outcome.details or ''}>"
