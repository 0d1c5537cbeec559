"""Retries with a retry budget, backoff with full jitter, and the deadline.

Every decision is made by `RetryDecision`, which does no IO (as tenacity's `iter` says what to
do next): after each attempt it says whether that outcome goes to the caller or how long to
sleep before the next attempt. The sync and async filters are loops that only send and sleep.
A request whose first attempt succeeds costs one decision (a status check), nothing more.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshlib.pipeline import AsyncService, Call, Response, Service
from meshlib.resilience.classify import (
    IDEMPOTENT,
    RPC_CONDITIONS,
    Failure,
    failure_of,
    retryable_failure,
    retryable_status,
)

if TYPE_CHECKING:
    from meshlib.resilience.budget import RetryBudget
    from meshlib.resilience.state import ResilienceState
    from meshlib.rules import RetrySpec
    from meshlib.stats import TrafficStats

MAX_RETRY_AFTER = 10.0
"""A `retry-after` longer than this (seconds) is handed back to the caller, not slept on."""

PUSHBACK = "grpc-retry-pushback-ms"
"""A server's word on when to retry (gRPC A6): wait that many ms; negative or malformed: do not."""


class RetryPolicy:
    """A route's `retries`, compiled once per Snapshot (`CompiledRoute.retry`)."""

    def __init__(self, spec: RetrySpec) -> None:
        self.spec = spec
        self.attempts = spec.attempts
        self.on = frozenset(spec.on)
        self.rpc_on = self.on & RPC_CONDITIONS  # gRPC codes, asked of the wire only when listed
        self.codes = frozenset(spec.retriable_status_codes)
        self.base = spec.backoff.base
        self.cap = spec.backoff.max

    def replayable(self, call: Call) -> bool:
        """May this request be sent again after it was (perhaps) received?"""
        if call.method not in IDEMPOTENT and not self.spec.non_idempotent and not call.wire.idempotent(call):
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
        if self.rpc_on and call.wire.condition(response) in self.rpc_on:
            return self.replayable(call)
        status = call.wire.status(response)
        return retryable_status(status, self.on, self.codes) and self.replayable(call)

    def backoff(self, retry_number: int, rng: Callable[[], float]) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^(n-1))] (Envoy's defaults 25 ms / 250 ms)."""
        return rng() * min(self.cap, self.base * (2 ** (retry_number - 1)))


def pushback(value: str) -> float | None:
    """Seconds from a `grpc-retry-pushback-ms` value; None when it says not to retry."""
    value = value.strip()
    return int(value) / 1000 if value.isdigit() else None


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


class RetryDecision:
    """One request's retry decisions, without IO: `after` each attempt says what to do next.

    None: hand this outcome to the caller (return the response, raise the error). A number:
    sleep that long, discard the response (if any), and send the next attempt. In order: a
    retryable outcome, the backoff (at least a 429/503's `retry-after`), then the stops:
    attempts used up, a `retry-after` too long to wait, a backoff that would end past the
    deadline, a retry budget that refuses the withdrawal.
    """

    __slots__ = ("attempts", "budget", "call", "clock", "draw", "policy", "stats")

    def __init__(
        self,
        call: Call,
        policy: RetryPolicy,
        budget: RetryBudget,
        stats: TrafficStats,
        *,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.call = call
        self.policy = policy
        self.budget = budget
        self.stats = stats
        self.clock = clock
        self.draw = draw
        self.attempts = 0  # made so far

    def after(self, response: Response | None, error: BaseException | None) -> float | None:
        self.attempts += 1
        call, policy = self.call, self.policy
        if not policy.should_retry(call, response, error):
            return None
        hint = None
        service = call.service
        pause = policy.backoff(self.attempts, self.draw)
        if error is None:
            pushed = call.wire.header(response, PUSHBACK)
            if pushed is not None:  # the server says when, exactly, or not at all
                hint = pushback(pushed)
                if hint is None:
                    self.stats.count("retry_pushback_stop", service)
                    return None
                pause = hint
            elif call.wire.status(response) in (429, 503):
                hint = retry_after(call.wire.header(response, "retry-after"))
                if hint is not None:
                    pause = max(pause, hint)
        if self.attempts >= policy.attempts or (hint is not None and hint > MAX_RETRY_AFTER):
            return None
        if call.deadline is not None and self.clock() + pause >= call.deadline:
            self.stats.count("retry_deadline", service)
            return None
        if not self.budget.try_withdraw():
            self.stats.count("budget_exhausted", service)
            return None
        self.stats.count("retries", service)
        return pause


class RetryFilter:
    """Sends a failed attempt again, per the route's `retries` and the destination's budget."""

    role = "retry"
    needs = "retry"

    def __init__(self, state: ResilienceState) -> None:
        self.state = state

    def decision(self, call: Call) -> RetryDecision:
        assert call.route is not None and call.route.retry is not None
        policy = call.route.retry
        budget = self.state.budget(call.service, policy.spec.budget)
        if call.attempt == 0:  # a hedge's copy (already attempted) is not a new request
            budget.deposit()
        return RetryDecision(call, policy, budget, self.state.stats)

    def handle(self, call: Call, next: Service) -> Response:
        decision = self.decision(call)
        while True:
            response = None
            try:
                response = next(call)
            except Exception as exc:
                if (pause := decision.after(None, exc)) is None:
                    raise
            else:
                if (pause := decision.after(response, None)) is None:
                    return response
            time.sleep(pause)
            if response is not None:
                call.wire.close(response)

    async def handle_async(self, call: Call, next: AsyncService) -> Response:
        decision = self.decision(call)
        while True:
            response = None
            try:
                response = await next(call)
            except Exception as exc:
                if (pause := decision.after(None, exc)) is None:
                    raise
            else:
                if (pause := decision.after(response, None)) is None:
                    return response
            await asyncio.sleep(pause)
            if response is not None:
                await call.wire.aclose(response)
