"""Retry budget: retries as a share of recent requests, with a floor for quiet clients.

Over a sliding window the budget allows

    max(min_per_second * window,  percent / 100 * (requests deposited in the window))
                             -  (retries withdrawn in the window)

retries. Every original request deposits once; every retry or hedge withdraws one, and is not
sent when the withdrawal is refused. The floor (the reserve) lets a quiet client still retry a
little; the percentage keeps a busy one from multiplying its load when a service is down.

The floor is a floor, not an addition (Envoy's retry budget takes the greater of its percentage
and its minimum; Finagle adds them): with the defaults a failing service sees at most 1.2
attempts per request from any client sending more than 50 requests a second, instead of
1.2 + 10/rate. docs/decisions.md has the reasoning.

The window is cut into time slots that rotate as time passes, so every operation is O(1)
amortized and the memory is fixed. A deposit or withdrawal counts for between
`window * (1 - 1/slots)` and `window` after it is made (it leaves with its slot).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlib.rules.models import BudgetSpec

Clock = Callable[[], float]


class RetryBudget:
    """How many retries may be sent now; thread-safe, IO-free, O(1) per call.

    `exhausted` counts refused withdrawals (a metric: retries the budget prevented).
    """

    __slots__ = (
        "_deposited",
        "_deposits",
        "_head",
        "_index",
        "_lock",
        "_origin",
        "_slot_end",
        "_slots",
        "_width",
        "_withdrawals",
        "_withdrawn",
        "clock",
        "exhausted",
        "min_per_second",
        "percent",
        "reserve",
        "window",
    )

    def __init__(
        self,
        percent: float = 20.0,
        min_per_second: float = 10.0,
        window: float = 10.0,
        *,
        slots: int = 10,
        clock: Clock = time.monotonic,
    ) -> None:
        if not percent >= 0:
            raise ValueError(f"percent must be 0 or more, not {percent!r}")
        if not min_per_second >= 0:
            raise ValueError(f"min_per_second must be 0 or more, not {min_per_second!r}")
        if not window > 0:
            raise ValueError(f"window must be longer than 0 seconds, not {window!r}")
        if slots < 1:
            raise ValueError(f"slots must be 1 or more, not {slots!r}")
        self.percent = float(percent)
        self.min_per_second = float(min_per_second)
        self.window = float(window)
        self.reserve = self.min_per_second * self.window
        self.clock = clock
        self.exhausted = 0
        self._slots = slots
        self._width = self.window / slots
        self._deposits = [0] * slots
        self._withdrawals = [0] * slots
        self._deposited = 0  # sums over the live slots
        self._withdrawn = 0
        self._origin = clock()
        self._head = 0  # absolute number of the current slot (slot 0 starts at _origin)
        self._index = 0  # its place in the lists: _head % slots
        self._slot_end = self._origin + self._width
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: BudgetSpec, *, clock: Clock = time.monotonic) -> RetryBudget:
        return cls(spec.percent, spec.min_per_second, spec.window, clock=clock)

    # ----------------------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        """Rotate to the slot that holds `now`, forgetting the slots that left the window."""
        slot = int((now - self._origin) // self._width)
        gap = slot - self._head
        if gap <= 0:  # rounding at a slot edge, or a clock that went back: stay in this slot
            return
        n = self._slots
        if gap >= n:
            for i in range(n):
                self._deposits[i] = 0
                self._withdrawals[i] = 0
            self._deposited = 0
            self._withdrawn = 0
        else:
            for s in range(self._head + 1, slot + 1):
                i = s % n
                self._deposited -= self._deposits[i]
                self._withdrawn -= self._withdrawals[i]
                self._deposits[i] = 0
                self._withdrawals[i] = 0
        self._head = slot
        self._index = slot % n
        self._slot_end = self._origin + (slot + 1) * self._width

    def _balance(self) -> float:
        # percent * count / 100 (not count * 0.2): exact whenever the true value is a whole number
        share = self.percent * self._deposited / 100.0
        return (share if share > self.reserve else self.reserve) - self._withdrawn

    # ----------------------------------------------------------------------------------------

    def deposit(self) -> None:
        """Call once per original request (not for retries or hedges)."""
        now = self.clock()
        with self._lock:
            if now >= self._slot_end:
                self._advance(now)
            self._deposits[self._index] += 1
            self._deposited += 1

    def try_withdraw(self) -> bool:
        """Call once per retry or hedge: True to send it; False (nothing withdrawn) to not."""
        now = self.clock()
        with self._lock:
            if now >= self._slot_end:
                self._advance(now)
            if self._balance() >= 1.0:
                self._withdrawals[self._index] += 1
                self._withdrawn += 1
                return True
            self.exhausted += 1
            return False

    def balance(self) -> float:
        """Retries available right now (never below 0; a withdrawal needs at least 1)."""
        now = self.clock()
        with self._lock:
            if now >= self._slot_end:
                self._advance(now)
            return max(0.0, self._balance())

    def __repr__(self) -> str:
        return (
            f"RetryBudget(percent={self.percent:g}, min_per_second={self.min_per_second:g}, "
            f"window={self.window:g}, balance={self.balance():.1f}, exhausted={self.exhausted})"
        )
