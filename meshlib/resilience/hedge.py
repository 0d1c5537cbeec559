"""Hedged requests (Finagle's BackupRequestFilter, gRPC A6 hedging).

For an idempotent request that is taking longer than usual (a fixed delay, or the route's
observed latency percentile), send a copy to another endpoint; the first good answer wins
and the others are cancelled. Each hedge draws on the retry budget, so hedging can never
more than add the budget's share of load.

Two caps hold whatever the rules and the budget say: a call sends at most `MAX_HEDGES` copies,
and a Mesh sends one service at most `MAX_HEDGES_PER_SECOND` hedges a second (a burst of
`HEDGE_BURST`). The budget's floor lets a quiet client spend its whole reserve at once; hedging
adds load just when a service is slow, so it never gets to do that in one burst.

The decisions live in `_Race` (synchronous); the async filter races tasks and cancels the
losers, the sync filter races threads of a small pool and closes the losers' responses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from bisect import insort
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshlib.pipeline import AsyncService, Call, Response, Service
from meshlib.resilience.classify import IDEMPOTENT
from meshlib.resilience.ratelimit import TokenBucket
from meshlib.rules import MAX_HEDGES

if TYPE_CHECKING:
    from meshlib.resilience.budget import RetryBudget
    from meshlib.resilience.state import ResilienceState
    from meshlib.rules import HedgeSpec

MIN_SAMPLES = 20
"""A percentile trigger waits for this many observed latencies before it hedges at all."""

MAX_HEDGES_PER_SECOND = 100.0
"""Hedges one Mesh sends to one service per second at most, whatever the budget allows."""

HEDGE_BURST = 20
"""Hedges to one service at once after a quiet spell (the bucket of MAX_HEDGES_PER_SECOND)."""


class LatencyWindow:
    """Recent latencies of one route, for percentile triggers (cheap to add, cached to read)."""

    def __init__(self, size: int = 512) -> None:
        self._recent: deque[float] = deque(maxlen=size)
        self._cache: dict[float, float] = {}
        self._adds = 0
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._recent.append(seconds)
            self._adds += 1
            if self._adds % 16 == 0:
                self._cache.clear()

    def percentile(self, q: float) -> float | None:
        if len(self._recent) < MIN_SAMPLES:
            return None
        cached = self._cache.get(q)
        if cached is None:
            ordered: list[float] = []
            with self._lock:
                for v in self._recent:
                    insort(ordered, v)
            cached = ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]
            self._cache[q] = cached
        return cached


class HedgePolicy:
    def __init__(self, spec: HedgeSpec) -> None:
        self.spec = spec
        self.window = LatencyWindow()

    def delay(self) -> float | None:
        if self.spec.delay is not None:
            return self.spec.delay
        assert self.spec.percentile is not None
        return self.window.percentile(self.spec.percentile)


def _good(call: Call, outcome: tuple[Response | None, BaseException | None]) -> bool:
    response, error = outcome
    return error is None and call.wire.status(response) < 500


class _Race:
    """One hedged request's bookkeeping: when to launch a copy, which outcome wins."""

    def __init__(
        self, call: Call, policy: HedgePolicy, budget: RetryBudget, state: ResilienceState, rate: TokenBucket
    ) -> None:
        self.call = call
        self.policy = policy
        self.budget = budget
        self.state = state
        self.rate = rate
        self.limit = min(policy.spec.max_hedges, MAX_HEDGES)  # the rules cap it; models built unchecked too
        self.hedges = 0
        self.fallback: tuple[Response | None, BaseException | None] | None = None
        self.discard: list[Response] = []  # responses that lost: to be closed

    def next_copy(self) -> Call | None:
        """The delay passed with nothing back: a Call for one more copy, or None to just wait."""
        call = self.call
        if self.hedges >= self.limit:
            return None
        if call.deadline is not None and time.monotonic() >= call.deadline:
            return None
        self.hedges += 1
        if self.rate.try_acquire() > 0:
            self.state.stats.count("hedge_rate_limited", call.service)
            self.hedges = self.limit
            return None
        if not self.budget.try_withdraw():
            self.state.stats.count("budget_exhausted", call.service)
            self.hedges = self.limit
            return None
        self.state.stats.count("hedges", call.service)
        return call.fork(call.wire.copy_request(call.request))

    def finished(self, outcome: tuple[Response | None, BaseException | None], started: float) -> bool:
        """Record an attempt's outcome; True when it wins the race."""
        self.policy.window.add(time.monotonic() - started)
        if _good(self.call, outcome):
            return True
        if self.fallback is not None and self.fallback[0] is not None:
            self.discard.append(self.fallback[0])
        self.fallback = outcome
        return False

    def result(self, outcome: tuple[Response | None, BaseException | None] | None) -> Response:
        outcome = outcome or self.fallback
        assert outcome is not None
        response, error = outcome
        if error is not None:
            raise error
        return response


class HedgeFilter:
    def __init__(
        self, state: ResilienceState, max_threads: int = 32, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.state = state
        self.clock = clock  # of the hedge rate buckets
        self._max_threads = max_threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._rates: dict[str, TokenBucket] = {}

    def _rate(self, service: str) -> TokenBucket:
        bucket = self._rates.get(service)
        if bucket is None:
            with self._lock:
                bucket = self._rates.setdefault(
                    service, TokenBucket(MAX_HEDGES_PER_SECOND, HEDGE_BURST, clock=self.clock)
                )
        return bucket

    def active(self, call: Call) -> bool:
        """Only routes with a `hedge` need this filter (see `pipeline.Chain`)."""
        assert call.route is not None
        return call.route.rule.hedge is not None

    def _race(self, call: Call) -> tuple[_Race, float | None] | None:
        """None: no hedging for this call. Else the race and its trigger delay (None while
        the percentile trigger has too few samples: the call then runs alone, observed)."""
        route = call.route
        assert route is not None
        spec = route.rule.hedge
        if spec is None or call.method not in IDEMPOTENT:
            return None
        policy: HedgePolicy | None = route.policies.get("hedge")
        if policy is None:
            policy = route.policies["hedge"] = HedgePolicy(spec)
        retries = route.rule.retries
        budget_spec = retries.budget if retries is not None else _default_budget()
        budget = self.state.budget(call.service, budget_spec)
        if retries is None or retries.attempts <= 1:  # otherwise the retry filter deposits for it
            budget.deposit()
        return _Race(call, policy, budget, self.state, self._rate(call.service)), policy.delay()

    # -- async: tasks, losers cancelled -------------------------------------------------------

    async def handle_async(self, call: Call, next: AsyncService) -> Response:
        prepared = self._race(call)
        if prepared is None:
            return await next(call)
        race, delay = prepared
        if delay is None:
            t0 = time.monotonic()
            response = await next(call)
            race.policy.window.add(time.monotonic() - t0)
            return response
        started: dict[asyncio.Task[Any], float] = {}

        def launch(c: Call) -> None:
            started[asyncio.ensure_future(next(c))] = time.monotonic()

        launch(call)
        winner = None
        try:
            while started and winner is None:
                timeout = delay if race.hedges < race.limit else None
                done, _ = await asyncio.wait(started, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    twin = race.next_copy()
                    if twin is not None:
                        launch(twin)
                    continue
                for task in done:
                    t0 = started.pop(task)
                    if task.cancelled():
                        continue
                    exc = task.exception()
                    outcome = (None, exc) if exc is not None else (task.result(), None)
                    if winner is None and race.finished(outcome, t0):
                        winner = outcome
                    elif winner is not None and outcome[0] is not None:
                        race.discard.append(outcome[0])
            return race.result(winner)
        finally:
            for task in started:
                task.cancel()
            if started:
                for r in await asyncio.gather(*started, return_exceptions=True):
                    if r is not None and not isinstance(r, BaseException):
                        race.discard.append(r)
            for response in race.discard:
                await call.wire.aclose(response)

    # -- sync: a small thread pool, losers closed when they come back -------------------------

    def _threads(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(
                        self._max_threads, thread_name_prefix="meshlib-hedge"
                    )
        return self._pool

    def handle(self, call: Call, next: Service) -> Response:
        prepared = self._race(call)
        if prepared is None:
            return next(call)
        race, delay = prepared
        if delay is None:
            t0 = time.monotonic()
            response = next(call)
            race.policy.window.add(time.monotonic() - t0)
            return response
        pool = self._threads()
        started = {pool.submit(next, call): time.monotonic()}
        winner = None
        while started and winner is None:
            timeout = delay if race.hedges < race.limit else None
            done, _ = concurrent.futures.wait(started, timeout, concurrent.futures.FIRST_COMPLETED)
            if not done:
                twin = race.next_copy()
                if twin is not None:
                    started[pool.submit(next, twin)] = time.monotonic()
                continue
            for future in done:
                t0 = started.pop(future)
                exc = future.exception()
                outcome = (None, exc) if exc is not None else (future.result(), None)
                if winner is None and race.finished(outcome, t0):
                    winner = outcome
                elif winner is not None and outcome[0] is not None:
                    race.discard.append(outcome[0])
        for future in started:  # still running: close whatever they bring back
            future.add_done_callback(lambda f: _close_late(call, f))
        for response in race.discard:
            call.wire.close(response)
        return race.result(winner)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _close_late(call: Call, future: concurrent.futures.Future[Response]) -> None:
    if not future.cancelled() and future.exception() is None:
        call.wire.close(future.result())


def _default_budget() -> Any:
    from meshlib.rules import BudgetSpec

    return BudgetSpec()
