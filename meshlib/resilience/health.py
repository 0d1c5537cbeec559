"""Per-endpoint health: circuit breakers and outlier detection, fed by each attempt's outcome.

A service whose Destination sets no `outlier_detection` still gets failure accrual on
connection failures (Finagle and Linkerd have it on by default): an endpoint that refuses
connections five times in a row is ejected like an outlier, so a crashed instance stops
costing every caller a retry.

The balancer already skips endpoints whose breaker is open or that are ejected (see
`ResilienceState.exclusion`); this filter admits the attempt (a half-open breaker lets only
its trial requests through) and reports the outcome, classified once for both policies.
An endpoint picked although it is out (panic mode, or the pool's ejection budget is spent:
`call.forced`) is admitted through its open breaker with `force` (a success closes it, a
failure changes nothing); when it answers, as when a breaker's probe succeeds, its ejection
ends too: the endpoint is back. A streamed answer is judged when it ends, by the status it
ended with (a failure mid-stream counts); the breaker's admission is held until then.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from meshlib.errors import CircuitOpenError
from meshlib.pipeline import Call, Response, Stage
from meshlib.resilience.classify import Failure, failure_of, is_failure
from meshlib.resilience.deadline import cut_by_callers_deadline

if TYPE_CHECKING:
    from meshlib.resilience.breaker import Admission
    from meshlib.resilience.state import ResilienceState


_TIMED_OUT = (Failure.TIMEOUT, Failure.CONNECT)
"""Attempt failures a deadline may have caused (a connect timeout is `CONNECT`)."""


class HealthFilter(Stage):
    """Admits each attempt through its endpoint's breaker and reports the outcome to the breaker
    and the outlier detector."""

    role = "health"
    enter_needs = "breaker"  # admission is the breaker's; without one only `leave` has work (accrual)

    def __init__(self, state: ResilienceState) -> None:
        self.state = state

    def enter(self, call: Call) -> Admission | None:
        dest = call.plan.destination
        if dest is None or dest.circuit_breaker is None:
            return None
        assert call.endpoint is not None
        breaker = self.state.breakers.get(call.endpoint.address, dest.circuit_breaker)
        admission = breaker.admit()
        if admission is None and call.forced:
            admission = breaker.admit(force=True)
        if admission is None:
            raise CircuitOpenError(f"circuit breaker of {call.endpoint.address} ({call.service}) is open")
        return admission

    def leave(
        self, call: Call, admission: Admission | None, response: Response | None, error: BaseException | None
    ) -> None:
        dest = call.plan.destination
        # accrual has nothing to do for an answer while no service has had a connection failure
        accrue = error is not None or self.state.accruals
        if dest is None:  # failure accrual only: it judges connection failures, never a status
            if accrue:
                self._accrue(call, admission, error)
            return
        if response is not None and call.wire.open(response):  # a stream is judged by how it ends
            call.wire.on_end(response, partial(self.leave, call, admission, response))
            return
        if dest.outlier_detection is None:
            if accrue:
                self._accrue(call, admission, error)
            if dest.circuit_breaker is None:
                return
        endpoint = call.endpoint
        assert endpoint is not None
        # the breaker that admitted this attempt (a rules change may have replaced it since)
        breaker = admission.breaker if admission is not None else None
        status = call.wire.status(response) if response is not None else None
        failure = failure_of(error, call.wire.failure_kind(error)) if error is not None else None
        if (
            failure is Failure.MESH
            or (error is not None and not isinstance(error, Exception))
            or (failure in _TIMED_OUT and cut_by_callers_deadline(call))
        ):
            # the mesh declined, the attempt was cancelled (a hedge that lost), or the caller's
            # own deadline ended it: no verdict
            if breaker is not None:
                breaker.release(admission)
            return
        failed = is_failure(status, failure)
        if not failed and response is not None:
            # a good status whose body is still to come is judged when the body ends: cut short
            # (a reset mid-body) it is a failure of the endpoint, whole it is a success
            verdict = _Verdict(call, admission, status)
            if call.wire.on_failure(response, verdict.cut_short):
                call.wire.on_close(response, partial(self._judge, verdict))
                return
        self._record(call, admission, status, failure, failed)

    def _judge(self, verdict: _Verdict) -> None:
        """The body of a good answer is finished with: whole, cut short, or cut by the deadline."""
        if verdict.failure is Failure.MESH:  # the caller's deadline ran out: no verdict
            admission = verdict.admission
            if admission is not None:
                admission.breaker.release(admission)
            return
        failed = verdict.failure is not None
        self._record(verdict.call, verdict.admission, verdict.status, verdict.failure, failed)

    def _record(
        self,
        call: Call,
        admission: Admission | None,
        status: int | None,
        failure: Failure | None,
        failed: bool,
    ) -> None:
        dest = call.plan.destination
        endpoint = call.endpoint
        assert dest is not None and endpoint is not None
        breaker = admission.breaker if admission is not None else None
        if breaker is not None:
            breaker.record(failed, admission)
        if dest.outlier_detection is not None:
            detector = self.state.detector(call.service, dest.outlier_detection)
            probe = call.forced or (admission is not None and admission.trial)
            if probe and failure is None and status is not None and status < 500:
                detector.reinstate(endpoint.address)
            failed_status = status if failure is None else None
            detector.record(endpoint.address, failed_status, local_failure=failure is not None)

    def _accrue(self, call: Call, admission: Admission | None, error: BaseException | None) -> None:
        """Default failure accrual: consecutive connection failures take an endpoint out."""
        state = self.state
        if error is None:
            if state.accruals:  # a truth test while no service has had a connection failure
                detector = state.accrual(call.plan)
                if detector is not None:
                    assert call.endpoint is not None
                    if call.forced or (admission is not None and admission.trial):
                        detector.reinstate(call.endpoint.address)  # it answered: it is back
                    detector.record(call.endpoint.address, 200)
            return
        if not isinstance(error, Exception) or call.wire.failure_kind(error) is not Failure.CONNECT:
            return
        if cut_by_callers_deadline(call):  # a connect the caller's deadline cut short: no verdict
            return
        detector = state.accrual(call.plan, create=True)
        assert detector is not None and call.endpoint is not None
        detector.record(call.endpoint.address, None, local_failure=True)


class _Verdict:
    """A good answer whose body is still to come, until the body ends (`failure` set if it was
    cut short)."""

    __slots__ = ("admission", "call", "failure", "status")

    def __init__(self, call: Call, admission: Admission | None, status: int | None) -> None:
        self.call = call
        self.admission = admission
        self.status = status
        self.failure: Failure | None = None

    def cut_short(self, error: BaseException) -> None:
        self.failure = failure_of(error, self.call.wire.failure_kind(error))
