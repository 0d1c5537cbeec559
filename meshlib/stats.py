"""In-process traffic counters per edge: what the middleware and clients saw.

Small and dependency-free so that the demo, `Mesh.stats` and tests can read live figures;
the OpenTelemetry instruments and the Prometheus text read these counters when they collect.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter, deque
from dataclasses import dataclass, field

RESERVOIR = 2048
"""Latencies kept per edge for percentiles (the most recent ones)."""

MAX_EDGES = 1000
"""Distinct (peer, subset) edges kept per direction; later ones are counted under peer `OTHER`
(each direction has its own: callers' claimed names cannot crowd out the calls this process makes)."""

OTHER = "other"


DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip
"""Upper bounds (seconds) of the duration histogram: Prometheus' defaults, plus two below 5 ms
because in-cluster calls are often that fast."""

_SLOTS = len(DURATION_BUCKETS) + 1
_FIRST = DURATION_BUCKETS[0]

_CLASSES = tuple(f"{n}xx" for n in range(10))


_CLASS_OF: dict[int | None, str] = {status: _CLASSES[status // 100] for status in range(100, 600)}
_CLASS_OF[None] = "error"
"""`status_class` of each usual status code (and of no response), looked up once per request."""


def status_class(status: int | None) -> str:
    """'2xx'..'5xx', or 'error' when no response came back."""
    if status is None:
        return "error"
    n = status // 100
    return _CLASSES[n] if 0 <= n < 10 else f"{n}xx"


_SUM, _SLOT0 = 0, 1  # a row's sum of durations, its first duration slot


def _count(row: list[float]) -> int:
    return int(sum(row[_SLOT0:]))


@dataclass(slots=True)
class EdgeStats:
    """Counts by status class, their duration histograms and sums, and recent latencies
    (seconds) of one edge.

    One row per status code (`rows`, None for no response; HTTP's three digits bound how many):
    [sum of durations, then how many durations fell in each DURATION_BUCKETS slot (not
    cumulative; the last slot is above the largest bound)]. A request adds to one list, found by
    its status as it is; a count is the sum of a row's slots, and the rows of a status class are
    added up, by a reader rather than by every request. A row is whole from the moment it is in
    `rows`, so a reader on another thread never sees one half made."""

    rows: dict[int | None, list[float]] = field(default_factory=dict)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=RESERVOIR))

    def add(self, status: int | None, seconds: float) -> None:
        """One request of this edge, answered with `status` after `seconds`."""
        row = self.rows.get(status)
        if row is None:
            row = self.rows.setdefault(status, [0.0] + [0] * _SLOTS)
        row[_SUM] += seconds
        row[_SLOT0 if seconds <= _FIRST else _SLOT0 + bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.latencies.append(seconds)

    def classes(self) -> dict[str, list[float]]:
        """The rows added up per status class ('2xx'..'5xx', 'error')."""
        out: dict[str, list[float]] = {}
        for status, row in list(self.rows.items()):
            cls = _CLASS_OF.get(status) or status_class(status)
            merged = out.get(cls)
            out[cls] = list(row) if merged is None else [a + b for a, b in zip(merged, row, strict=True)]
        return out

    @property
    def by_class(self) -> dict[str, int]:
        """Requests per status class."""
        return {cls: _count(row) for cls, row in self.classes().items()}

    @property
    def buckets(self) -> dict[str, list[int]]:
        """Per status class, how many durations fell in each DURATION_BUCKETS slot: a histogram
        that, unlike `latencies`, never forgets."""
        return {cls: [int(n) for n in row[_SLOT0:]] for cls, row in self.classes().items()}

    @property
    def sums(self) -> dict[str, float]:
        """Per status class, the sum of the durations (seconds)."""
        return {cls: row[_SUM] for cls, row in self.classes().items()}

    @property
    def total(self) -> int:
        return sum(_count(row) for row in list(self.rows.values()))

    @property
    def failures(self) -> int:
        classes = self.classes()
        return sum(_count(classes[cls]) for cls in ("5xx", "error") if cls in classes)

    def percentile(self, q: float) -> float | None:
        data = sorted(self.latencies)
        if not data:
            return None
        return data[min(len(data) - 1, int(q * len(data)))]


class TrafficStats:
    """Edges keyed by (direction, peer service, subset); direction is 'in' or 'out'."""

    def __init__(self) -> None:
        self._edges: dict[tuple[str, str, str], EdgeStats] = {}
        self._in: dict[str, EdgeStats] = {}  # the ("in", peer, "") edges by peer: `record_in`'s
        self.max_edges = MAX_EDGES
        self.counters: Counter[tuple[str, str]] = Counter()
        """Decisions by (name, service or address): retries, budget_exhausted, ejections, ..."""
        self._subjects: Counter[str] = Counter()  # distinct subjects per counter name
        self._directions: Counter[str] = Counter()  # distinct edges per direction
        self._lock = threading.Lock()

    def count(self, name: str, subject: str, n: int = 1) -> None:
        key = (name, subject)
        with self._lock:
            counters = self.counters
            if key not in counters:
                # subjects can come from outside (a blocked host the app was asked to call, a
                # caller's claimed name): past the cap, new ones of a name share `OTHER`
                if self._subjects[name] >= self.max_edges:
                    key = (name, OTHER)
                else:
                    self._subjects[name] += 1
            counters[key] += n

    def counter(self, name: str, subject: str) -> int:
        return self.counters.get((name, subject), 0)

    def record(
        self, direction: str, peer: str, subset: str | None, status: int | None, seconds: float
    ) -> None:
        key = (direction, peer, subset or "")
        edge = self._edges.get(key)
        if edge is None:
            edge = self._edge(key)
        edge.add(status, seconds)

    def record_in(self, peer: str, status: int | None, seconds: float) -> None:
        """`record("in", peer, None, status, seconds)`, as a server's middleware makes it for
        every request: the edge found by the caller's name, and `EdgeStats.add`, inline."""
        edge = self._in.get(peer)
        if edge is None:
            edge = self._edge(("in", peer, ""), self._in)
        row = edge.rows.get(status)
        if row is None:
            row = edge.rows.setdefault(status, [0.0] + [0] * _SLOTS)
        row[_SUM] += seconds
        row[_SLOT0 if seconds <= _FIRST else _SLOT0 + bisect_left(DURATION_BUCKETS, seconds)] += 1
        edge.latencies.append(seconds)

    def _edge(self, key: tuple[str, str, str], index: dict[str, EdgeStats] | None = None) -> EdgeStats:
        """The edge of `key`, made if new; also kept in `index` by peer, unless past the cap."""
        with self._lock:
            if key not in self._edges:
                if self._directions[key[0]] >= self.max_edges:
                    # a caller's claimed name (plaintext x-mesh-source) must not grow memory and
                    # /metrics without bound: past the cap, new peers share one edge
                    return self._edges.setdefault((key[0], OTHER, ""), EdgeStats())
                self._directions[key[0]] += 1
            edge = self._edges.setdefault(key, EdgeStats())
            if index is not None:
                index[key[1]] = edge
            return edge

    def edge(self, direction: str, peer: str, subset: str | None = None) -> EdgeStats:
        return self._edges.get((direction, peer, subset or "")) or EdgeStats()

    def edges(self) -> dict[tuple[str, str, str], EdgeStats]:
        with self._lock:
            return dict(self._edges)

    def reset(self) -> None:
        with self._lock:
            self._edges.clear()
            self._in.clear()
            self._directions.clear()
            self.counters.clear()
            self._subjects.clear()
