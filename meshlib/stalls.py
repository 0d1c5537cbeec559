"""Telling a stall every endpoint shared from one endpoint's slowness, for peak EWMA.

A pause of the caller (a GC pause, a blocked event loop, a machine that was not scheduled) or of
everything behind it at once makes every answer in flight late by the same time. Peak EWMA
takes each late answer as a peak, so the endpoints that happened to be busy look slow and an
idle, truly slow one looks fast until their peaks decay (10 s by default).

The rule: a stretch of time in which two different endpoints were both overdue (past their own
latency estimate) and no answer came on time is a common stall. The part of any answer's wait
inside it is taken out of that answer before it is folded in, and the first endpoint's peak,
already taken when the second came, is taken back. A truly slow endpoint keeps what it does not
share: its wait outside the stall. An answer on time shows the caller and the path were working,
so two slow endpoints among others that keep answering are not mistaken for a stall; with no
other traffic at all they cannot be told from one (nothing else shows the caller was running).
Late answers do not end the stretch: a caller slowed down (not frozen) still reads answers, all
of them late.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlib.endpoint import EndpointLoad


class _Late:
    """The latest overdue answer no other endpoint has matched yet."""

    __slots__ = ("done", "load", "prior", "rtt", "since", "started")

    def __init__(self, load: EndpointLoad, prior: float, started: float, done: float, since: float) -> None:
        self.load = load
        self.prior = prior  # the endpoint's average before this answer's peak
        self.started = started
        self.done = done
        self.rtt = done - started
        self.since = since  # from here to `done` it was overdue and nothing came on time


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _shared(x0: float, x1: float, a0: float, a1: float, b0: float, b1: float) -> float:
    """How much of [x0, x1] lies in [a0, a1] or [b0, b1]."""
    both = _overlap(x0, x1, max(a0, b0), min(a1, b1)) if max(a0, b0) < min(a1, b1) else 0.0
    return _overlap(x0, x1, a0, a1) + _overlap(x0, x1, b0, b1) - both


class Stalls:
    """The common stalls seen by one caller: shared by every `EndpointLoad` of a `LoadBook`.

    Not locked: under the GIL a race loses at most one answer's correction, which only nudges
    a heuristic, as for the loads themselves.
    """

    __slots__ = ("_late", "count", "end", "on_time", "pending", "start")

    def __init__(self) -> None:
        self.count = 0  # common stalls found (a diagnostic: benchmarks report it)
        self.start = 0.0  # the latest common stall (monotonic seconds); empty at first
        self.end = 0.0
        self.on_time = float("-inf")  # when the latest answer on time arrived (any endpoint)
        self._late: _Late | None = None
        self.pending: EndpointLoad | None = None  # the load of `_late`: its answers prove nothing yet

    def judge(self, load: EndpointLoad, rtt: float, now: float, expected: float) -> float:
        """The part of an answer's `rtt` that says something about `load`'s endpoint.

        `expected` is the endpoint's average before this answer (0: none yet).
        """
        started = now - rtt
        quiet_since = self.on_time  # nothing came on time between then and now
        own = rtt - _overlap(started, now, self.start, self.end)
        if expected <= 0.0 or own <= expected:
            # on time as it came (not once a stall is taken out): the path was working
            if (expected <= 0.0 or rtt <= expected) and now > quiet_since and load is not self.pending:
                self.on_time = now
            return own
        overdue = started + expected
        late = self._late
        if late is not None and late.load is not load:
            w0 = max(late.since, overdue)
            w1 = min(late.done, now)
            if w0 < w1:  # two endpoints overdue together and nothing on time: a common stall
                # taken out of both: their overlap with this stall and the last one (still in
                # force: nothing has been found since the first of them came), counted once
                a0, a1 = self.start, self.end
                late.load.unpeak(late.prior, late.rtt - _shared(late.started, late.done, a0, a1, w0, w1))
                own = rtt - _shared(started, now, a0, a1, w0, w1)
                if w0 < a1 and w1 > a0:
                    w0, w1 = min(w0, a0), max(w1, a1)
                self.start, self.end = w0, w1
                self.count += 1
                self._late = self.pending = None
                return own
        since = max(overdue, quiet_since)
        if late is not None and late.load is load:  # the same endpoint again: keep its first prior
            if now - started > late.rtt:
                late.started, late.done, late.rtt = started, now, now - started
            late.since = min(late.since, since)
        elif since < now:
            self._late = _Late(load, expected, started, now, since)
            self.pending = load
        return own
