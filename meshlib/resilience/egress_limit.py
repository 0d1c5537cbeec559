"""Rate limits on calls to External hosts, in the calling process.

A RateLimit document names the service that receives the requests and is enforced by that
service's own inbound sequence. An External host runs no meshlib: its callers are the only
place a limit can hold, so a RateLimit document whose service is an External is enforced by
the client stack of every process calling it (a provider's quota, kept per process). A refused
call fails fast with `RateLimitedError` before it takes a bulkhead slot or an endpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshlib.errors import RateLimitedError
from meshlib.pipeline import Call, Stage

if TYPE_CHECKING:
    from meshlib.resilience.state import ResilienceState
    from meshlib.rules import RateLimitDoc


class EgressLimitFilter(Stage):
    """Takes a token from the External's bucket for each request, or refuses the request."""

    role = "egress-limit"
    needs = "rate_limit"  # an External's RateLimit, on each of its routes

    def __init__(self, state: ResilienceState) -> None:
        self.state = state

    def enter(self, call: Call) -> None:
        doc: RateLimitDoc | None = call.route.rate_limit if call.route is not None else None
        if doc is None:
            return
        wait = self.state.limiter(doc).try_acquire()
        if wait > 0:
            self.state.stats.count("egress_rate_limited", call.service)
            raise RateLimitedError(
                f"{call.service}: RateLimit of {doc.requests_per_second:g} requests/s (burst {doc.burst}) "
                f"spent in this process; a token is free in {wait:.3f}s",
                retry_after=wait,
            )
