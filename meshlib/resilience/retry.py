"""Retries on tenacity, with a retry budget, backoff with full jitter, and the deadline.

The first attempt runs outside tenacity (it costs ~20 µs per call even when nothing fails);
only a failed first attempt brings the engine in, replaying that first outcome as tenacity's
attempt one so that stop, wait and retry decisions are all tenacity's. The decisions are one
synchronous policy (`_Run`); the sync and async filters differ only in which tenacity runner
drives it.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tenacity import AsyncRetrying, RetryCallState, Retrying

from meshlib.pipeline import AsyncService, Call, Response, Service
from meshlib.resilience.classify import (
    IDEMPOTENT,
    Failure,
    failure_of,
    retryable_failure,
    retryable_status,
)

if TYPE_CHECKING:
    from meshlib.resilience.budget import RetryBudget
    from meshlib.resilience.state import ResilienceState
    from meshlib.rules import RetrySpec

MAX_RETRY_AFTER = 10.0
"""A `retry-after` longer than this (seconds) is handed back to the caller, not slept on."""

_MISSING = object()


class RetryPolicy:
    """A route's `retries`, compiled once per Snapshot."""

    def __init__(self, spec: RetrySpec) -> None:
        self.spec = spec
        self.attempts = spec.attempts
        self.on = frozenset(spec.on)
        self.codes = frozenset(spec.retriable_status_codes)
        self.base = spec.backoff.base
        self.cap = spec.backoff.max

    def replayable(self, call: Call) -> bool:
        """May this request be sent again after it was (perhaps) received?"""
        if call.method not in IDEMPOTENT and not self.spec.non_idempotent:
            return False
        size = call.wire.body_size(call.request)
        return size is not None and size <= self.spec.max_body_bytes

    def should_retry(self, call: Call, response: Response | None, error: BaseException | None) -> bool:
        if error is not None:
            if not isinstance(error, Exception):
                return False  # cancellation and the like
            failure = failure_of(error, call.wire.failure_kind(error))
            if not retryable_failure(failure, self.on):
                return False
            # a request that never reached the peer can be sent again whatever its method
            return failure is Failure.CONNECT or self.replayable(call)
        status = call.wire.status(response)
        return retryable_status(status, self.on, self.codes) and self.replayable(call)

    def backoff(self, retry_number: int, rng: Callable[[], float]) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^(n-1))] (Envoy's defaults 25 ms / 250 ms)."""
        return rng() * min(self.cap, self.base * (2 ** (retry_number - 1)))


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a `retry-after` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _Run:
    """One request's retry decisions, as tenacity strategies."""

    def __init__(self, call: Call, policy: RetryPolicy, budget: RetryBudget, state: ResilienceState) -> None:
        self.call = call
        self.policy = policy
        self.budget = budget
        self.state = state
        self.pending: Response | None = None  # a failed response to close before the next attempt
        self.hint: float | None = None  # the last retry-after, seconds

    def retry(self, rs: RetryCallState) -> bool:
        outcome = rs.outcome
        assert outcome is not None
        if outcome.failed:
            self.pending, self.hint = None, None
            return self.policy.should_retry(self.call, None, outcome.exception())
        response = outcome.result()
        if not self.policy.should_retry(self.call, response, None):
            return False
        self.pending = response
        status = self.call.wire.status(response)
        self.hint = (
            retry_after(self.call.wire.header(response, "retry-after")) if status in (429, 503) else None
        )
        return True

    def wait(self, rs: RetryCallState) -> float:
        jitter = self.policy.backoff(rs.attempt_number, random.random)
        return max(jitter, self.hint) if self.hint is not None else jitter

    def stop(self, rs: RetryCallState) -> bool:
        call, service = self.call, self.call.service
        if rs.attempt_number >= self.policy.attempts:
            return True
        if self.hint is not None and self.hint > MAX_RETRY_AFTER:
            return True
        if call.deadline is not None and time.monotonic() + rs.upcoming_sleep >= call.deadline:
            self.state.stats.count("retry_deadline", service)
            return True
        if not self.budget.try_withdraw():
            self.state.stats.count("budget_exhausted", service)
            return True
        self.state.stats.count("retries", service)
        return False

    @staticmethod
    def give_up(rs: RetryCallState) -> Any:
        assert rs.outcome is not None
        return rs.outcome.result()  # the last response, or its exception raised

    def kwargs(self) -> dict[str, Any]:
        return {
            "retry": self.retry,
            "wait": self.wait,
            "stop": self.stop,
            "retry_error_callback": self.give_up,
        }


class _Replay:
    """Tenacity's first attempt: the outcome the fast path already has."""

    def __init__(self, response: Response | None, error: BaseException | None) -> None:
        self.response = response
        self.error = error
        self.used = False

    def take(self) -> Response:
        self.used = True
        if self.error is not None:
            raise self.error
        return self.response


class RetryFilter:
    """Retries per the route's `retries`, drawing on the destination's retry budget."""

    def __init__(self, state: ResilienceState) -> None:
        self.state = state

    def _policy(self, call: Call) -> RetryPolicy | None:
        route = call.route
        assert route is not None
        policy = route.policies.get("retry", _MISSING)
        if policy is _MISSING:
            spec = route.rule.retries
            policy = route.policies["retry"] = (
                RetryPolicy(spec) if spec is not None and spec.attempts > 1 else None
            )
        return policy

    def active(self, call: Call) -> bool:
        """Only routes that retry need this filter (see `pipeline.Chain`)."""
        return self._policy(call) is not None

    def _start(self, call: Call, policy: RetryPolicy) -> _Run:
        budget = self.state.budget(call.service, policy.spec.budget)
        if call.attempt == 0:  # a hedge's copy (already attempted) is not a new request
            budget.deposit()
        return _Run(call, policy, budget, self.state)

    def handle(self, call: Call, next: Service) -> Response:
        policy = self._policy(call)
        if policy is None:
            return next(call)
        run = self._start(call, policy)
        try:
            response = next(call)
        except Exception as exc:
            if not policy.should_retry(call, None, exc):
                raise
            first = _Replay(None, exc)
        else:
            if not policy.should_retry(call, response, None):
                return response
            first = _Replay(response, None)

        def attempt() -> Response:
            if not first.used:
                return first.take()
            if run.pending is not None:
                call.wire.close(run.pending)
                run.pending = None
            return next(call)

        return Retrying(**run.kwargs())(attempt)

    async def handle_async(self, call: Call, next: AsyncService) -> Response:
        policy = self._policy(call)
        if policy is None:
            return await next(call)
        run = self._start(call, policy)
        try:
            response = await next(call)
        except Exception as exc:
            if not policy.should_retry(call, None, exc):
                raise
            first = _Replay(None, exc)
        else:
            if not policy.should_retry(call, response, None):
                return response
            first = _Replay(response, None)

        async def attempt() -> Response:
            if not first.used:
                return first.take()
            if run.pending is not None:
                await call.wire.aclose(run.pending)
                run.pending = None
            return await next(call)

        runner: Callable[..., Awaitable[Response]] = AsyncRetrying(**run.kwargs())
        return await runner(attempt)
