"""Global rate limiting: one token bucket shared through Redis (`RateLimit` with `scope: global`).

The semantics are those of the local `TokenBucket` (capacity `max(burst, 1)`, refill `rate` a
second, starts full, a refusal takes nothing and says how long to wait), but the bucket lives
in Redis under `meshlib:ratelimit:<service>`, and every instance of the service takes from it.
One Lua script reads, refills and takes atomically, on Redis's own clock (`TIME`), so the
instances' clocks never matter. The key expires once a bucket left alone would be full again:
an expired key and a full bucket are the same thing.

Redis unreachable or failing: the limit fails open to a local `TokenBucket` (a per-process
limit), with one warning per outage on the `meshlib.server` logger and another on recovery,
and Redis is tried again only after `retry_interval` seconds, not on every request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any

from meshlib.resilience.ratelimit import Clock, TokenBucket

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError:  # pragma: no cover - the `redis` extra is not installed
    redis = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from meshlib.rules import RateLimitDoc
    from meshlib.stats import TrafficStats

log = logging.getLogger("meshlib.server")

KEY_PREFIX = "meshlib:ratelimit:"

# KEYS[1]: the bucket; ARGV: rate, capacity, tokens wanted, TTL (ms), and optionally a clock
# reading in seconds (tests compare the arithmetic with TokenBucket's on a fake clock).
# Numbers cross the boundary as "%.17g" strings: Lua would truncate a returned number to an
# integer, and tostring() keeps only 14 digits.
SCRIPT = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local now
if ARGV[5] then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
  tokens = capacity
  last = now
end
tokens = math.min(capacity, tokens)
if now > last then
  tokens = math.min(capacity, tokens + (now - last) * rate)
  last = now
end
local wait = 0
if tokens >= n - 1e-9 * math.max(1, rate) then
  tokens = tokens - n
else
  wait = (n - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.17g', last))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return string.format('%.17g', wait)
"""


def redis_client(url: str, timeout: float = 0.05) -> Any:
    """A sync redis-py client for `url`: short timeouts, no retries (a failure falls back)."""
    if redis is None:  # pragma: no cover - the `redis` extra is not installed
        raise ImportError("scope: global rate limits need the redis package: pip install 'meshlib[redis]'")
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class GlobalTokenBucket:
    """A `TokenBucket` shared through Redis, with a local bucket to fall back on.

    `try_acquire()` returns 0.0 when granted, else the seconds until the tokens will be there.
    `server_clock` replaces Redis's `TIME` (tests only).
    """

    blocking = True
    """It waits on the network: callers on an event loop run `try_acquire` on a thread."""

    def __init__(
        self,
        client: Any,
        service: str,
        rate: float,
        burst: int,
        *,
        stats: TrafficStats | None = None,
        retry_interval: float = 1.0,
        clock: Clock = time.monotonic,
        server_clock: Clock | None = None,
    ) -> None:
        self.fallback = TokenBucket(rate, burst, clock=clock)  # validates rate and burst
        self.client = client
        self.service = service
        self.key = KEY_PREFIX + service
        self.rate = self.fallback.rate
        self.capacity = self.fallback.capacity
        self.stats = stats
        self.retry_interval = retry_interval
        self.clock = clock
        self.server_clock = server_clock
        self.refused = 0  # refusals decided by Redis (the fallback counts its own)
        self.errors = 0  # failed calls to Redis: one per outage, then one per retry_interval at most
        # the bucket refills completely in capacity / rate seconds: an idle key is a full bucket
        self._ttl_ms = math.ceil(self.capacity / self.rate * 1000) + 1000
        self._sha: str | None = None
        self._down_until: float | None = None  # set during an outage: when to try Redis again
        self._lock = threading.Lock()

    @classmethod
    def from_doc(cls, client: Any, doc: RateLimitDoc, **kwargs: Any) -> GlobalTokenBucket:
        burst = doc.burst if doc.burst is not None else math.ceil(doc.requests_per_second)
        return cls(client, doc.service, doc.requests_per_second, burst, **kwargs)

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and the local fallback decides."""
        return self._down_until is not None

    def try_acquire(self, n: float = 1.0) -> float:
        if n > self.capacity:
            return math.inf
        if not n > 0:
            if n == 0:
                return 0.0
            raise ValueError(f"the number of tokens must be 0 or more, not {n!r}")
        down_until = self._down_until
        if down_until is not None:
            now = self.clock()
            with self._lock:
                probe = self._down_until is not None and now >= self._down_until
                if probe:  # this request tries Redis; the others keep using the fallback meanwhile
                    self._down_until = now + self.retry_interval
            if not probe:
                return self._local(n)
        try:
            wait = self._eval(n)
        except Exception as exc:  # any Redis failure: fail open to the per-process bucket
            self._went_down(exc)
            return self._local(n)
        if self._down_until is not None:
            self._came_back()
        if wait > 0:
            self.refused += 1
        return wait

    def _args(self, n: float) -> list[str]:
        args = [repr(self.rate), repr(self.capacity), repr(float(n)), str(self._ttl_ms)]
        if self.server_clock is not None:
            args.append(repr(float(self.server_clock())))
        return args

    def _eval(self, n: float) -> float:
        args = self._args(n)
        if self._sha is None:
            self._sha = self.client.script_load(SCRIPT)
        try:
            result = self.client.evalsha(self._sha, 1, self.key, *args)
        except redis.exceptions.NoScriptError:  # a restarted or flushed Redis forgot the script
            result = self.client.eval(SCRIPT, 1, self.key, *args)
        return float(result)

    def _local(self, n: float) -> float:
        if self.stats is not None:
            self.stats.count("ratelimit_fallback", self.service)
        return self.fallback.try_acquire(n)

    def _went_down(self, exc: Exception) -> None:
        with self._lock:
            self.errors += 1
            first = self._down_until is None
            self._down_until = self.clock() + self.retry_interval
        if first:
            log.warning(
                "rate limit for %s: Redis unavailable (%s: %s); enforcing it per process until it is back",
                self.service,
                type(exc).__name__,
                exc,
            )

    def _came_back(self) -> None:
        with self._lock:
            was_down = self._down_until is not None
            self._down_until = None
        if was_down:
            log.warning("rate limit for %s: Redis is back; the limit is global again", self.service)

    def __repr__(self) -> str:
        state = "degraded" if self.degraded else "global"
        return f"GlobalTokenBucket({self.key!r}, rate={self.rate:g}, capacity={self.capacity:g}, {state})"
