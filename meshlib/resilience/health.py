"""Per-endpoint health: circuit breakers and outlier detection, fed by each attempt's outcome.

The balancer already skips endpoints whose breaker is open or that are ejected (see
`ResilienceState.exclusion`); this filter admits the attempt (a half-open breaker lets only
its trial requests through) and reports the outcome, classified once for both policies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshlib.errors import CircuitOpenError
from meshlib.pipeline import Call, Response, Stage
from meshlib.resilience.classify import Failure, failure_of, is_failure

if TYPE_CHECKING:
    from meshlib.resilience.state import ResilienceState


class HealthFilter(Stage):
    def __init__(self, state: ResilienceState) -> None:
        self.state = state

    def enter(self, call: Call) -> None:
        dest = call.plan.destination
        if dest is None or dest.circuit_breaker is None:
            return
        assert call.endpoint is not None
        breaker = self.state.breakers.get(call.endpoint.address, dest.circuit_breaker)
        admission = breaker.admit()
        if admission is None:
            raise CircuitOpenError(f"circuit breaker of {call.endpoint.address} ({call.service}) is open")
        call.admission = admission

    def leave(self, call: Call, response: Response | None, error: BaseException | None) -> None:
        dest = call.plan.destination
        if dest is None or (dest.circuit_breaker is None and dest.outlier_detection is None):
            return
        endpoint = call.endpoint
        assert endpoint is not None
        # the breaker that admitted this attempt (a rules change may have replaced it since)
        admission, call.admission = call.admission, None
        breaker = admission.breaker if admission is not None else None
        status = call.wire.status(response) if response is not None else None
        failure = failure_of(error, call.wire.failure_kind(error)) if error is not None else None
        if failure is Failure.MESH or (error is not None and not isinstance(error, Exception)):
            # the mesh declined, or the attempt was cancelled (a hedge that lost): no verdict
            if breaker is not None:
                breaker.release(admission)
            return
        if breaker is not None:
            breaker.record(is_failure(status, failure), admission)
        if dest.outlier_detection is not None:
            detector = self.state.detector(call.service, dest.outlier_detection)
            detector.record(endpoint.address, status, local_failure=failure is not None)
