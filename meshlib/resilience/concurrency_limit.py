"""Concurrency limits found from latency instead of set by hand: the limit algorithms.

Three published ones, each fed the latency of admitted requests and nothing else (no IO, no
timer: time comes in with each sample, so tests drive it by hand):

- `GradientLimit`, Envoy's adaptive concurrency gradient controller: every `interval` the limit
  becomes `limit * gradient + sqrt(limit * gradient)`, gradient = (minRTT + buffer) / sampleRTT
  clamped to [0.5, 2], sampleRTT a percentile of the interval's latencies. minRTT is measured
  with the limit pinned low (`min_rtt_concurrency`) over `min_rtt_requests` requests, again
  every `min_rtt_interval` plus a random delay of up to `jitter` of it (so replicas do not
  measure together), and at once after 5 intervals spent at the minimum limit. Unlike Envoy's,
  it does not grow while fewer than half of it were in flight in the interval (Netflix's guard,
  below): under light load Envoy's limit climbs to its maximum, and a sudden overload then
  queues until it has come all the way down.
- `Gradient2Limit`, Netflix concurrency-limits' gradient2: per window, gradient =
  tolerance * longRTT / shortRTT clamped to [0.5, 1], the limit moves by `smoothing` towards
  `limit * gradient + queue_size`; longRTT is an exponential average over `long_window`
  windows (a plain mean over the first 10), cut by a tenth whenever it is over twice the short.
- `VegasLimit`, Netflix's Vegas: per request, queue = ceil(limit * (1 - RTTnoload / RTT));
  grow by beta (6 log10 limit) while the queue is within log10 limit, by log10 limit while
  under alpha (3 log10 limit), shrink by log10 limit over beta or on a drop. RTTnoload is the
  least latency seen, forgotten (re-probed) every `probe_multiplier * limit` samples times a
  random factor in [0.5, 1).

Gradient2 and Vegas leave the limit alone while fewer than half of it are in flight (the
application, not the server, limits the rate then: nothing was learnt about the server).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Protocol

Random = Callable[[], float]
"""A uniform draw in [0, 1) (the jitters; tests pass a fixed one)."""

MIN_RTT_STUCK_WINDOWS = 5
"""Envoy's count of intervals at the minimum limit that start a minRTT measurement early."""
MAX_WINDOW_SAMPLES = 4096
"""Latencies kept per window for its percentile (later ones in the window are not kept)."""


class Limit(Protocol):
    """A concurrency limit algorithm: told each admitted request's latency, it says the limit."""

    @property
    def limit(self) -> int:
        """Requests that may be in flight now."""
        ...

    def sample(self, rtt: float, in_flight: int, dropped: bool, now: float) -> None:
        """A request admitted with `in_flight` in flight (itself included) ended at `now` after
        `rtt` seconds; `dropped`: it failed the way overload fails (an error, a timeout, a 503)."""
        ...


def log10_root(limit: float) -> int:
    """Vegas' step and thresholds: the integer part of log10(limit), at least 1."""
    return max(1, int(math.log10(max(1.0, limit))))


def percentile(values: list[float], pct: float) -> float:
    """The `pct` percentile (0-100) of `values` by the nearest rank (not interpolated)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class GradientLimit:
    """Envoy's gradient controller (see the module doc); `limit` is pinned to
    `min_rtt_concurrency` while minRTT is being measured."""

    __slots__ = (
        "_jitter",
        "_measure_from",
        "_rtts",
        "_window_end",
        "_window_in_flight",
        "_window_rtts",
        "at_minimum",
        "buffer",
        "estimate",
        "interval",
        "jitter",
        "max_limit",
        "measuring",
        "min_limit",
        "min_rtt",
        "min_rtt_concurrency",
        "min_rtt_interval",
        "min_rtt_requests",
        "next_measure",
        "percentile",
        "sample_rtt",
    )

    def __init__(
        self,
        *,
        initial_limit: int = 20,
        min_limit: int = 3,
        max_limit: int = 1000,
        interval: float = 0.1,
        percentile: float = 50.0,
        buffer: float = 0.25,
        min_rtt_interval: float = 60.0,
        jitter: float = 0.15,
        min_rtt_requests: int = 50,
        min_rtt_concurrency: int = 3,
        now: float = 0.0,
        rng: Random = random.random,
    ) -> None:
        self.estimate = float(min(max(initial_limit, min_limit), max_limit))
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.interval = interval
        self.percentile = percentile
        self.buffer = buffer
        self.min_rtt_interval = min_rtt_interval
        self.jitter = jitter
        self.min_rtt_requests = min_rtt_requests
        # pinned to while minRTT is measured, never above the limit's own bound (the docs promise
        # the limit never goes above max_limit; a max_limit of 1 under the default 3 would not hold)
        self.min_rtt_concurrency = min(min_rtt_concurrency, max_limit)
        self._jitter = rng
        self.min_rtt: float | None = None
        self.sample_rtt: float | None = None
        self.at_minimum = 0  # intervals in a row that ended at the minimum limit
        self._window_rtts: list[float] = []
        self._window_in_flight = 0
        self._window_end = now + interval
        self.measuring = False
        self._rtts: list[float] = []  # the minRTT measurement's latencies
        self._measure_from = now
        self.next_measure = now
        self._start_measuring(now)

    @property
    def limit(self) -> int:
        return self.min_rtt_concurrency if self.measuring else int(self.estimate)

    def _start_measuring(self, now: float) -> None:
        self.measuring = True
        self._rtts = []
        self._measure_from = now

    def sample(self, rtt: float, in_flight: int, dropped: bool, now: float) -> None:
        if self.measuring:
            if now - rtt >= self._measure_from:  # admitted under the pinned limit: an ideal latency
                self._rtts.append(rtt)
                if len(self._rtts) >= self.min_rtt_requests:
                    self.min_rtt = percentile(self._rtts, self.percentile)
                    self.measuring = False
                    self._rtts = []
                    self.at_minimum = 0
                    self.next_measure = now + self.min_rtt_interval * (1.0 + self.jitter * self._jitter())
                    self._window_rtts = []
                    self._window_end = now + self.interval
            return
        if now >= self.next_measure:
            self._start_measuring(now)
            return
        if len(self._window_rtts) < MAX_WINDOW_SAMPLES:
            self._window_rtts.append(rtt)
        self._window_in_flight = max(self._window_in_flight, in_flight)
        if now >= self._window_end:
            self.sample_rtt = percentile(self._window_rtts, self.percentile)
            busiest = self._window_in_flight
            self._window_rtts = []
            self._window_in_flight = 0
            self._window_end = now + self.interval
            new = self.update(self.sample_rtt)
            if new > self.estimate and busiest * 2 < self.estimate:
                new = int(self.estimate)  # the callers, not the server, set the pace: no growth
            self.estimate = float(new)
            if self.estimate <= self.min_limit:
                self.at_minimum += 1
                if self.at_minimum >= MIN_RTT_STUCK_WINDOWS:
                    self._start_measuring(now)
            else:
                self.at_minimum = 0

    def gradient(self, sample_rtt: float) -> float:
        assert self.min_rtt is not None
        return max(0.5, min(2.0, self.min_rtt * (1.0 + self.buffer) / sample_rtt))

    def update(self, sample_rtt: float) -> int:
        """The next limit from one interval's sampleRTT (Envoy's formula, whole requests)."""
        scaled = self.estimate * self.gradient(sample_rtt)
        new = int(scaled + math.sqrt(scaled))
        return max(self.min_limit, min(self.max_limit, new))


class ExpAverage:
    """An exponential average over `window` values (weight 2 / (window + 1)), the plain mean of
    the first `warmup` ones so that the first value does not weigh for ever."""

    __slots__ = ("count", "total", "value", "warmup", "weight")

    def __init__(self, window: int, warmup: int = 10) -> None:
        self.weight = 2.0 / (window + 1)
        self.warmup = warmup
        self.count = 0
        self.total = 0.0
        self.value = 0.0

    def add(self, x: float) -> float:
        if self.count < self.warmup:
            self.count += 1
            self.total += x
            self.value = self.total / self.count
        else:
            self.value += (x - self.value) * self.weight
        return self.value


class Window:
    """Samples summarised per window of at least `interval` seconds and `min_samples` requests:
    their mean latency, the most in flight, whether any was dropped (Netflix's windowed limit)."""

    __slots__ = ("count", "dropped", "end", "in_flight", "interval", "min_samples", "total")

    def __init__(self, interval: float, min_samples: int, now: float) -> None:
        self.interval = interval
        self.min_samples = min_samples
        self.end = now + interval
        self.count = 0
        self.total = 0.0
        self.in_flight = 0
        self.dropped = False

    def add(self, rtt: float, in_flight: int, dropped: bool, now: float) -> tuple[float, int, bool] | None:
        """Add a sample; the window's summary when this one closed it, else None."""
        self.count += 1
        self.total += rtt
        self.in_flight = max(self.in_flight, in_flight)
        self.dropped = self.dropped or dropped
        if now < self.end or self.count < self.min_samples:
            return None
        summary = (self.total / self.count, self.in_flight, self.dropped)
        self.end = now + self.interval
        self.count = 0
        self.total = 0.0
        self.in_flight = 0
        self.dropped = False
        return summary


class Gradient2Limit:
    """Netflix's gradient2 (see the module doc), updated once per `Window`."""

    __slots__ = (
        "estimate",
        "long_rtt",
        "max_limit",
        "min_limit",
        "queue_size",
        "short_rtt",
        "smoothing",
        "tolerance",
        "window",
    )

    def __init__(
        self,
        *,
        initial_limit: int = 20,
        min_limit: int = 1,
        max_limit: int = 1000,
        smoothing: float = 0.2,
        tolerance: float = 1.5,
        queue_size: int = 4,
        long_window: int = 600,
        interval: float = 0.1,
        min_samples: int = 10,
        now: float = 0.0,
    ) -> None:
        self.estimate = float(min(max(initial_limit, min_limit), max_limit))
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.smoothing = smoothing
        self.tolerance = tolerance
        self.queue_size = queue_size
        self.long_rtt = ExpAverage(long_window)
        self.short_rtt = 0.0
        self.window = Window(interval, min_samples, now)

    @property
    def limit(self) -> int:
        return int(self.estimate)

    def sample(self, rtt: float, in_flight: int, dropped: bool, now: float) -> None:
        summary = self.window.add(rtt, in_flight, dropped, now)
        if summary is not None:
            self.update(summary[0], summary[1])

    def update(self, rtt: float, in_flight: int) -> float:
        """One window's mean latency and most in flight: the new (fractional) limit."""
        self.short_rtt = rtt
        long_rtt = self.long_rtt.add(rtt)
        if long_rtt / rtt > 2:  # latency is back to normal after a long overload: catch up faster
            self.long_rtt.value *= 0.9
        if in_flight < self.estimate / 2:  # the application limits itself: learn nothing
            return self.estimate
        gradient = max(0.5, min(1.0, self.tolerance * long_rtt / rtt))
        target = self.estimate * gradient + self.queue_size
        new = self.estimate * (1 - self.smoothing) + target * self.smoothing
        self.estimate = max(float(self.min_limit), min(float(self.max_limit), new))
        return self.estimate


class VegasLimit:
    """Netflix's Vegas (see the module doc), updated on every sample."""

    __slots__ = (
        "_jitter",
        "_probe_at",
        "estimate",
        "max_limit",
        "min_limit",
        "probe_count",
        "probe_multiplier",
        "rtt_noload",
        "smoothing",
    )

    def __init__(
        self,
        *,
        initial_limit: int = 20,
        min_limit: int = 1,
        max_limit: int = 1000,
        smoothing: float = 1.0,
        probe_multiplier: int = 30,
        rng: Random = random.random,
    ) -> None:
        self.estimate = float(min(max(initial_limit, min_limit), max_limit))
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.smoothing = smoothing
        self.probe_multiplier = probe_multiplier
        self.rtt_noload = 0.0
        self.probe_count = 0
        self._jitter = rng
        self._probe_at = self._next_probe()

    def _next_probe(self) -> float:
        return 0.5 + 0.5 * self._jitter()  # in [0.5, 1)

    @property
    def limit(self) -> int:
        return int(self.estimate)

    def sample(self, rtt: float, in_flight: int, dropped: bool, now: float) -> None:
        self.update(rtt, in_flight, dropped)

    def update(self, rtt: float, in_flight: int, dropped: bool) -> float:
        """One request's latency and in flight at its admission: the new (fractional) limit."""
        if rtt <= 0:
            return self.estimate
        self.probe_count += 1
        if self.probe_count >= self._probe_at * self.probe_multiplier * self.estimate:
            # forget the no-load latency now and then: the server may have become slower for good
            self._probe_at = self._next_probe()
            self.probe_count = 0
            self.rtt_noload = rtt
            return self.estimate
        if self.rtt_noload == 0 or rtt < self.rtt_noload:
            self.rtt_noload = rtt
            return self.estimate
        limit = self.estimate
        queue = math.ceil(limit * (1 - self.rtt_noload / rtt))
        step = log10_root(limit)
        if dropped:
            new = limit - step
        elif in_flight * 2 < limit:
            return limit
        elif queue <= step:  # no queue: grow fast
            new = limit + 6 * step
        elif queue < 3 * step:
            new = limit + step
        elif queue > 6 * step:
            new = limit - step
        else:
            return limit
        new = max(float(self.min_limit), min(float(self.max_limit), new))
        self.estimate = (1 - self.smoothing) * limit + self.smoothing * new
        return self.estimate
