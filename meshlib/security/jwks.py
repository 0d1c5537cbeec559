"""JWKS fetched from an issuer's URL: fetched off the request path, cached, refreshed, rotated.

One `JwksSource` per URL in the process, with a daemon thread of its own that fetches when the
rules bring the URL in, again when the cache runs out (the response's `Cache-Control: max-age`
within bounds, else `REFRESH_DEFAULT`), and at once when a request shows a key id the cached
set lacks (a key rotation) - but at most once per `REFETCH_INTERVAL`, so tokens with made-up
key ids cannot make the mesh hammer the issuer. A failed fetch keeps the last good keys and
logs one WARNING per outage; it is retried sooner, with a doubling backoff. The thread holds
the source weakly and ends once no rules use the URL any more.

Requests never fetch: they read `keys`, and at most wait (off the event loop) for a fetch
that is under way (`wait`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from collections.abc import Callable

from meshlib.security.jwk import KeySet, parse_jwks

log = logging.getLogger("meshlib.security.jwks")

REFRESH_DEFAULT = 300.0
"""Seconds between fetches when the issuer sends no max-age."""
REFRESH_MIN = 30.0
REFRESH_MAX = 24 * 3600.0
"""Bounds of the refresh interval a max-age may set."""
REFETCH_INTERVAL = 30.0
"""An unknown key id asks for a fetch at most once per this many seconds per URL."""
RETRY_FIRST = 1.0
"""After a failed fetch the next comes after this, doubling up to the refresh interval."""
FETCH_TIMEOUT = 5.0
MAX_BYTES = 1024 * 1024

_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d{1,10})\"?\s*(?:,|$)", re.IGNORECASE)

Fetch = Callable[[str], tuple[bytes, str | None]]
"""(body, Cache-Control header) of a GET of the URL; raises on failure (any status but 200)."""


def http_get(uri: str) -> tuple[bytes, str | None]:
    """The JWKS body and its Cache-Control, over httpx (imported here: only a verifying
    process loads it for this), capped at `MAX_BYTES`, no redirects followed."""
    import httpx

    with (
        httpx.Client(timeout=FETCH_TIMEOUT, follow_redirects=False) as client,
        client.stream("GET", uri, headers={"accept": "application/json"}) as response,
    ):
        if response.status_code != 200:
            raise OSError(f"HTTP {response.status_code}")
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > MAX_BYTES:
                raise OSError(f"the JWKS is larger than {MAX_BYTES} bytes")
        return bytes(body), response.headers.get("cache-control")


def refresh_after(cache_control: str | None) -> float:
    """Seconds until the next fetch: the max-age within bounds, else the default."""
    match = _MAX_AGE.search(cache_control or "")
    if match is None:
        return REFRESH_DEFAULT
    return min(max(float(match.group(1)), REFRESH_MIN), REFRESH_MAX)


class JwksSource:
    """The cached keys of one JWKS URL. `keys` is None until a fetch has worked; `generation`
    counts finished fetches (worked or not), so a request can wait for the next one."""

    def __init__(
        self, uri: str, *, fetch: Fetch = http_get, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.uri = uri
        self.keys: KeySet | None = None
        self.error: str | None = None  # why the last fetch failed; None once one works
        self.generation = 0
        self.fetches = 0  # fetches started (tests, diagnostics)
        self._fetch = fetch
        self._clock = clock
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._wanted = True  # the first fetch is due at once
        self._next = 0.0
        self._asked = -REFETCH_INTERVAL * 2  # when an unknown key id last asked for a fetch
        self._failures = 0
        self._refresh = REFRESH_DEFAULT

    # -- what requests do ----------------------------------------------------------------

    def refetch(self) -> bool:
        """A token names a key id the set lacks: ask for a fetch now, unless one was asked for
        within `REFETCH_INTERVAL`. True: a fetch is coming (wait for the next generation)."""
        with self._cond:
            if self._wanted:
                return True
            now = self._clock()
            if now - self._asked < REFETCH_INTERVAL:
                return False
            self._asked = now
            self._wanted = True
        self._wake.set()
        return True

    def wait(self, generation: int, timeout: float) -> bool:
        """Block until a fetch after `generation` has finished; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.generation > generation, timeout)

    # -- what the thread does ------------------------------------------------------------

    def due_in(self) -> float:
        with self._cond:
            return 0.0 if self._wanted else max(0.0, self._next - self._clock())

    def fetch_now(self) -> None:
        """One fetch, its outcome recorded; never raises."""
        with self._cond:
            self._wanted = False
            self.fetches += 1
        try:
            body, cache_control = self._fetch(self.uri)
            keys = parse_jwks(body)
        except Exception as exc:  # any failure keeps the last good keys
            self._failed(f"{type(exc).__name__}: {str(exc)[:200]}")
            return
        refresh = refresh_after(cache_control)
        with self._cond:
            recovered = self.error is not None and self.generation > 0
            self.keys = keys
            self.error = None
            self._failures = 0
            self._refresh = refresh
            self._next = self._clock() + refresh
            self.generation += 1
            self._cond.notify_all()
        if recovered:
            log.info("JWKS %s fetched again: %d key ids", self.uri, len(keys.by_kid))

    def _failed(self, reason: str) -> None:
        with self._cond:
            first = self.error is None
            self.error = reason
            delay = min(RETRY_FIRST * 2**self._failures, self._refresh)
            self._failures = min(self._failures + 1, 30)
            self._next = self._clock() + delay
            self.generation += 1
            self._cond.notify_all()
        if first:  # one WARNING per outage, not one per retry
            kept = (
                "keeping the last good keys" if self.keys is not None else "no keys yet: tokens are refused"
            )
            log.warning("JWKS %s cannot be fetched (%s); %s, retrying", self.uri, reason, kept)

    def start(self) -> None:
        wake = self._wake
        weakref.finalize(self, wake.set)  # ends the thread once nothing uses the URL
        thread = threading.Thread(
            target=_run, args=(weakref.ref(self), wake), daemon=True, name=f"meshlib-jwks {self.uri[:60]}"
        )
        thread.start()


def _run(ref: weakref.ref[JwksSource], wake: threading.Event) -> None:
    while True:
        source = ref()
        if source is None:
            return
        delay = source.due_in()
        if delay <= 0:
            source.fetch_now()
            del source
            continue
        del source  # never hold it while waiting: that would keep it alive
        wake.wait(delay)
        wake.clear()


_sources: weakref.WeakValueDictionary[str, JwksSource] = weakref.WeakValueDictionary()
_lock = threading.Lock()


def source_for(uri: str) -> JwksSource:
    """The process's source for this URL, made (and its first fetch started) on first use."""
    with _lock:
        source = _sources.get(uri)
        if source is None:
            source = _sources[uri] = JwksSource(uri)
            source.start()
        return source
