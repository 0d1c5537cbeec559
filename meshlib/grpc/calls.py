"""What the sync and asyncio server interceptors share: reading a call into the inbound
sequence's `Request`, and translating its answers back into gRPC terms.

A gRPC call is a POST to its full method name (`/pkg.Service/Method`): that is the path rules
match, and metadata are the headers. The call's own deadline becomes the mesh's inbound
deadline (as `x-mesh-timeout` would: the smaller of both when both are sent), so the calls the
servicer makes, over HTTP or gRPC, inherit it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from opentelemetry.propagators.textmap import Getter

from meshlib.balancing.orca import HEADER as LOAD_HEADER
from meshlib.grpc.codes import code_of, http_status
from meshlib.headers import INBOUND, RETRY_AFTER, TIMEOUT
from meshlib.inbound import MAX_TIMEOUT_MS, Refusal, Request, Rpc, parse_timeout_ms

PUSHBACK = "grpc-retry-pushback-ms"
"""The trailing metadata a server sends with RESOURCE_EXHAUSTED: when a retry may come (gRPC A6)."""
SPIFFE_KEY = "peer_spiffe_id"
"""The auth-context property grpc sets from the URI SAN of a verified peer certificate."""

_WANTED = frozenset(INBOUND)
_NO_DEADLINE_S = MAX_TIMEOUT_MS / 1000.0  # beyond it a deadline is "none" (grpc's infinite one)


class MetadataGetter(Getter[Iterable[tuple[str, Any]]]):
    """Reads invocation metadata (key, value) pairs for `propagate.extract`; binary values
    (`-bin` keys) are never trace context."""

    def get(self, carrier: Iterable[tuple[str, Any]], key: str) -> list[str] | None:
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        return values or None

    def keys(self, carrier: Iterable[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


METADATA = MetadataGetter()


def peer_of(auth: Mapping[str, Iterable[bytes]]) -> tuple[str | None, bool]:
    """(verified peer SPIFFE id, whether the connection is TLS) from a call's auth context.

    grpc names a peer only from a certificate it verified against the server's trust roots;
    nothing in a call's metadata can set it."""
    kinds = auth.get("transport_security_type")
    secure = kinds is not None and any(k in (b"ssl", b"tls") for k in kinds)
    if not secure:
        return None, False
    ids = list(auth.get(SPIFFE_KEY) or ())
    return (ids[0].decode("utf-8", "replace") if len(ids) == 1 else None), True


def inbound_request(path: str, context: Any) -> Request:
    """The neutral view of a call (sync or asyncio `ServicerContext`)."""
    metadata = tuple(context.invocation_metadata() or ())
    headers: dict[str, str] = {}
    for key, value in metadata:
        if key in _WANTED and isinstance(value, str):
            headers[key] = value
    remaining = context.time_remaining()
    if remaining is not None and remaining < _NO_DEADLINE_S:
        sent = parse_timeout_ms(headers.get(TIMEOUT))
        if sent is None or remaining < sent:
            headers[TIMEOUT] = f"{max(remaining, 0.0) * 1000.0:.3f}"
    peer, secure = peer_of(context.auth_context())
    service, _, method = path.lstrip("/").partition("/")
    rpc = Rpc("grpc", service, method)
    return Request(
        "POST", path, "https" if secure else "http", peer, secure, headers, metadata, METADATA, rpc
    )


def refusal_status(refusal: Refusal) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, details, trailing metadata) of a refusal: PERMISSION_DENIED with the reason,
    UNAUTHENTICATED with the reason (an invalid end-user token), RESOURCE_EXHAUSTED with when
    to come back, in gRPC's pushback and in retry-after."""
    trailing: tuple[tuple[str, str], ...] = ()
    retry_after = dict(refusal.headers).get(RETRY_AFTER)
    if retry_after is not None:
        trailing = ((PUSHBACK, str(int(retry_after) * 1000)), (RETRY_AFTER, retry_after))
    return code_of(refusal.status), refusal.reason, trailing


def outcome(
    code: grpc.StatusCode | None, error: BaseException | None, gone: bool, context: Any
) -> grpc.StatusCode:
    """The status the call ended with: what the servicer set or aborted with; else OK, or
    UNKNOWN for an exception (grpc's own answer); when grpc ended the call before the servicer
    did (`gone`), DEADLINE_EXCEEDED once the deadline has passed, CANCELLED otherwise."""
    if code is not None:
        return code
    if gone:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


class WithoutTokens:
    """The servicer's context with the metadata a `forward: false` rule takes off the call: the
    token stays with the mesh, as it is taken off an HTTP request's headers. Everything else
    is the call's own context."""

    __slots__ = ("_context", "_drop")

    def __init__(self, context: Any, drop: tuple[str, ...]) -> None:
        self._context = context
        self._drop = drop

    def invocation_metadata(self) -> tuple[Any, ...]:
        drop = self._drop
        return tuple(item for item in self._context.invocation_metadata() or () if item[0] not in drop)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def servicer_context(request: Request, context: Any) -> Any:
    """What the servicer is handed: the call's context, less a token it is not to see."""
    return WithoutTokens(context, request.drop) if request.drop else context


def report_load(request: Request, context: Any) -> None:
    """ORCA's load report in the trailing metadata, after what the servicer put there (a call
    that ends well only: an abort has sent its status already)."""
    mesh = request.mesh
    if mesh.load_reports:
        trailing = context.trailing_metadata() or ()
        context.set_trailing_metadata((*trailing, (LOAD_HEADER, mesh.load.header())))


def finish(request: Request, code: grpc.StatusCode, error: BaseException | None) -> None:
    """Count, trace and log the call by the HTTP status its code maps to."""
    rpc = request.rpc
    if rpc is not None:
        rpc.code = code.value[0]
    # an abort or a status the servicer chose is an answer, not a failure of the servicer
    request.finish(http_status(code), error if code is grpc.StatusCode.UNKNOWN else None)
