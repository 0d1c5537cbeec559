"""The inbound request's context, as the server middleware saw it.

Kept in a context variable so that calls the app makes while handling a request inherit it
(its deadline, its trace) without the app passing anything along.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InboundContext:
    """What the mesh knows about the request being handled by this process."""

    service: str  # this process's service (the callee)
    source: str | None  # the calling service, if it said (or its certificate says)
    deadline: float | None = None  # time.monotonic() by which the whole request must finish
    method: str = ""
    path: str = ""

    def remaining(self, now: float | None = None) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - (time.monotonic() if now is None else now)


inbound: ContextVar[InboundContext | None] = ContextVar("meshlib_inbound", default=None)


def current() -> InboundContext | None:
    """The context of the inbound request this code runs for, or None outside one."""
    return inbound.get()
