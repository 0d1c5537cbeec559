"""Whether the control service is reachable, logged once per outage rather than once per retry.

A process retries an unreachable control service every fraction of a second; one line per
retry would bury everything else in its log. Each of a link's loops (the watch, the
registration heartbeat) reports through the link's `ControlEndpoints` to one `Outage`, which
it calls only when every replica has failed: the first such failure logs one WARNING, retries
log at DEBUG, and the first success after that logs one INFO saying it is back.
Everything that reports runs on the Mesh's runtime loop, so no lock is needed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

log = logging.getLogger("meshlib.control")


class Outage:
    def __init__(self, urls: str | Sequence[str]) -> None:
        urls = [urls] if isinstance(urls, str) else list(urls)
        self.url = ", ".join(u.rstrip("/") for u in urls)
        # what is down: one URL, or every replica of several
        self.what = (
            f"control service at {self.url}"
            if len(urls) == 1
            else f"every control service replica ({self.url})"
        )
        self.since: float | None = None  # monotonic time of the first failure of this outage
        self.failures = 0  # failed attempts in this outage

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, error: BaseException | str, consequence: str = "") -> None:
        """An attempt to reach the control service failed; `consequence`: what the process
        does meanwhile (said once, in the WARNING)."""
        self.failures += 1
        text = _brief(error)
        if self.since is not None:
            log.debug("%s still unreachable (%s)", self.what, text)
            return
        self.since = time.monotonic()
        log.warning(
            "%s unreachable (%s)%s; retrying in the background, this is logged once until it is back",
            self.what,
            text,
            f"; {consequence}" if consequence else "",
        )

    def ok(self) -> None:
        """An attempt reached the control service."""
        if self.since is None:
            return
        log.info(
            "control service reachable again after %.1fs (%d failed attempts; %s)",
            time.monotonic() - self.since,
            self.failures,
            self.url,
        )
        self.since = None
        self.failures = 0


def _brief(error: BaseException | str) -> str:
    text = error if isinstance(error, str) else (str(error) or type(error).__name__)
    return text if len(text) < 200 else text[:200] + "..."
