"""Outlier detection: eject misbehaving endpoints of one service for a while (Envoy's rules,
plus Finagle's success-rate rule).

Rules (`OutlierSpec`):

- consecutive 5xx: `consecutive_5xx` 5xx responses or local failures (no response: connect
  failure, reset, timeout) in a row eject the endpoint at once. Any other response resets
  the count.
- consecutive gateway errors (when `consecutive_gateway_errors` is set): as many 502, 503,
  504 or local failures in a row. Any other response, a 500 included, resets the count.
- success rate: each endpoint's successes / requests over the sliding `success_rate_window`
  (time-slotted). Every `interval` (checked lazily by `record`, `ejected` and
  `ejected_addresses`: no thread, no timer), an endpoint with at least
  `success_rate_min_requests` requests in the window and a rate below
  `success_rate_threshold` is ejected, the worst first. A failure here is what the
  consecutive-5xx rule counts; a 4xx is a success (the endpoint answered).

Ejection:

- It lasts `base_ejection * multiplier`, capped at `max_ejection` (default
  `max(base_ejection, 300s)`, Envoy's max_ejection_time). The multiplier counts the
  endpoint's ejections and, as in Envoy, decays by one for every `interval` the endpoint
  then spends in service: an endpoint that keeps failing stays out longer each time, one
  that fails once a month gets the base time each time.
- It ends early by `reinstate` (a request sent anyway succeeded, or the endpoint is a new
  process).
- It ends by itself when its time is up; the return is noticed lazily (by the next call
  that looks) and reported to `on_return` then. On return the endpoint starts afresh: its
  consecutive counts and its success-rate window are empty (they are cleared when it is
  ejected, and records for an endpoint while it is ejected, from requests already in
  flight, are ignored).
- At most `max_ejection_percent` of the pool is ejected at once, strictly: an ejection
  happens only if the number ejected afterwards is at most floor(pool * percent / 100).
  This is Envoy's rule since it stopped always allowing one ejection (envoy#27909; the old
  behaviour is its opt-in `always_eject_one_host`): a pool of 1 at 50% ejects nothing, 2
  ejects 1, 4 eject 2, 5 eject 2. A failing endpoint refused by the cap is ejected by its
  next failure once there is room (the count is compared with >=, not ==).

The pool is the set given to `set_pool`; until it is first called, it is every address
recorded so far. Once a pool is set, records for addresses outside it are ignored and
`set_pool` forgets everything about the addresses that left (an address that comes back
starts afresh, as in Envoy; its ejection, if any, ends without an `on_return`).

Callbacks run after the state has changed, outside the lock, in the thread whose call
noticed the change; they should be quick and must not raise.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlib.rules.models import OutlierSpec

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class OutlierDefaults:
    """`OutlierSpec()` as plain data, for the failure accrual of services whose rules set no
    `outlier_detection`: making it needs no rules model (pydantic) in a process without rules.
    tests/resilience/test_outlier.py checks that it equals OutlierSpec's defaults."""

    consecutive_5xx: int = 5
    consecutive_gateway_errors: int | None = None
    interval: float = 10.0
    base_ejection: float = 30.0
    max_ejection_percent: int = 50
    success_rate_threshold: float = 0.8
    success_rate_window: float = 30.0
    success_rate_min_requests: int = 100


GATEWAY_ERRORS = frozenset({502, 503, 504})
_SLOTS = 10  # time slots across the success-rate window
_MAX_EJECTION = 300.0  # Envoy's default max_ejection_time

_EJECT = 0
_RETURN = 1
_Events = list[tuple[int, str, float]]  # (_EJECT or _RETURN, address, duration) to report


class _Host:
    """What is known about one endpoint."""

    __slots__ = (
        "consecutive_5xx",
        "consecutive_gateway",
        "head",
        "multiplier",
        "ok",
        "ok_sum",
        "returned_at",
        "total",
        "total_sum",
    )

    def __init__(self, slot: int) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.multiplier = 0  # ejection multiplier (decays while in service)
        self.returned_at = 0.0  # when the last ejection ended
        self.ok = [0] * _SLOTS  # success-rate window: successes and requests per slot
        self.total = [0] * _SLOTS
        self.ok_sum = 0
        self.total_sum = 0
        self.head = slot  # absolute number of the newest slot

    def rotate(self, slot: int) -> None:
        """Move the window to end at `slot`, forgetting the slots that left it."""
        gap = slot - self.head
        if gap <= 0:
            return
        if gap >= _SLOTS:
            self.clear_window()
        else:
            ok, total = self.ok, self.total
            for s in range(self.head + 1, slot + 1):
                i = s % _SLOTS
                self.ok_sum -= ok[i]
                self.total_sum -= total[i]
                ok[i] = 0
                total[i] = 0
        self.head = slot

    def clear_window(self) -> None:
        for i in range(_SLOTS):
            self.ok[i] = 0
            self.total[i] = 0
        self.ok_sum = 0
        self.total_sum = 0


class OutlierDetector:
    """Outlier detection for the endpoints of one service; thread-safe.

    `record` after every attempt; `ejected` (a comparison and a dict lookup) when picking.
    `ejections_total` counts ejections since creation (a metric).
    """

    def __init__(
        self,
        spec: OutlierSpec | OutlierDefaults,
        *,
        clock: Clock = time.monotonic,
        on_eject: Callable[[str, float], None] | None = None,
        on_return: Callable[[str], None] | None = None,
        max_ejection: float | None = None,
    ) -> None:
        self.spec = spec
        self.clock = clock
        self.on_eject = on_eject
        self.on_return = on_return
        self.max_ejection = (
            max(spec.base_ejection, _MAX_EJECTION) if max_ejection is None else float(max_ejection)
        )
        self.ejections_total = 0
        self._threshold_5xx = spec.consecutive_5xx
        self._threshold_gateway = spec.consecutive_gateway_errors or 0  # 0: rule off
        self._hosts: dict[str, _Host] = {}
        self._pool: frozenset[str] | None = None
        self._ejected: dict[str, float] = {}  # address -> when its ejection ends
        self._view: frozenset[str] = frozenset()  # the keys of _ejected
        self._lock = threading.Lock()
        now = clock()
        self._origin = now
        self._width = spec.success_rate_window / _SLOTS
        self._slot = 0
        self._slot_end = now + self._width
        self._next_sweep = now + spec.interval
        self._next_return = math.inf  # earliest end of a current ejection
        self._next_check = self._next_sweep  # min(_next_sweep, _next_return)

    # ----------------------------------------------------------------------------------------
    # Queries

    def ejected(self, address: str, now: float | None = None) -> bool:
        """Is this endpoint ejected now? (An ejection whose time is up ends here.)"""
        return address in self.ejected_addresses(now)

    def ejected_addresses(self, now: float | None = None) -> frozenset[str]:
        """Every endpoint ejected now."""
        if now is None:
            now = self.clock()
        if now >= self._next_check:
            self._maintain(now)
        return self._view

    def pool_size(self) -> int:
        """The number of endpoints the ejection cap is computed from."""
        return len(self._pool) if self._pool is not None else len(self._hosts)

    # ----------------------------------------------------------------------------------------
    # Updates

    def set_pool(self, addresses: Iterable[str]) -> None:
        """The current endpoints of the service; everything about the others is forgotten."""
        pool = frozenset(addresses)
        with self._lock:
            self._pool = pool
            for address in [a for a in self._hosts if a not in pool]:
                del self._hosts[address]
            gone = [a for a in self._ejected if a not in pool]
            for address in gone:
                del self._ejected[address]
            if gone:
                self._ejections_changed()

    def reinstate(self, address: str, *, forget: bool = False) -> None:
        """End the ejection of `address` now: a request sent to it anyway (panic mode, or a
        breaker's probe) succeeded. With `forget`, everything known about it goes too (a new
        process answers there: re-registered, or back in discovery), its multiplier included."""
        with self._lock:
            if forget:
                self._hosts.pop(address, None)
            else:
                host = self._hosts.get(address)
                if host is not None:
                    host.returned_at = self.clock()
            if self._ejected.pop(address, None) is None:
                return
            self._ejections_changed()
        if not forget and self.on_return is not None:
            self.on_return(address)

    def record(self, address: str, status: int | None, *, local_failure: bool = False) -> None:
        """The outcome of one attempt on `address`: its HTTP status, or None (and
        `local_failure=True`) when no response came (connect failure, reset, timeout)."""
        now = self.clock()
        events: _Events = []
        with self._lock:
            if now >= self._next_check:
                self._due(now, events)
            self._record(address, status, local_failure, now, events)
        if events:
            self._fire(events)

    # ----------------------------------------------------------------------------------------
    # Internals (called with the lock held, except _maintain and _fire)

    def _record(
        self,
        address: str,
        status: int | None,
        local_failure: bool,
        now: float,
        events: _Events,
    ) -> None:
        if address in self._ejected:
            return  # an attempt already in flight when it was ejected: ignored
        host = self._hosts.get(address)
        if host is None:
            if self._pool is not None and address not in self._pool:
                return  # not (or no longer) an endpoint of this service
            host = self._hosts[address] = _Host(self._slot)
        if now >= self._slot_end:
            self._advance_slot(now)
        if host.head != self._slot:
            host.rotate(self._slot)
        i = self._slot % _SLOTS
        host.total[i] += 1
        host.total_sum += 1
        if not local_failure and status is not None and status < 500:
            host.ok[i] += 1
            host.ok_sum += 1
            host.consecutive_5xx = 0
            host.consecutive_gateway = 0
            return
        host.consecutive_5xx += 1
        if local_failure or status is None or status in GATEWAY_ERRORS:
            host.consecutive_gateway += 1
        else:
            host.consecutive_gateway = 0
        if host.consecutive_5xx >= self._threshold_5xx or (
            self._threshold_gateway and host.consecutive_gateway >= self._threshold_gateway
        ):
            self._eject(address, host, now, events)

    def _maintain(self, now: float) -> None:
        events: _Events = []
        with self._lock:
            if now >= self._next_check:
                self._due(now, events)
        if events:
            self._fire(events)

    def _due(self, now: float, events: _Events) -> None:
        """End the ejections whose time is up, then run the success-rate sweep if it is due."""
        if now >= self._next_return:
            ended = [(a, until) for a, until in self._ejected.items() if until <= now]
            for address, until in ended:
                del self._ejected[address]
                host = self._hosts.get(address)
                if host is not None:
                    host.returned_at = until
                    host.consecutive_5xx = 0
                    host.consecutive_gateway = 0
                events.append((_RETURN, address, 0.0))
            self._ejections_changed()
        if now >= self._next_sweep:
            self._next_sweep = now + self.spec.interval
            self._next_check = min(self._next_sweep, self._next_return)
            self._sweep(now, events)

    def _sweep(self, now: float, events: _Events) -> None:
        """Finagle's success-rate rule, over every endpoint in service with enough volume."""
        spec = self.spec
        if now >= self._slot_end:
            self._advance_slot(now)
        slot = self._slot
        outliers = []
        for address, host in self._hosts.items():
            if address in self._ejected:
                continue
            host.rotate(slot)
            total = host.total_sum
            if total >= spec.success_rate_min_requests and host.ok_sum < spec.success_rate_threshold * total:
                outliers.append((host.ok_sum / total, address, host))
        outliers.sort(key=lambda o: o[0])
        for _, address, host in outliers:
            if not self._eject(address, host, now, events):
                break

    def _eject(self, address: str, host: _Host, now: float, events: _Events) -> bool:
        """Eject now if the cap allows; False if it does not."""
        if (len(self._ejected) + 1) * 100 > self.pool_size() * self.spec.max_ejection_percent:
            return False
        spec = self.spec
        if host.multiplier:  # one step down for every interval spent in service since
            healthy = int((now - host.returned_at) // spec.interval)
            host.multiplier = max(0, host.multiplier - healthy)
        host.multiplier += 1
        duration = min(spec.base_ejection * host.multiplier, self.max_ejection)
        self._ejected[address] = now + duration
        host.consecutive_5xx = 0
        host.consecutive_gateway = 0
        host.clear_window()
        self.ejections_total += 1
        self._ejections_changed()
        events.append((_EJECT, address, duration))
        return True

    def _ejections_changed(self) -> None:
        self._view = frozenset(self._ejected)
        self._next_return = min(self._ejected.values(), default=math.inf)
        self._next_check = min(self._next_sweep, self._next_return)

    def _advance_slot(self, now: float) -> None:
        slot = int((now - self._origin) // self._width)
        if slot > self._slot:
            self._slot = slot
            self._slot_end = self._origin + (slot + 1) * self._width

    def _fire(self, events: _Events) -> None:
        for kind, address, duration in events:
            if kind == _EJECT:
                if self.on_eject is not None:
                    self.on_eject(address, duration)
            elif self.on_return is not None:
                self.on_return(address)

    def __repr__(self) -> str:
        return (
            f"OutlierDetector(pool={self.pool_size()}, ejected={sorted(self._view)}, "
            f"ejections_total={self.ejections_total})"
        )
