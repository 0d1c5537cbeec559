"""Exceptions the mesh raises on the client side.

They subclass `httpx.TransportError`, so code that already handles httpx failures
(`except httpx.HTTPError`, `except httpx.TransportError`) handles mesh failures too.
"""

from __future__ import annotations

import httpx


class MeshError(httpx.TransportError):
    """Base of every error the mesh itself raises (as opposed to one from the peer)."""


class NoEndpointsError(MeshError):
    """The service (or the chosen subset) has no endpoint that may take the request."""


class DeadlineExceeded(MeshError):
    """The request's deadline passed before it could be sent or completed."""


class CircuitOpenError(NoEndpointsError):
    """Every endpoint that could take the request has its circuit breaker open."""


class BulkheadFullError(MeshError):
    """The destination already has `max_concurrent_requests` in flight from this process."""


class ConcurrencyLimitedError(BulkheadFullError):
    """The destination already has as many requests in flight from this process as its
    `adaptive_concurrency` limit allows now (a bulkhead whose size is learnt from latency)."""


class FaultAbortError(MeshError):
    """Raised only for injected aborts of protocols that have no status code to return."""


class OutboundBlocked(MeshError):
    """The outbound policy is `registry_only` and the host is neither a mesh service nor a
    declared External (Istio's REGISTRY_ONLY); no connection was attempted."""


class OriginationError(MeshError):
    """TLS origination to an External host cannot be set up (its `ca` is unreadable or holds no
    certificate): the call fails closed, before any connection."""


class RateLimitedError(MeshError):
    """A RateLimit document of an External host refused the call in this process: its tokens
    are spent. `retry_after` is the seconds until one is free; nothing was sent."""

    def __init__(self, message: str, *, retry_after: float, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)
        self.retry_after = retry_after
