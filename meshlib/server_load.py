"""How loaded this server is: the figures its load reports and probe answers are made of.

One `ServerLoad` per serving Mesh (`mesh.load`); the server middleware calls `begin`/`end`
around every request, and the app may add its own figure (`set_application_utilization`),
which a weighted_round_robin client prefers to the CPU's (gRFC A58). Protocol-neutral: the
shells put `report()` on the wire (meshlib.balancing.orca).

`end` is on every request's path, so it does little: a counter, and one latency sample filed
under the requests in flight it ran with (Prequal's estimate reads those by RIF). The rates and
the CPU figure are sampled at most once a `period`, when someone asks.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections import deque
from collections.abc import Callable
from types import MappingProxyType

from meshlib.balancing.orca import LoadReport, format_report, valid_name

PERIOD_S = 1.0
"""How often the CPU figure and the rates are sampled (and how long a sample is reused)."""
SAMPLES_PER_RIF = 16
"""Latency samples kept per requests-in-flight class; the estimate is their median."""
SAMPLE_AGE_S = 10.0
"""Samples older than this say nothing about now (Prequal uses recent samples only)."""
_EXACT = 8  # RIF 0..7 each have their own class; above, one class per power of two
_CLASSES = 32


def _rif_class(rif: int) -> int:
    if rif < _EXACT:
        return max(rif, 0)
    return min(rif.bit_length() + _EXACT - 4, _CLASSES - 1)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ServerLoad:
    """Requests in flight, recent latencies by RIF, CPU and rates of one serving process.

    Mutated from the request path without a lock, like `EndpointLoad`: single increments and
    appends are atomic under the GIL, and a lost update only nudges a heuristic.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
        cores: int | None = None,
        period: float = PERIOD_S,
    ) -> None:
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._cores = cores or _cores()
        self.period = period
        self.tracking = False
        """Whether the server middleware counts requests here (`begin`/`end`): on with load
        reports (`Mesh(load_reports=)`), or set by whatever else reads these figures."""
        # begun and ended requests as counted by itertools.count, whose next() is one call: a
        # `+= 1` from WSGI's threads may lose an update where the interpreter switches threads
        # inside it (free-threaded builds), and requests in flight would drift for good; a stale
        # store here is corrected by the next request
        self._begins = itertools.count(1)
        self._ends = itertools.count(1)
        self._begun = 0
        self._completed = 0
        self._failed = 0
        self._samples: list[deque[tuple[float, float]]] = [
            deque(maxlen=SAMPLES_PER_RIF) for _ in range(_CLASSES)
        ]
        self._application = 0.0
        self._named: dict[str, float] = {}
        # the last sample: when, the counters then, and what was derived from them
        self._at = clock()
        self._cpu_at = cpu_clock()
        self._completed_at = 0
        self._failed_at = 0
        self._cpu = 0.0
        self._rps = 0.0
        self._eps = 0.0
        self._text: str | None = None  # the report's text but the RIF, until the next sample

    # the request path

    def begin(self) -> float:
        """A request enters; returns the stamp to give `end`."""
        self._begun = next(self._begins)
        return self._clock()

    def end(self, started: float, *, failed: bool = False) -> None:
        """The request that `begin` stamped `started` has left (`failed`: it counts in `eps`)."""
        now = self._clock()
        rif = self._begun - self._completed  # this one included
        self._completed = next(self._ends)
        if failed:
            self._failed += 1
        self._samples[rif if 0 <= rif < _EXACT else _rif_class(rif)].append((now, now - started))

    @property
    def in_flight(self) -> int:
        rif = self._begun - self._completed
        return rif if rif > 0 else 0

    # estimates

    def latency(self, rif: int | None = None) -> float | None:
        """The median latency of recent requests that ran with about `rif` in flight (this one
        included; default: as many as now, plus the one asking), the nearest class that has
        recent samples when that one has none. With nothing recent, the latest request's
        latency stands (a server nobody sent to for a while because it was slow must not look
        as fast as an idle new one); None only before the first request."""
        if rif is None:
            rif = self.in_flight + 1
        wanted = _rif_class(rif)
        oldest = self._clock() - SAMPLE_AGE_S
        for distance in range(_CLASSES):
            for index in (wanted - distance, wanted + distance) if distance else (wanted,):
                if 0 <= index < _CLASSES:
                    recent = sorted(lat for at, lat in self._samples[index] if at >= oldest)
                    if recent:
                        return recent[len(recent) // 2]
        latest: tuple[float, float] | None = None
        for samples in self._samples:
            if samples and (latest is None or samples[-1][0] > latest[0]):
                latest = samples[-1]
        return latest[1] if latest is not None else None

    def cpu_utilization(self) -> float:
        """Process CPU time over wall time since the previous sample, per core."""
        self._sample()
        return self._cpu

    def set_application_utilization(self, value: float) -> None:
        """The app's own measure of how busy it is (a fraction, 1.0 = saturated; 0 = none, so
        clients use the CPU's). weighted_round_robin weighs by it when set."""
        if not math.isfinite(value) or value < 0.0:
            raise ValueError(f"application utilization must be a finite number >= 0, not {value!r}")
        self._application = float(value)
        self._text = None

    def set_named_metric(self, name: str, value: float) -> None:
        """A figure of the app's own, reported as `named_metrics.<name>`."""
        if not valid_name(name):
            raise ValueError(f"a named metric's name has no comma, '=' or space, and is not empty: {name!r}")
        if not math.isfinite(value) or value < 0.0:
            raise ValueError(f"a named metric must be a finite number >= 0, not {value!r}")
        self._named[name] = float(value)
        self._text = None

    def report(self) -> LoadReport:
        """The figures now, requests in flight as the named metric `rif`."""
        self._sample()
        return LoadReport(
            cpu_utilization=self._cpu,
            application_utilization=self._application,
            rps_fractional=self._rps,
            eps=self._eps,
            named_metrics=MappingProxyType({**self._named, "rif": float(self.in_flight)}),
        )

    def header(self) -> str:
        """`report()` as the `endpoint-load-metrics` value; the text but the RIF is reused until
        the next sample, so a response pays for a clock read and one concatenation."""
        if self._clock() - self._at >= self.period:
            self._sample()
            self._text = None
        if self._text is None:
            report = LoadReport(
                cpu_utilization=self._cpu,
                application_utilization=self._application,
                rps_fractional=self._rps,
                eps=self._eps,
                named_metrics=self._named,
            )
            self._text = format_report(report) + ", named_metrics.rif="
        return self._text + str(self.in_flight)

    def _sample(self) -> bool:
        """Take a new sample when the last is a `period` old; True when it did."""
        now = self._clock()
        elapsed = now - self._at
        if elapsed < self.period:
            return False
        cpu = self._cpu_clock()
        completed, failed = self._completed, self._failed
        self._cpu = max(cpu - self._cpu_at, 0.0) / elapsed / self._cores
        self._rps = (completed - self._completed_at) / elapsed
        self._eps = (failed - self._failed_at) / elapsed
        self._at, self._cpu_at, self._completed_at, self._failed_at = now, cpu, completed, failed
        return True
