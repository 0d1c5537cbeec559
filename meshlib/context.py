"""The inbound request's context, as the server middleware saw it.

Kept in a context variable so that calls the app makes while handling a request inherit it
(its deadline, its trace) without the app passing anything along.
"""

from __future__ import annotations

import time
from collections import _tuplegetter  # type: ignore[attr-defined]  # namedtuple's field reader
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import Any

_tuple_new = tuple.__new__
_tuple_eq = tuple.__eq__


@dataclass(frozen=True, init=False)
class InboundContext(tuple):
    """What the mesh knows about the request being handled by this process.

    A frozen dataclass whose values are kept as a tuple, as a NamedTuple's are: the server
    middleware makes one per request, and a tuple is made in one call where five slots take
    five (docs/decisions.md). Equal only to an `InboundContext` with the same fields, as the
    dataclass is."""

    __slots__ = ()

    service: str  # this process's service (the callee)
    source: str | None  # the calling service, if it said (or its certificate says)
    deadline: float | None = None  # time.monotonic() by which the whole request must finish
    method: str = ""
    path: str = ""

    def __new__(
        cls, service: str, source: str | None, deadline: float | None = None, method: str = "", path: str = ""
    ) -> InboundContext:
        return _tuple_new(cls, (service, source, deadline, method, path))

    def __getnewargs__(self) -> tuple[Any, ...]:  # copy and pickle: `__new__`'s arguments
        return tuple(self)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return _tuple_eq(self, other)
        return False if isinstance(other, tuple) else NotImplemented  # no tuple's reflected ==

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = tuple.__hash__  # the dataclass's: the hash of the fields' tuple

    def remaining(self, now: float | None = None) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - (time.monotonic() if now is None else now)


for _index, _field in enumerate(fields(InboundContext)):  # each field reads its item of the tuple
    setattr(InboundContext, _field.name, _tuplegetter(_index, None))
del _index, _field

inbound: ContextVar[InboundContext | None] = ContextVar("meshlib_inbound", default=None)


def inbound_context(
    service: str, source: str | None, deadline: float | None, method: str, path: str
) -> InboundContext:
    """`InboundContext(service, source, deadline, method, path)`, made as the server middleware
    makes one per request: the tuple directly, without a call to `__new__`."""
    return _tuple_new(InboundContext, (service, source, deadline, method, path))


def current() -> InboundContext | None:
    """The context of the inbound request this code runs for, or None outside one."""
    return inbound.get()
