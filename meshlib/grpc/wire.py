"""The `Wire` for gRPC: how the protocol-neutral stack reads a gRPC outcome.

A gRPC status is a *response* to the core, never an error: UNAVAILABLE is judged as a 503 by
breakers, outlier detection, stats and retries alike (`codes.http_status`). What the channel
shells send and get back travels as a `GrpcRequest` and a `GrpcOutcome`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from meshlib.errors import DeadlineExceeded, MeshError, RateLimitedError
from meshlib.grpc.codes import code_of, http_status
from meshlib.headers import FAULT, MIRROR
from meshlib.pipeline import Abandoned, Call
from meshlib.resilience.classify import Failure

if TYPE_CHECKING:
    from meshlib.endpoint import Endpoint
    from meshlib.grpc.pool import ChannelPool
    from meshlib.rules import RedirectSpec

log = logging.getLogger("meshlib.grpc")

UNARY_UNARY = "unary_unary"
UNARY_STREAM = "unary_stream"
STREAM_UNARY = "stream_unary"
STREAM_STREAM = "stream_stream"

MIRROR_MAX_BODY = 64 * 1024
MIRROR_MAX_IN_FLIGHT = 256
MIRROR_TIMEOUT = 10.0

Metadata = tuple[tuple[str, str | bytes], ...]

_OK = grpc.StatusCode.OK
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED

LOCALLY_CANCELLED = "Locally cancelled by application!"
"""The details of a call the caller cancelled, in grpc's own words (sync and grpc.aio alike)."""

EARLY = 0.005
"""A DEADLINE_EXCEEDED this close (seconds) to a deadline was that deadline's."""

CONDITION_OF_CODE: dict[grpc.StatusCode, str] = {
    code: code.name.lower().replace("_", "-") for code in grpc.StatusCode
}
"""The `retries.on` name of each code (`retries.on` accepts only some of them)."""


@dataclass(eq=False, slots=True)
class GrpcRequest:
    """One RPC as the channel sends it, on every attempt alike.

    `payload` is the request message serialized once (unary requests: every attempt, hedge and
    mirror sends the same bytes), or the caller's iterator of messages (streaming requests).
    `headers` is the text metadata by lowercase key (the Call's headers: routes match on it,
    trace context is written into it); `extra` is what cannot be keyed so (binary or repeated
    entries), sent as given."""

    kind: str
    method: str
    payload: Any
    headers: dict[str, str]
    extra: Metadata = ()
    deserializer: Callable[[bytes], Any] | None = None
    credentials: grpc.CallCredentials | None = None
    wait_for_ready: bool | None = None
    compression: grpc.Compression | None = None
    call_wanted: bool = True
    """False where the caller takes only the answer (a sync `__call__`): an OK answer needs no
    grpc call object then, unless a retry decision may read its metadata."""
    cancel: Cancellation | None = None
    """A sync `future()`'s: its `cancel()` reaches the attempts in flight (hedged copies share it)."""

    @property
    def unary_request(self) -> bool:
        return self.kind in (UNARY_UNARY, UNARY_STREAM)

    def metadata(self, more: Metadata = ()) -> Metadata:
        return (*self.headers.items(), *self.extra, *more)


class Cancellation:
    """How a sync `future()`'s `cancel()` reaches an RPC in flight on a thread of the channel:
    the stack blocks there, so each attempt sends with grpc's own future and watches it here,
    where `cancel()` cancels it (the server sees CANCELLED); an attempt not sent yet is not sent.
    A cancelled attempt raises `Abandoned`: no retry, no verdict on the endpoint, its slot back."""

    __slots__ = ("_lock", "_rpcs", "cancelled")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rpcs: set[grpc.Future] = set()
        self.cancelled = False

    def watch(self, rpc: grpc.Future) -> None:
        """`rpc` is in flight: cancelled with the call (at once if the call was cancelled)."""
        with self._lock:
            if not self.cancelled:
                self._rpcs.add(rpc)
                return
        rpc.cancel()

    def unwatch(self, rpc: grpc.Future) -> None:
        with self._lock:
            self._rpcs.discard(rpc)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            rpcs, self._rpcs = self._rpcs, set()
        for rpc in rpcs:  # outside the lock: grpc runs its callbacks as it cancels
            rpc.cancel()


_ENDING = threading.Lock()
"""Guards a stream's end against its registrations: it may end on grpc's thread (sync) while
the stack's stages still register their `on_close`/`on_end` callbacks."""


class GrpcOutcome:
    """What one attempt got: a status, and the answer (unary) or the stream (streaming).

    A streaming answer is an outcome once its first message is in (gRPC A6's "committed":
    from then on it is the caller's, never retried) or, for a bidi stream, once it started.

    `initial` and `trailing` are the metadata. Most answers are OK, and nothing reads an OK
    answer's metadata but the caller (`with_call`, `await call.trailing_metadata()`) and, in
    principle, a retry decision (a route could list 200 among its retriable codes), so an OK
    answer may leave them where grpc keeps them: `metadata_of`, a finished sync grpc call, is
    read when first asked; `aio_metadata_of`, a finished grpc.aio call, only by the asyncio
    call object (its metadata are awaited), and only where the route has no retry policy.

    Its `code` is OK until a stream ends (`end`): then the status it ended with, which the
    stages waiting on it (health, stats, spans) read. The shells make an OK unary outcome with
    positional arguments (code, details, value, rpc, metadata_of, aio_metadata_of): a class
    called with keywords costs a few thousand instructions more per RPC."""

    __slots__ = (
        "_initial",
        "_trailing",
        "abandoned",
        "aio_metadata_of",
        "callbacks",
        "code",
        "deadline",
        "details",
        "done",
        "metadata_of",
        "rpc",
        "stream",
        "value",
    )

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str | None = None,
        value: Any = None,
        rpc: Any = None,  # grpc's call object (with_call, streaming): the caller's view of the RPC
        metadata_of: grpc.Call | None = None,
        aio_metadata_of: Any = None,
        initial: Metadata = (),
        trailing: Metadata = (),
        stream: Any = None,  # a streaming answer: the caller iterates it
        callbacks: list[Callable[[], None]] | None = None,
        done: bool = True,  # False while a stream is open: `on_close` callbacks wait for its end
        abandoned: bool = False,  # the caller (or the mesh, discarding it) gave the stream up
    ) -> None:
        self.code = code
        self.details = details
        self.value = value
        self.rpc = rpc
        self._initial = initial
        self._trailing = trailing
        self.stream = stream
        self.callbacks = callbacks if callbacks is not None else []
        self.done = done
        self.metadata_of = metadata_of
        self.aio_metadata_of = aio_metadata_of
        self.abandoned = abandoned
        self.deadline: float | None = None  # a committed stream's: the caller's own deadline

    def _read_metadata(self, call: grpc.Call) -> None:
        self.metadata_of = None
        self._initial = tuple(call.initial_metadata() or ())
        self._trailing = tuple(call.trailing_metadata() or ())

    @property
    def initial(self) -> Metadata:
        if self.metadata_of is not None:
            self._read_metadata(self.metadata_of)
        return self._initial

    @property
    def trailing(self) -> Metadata:
        if self.metadata_of is not None:
            self._read_metadata(self.metadata_of)
        return self._trailing

    @trailing.setter
    def trailing(self, value: Metadata) -> None:
        if self.metadata_of is not None:
            self._read_metadata(self.metadata_of)
        self._trailing = value

    def end(
        self,
        code: grpc.StatusCode,
        details: str | None = None,
        trailing: Metadata | None = None,
        *,
        abandoned: bool = False,
    ) -> bool:
        """The stream ended with `code` (the first end wins: the caller's read, grpc's done
        callback, a cancel): record it and run the callbacks once, in the order they came
        (innermost stage first, as stages leave). False if it had ended already."""
        with _ENDING:
            if self.done:
                return False
            self.code, self.details = code, details
            self.abandoned = abandoned or (self.abandoned and code is grpc.StatusCode.CANCELLED)
            if trailing is not None:
                self.trailing = trailing
            self.done = True
            callbacks, self.callbacks = self.callbacks, []
        for fn in callbacks:
            try:
                fn()
            except Exception:
                log.debug("a stream's close callback failed", exc_info=True)
        return True

    def abandon(self) -> None:
        """The caller (or the mesh, discarding it) gives the stream up: the RPC is cancelled and
        the stream ends CANCELLED, abandoned; unless grpc had ended it already, then with the
        status it ended with (a sync call's is read here; an aio call's by its done callback)."""
        with _ENDING:
            if self.done:
                return
            self.abandoned = True  # a CANCELLED grpc reports from now on is this one
        rpc = self.rpc
        if rpc is None or rpc.cancel():
            self.end(grpc.StatusCode.CANCELLED, LOCALLY_CANCELLED, abandoned=True)
        elif not isinstance(rpc, grpc.aio.Call):
            self.end(rpc.code(), rpc.details(), tuple(rpc.trailing_metadata() or ()))

    def add(self, fn: Callable[[], None]) -> None:
        """Run `fn` when the stream ends (at once if it has)."""
        if not self.done:
            with _ENDING:
                if not self.done:
                    self.callbacks.append(fn)
                    return
        fn()

    def header(self, name: str) -> str | None:
        for key, value in (*self.trailing, *self.initial):
            if key == name and isinstance(value, str):
                return value
        return None


def _ended_by(response: GrpcOutcome) -> BaseException | None:
    """Why a stream ended, when it was not the endpoint's doing: the caller gave it up
    (`Abandoned`), or the caller's own deadline passed (`DeadlineExceeded`, the mesh's: no
    verdict on the endpoint, as for an HTTP body cut by the deadline). A
    DEADLINE_EXCEEDED before that deadline is the server's, and one at the route's timeout
    the route's (`deadline` is None then): both are judged as the 504 they are."""
    if response.abandoned:
        return Abandoned()
    deadline = response.deadline
    if response.code is _DEADLINE_EXCEEDED and deadline is not None:
        now = time.monotonic()
        if now >= deadline - EARLY:
            return DeadlineExceeded(
                f"the caller's deadline ended the stream {(now - deadline) * 1000:.0f} ms ago"
            )
    return None


class AttemptTimeout(grpc.RpcError):
    """The attempt's own timeout (per try, or the rest of the deadline) cut the RPC short: to the
    core a timeout (`Failure.TIMEOUT`), which the attempt stage turns into `DeadlineExceeded`
    when it was the call's deadline."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "deadline exceeded"


class TlsRefused(grpc.RpcError):
    """An originated TLS attempt to an External failed on the server's certificate: to the core
    a refusal (`Failure.REFUSED`: against the endpoint, never retried), to the caller
    UNAVAILABLE with this message (`meshlib.grpc.egress.check_refused`)."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return str(self)


class GrpcWire:
    """The `Wire` of a Mesh's gRPC channels (one per Mesh: mirrored copies leave from it)."""

    def __init__(self, mirror_pool: Callable[[str], ChannelPool]) -> None:
        self._mirror_pool = mirror_pool  # service -> the sync pool mirrored copies leave from
        self._mirror_slots = threading.BoundedSemaphore(MIRROR_MAX_IN_FLIGHT)

    def status(self, response: GrpcOutcome) -> int:
        code = response.code
        return 200 if code is _OK else http_status(code)  # OK first: hashing an Enum is slow

    def condition(self, response: GrpcOutcome) -> str | None:
        return CONDITION_OF_CODE.get(response.code)

    def header(self, response: GrpcOutcome, name: str) -> str | None:
        return response.header(name)

    def header_view(self, headers: dict[str, str]) -> Mapping[str, str]:
        return headers

    def on_close(self, response: GrpcOutcome, fn: Callable[[], None]) -> None:
        if response.done:
            fn()
        else:
            response.add(fn)

    def open(self, response: GrpcOutcome) -> bool:
        return not response.done

    def on_end(self, response: GrpcOutcome, fn: Callable[[BaseException | None], None]) -> None:
        response.add(lambda: fn(_ended_by(response)))

    def on_failure(self, response: GrpcOutcome, fn: Callable[[BaseException], None]) -> bool:
        """Nothing fails after a unary status; a stream is open and says how it ended instead."""
        return False

    def close(self, response: GrpcOutcome) -> None:
        """Discard an outcome (a failed attempt, a losing hedge): an open stream is cancelled."""
        if not response.done:
            response.abandon()

    async def aclose(self, response: GrpcOutcome) -> None:
        self.close(response)

    def failure_kind(self, error: BaseException) -> Failure | None:
        if isinstance(error, AttemptTimeout):
            return Failure.TIMEOUT
        if isinstance(error, TlsRefused):
            return Failure.REFUSED
        return None

    def body_size(self, request: GrpcRequest) -> int | None:
        """A unary request's size (its serialized bytes, replayable); None for a stream."""
        return len(request.payload) if request.unary_request else None

    def idempotent(self, call: Call, concurrent: bool = False) -> bool:
        """A route's retry or hedge policy for an RPC is the owner's word that it may be sent
        again (gRPC A6; a streamed request is never replayed: `body_size` is None); hedged
        copies are for unary-unary calls only."""
        return not concurrent or call.request.kind == UNARY_UNARY

    def rpc_attributes(
        self, call: Call, response: GrpcOutcome | None, error: BaseException | None = None
    ) -> dict[str, Any] | None:
        """OTel rpc conventions: `rpc.system`, `rpc.service`, `rpc.method` for the span's start;
        `rpc.grpc.status_code` for its end, also when the mesh refused the call (the code the
        caller gets)."""
        if response is not None:
            return {"rpc.grpc.status_code": response.code.value[0]}
        if error is not None:
            code = refusal_code(error)
            return {"rpc.grpc.status_code": code.value[0]} if code is not None else None
        service, _, method = call.path.lstrip("/").rpartition("/")
        return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

    def copy_request(self, request: GrpcRequest) -> GrpcRequest:
        return dataclasses.replace(request, headers=dict(request.headers))

    def synthesize(self, call: Call, status: int, reason: str) -> GrpcOutcome:
        """An injected `fault.abort`: never OK (a made-up answer has no message for the caller),
        its status as `code_of` maps it (2xx, 3xx and the others outside gRPC's mapping:
        UNKNOWN); the details name the fault, its route and its status."""
        name = call.route.name if call.route is not None else "?"
        return GrpcOutcome(
            code_of(status),
            f"{reason}: fault.abort of route {name!r} of service {call.service!r}, status {status}",
            trailing=((FAULT, "abort"),),
        )

    def redirect(self, call: Call, spec: RedirectSpec) -> GrpcOutcome:
        """A redirect means nothing to gRPC (no client follows one): the call is refused with
        UNIMPLEMENTED, saying which rule answered it."""
        name = call.route.name if call.route is not None else "?"
        return GrpcOutcome(
            grpc.StatusCode.UNIMPLEMENTED,
            f"route {name!r} of service {call.service!r} answers with a redirect, which a gRPC call "
            "cannot follow; give gRPC methods a rule without redirect (docs/rules.md#redirect)",
        )

    def mirror(self, call: Call, endpoint: Endpoint) -> bool:
        """A unary-unary RPC's copy, sent with `future()` on the endpoint's (sync) channel: no
        thread waits for it; the slot comes back when it is done."""
        request: GrpcRequest = call.request
        if call.plan.external is not None:  # the rules refuse it; a copy never leaves the mesh
            return False
        if request.kind != UNARY_UNARY or len(request.payload) > MIRROR_MAX_BODY:
            return False
        if not self._mirror_slots.acquire(blocking=False):
            return False
        try:
            pool = self._mirror_pool(call.service)
            channel = pool.lease(endpoint.address)
            try:
                send = channel.method(UNARY_UNARY, request.method, None)  # bytes in, bytes out
                future = send.future(
                    request.payload,
                    timeout=MIRROR_TIMEOUT,
                    metadata=request.metadata(((MIRROR, "1"),)),
                )
            except BaseException:
                channel.release()
                raise
        except Exception as exc:
            self._mirror_slots.release()
            log.debug("mirrored %s failed to start: %s", request.method, exc)
            return False

        def done(_: Any) -> None:
            channel.release()
            self._mirror_slots.release()

        future.add_done_callback(done)
        return True


def refusal_code(error: BaseException) -> grpc.StatusCode | None:
    """The code of the mesh's own refusal (no endpoint, open breaker, deadline, bulkhead, the
    outbound policy, an External's certificate refused) as the caller sees it; an External's
    RateLimit spent is RESOURCE_EXHAUSTED, as a served RateLimit's; None for an error that is
    not the mesh's."""
    if isinstance(error, DeadlineExceeded | AttemptTimeout):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(error, RateLimitedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, MeshError | TlsRefused):
        return grpc.StatusCode.UNAVAILABLE
    return None
