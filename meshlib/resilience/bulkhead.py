"""Bulkhead: a cap on requests in flight to one destination; the excess fails fast.

No queue: a caller over the limit gets `BulkheadFullError` at once, which is what keeps one
slow dependency from tying up every worker of the process. The cap is a fixed number
(`max_concurrent_requests`) or one learnt from the calls' latency (`adaptive_concurrency`,
`meshlib.resilience.adaptive_concurrency`): the same slot in the stack either way.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from meshlib.errors import BulkheadFullError, ConcurrencyLimitedError
from meshlib.pipeline import Call, Response, Stage

if TYPE_CHECKING:
    from meshlib.resilience.adaptive_concurrency import ConcurrencyLimiter, Ticket
    from meshlib.resilience.state import ResilienceState


class Bulkhead:
    """At most `limit` requests in flight; the excess fails fast instead of queueing."""

    __slots__ = ("_collected", "_held", "_lock", "in_flight", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()
        # slots held by responses not closed yet, by id: a response need not be hashable
        self._held: dict[int, weakref.ref[Any]] = {}
        self._collected = self._release  # bound once, not per response

    def hold(self, response: object) -> Callable[[], None]:
        """The release of a slot that `response` holds until it is closed: run once, at its
        close or, for a response its caller drops unclosed (a stream never read), when the
        garbage collector takes it, whichever comes first.

        Only for a response the caller holds itself (a weakref-able one, as httpx's is): the
        slot must not go back while the body can still be read. The collector may call the
        release on any thread at any allocation; `leave` allocates nothing while it holds the
        lock, so the thread holding it is never the one that waits for it."""
        if not type(response).__weakrefoffset__:  # (gRPC's outcomes) given back on close only
            return self.leave
        ref = weakref.ref(response, self._collected)
        self._held[id(ref)] = ref
        return partial(self._release, ref)

    def _release(self, ref: weakref.ref[Any]) -> None:
        if self._held.pop(id(ref), None) is not None:  # atomic: the first of close and collection
            self.leave()

    def try_enter(self) -> bool:
        with self._lock:
            if self.in_flight >= self.limit:
                return False
            self.in_flight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


class BulkheadFilter(Stage):
    """Fails a request at once when its destination already has `max_concurrent_requests`, or
    as many as its `adaptive_concurrency` limit allows now."""

    role = "bulkhead"
    needs = "bulkhead"  # the Destination's cap, on each of its routes: a service without one skips it

    def __init__(self, state: ResilienceState) -> None:
        self.state = state

    def enter(self, call: Call) -> Bulkhead | tuple[ConcurrencyLimiter, Ticket] | None:
        dest = call.plan.destination
        if dest is None:
            return None
        if dest.adaptive_concurrency is not None:
            limiter = self.state.concurrency("out", call.service, dest.adaptive_concurrency)
            ticket = limiter.try_acquire()
            if ticket is None:
                self.state.stats.count("concurrency_limited", call.service)
                raise ConcurrencyLimitedError(
                    f"{call.service!r} already has {limiter.in_flight} requests in flight, "
                    f"its adaptive concurrency limit ({limiter.current})"
                )
            return limiter, ticket
        if dest.max_concurrent_requests is None:
            return None
        bulkhead = self.state.bulkhead(call.service, dest.max_concurrent_requests)
        if not bulkhead.try_enter():
            self.state.stats.count("bulkhead_rejected", call.service)
            raise BulkheadFullError(
                f"{call.service!r} already has {bulkhead.limit} requests in flight (max_concurrent_requests)"
            )
        return bulkhead

    def leave(
        self,
        call: Call,
        slot: Bulkhead | tuple[ConcurrencyLimiter, Ticket] | None,
        response: Response | None,
        error: BaseException | None,
    ) -> None:
        if slot is None:
            return
        if isinstance(slot, Bulkhead):
            if response is None:
                slot.leave()
            else:
                call.wire.on_close(response, slot.hold(response))
            return
        limiter, ticket = slot
        if response is None:
            limiter.release(ticket, dropped=True)
            return
        wire = call.wire

        def release() -> None:  # at the end of the body: a gRPC stream's status is known by then
            status = wire.status(response)
            limiter.release(ticket, status == 503 or status == 504)

        wire.on_close(response, release)
