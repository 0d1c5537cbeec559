"""One table between gRPC status codes and the HTTP statuses the protocol-neutral core reads.

The classifier, breakers, outlier detection and stats judge outcomes by HTTP status; a gRPC
outcome is translated once, here, with the mapping of google.rpc.Code (code.proto's "HTTP
Mapping"), so UNAVAILABLE counts as a 503 and CANCELLED as a client's 499. The other way,
a refusal of the inbound sequence becomes the code that says what it is (403:
PERMISSION_DENIED, 429: RESOURCE_EXHAUSTED), and an HTTP status from elsewhere follows gRPC's
own HTTP-to-gRPC mapping (doc/http-grpc-status-mapping.md).
"""

from __future__ import annotations

import grpc

HTTP_OF_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

_CODE_OF_HTTP: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INTERNAL,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,  # gRPC's table says UNAVAILABLE; a rate limit says what it is
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.UNAVAILABLE,
}

CODE_BY_NAME: dict[str, grpc.StatusCode] = {
    code.name.lower().replace("_", "-"): code for code in grpc.StatusCode
}
"""`unavailable`, `resource-exhausted`, ...: the names `retries.on` takes for gRPC codes."""


def http_status(code: grpc.StatusCode | None) -> int:
    """The HTTP status the core judges a gRPC outcome by (None, no status at all: 500)."""
    return HTTP_OF_CODE.get(code, 500) if code is not None else 500


def code_of(status: int) -> grpc.StatusCode:
    """The gRPC code a mesh answer with this HTTP status goes out as (a refusal, a fault).

    Never OK: an answer the mesh makes up has no response message, so a 2xx (or 3xx) is a
    status outside gRPC's mapping, UNKNOWN, as every other one; OK would hand the caller None."""
    return _CODE_OF_HTTP.get(status, grpc.StatusCode.UNKNOWN)
