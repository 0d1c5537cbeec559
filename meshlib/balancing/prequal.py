"""Prequal: pick by probed requests-in-flight and latency, with the hot-cold rule.

After Google's Prequal (Wydrowski, Kleinberg, Rumble, Archer; NSDI 2024, "Load is not what you
should balance"). Each pick asks for a few probes of random endpoints (`Prober`: it only
schedules them; the answers arrive later, off the request path) and picks from a small pool of
recent answers: among the "cold" ones (requests in flight at or below the `q_rif` quantile of
recently probed RIFs) before hot ones, and within each the lowest expected latency (the answer's,
carried to its RIF as of now; the paper orders hot answers by RIF alone: docs/decisions.md).

This module is synchronous and does no IO. The pool outlives Snapshots (a `ProbeHub` on the
`LoadBook` keeps one per service, protocol and address set), so a rules change keeps what was
probed.
What is kept of the paper, and the defaults, are in docs/rules.md (prequal) and decisions.md.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from meshlib.balancing.base import NOTHING
from meshlib.balancing.least_request import LeastRequest
from meshlib.balancing.probe_budget import ProbeBudget
from meshlib.balancing.weighted_random import effective_weights
from meshlib.endpoint import Endpoint, EndpointLoad

RIF_HISTORY = 64
"""Recent probe answers whose RIFs give the hot-cold threshold (four pools' worth)."""

MAX_POOLS = 1024
"""Pools a hub keeps (one per service, protocol and address set); the oldest goes beyond it."""

HTTP = "http"
GRPC = "grpc"
"""The protocols probed (a plan's endpoints speak one: `ProbeHub.probers` has one prober each)."""


@dataclass(frozen=True, slots=True)
class PrequalOptions:
    """The paper's parameters kept here (docs/rules.md#prequal gives the reasons and ranges).

    `probes_per_query` (r_probe; a fraction is a probability), `pool_size` (the pool's maximum,
    16 as in the paper), `max_age` (seconds a probe answer is trusted), `reuse_budget` (b_reuse:
    picks one answer may serve; None derives it from the others, as the paper does),
    `remove_per_query` (r_remove: the worst answer dropped per pick), `q_rif` (Q_RIF: the
    quantile that splits hot from cold). `probe_timeout` and `max_probe_rate` (probes per second
    to one destination) bound the prober.
    """

    probes_per_query: float = 1.0
    pool_size: int = 16
    max_age: float = 1.0
    reuse_budget: int | None = None
    remove_per_query: float = 0.25
    q_rif: float = 0.8
    probe_timeout: float = 0.25
    max_probe_rate: float = 200.0


DEFAULT_OPTIONS = PrequalOptions()


def reuse_budget(options: PrequalOptions, endpoints: int) -> float:
    """b_reuse: how many picks one answer may serve so that the pool does not drain.

    Each pick uses one answer; answers arrive at `probes_per_query` per pick, of which a share
    `pool_size / endpoints` only replaces an endpoint already pooled, and `remove_per_query`
    leave as the worst. Uses per answer must cover what the net inflow leaves uncovered:
    1 / ((1 - m/n) r_probe - r_remove), with 10% slack, at least 1. A net inflow of zero or less
    (small sets, few probes) leaves no bound but the age: infinity.
    """
    if options.reuse_budget is not None:
        return float(options.reuse_budget)
    if endpoints <= 0:
        return 1.0
    share = min(options.pool_size / endpoints, 1.0)
    inflow = (1.0 - share) * options.probes_per_query - options.remove_per_query
    if inflow <= 0.0:
        return math.inf
    return max(1.0, math.ceil(1.1 / inflow))


class Probe:
    """One answer: the endpoint's requests in flight and latency estimate, when it arrived and
    how often it was used.

    `load` is this caller's own record of the endpoint (None when unknown): the requests this
    caller started and finished there since the answer are known exactly, so the answer's RIF is
    corrected by them (`own` is the caller's count at the answer). Without it, each use counts
    as one more request in flight."""

    __slots__ = ("address", "latency", "load", "own", "received", "rif", "uses")

    def __init__(
        self, address: str, rif: int, latency: float, received: float, load: EndpointLoad | None = None
    ) -> None:
        self.address = address
        self.rif = rif
        self.latency = latency
        self.received = received
        self.load = load
        self.own = load.outstanding if load is not None else 0
        self.uses = 0

    def current(self) -> int:
        """The RIF as of now: the answer's, plus what this caller sent there since (less what
        came back)."""
        load = self.load
        if load is None:
            return self.rif + self.uses
        return max(self.rif + load.outstanding - self.own, 0)

    def __repr__(self) -> str:
        return f"Probe({self.address}, rif={self.current()}, latency={self.latency:.4f}, uses={self.uses})"


class ProbePool:
    """The recent probe answers for one address set, bounded by `pool_size`, one per address,
    and the RIFs of the last `RIF_HISTORY` answers (the hot-cold threshold's sample).

    Written by the prober (answers, failures) and read by picks from any thread: every
    operation holds a lock for a few microseconds, never across IO.
    """

    def __init__(self, service: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.clock = clock
        self._probes: dict[str, Probe] = {}
        self._rifs: deque[int] = deque(maxlen=RIF_HISTORY)
        self._cut: tuple[float, float] | None = None  # (q, threshold) until the next answer
        self._lock = threading.Lock()
        self.pending: set[str] = set()  # addresses with a probe in flight (the prober's)
        self.sent = 0
        self.failed = 0

    def __len__(self) -> int:
        return len(self._probes)

    def probes(self) -> list[Probe]:
        with self._lock:
            return list(self._probes.values())

    def add(
        self,
        address: str,
        rif: int,
        latency: float,
        size: int,
        now: float | None = None,
        load: EndpointLoad | None = None,
    ) -> None:
        """An answer arrived: it replaces the address's older one; in a full pool the oldest
        answer leaves. `load`: the caller's own record of the endpoint (see `Probe`)."""
        now = self.clock() if now is None else now
        with self._lock:
            probes = self._probes
            probes.pop(address, None)
            while len(probes) >= size:
                oldest = min(probes.values(), key=_received)
                del probes[oldest.address]
            probes[address] = Probe(address, rif, latency, now, load)
            self._rifs.append(rif)
            self._cut = None

    def fail(self, address: str) -> None:
        """A probe went unanswered (error, timeout, refusal): nothing it said before is trusted."""
        with self._lock:
            self._probes.pop(address, None)
            self.failed += 1

    def choose(
        self, options: PrequalOptions, budget: float, exclude: Container[str], rand: Callable[[], float]
    ) -> str | None:
        """The hot-cold pick among the answers not excluded and not older than `max_age`, or
        None when there is none. The chosen answer counts one use (and, through the caller's
        load record, this pick's request once it starts); worn out by `budget` uses, it leaves.
        Then, in a full pool, with probability `remove_per_query` (surely for each whole unit of
        it), the worst answer leaves:
        in a pool with room, the worst answer still says something and no better one waits for
        its place (with fewer endpoints than `pool_size`, it would leave only the best one, used
        on and on until the next probe)."""
        now = self.clock()
        oldest = now - options.max_age
        with self._lock:
            probes = self._probes
            for p in [p for p in probes.values() if p.received < oldest]:
                del probes[p.address]
            if not probes:
                return None
            q = options.q_rif
            known = self._cut
            if known is not None and known[0] == q:
                cut = known[1]
            else:  # sorted once per answer, not per pick
                cut = _quantile(sorted(self._rifs), q)
                self._cut = (q, cut)
            best: Probe | None = None
            best_rif = 0
            for p in probes.values():
                if p.address in exclude:
                    continue
                rif = p.current()
                if best is None or _before(p, rif, best, best_rif, cut):
                    best, best_rif = p, rif
            if best is None:
                return None
            best.uses += 1
            if best.uses >= budget:
                del probes[best.address]
            removals = options.remove_per_query
            while removals > 0.0 and len(probes) >= options.pool_size:
                if removals >= 1.0 or rand() < removals:
                    worst = _worst(probes.values(), cut)
                    del probes[worst.address]
                removals -= 1.0
            return best.address


def _received(p: Probe) -> float:
    return p.received


def _expected(p: Probe, rif: int) -> float:
    """The answer's latency carried to the RIF as of now: it was the server's estimate for a
    request arriving at the RIF it answered with; each request this caller added since makes a
    new one wait that much longer (as peak EWMA's cost grows with requests in flight)."""
    return p.latency * (rif + 1) / (p.rif + 1)


def _before(p: Probe, p_rif: int, best: Probe, best_rif: int, cut: float) -> bool:
    """Hot-cold order: cold (RIF at or below `cut`) before hot; within each, the lower expected
    latency at the RIF as of now (ties broken by RIF). The paper orders hot answers by RIF
    alone; by expected latency a slow server that is idle because it is slow is not the pick
    whenever the others are all hot (docs/decisions.md)."""
    cold = p_rif <= cut
    if cold != (best_rif <= cut):
        return cold
    return (_expected(p, p_rif), p_rif) < (_expected(best, best_rif), best_rif)


def _worst(probes: Iterable[Probe], cut: float) -> Probe:
    """The answer the hot-cold rule would take last: the hottest, or the slowest if none is hot."""
    items = [(p.current(), p) for p in probes]
    hot = [(rif, p) for rif, p in items if rif > cut]
    if hot:
        return max(hot, key=lambda item: (item[0], item[1].latency))[1]
    return max(items, key=lambda item: (item[1].latency, item[0]))[1]


def _quantile(values: Sequence[int], q: float) -> float:
    """The q-quantile of sorted `values` (nearest rank); infinity when there are none."""
    if not values:
        return math.inf
    return float(values[min(len(values) - 1, int(q * len(values)))])


class Prober(Protocol):
    """Sends probes off the request path (meshlib.http.probes for HTTP).

    `probe` returns at once: it only schedules (and may drop what exceeds its rate bounds);
    answers reach `pool.add`, failures `pool.fail`, later, from whatever thread the prober runs."""

    def probe(self, pool: ProbePool, targets: Sequence[Endpoint], options: PrequalOptions) -> None: ...


class ProbeHub:
    """The pools of one `LoadBook` (one per service, protocol and address set, kept across
    Snapshots), the probers that feed them by protocol (`http`: set by the first meshed HTTP
    client; `grpc`: by the first gRPC channel), and the bounds they share (`budget`)."""

    def __init__(self) -> None:
        self.probers: dict[str, Prober] = {}
        self.budget = ProbeBudget()
        self._pools: dict[tuple[str, str, frozenset[str]], ProbePool] = {}
        self._lock = threading.Lock()

    def pool(self, service: str, addresses: frozenset[str], protocol: str = HTTP) -> ProbePool:
        key = (service, protocol, addresses)
        pool = self._pools.get(key)
        if pool is None:
            with self._lock:
                pool = self._pools.get(key)
                if pool is None:
                    while len(self._pools) >= MAX_POOLS:
                        del self._pools[next(iter(self._pools))]
                    pool = self._pools[key] = ProbePool(service)
        return pool

    def pools(self) -> list[ProbePool]:
        return list(self._pools.values())


class Prequal:
    """The prequal balancer over one set of endpoints.

    Options: `hub` (where the pool and the prober are; without one the balancer keeps a pool of
    its own and nobody probes: it picks like `least_request` until answers are added), `service`
    (the pool's service, for the prober and stats), `protocol` (which prober: `http`, `grpc`),
    `prequal` (`PrequalOptions`: the
    Destination's `prequal` spec), `clock`.
    Weights: an endpoint of weight 0 is neither probed nor picked unless all are (as elsewhere);
    otherwise the probes measure capacity, and weights are left to the fallback.
    """

    __slots__ = (
        "_budget",
        "_by_address",
        "_fallback",
        "_hub",
        "_protocol",
        "_random",
        "_rng",
        "_targets",
        "endpoints",
        "options",
        "pool",
    )

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        rng: random.Random | None = None,
        hub: ProbeHub | None = None,
        service: str = "",
        protocol: str = HTTP,
        prequal: PrequalOptions | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.endpoints: Sequence[Endpoint] = tuple(endpoints)
        self.options = prequal if prequal is not None else DEFAULT_OPTIONS
        rng = rng if rng is not None else random.Random()
        self._rng = rng
        self._random = rng.random
        self._hub = hub
        self._protocol = protocol
        addresses = frozenset(e.address for e in self.endpoints)
        self.pool = hub.pool(service, addresses, protocol) if hub is not None else ProbePool(service)
        if clock is not None:
            self.pool.clock = clock
        weights = effective_weights(self.endpoints)
        self._targets = [e for e, w in zip(self.endpoints, weights, strict=True) if w > 0]
        self._by_address = {e.address: e for e in self._targets}
        self._budget = reuse_budget(self.options, len(self._targets))
        self._fallback = LeastRequest(self.endpoints, rng=rng)

    def pick(self, key: str | None = None, exclude: Container[str] = NOTHING) -> Endpoint | None:
        self._ask()
        address = self.pool.choose(self.options, self._budget, exclude, self._random)
        if address is not None:
            endpoint = self._by_address.get(address)
            if endpoint is not None:
                return endpoint
        return self._fallback.pick(key, exclude)

    def _ask(self) -> None:
        """Ask for `probes_per_query` probes of endpoints drawn uniformly at random."""
        hub = self._hub
        prober = hub.probers.get(self._protocol) if hub is not None else None
        targets = self._targets
        if prober is None or not targets:
            return
        rate = self.options.probes_per_query
        count = int(rate)
        if self._random() < rate - count:
            count += 1
        if count <= 0:
            return
        n = len(targets)
        if count >= n:
            chosen: Sequence[Endpoint] = targets
        elif count == 1:
            chosen = (targets[int(self._random() * n) % n],)
        else:
            chosen = self._rng.sample(targets, count)
        prober.probe(self.pool, chosen, self.options)

    def __repr__(self) -> str:
        return f"Prequal({len(self.endpoints)} endpoints, {len(self.pool)} probes pooled)"
