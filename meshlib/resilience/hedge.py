"""Hedged requests (Finagle's BackupRequestFilter, gRPC A6 hedging).

For an idempotent request that is taking longer than usual (a fixed delay, or the route's
observed latency percentile), send a copy to another endpoint; the first good answer wins
and the others are cancelled. Each hedge draws on the retry budget, so hedging can never
more than add the budget's share of load.

Two caps hold whatever the rules and the budget say: a call sends at most `MAX_HEDGES` copies,
and a Mesh sends one service at most `MAX_HEDGES_PER_SECOND` hedges a second (a burst of
`HEDGE_BURST`). The budget's floor lets a quiet client spend its whole reserve at once; hedging
adds load just when a service is slow, so it never gets to do that in one burst.

Every decision is made by `Race`, which does no IO: how long to wait for an outcome, whether
to send a copy, which outcome wins, which responses to close. The async filter is a loop that
races tasks and cancels the losers; the sync one races threads of a small pool and closes the
losers' responses when they come back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshlib.pipeline import AsyncService, Call, Response, Service
from meshlib.resilience.classify import IDEMPOTENT
from meshlib.resilience.ratelimit import TokenBucket

if TYPE_CHECKING:
    from meshlib.resilience.budget import RetryBudget
    from meshlib.resilience.state import ResilienceState
    from meshlib.rules import HedgeSpec, RetrySpec
    from meshlib.stats import TrafficStats

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
            with self._lock:
                ordered = sorted(self._recent)
            cached = ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]
            self._cache[q] = cached
        return cached


class HedgePolicy:
    """A route's `hedge`, compiled once per Snapshot (`CompiledRoute.hedge`), with the window of
    latencies its percentile trigger reads."""

    def __init__(self, spec: HedgeSpec, retries: RetrySpec | None = None) -> None:
        from meshlib.rules.models import MAX_HEDGES, BudgetSpec  # loaded already: `spec` is a model

        self.spec = spec
        self.window = LatencyWindow()
        self.limit = min(spec.max_hedges, MAX_HEDGES)  # the rules cap it; models built unchecked too
        self.budget = retries.budget if retries is not None else BudgetSpec()
        # a request deposits once: here, unless the retry filter (inside this one) does it
        self.deposits = retries is None or retries.attempts <= 1

    def delay(self) -> float | None:
        if self.spec.delay is not None:
            return self.spec.delay
        assert self.spec.percentile is not None
        return self.window.percentile(self.spec.percentile)


Outcome = tuple[Response | None, BaseException | None]


class Race:
    """One hedged request's decisions, without IO.

    The driver sends the original, then loops until `winner` is set or nothing is in flight:
    wait up to `wait()` for an outcome (None: for as long as it takes); if none came, send the
    Call `copy()` gives (None: no copy now); give each outcome to `settle`. Then it closes
    `discard` and returns `result()`. With `delay` None (a percentile trigger short of samples)
    the request runs alone and `alone` records its latency.
    """

    def __init__(
        self,
        call: Call,
        policy: HedgePolicy,
        budget: RetryBudget,
        stats: TrafficStats,
        rate: TokenBucket,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.call = call
        self.policy = policy
        self.budget = budget
        self.stats = stats
        self.rate = rate
        self.clock = clock
        self.hedges = 0
        self.winner: Outcome | None = None
        self.fallback: Outcome | None = None  # the latest bad outcome, returned if nothing wins
        self.discard: list[Response] = []  # responses that lost: to be closed
        self.delay = policy.delay()
        self.started = clock()

    def wait(self) -> float | None:
        return self.delay if self.hedges < self.policy.limit else None

    def copy(self) -> Call | None:
        """The wait passed with nothing back: a Call for one more copy, or None to just wait."""
        call = self.call
        if self.hedges >= self.policy.limit:
            return None
        if call.deadline is not None and self.clock() >= call.deadline:
            return None
        self.hedges += 1
        if self.rate.try_acquire() > 0:
            self.stats.count("hedge_rate_limited", call.service)
            self.hedges = self.policy.limit
            return None
        if not self.budget.try_withdraw():
            self.stats.count("budget_exhausted", call.service)
            self.hedges = self.policy.limit
            return None
        self.stats.count("hedges", call.service)
        return call.fork(call.wire.copy_request(call.request))

    def settle(self, started: float, response: Response | None, error: BaseException | None) -> None:
        """One attempt (sent at `started`) came back: the first good outcome wins. A response that
        arrives after the winner, and a bad one outdone by a later outcome, are discarded."""
        if self.winner is not None:
            if response is not None:
                self.discard.append(response)
            return
        self.policy.window.add(self.clock() - started)
        if self.fallback is not None and self.fallback[0] is not None:
            self.discard.append(self.fallback[0])
        if error is None and self.call.wire.status(response) < 500:
            self.winner, self.fallback = (response, None), None
        else:
            self.fallback = (response, error)

    def alone(self, response: Response) -> Response:
        self.policy.window.add(self.clock() - self.started)
        return response

    def result(self) -> Response:
        outcome = self.winner or self.fallback
        assert outcome is not None
        response, error = outcome
        if error is not None:
            raise error
        return response


class HedgeFilter:
    """Sends a copy of a slow idempotent request to another endpoint; the first good answer wins."""

    role = "hedge"
    needs = "hedge"

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

    def race(self, call: Call) -> Race | None:
        """None: no hedging for this call (no policy, or a method that must not be sent twice)."""
        assert call.route is not None
        policy = call.route.hedge
        if policy is None or (call.method not in IDEMPOTENT and not call.wire.idempotent(call, True)):
            return None
        budget = self.state.budget(call.service, policy.budget)
        if policy.deposits:
            budget.deposit()
        return Race(call, policy, budget, self.state.stats, self._rate(call.service))

    async def handle_async(self, call: Call, next: AsyncService) -> Response:
        race = self.race(call)
        if race is None:
            return await next(call)
        if race.delay is None:
            return race.alone(await next(call))
        started: dict[asyncio.Task[Any], float] = {asyncio.ensure_future(next(call)): race.clock()}
        try:
            while started and race.winner is None:
                done, _ = await asyncio.wait(
                    started, timeout=race.wait(), return_when=asyncio.FIRST_COMPLETED
                )
                if not done and (twin := race.copy()) is not None:
                    started[asyncio.ensure_future(next(twin))] = race.clock()
                for task in done:
                    sent = started.pop(task)
                    if not task.cancelled():
                        exc = task.exception()
                        race.settle(sent, None if exc is not None else task.result(), exc)
            return race.result()
        finally:  # the losers still in flight are cancelled; whatever they brought back, closed
            for task in started:
                task.cancel()
            if started:
                for r in await asyncio.gather(*started, return_exceptions=True):
                    if r is not None and not isinstance(r, BaseException):
                        race.discard.append(r)
            for response in race.discard:
                await call.wire.aclose(response)

    def _threads(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(
                        self._max_threads, thread_name_prefix="meshlib-hedge"
                    )
        return self._pool

    def handle(self, call: Call, next: Service) -> Response:
        race = self.race(call)
        if race is None:
            return next(call)
        if race.delay is None:
            return race.alone(next(call))
        pool = self._threads()
        started = {pool.submit(next, call): race.clock()}
        while started and race.winner is None:
            done, _ = concurrent.futures.wait(started, race.wait(), concurrent.futures.FIRST_COMPLETED)
            if not done and (twin := race.copy()) is not None:
                started[pool.submit(next, twin)] = race.clock()
            for future in done:
                exc = future.exception()
                race.settle(started.pop(future), None if exc is not None else future.result(), exc)
        for future in started:  # still running: close whatever they bring back
            future.add_done_callback(lambda f: _close_late(call, f))
        for response in race.discard:
            call.wire.close(response)
        return race.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _close_late(call: Call, future: concurrent.futures.Future[Response]) -> None:
    if not future.cancelled() and future.exception() is None:
        call.wire.close(future.result())
