"""The control service's replicas as a client sees them: their URLs, the one in use, and moving on.

Every loop of a Mesh's link (the watch, acks, registration heartbeats, telemetry) and its
enrollment talks to the replica in use, `current`. A loop whose request to it fails calls
`failed(url)`: the first loop to report a replica moves everyone to the next one (after the
first URL, each process tries the others in an order of its own: the clients of a replica that
dies spread over the rest), and the watch, told by `on_move`, leaves its stream there too; a
report about a replica no longer in use changes nothing, so two loops meeting one dead replica
move once. Moving on is logged at INFO; only when every replica has failed since the last
success is it an outage (one WARNING, `Outage`), and the pause before the next attempt grows
with each full round of failures. Everything that reports runs on the Mesh's runtime loop: no
lock.

The first URL is the process's preferred replica. A process that moved off it goes back once
it has answered health checks without a break for a while (`RETURN_AFTER`, drawn per move so a
fleet does not return at once): otherwise a rolling restart would leave every client on the
replica restarted first (docs/decisions.md, "Clients return to their preferred replica"). The
watch (meshlib.control.subscriber) runs the checks and moves; the other loops follow `current`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from meshlib.control.outage import Outage, _brief

log = logging.getLogger("meshlib.control")

BACKOFF = (0.1, 5.0)
"""Seconds: the pause after a failure within the first round, and the longest pause."""

RETURN_AFTER = (30.0, 60.0)
"""Seconds (a range: each move draws its own) the preferred replica must stay healthy before a
process that left it goes back; None: never go back."""

PROBE_EVERY = 10.0
"""Seconds between health checks of the preferred replica while away from it (jittered: 5 to 10 s;
a thousand clients waiting to return to a replica send it 100 to 200 checks a second)."""


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

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        backoff: tuple[float, float] = BACKOFF,
        return_after: tuple[float, float] | None = RETURN_AFTER,
        spread: bool = True,
    ) -> None:
        self.urls = parse_control_urls(urls)
        # The order replicas are tried in: the preferred (first) one, then the others, in an
        # order of this process's own with `spread` (the clients of a replica that dies then
        # spread over the others instead of all landing on the one listed next).
        rest = list(range(1, len(self.urls)))
        if spread:
            random.shuffle(rest)
        self._order = (0, *rest)
        self._position = 0  # in _order
        self._backoff = backoff
        self.return_after = return_after
        """Seconds (low, high) the preferred replica must be healthy before going back; None: never."""
        self.failures = 0  # failed attempts since the last success, counted on the replica in use
        self._failed: set[str] = set()  # replicas that failed since the last success
        self.switches = 0  # times this process moved to another replica
        self._listeners: list[Callable[[], None]] = []  # told of every move (on the runtime loop)
        self.outage = Outage(self.urls)  # one WARNING when every replica has failed

    def __repr__(self) -> str:
        return f"ControlEndpoints({', '.join(self.urls)}; using {self.current})"

    @property
    def current(self) -> str:
        """The URL in use."""
        return self.urls[self._order[self._position]]

    @property
    def order(self) -> tuple[str, ...]:
        """The URLs in the order this process tries them: the preferred one first."""
        return tuple(self.urls[i] for i in self._order)

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

    @property
    def preferred(self) -> str:
        """The first URL: the replica this process uses whenever it is healthy."""
        return self.urls[0]

    @property
    def away(self) -> bool:
        """Using another replica than the preferred one, and meant to go back to it."""
        return self._position != 0 and self.return_after is not None

    def settle(self) -> float:
        """How long (seconds) the preferred replica must be healthy before going back: drawn
        anew each time, so the processes that left one replica together return spread out."""
        assert self.return_after is not None
        low, high = self.return_after
        return random.uniform(low, high)

    def go_back(self, healthy_for: float) -> bool:
        """Use the preferred replica again (its health checks passed for `healthy_for` s);
        False if this process is not away from it (another loop moved meanwhile)."""
        if not self.away:
            return False
        left = self.current
        self._position = 0
        self.switches += 1
        self._moved()
        log.info(
            "control service at %s healthy for %.0fs; moving back to it from %s",
            self.preferred,
            healthy_for,
            left,
        )
        return True

    def on_move(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` after every move to another replica (whichever loop made it); returns
        the function that stops it. The watch uses it to leave a stream on a replica the other
        loops found dead: a machine that is gone ends no stream, it only goes silent."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _moved(self) -> None:
        for listener in list(self._listeners):
            listener()

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
            self._position = (self._position + 1) % len(self.urls)
            self.switches += 1
            self._moved()
