"""The one response classifier (Finagle's ResponseClassifier): what counts as a failure.

Retries, circuit breakers, outlier detection and metrics all ask here, so a 503 or a reset
means the same thing to each of them. Protocol exceptions are first reduced to a `Failure`
kind by the call's `Wire`; everything below works on that kind and on status codes.
"""

from __future__ import annotations

import enum
import ssl
from collections.abc import Collection

from meshlib.errors import MeshError


class Failure(enum.Enum):
    """Why an attempt got no response."""

    CONNECT = "connect-failure"  # never reached the peer: the request was not sent
    RESET = "reset"  # the connection broke after the request may have been sent
    TIMEOUT = "timeout"  # the per-try timeout or the deadline cut the attempt short
    REFUSED = "refused"  # the peer refused us (e.g. a TLS handshake rejected): not transient
    MESH = "mesh"  # the mesh itself declined (no endpoint, open breaker, deadline passed)
    OTHER = "other"


GATEWAY_ERRORS = frozenset({502, 503, 504})
RPC_CONDITIONS = frozenset(
    {"unavailable", "resource-exhausted", "deadline-exceeded", "internal", "cancelled"}
)
"""The `retries.on` names of gRPC status codes: a wire's `condition` names a response's code."""
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def is_failure(status: int | None, failure: Failure | None) -> bool:
    """Does this outcome count against the endpoint (breakers, outliers, success rate)?"""
    if failure is not None:
        return failure is not Failure.MESH
    return status is not None and status >= 500


def failure_of(exc: BaseException, protocol_kind: Failure | None) -> Failure:
    if isinstance(exc, MeshError):
        return Failure.MESH
    return protocol_kind or Failure.OTHER


_TRANSIENT_TLS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError, ssl.SSLWantReadError)


def refused_by_tls(error: BaseException) -> bool:
    """Did a TLS handshake fail on a certificate (ours refused by the peer, or the peer's by
    us: wrong CA, expired, wrong SPIFFE id)? Retrying does not heal that; an EOF does not say.

    httpcore keeps the `ssl.SSLError` as the first argument of the error it raises, and httpx
    chains that one as `__cause__`: both links are followed."""
    seen: list[BaseException] = []
    stack = [error]
    while stack and len(seen) < 8:
        exc = stack.pop()
        if any(exc is s for s in seen):
            continue
        seen.append(exc)
        if isinstance(exc, ssl.SSLError):
            return not isinstance(exc, _TRANSIENT_TLS)
        stack.extend(e for e in (exc.__cause__, *exc.args[:1]) if isinstance(e, BaseException))
    return False


def retryable_status(status: int, on: Collection[str], codes: Collection[int]) -> bool:
    """Does the route's `retries.on` list ask for a retry of this status?"""
    if status >= 500 and "5xx" in on:
        return True
    if status in GATEWAY_ERRORS and "gateway-error" in on:
        return True
    if status == 429 and "429" in on:
        return True
    return status in codes and "retriable-status-codes" in on


def retryable_failure(failure: Failure, on: Collection[str]) -> bool:
    """Does the route's `retries.on` list ask for a retry of this failure (no response)?"""
    if failure is Failure.CONNECT:
        return "connect-failure" in on or "5xx" in on or "gateway-error" in on
    if failure is Failure.RESET:
        return "reset" in on or "5xx" in on or "gateway-error" in on
    if failure is Failure.TIMEOUT:  # a per-try timeout (one that hit the deadline is not retried)
        return "5xx" in on or "gateway-error" in on or "deadline-exceeded" in on
    return False
