"""The control service's replicas as a client sees them: their URLs, the one in use, and moving on.

Every loop of a Mesh's link (the watch, acks, registration heartbeats, telemetry) and its
enrollment talks to the replica in use, `current`. A loop whose request to it fails calls
`failed(url)`: the first loop to report a replica moves everyone to the next one; a report about
a replica no longer in use changes nothing, so two loops meeting one dead replica move once.
Moving on is logged at INFO; only when every replica has failed since the last success is it
an outage (one WARNING, `Outage`), and the pause before the next attempt grows with each full
round of failures. Everything that reports runs on the Mesh's runtime loop: no lock.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from urllib.parse import urlsplit

from meshlib.control.outage import Outage, _brief

log = logging.getLogger("meshlib.control")

BACKOFF = (0.1, 5.0)
"""Seconds: the pause after a failure within the first round, and the longest pause."""


def parse_control_urls(value: str | Sequence[str]) -> tuple[str, ...]:
    """The URLs of `value` (a comma-separated string, or a sequence of URLs), each an http(s)
    URL with a host, all of one scheme, none twice, without trailing slashes; ValueError
    (that never shows a URL, which may carry credentials) otherwise."""
    parts = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    urls = tuple(p.strip().rstrip("/") for p in parts if p.strip())
    if not urls:
        raise ValueError("no URL given")
    schemes = set()
    for i, url in enumerate(urls, 1):
        try:
            split = urlsplit(url)
            host = split.hostname
            split.port  # noqa: B018 (raises ValueError for a port that is not a number)
        except ValueError:
            raise ValueError(f"URL {i} is not a URL") from None
        if split.scheme not in ("http", "https") or not host:
            raise ValueError(f"URL {i} is not an http:// or https:// URL with a host")
        if split.query or split.fragment:
            raise ValueError(f"URL {i} has a query or fragment")
        schemes.add(split.scheme)
    if len(schemes) > 1:
        raise ValueError("the URLs mix http and https (every replica is reached the same way)")
    if len(set(urls)) != len(urls):
        raise ValueError("a URL is listed twice")
    return urls


class ControlEndpoints:
    """The replicas of one control service, and which one this process uses now."""

    def __init__(self, urls: str | Sequence[str], *, backoff: tuple[float, float] = BACKOFF) -> None:
        self.urls = parse_control_urls(urls)
        self._index = 0
        self._backoff = backoff
        self.failures = 0  # failed attempts since the last success, counted on the replica in use
        self._failed: set[str] = set()  # replicas that failed since the last success
        self.switches = 0  # times this process moved to another replica
        self.outage = Outage(self.urls)  # one WARNING when every replica has failed

    def __repr__(self) -> str:
        return f"ControlEndpoints({', '.join(self.urls)}; using {self.current})"

    @property
    def current(self) -> str:
        """The URL in use."""
        return self.urls[self._index]

    def __str__(self) -> str:
        return ",".join(self.urls)

    def failed(
        self, url: str, error: BaseException | str, consequence: str = "", *, warn: bool = True
    ) -> None:
        """A request to `url` failed: unreachable, timed out, or a 5xx. The first report about
        the replica in use moves to the next one; when every replica has failed since the last
        success, the outage is logged (once, unless `warn` is False: telemetry stays quiet)."""
        url = url.rstrip("/")
        if url != self.current:  # another loop moved on already
            log.debug("control service at %s failed (%s); already using %s", url, _brief(error), self.current)
            return
        self.failures += 1
        self._failed.add(url)
        if len(self._failed) >= len(self.urls):
            if warn:  # else the caller logs it (at DEBUG)
                self.outage.failed(error, consequence)
            self._rotate()  # keep trying each in turn
            return
        self._rotate()
        log.info("control service at %s unreachable (%s); switching to %s", url, _brief(error), self.current)

    def leave(self, url: str, reason: BaseException | str) -> None:
        """Move off `url` (if it is in use and there is another) without calling it a failure:
        a watch stream that broke off. The replica is tried again in its turn."""
        url = url.rstrip("/")
        if url != self.current or len(self.urls) == 1:
            return
        self._rotate()
        log.info("left control service at %s (%s); switching to %s", url, _brief(reason), self.current)

    def ok(self, url: str) -> None:
        """A request to `url` got an answer: the control service is reachable."""
        self.failures = 0
        self._failed.clear()
        self.outage.ok()

    def pause(self, high: float | None = None) -> float:
        """Seconds to wait before the next attempt after a failure: short while replicas not
        yet tried remain, doubling with each full round of failures (jittered), at most `high`."""
        low, cap = self._backoff
        if high is not None:
            cap = min(cap, high)
        rounds = 1 + max(0, self.failures - 1) // len(self.urls)
        return random.uniform(min(low, cap), min(cap, low * 2 ** min(rounds, 10)))

    def _rotate(self) -> None:
        if len(self.urls) > 1:
            self._index = (self._index + 1) % len(self.urls)
            self.switches += 1
