"""Local rate limiting: a token bucket (the `RateLimit` document with `scope: local`).

The bucket holds at most `capacity` tokens and starts full; it refills continuously at `rate`
tokens a second. A request takes one token or is refused, and a refusal says how long until
the tokens it asked for will be there (a `Retry-After` for the 429). Refills are computed from
the clock when the bucket is used: no timer, no thread, no IO.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlib.rules.models import RateLimitDoc

Clock = Callable[[], float]

# A grant is allowed up to this many seconds early (or this many tokens short, at low rates),
# so that waiting exactly the retry-after a refusal returned is always enough, whatever the
# float rounding of a clock reading in the millions of seconds times the rate.
_SLACK = 1e-9


class TokenBucket:
    """`rate` tokens a second, up to `capacity = max(burst, 1)` at once; thread-safe.

    A `burst` of 0 would refuse every request forever, which no operator means: the bucket
    then holds one token, so requests are admitted evenly at `rate` a second with no burst.
    """

    __slots__ = ("_last", "_lock", "_slack", "_tokens", "capacity", "clock", "rate", "refused")

    def __init__(self, rate: float, burst: int, *, clock: Clock = time.monotonic) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a finite number above 0, not {rate!r}")
        if burst < 0:
            raise ValueError(f"burst must be 0 or more, not {burst!r}")
        self.rate = float(rate)
        self.capacity = float(max(burst, 1))
        self.clock = clock
        self.refused = 0  # refused acquisitions (a metric)
        self._tokens = self.capacity
        self._slack = _SLACK * max(1.0, self.rate)
        self._last = clock()
        self._lock = threading.Lock()

    @classmethod
    def from_doc(cls, doc: RateLimitDoc, *, clock: Clock = time.monotonic) -> TokenBucket:
        burst = doc.burst if doc.burst is not None else math.ceil(doc.requests_per_second)
        return cls(doc.requests_per_second, burst, clock=clock)

    def _refill(self, now: float) -> float:
        elapsed = now - self._last
        if elapsed > 0:  # a clock that went back adds nothing (and takes nothing away)
            self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
            self._last = now
        return self._tokens

    def try_acquire(self, n: float = 1.0) -> float:
        """Take `n` tokens: 0.0 when granted; otherwise the seconds until `n` tokens will be
        there, and nothing is taken. More than `capacity` can never be granted: `math.inf`."""
        if n > self.capacity:
            return math.inf
        if not n > 0:
            if n == 0:
                return 0.0
            raise ValueError(f"the number of tokens must be 0 or more, not {n!r}")
        now = self.clock()
        with self._lock:
            tokens = self._refill(now)
            if tokens >= n - self._slack:
                self._tokens = tokens - n
                return 0.0
            self.refused += 1
            return (n - tokens) / self.rate

    def available(self) -> float:
        """Tokens in the bucket now (for metrics and tests)."""
        now = self.clock()
        with self._lock:
            return max(0.0, self._refill(now))

    def __repr__(self) -> str:
        return (
            f"TokenBucket(rate={self.rate:g}, capacity={self.capacity:g}, available={self.available():.2f})"
        )
