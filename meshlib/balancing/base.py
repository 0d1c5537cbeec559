"""The balancer extension point.

A balancer is built for one set of endpoints (a subset of one Snapshot) and picks one per
attempt. It is synchronous and IO-free; the load it reads (`Endpoint.load`) is kept up to date
by the pipeline, so every balancer sees the same figures.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Protocol, runtime_checkable

from meshlib.endpoint import Endpoint

NOTHING: Container[str] = frozenset()


@runtime_checkable
class Balancer(Protocol):
    """Chooses an endpoint for one attempt.

    `key` is the request's hash key (ring_hash only; others ignore it). `exclude` holds the
    addresses not to pick: endpoints already tried by this request, open breakers, ejected
    outliers. Returns None when every endpoint is excluded or there are none.
    """

    endpoints: Sequence[Endpoint]

    def pick(self, key: str | None = None, exclude: Container[str] = NOTHING) -> Endpoint | None: ...
