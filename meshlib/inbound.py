"""Reading the mesh's headers off an inbound request: shared by the ASGI and WSGI middleware."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING

from meshlib.context import InboundContext

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

log = logging.getLogger("meshlib.server")

SOURCE = "x-mesh-source"
TIMEOUT = "x-mesh-timeout"
MAX_TIMEOUT_MS = 24 * 3600 * 1000


def parse_timeout_ms(value: str | None) -> float | None:
    """The remaining budget in seconds from `x-mesh-timeout` (relative ms); None if absent or bad."""
    if not value:
        return None
    try:
        ms = float(value)
    except ValueError:
        return None
    if ms != ms or ms < 0:  # NaN or negative: ignore rather than fail the request
        return None
    return min(ms, MAX_TIMEOUT_MS) / 1000.0


def context_from(
    service: str, method: str, path: str, source: str | None, timeout: str | None
) -> InboundContext:
    budget = parse_timeout_ms(timeout)
    deadline = time.monotonic() + budget if budget is not None else None
    return InboundContext(service=service, source=source or None, deadline=deadline, method=method, path=path)


def rate_limited(mesh: Mesh) -> int | None:
    """None if this request may proceed; else the whole seconds to put in `retry-after`.

    The limit is this service's own `RateLimit` document: per process (`scope: local`), or one
    bucket in Redis shared by every instance (`scope: global` with `Mesh(redis=...)`).
    """
    doc = mesh.snapshot.rules.rate_limit(mesh.service) if mesh.service else None
    if doc is None:
        return None
    return _verdict(mesh, mesh.resilience.limiter(doc).try_acquire())


async def rate_limited_async(mesh: Mesh) -> int | None:
    """`rate_limited` for an event loop: a bucket that asks Redis does so on a worker thread,
    so a slow or unreachable Redis never stalls the loop's other requests."""
    doc = mesh.snapshot.rules.rate_limit(mesh.service) if mesh.service else None
    if doc is None:
        return None
    limiter = mesh.resilience.limiter(doc)
    if getattr(limiter, "blocking", False):
        wait = await asyncio.to_thread(limiter.try_acquire)
    else:
        wait = limiter.try_acquire()
    return _verdict(mesh, wait)


def _verdict(mesh: Mesh, wait: float) -> int | None:
    if wait <= 0:
        return None
    mesh.stats.count("rate_limited", mesh.service or "")
    return max(1, math.ceil(wait))
