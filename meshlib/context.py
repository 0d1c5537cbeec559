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

_new = object.__new__
_set_service, _set_source, _set_deadline, _set_method, _set_path = (
    InboundContext.__dict__[name].__set__ for name in ("service", "source", "deadline", "method", "path")
)


def inbound_context(
    service: str, source: str | None, deadline: float | None, method: str, path: str
) -> InboundContext:
    """`InboundContext(service, source, deadline, method, path)`, made as the server middleware
    makes one per request: each field through its slot, where the frozen dataclass's `__init__`
    goes through `object.__setattr__` (half the cost)."""
    made = _new(InboundContext)
    _set_service(made, service)
    _set_source(made, source)
    _set_deadline(made, deadline)
    _set_method(made, method)
    _set_path(made, path)
    return made


def current() -> InboundContext | None:
    """The context of the inbound request this code runs for, or None outside one."""
    return inbound.get()
