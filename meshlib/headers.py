"""The mesh's wire headers, named once (lower case, as HTTP/2 and ASGI carry them).

docs/configuration.md ("Wire headers") says what each means; tests/test_settings.py checks that
every name here is documented there.
"""

SOURCE = "x-mesh-source"
TIMEOUT = "x-mesh-timeout"
ATTEMPT = "x-mesh-attempt"
MIRROR = "x-mesh-mirror"
FAULT = "x-mesh-fault"
ERROR = "x-mesh-error"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
RETRY_AFTER = "retry-after"
LOAD_REPORT = "endpoint-load-metrics"  # ORCA's, not the mesh's own: gRPC's servers send it too
BAGGAGE = "baggage"  # W3C baggage: not the mesh's own, read by the propagator
RULES_VERSION = "x-mesh-rules-version"  # the control service's watch: the rules a client holds

ALL = (
    SOURCE, TIMEOUT, ATTEMPT, MIRROR, FAULT, ERROR, TRACEPARENT, TRACESTATE, RETRY_AFTER, LOAD_REPORT,
    RULES_VERSION,
)  # fmt: skip
INBOUND = (SOURCE, TIMEOUT, ATTEMPT, MIRROR, TRACEPARENT, TRACESTATE, BAGGAGE)
"""The ones the server side reads off a request (`baggage`: whether there is any to extract)."""
