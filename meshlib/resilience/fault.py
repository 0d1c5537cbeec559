"""Fault injection for chaos testing: delay or abort a percentage of requests, client side."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshlib.pipeline import AsyncService, Call, Response, Service

if TYPE_CHECKING:
    from meshlib.rules import FaultSpec
    from meshlib.stats import TrafficStats


def decide(spec: FaultSpec, draw: Callable[[], float]) -> tuple[float, int | None]:
    """(delay in seconds, abort status or None) for one request; percentages are independent."""
    delay = 0.0
    if spec.delay is not None and draw() * 100 < spec.delay.percent:
        delay = spec.delay.duration
    abort = None
    if spec.abort is not None and draw() * 100 < spec.abort.percent:
        abort = spec.abort.status
    return delay, abort


async def sleep_at_least(seconds: float) -> None:
    """`asyncio.sleep` that never returns early: uvloop's timers have millisecond resolution and
    may fire up to a millisecond before their time, and a delay injected to test a timeout
    must be at least what the rule says."""
    end = time.monotonic() + seconds
    await asyncio.sleep(seconds)
    left = end - time.monotonic()
    while left > 0:
        await asyncio.sleep(left)
        left = end - time.monotonic()


class FaultFilter:
    """Delays or aborts a share of requests, per the route's `fault` (chaos testing)."""

    role = "fault"
    needs = "fault"

    def __init__(self, stats: TrafficStats, rng: random.Random | None = None) -> None:
        self.stats = stats
        self._draw = (rng or random.Random()).random

    def _decide(self, call: Call) -> tuple[float, int | None]:
        assert call.route is not None
        assert call.route.fault is not None  # the stack skips this filter elsewhere (`needs`)
        delay, abort = decide(call.route.fault, self._draw)
        if delay:
            self.stats.count("fault_delays", call.service)
            if call.deadline is not None:  # never sleep past the deadline: the next filter fails it
                delay = max(0.0, min(delay, call.deadline - time.monotonic()))
        if abort is not None:
            self.stats.count("fault_aborts", call.service)
        return delay, abort

    def handle(self, call: Call, next: Service) -> Response:
        delay, abort = self._decide(call)
        if delay:
            time.sleep(delay)
        if abort is not None:
            return call.wire.synthesize(call, abort, "fault injected")
        return next(call)

    async def handle_async(self, call: Call, next: AsyncService) -> Response:
        delay, abort = self._decide(call)
        if delay:
            await sleep_at_least(delay)
        if abort is not None:
            return call.wire.synthesize(call, abort, "fault injected")
        return await next(call)
