"""Bulkhead: a cap on requests in flight to one destination; the excess fails fast.

No queue: a caller over the limit gets `BulkheadFullError` at once, which is what keeps one
slow dependency from tying up every worker of the process.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from meshlib.errors import BulkheadFullError
from meshlib.pipeline import Call, Response, Stage

if TYPE_CHECKING:
    from meshlib.resilience.state import ResilienceState


class Bulkhead:
    """At most `limit` requests in flight; the excess fails fast instead of queueing."""

    __slots__ = ("_lock", "in_flight", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()

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
    """Fails a request at once when its destination already has `max_concurrent_requests`."""

    role = "bulkhead"
    needs = "bulkhead"  # the Destination's cap, on each of its routes: a service without one skips it

    def __init__(self, state: ResilienceState) -> None:
        self.state = state

    def enter(self, call: Call) -> Bulkhead | None:
        dest = call.plan.destination
        if dest is None or dest.max_concurrent_requests is None:
            return None
        bulkhead = self.state.bulkhead(call.service, dest.max_concurrent_requests)
        if not bulkhead.try_enter():
            self.state.stats.count("bulkhead_rejected", call.service)
            raise BulkheadFullError(
                f"{call.service!r} already has {bulkhead.limit} requests in flight (max_concurrent_requests)"
            )
        return bulkhead

    def leave(
        self, call: Call, bulkhead: Bulkhead | None, response: Response | None, error: BaseException | None
    ) -> None:
        if bulkhead is None:
            return
        if response is None:
            bulkhead.leave()
        else:
            call.wire.on_close(response, bulkhead.leave)
