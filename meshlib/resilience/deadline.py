"""Deadlines: the route's timeout and the caller's remaining budget, whichever ends first.

The deadline is absolute (monotonic) inside the process and travels between processes as
the relative `x-mesh-timeout` so clock skew never matters. A call whose deadline has passed
fails at once rather than adding load the caller will not wait for.
"""

from __future__ import annotations

import time

from meshlib.errors import DeadlineExceeded
from meshlib.pipeline import Call, Stage
from meshlib.resilience.classify import Failure


def _expired(call: Call, now: float) -> DeadlineExceeded:
    late = (now - call.deadline) * 1000 if call.deadline is not None else 0.0
    return DeadlineExceeded(f"deadline for {call.service!r} passed {late:.0f} ms ago")


class DeadlineFilter(Stage):
    """Per request: the earlier of the inherited deadline and the route's timeout; past it, fail."""

    role = "deadline"

    def enter(self, call: Call) -> None:
        assert call.route is not None
        timeout = call.route.timeout
        if timeout is not None:
            own = call.started + timeout
            if call.deadline is None or own < call.deadline:
                call.deadline = own
        if call.deadline is not None:
            now = time.monotonic()
            if now >= call.deadline:
                raise _expired(call, now)


class AttemptFilter(Stage):
    """Per attempt: refuse to start past the deadline, and set the attempt's own timeout."""

    role = "attempt-timeout"

    def enter(self, call: Call) -> None:
        assert call.route is not None
        timeout = call.route.per_try_timeout
        if call.deadline is not None:
            now = time.monotonic()
            remaining = call.deadline - now
            if remaining <= 0:
                raise _expired(call, now)
            if timeout is None or remaining < timeout:
                timeout = remaining
        call.attempt_timeout = timeout

    def translate(self, call: Call, error: BaseException) -> BaseException | None:
        return deadline_error(call, error)


def deadline_error(call: Call, error: BaseException) -> DeadlineExceeded | None:
    """A timeout that ran into the call's deadline is the deadline's (and is not retried): the
    error to raise instead of `error`, or None when `error` stands. For an attempt's error and
    for one that breaks off reading the body alike."""
    if call.deadline is None or call.wire.failure_kind(error) not in (Failure.TIMEOUT, Failure.CONNECT):
        return None
    now = time.monotonic()
    return _expired(call, now) if now >= call.deadline - 0.001 else None


def callers_deadline(call: Call) -> float | None:
    """The call's deadline when it is the caller's own (its timeout, or the deadline of the
    request it serves), None when there is none or the route's `timeout` set it. What ends at
    the caller's deadline says how long the caller waits, not how the endpoint did; the route's
    timeout is the owner's word on how long an endpoint may take."""
    deadline = call.deadline
    if deadline is None:
        return None
    route = call.route
    timeout = route.timeout if route is not None else None
    if timeout is not None and call.started + timeout <= deadline:
        return None
    return deadline


CALLERS_EARLY = 0.005
"""A timeout this close (seconds) to the caller's deadline was that deadline's (the clock is read
a moment after the transport gave up)."""


def cut_by_callers_deadline(call: Call) -> bool:
    """Whether an attempt that timed out now ran into the caller's own deadline: then it says how
    long the caller waits, not how the endpoint did, and is no verdict on the endpoint (as a
    stream or a body that deadline cuts). A route's `timeout` or `per_try_timeout` that ended it
    first is the owner's word on the endpoint, and is one."""
    deadline = callers_deadline(call)
    return deadline is not None and time.monotonic() >= deadline - CALLERS_EARLY
