"""GrpcWire: a gRPC status read as the HTTP status the core judges by, and the retry names."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest

from meshlib.grpc.codes import HTTP_OF_CODE
from meshlib.grpc.wire import (
    STREAM_STREAM,
    UNARY_STREAM,
    UNARY_UNARY,
    AttemptTimeout,
    GrpcOutcome,
    GrpcRequest,
    GrpcWire,
)
from meshlib.headers import FAULT
from meshlib.pipeline import Abandoned, Call
from meshlib.resilience.classify import Failure, is_failure
from meshlib.resilience.retry import PUSHBACK, RetryPolicy
from meshlib.rules import RetrySpec


def wire() -> GrpcWire:
    return GrpcWire(lambda service: pytest.fail("no mirror here"))


def call_of(kind: str = UNARY_UNARY, payload: object = b"abc") -> Call:
    request = GrpcRequest(kind, "/pkg.Svc/Do", payload, {"x-a": "1"})
    return Call(
        plan=SimpleNamespace(name="svc"),  # type: ignore[arg-type]
        wire=wire(),
        request=request,
        method="POST",
        path="/pkg.Svc/Do",
        headers=request.headers,
        source=None,
    )


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_every_code_is_judged_by_its_http_status(code: grpc.StatusCode) -> None:
    status = wire().status(GrpcOutcome(code))
    assert status == HTTP_OF_CODE[code]
    # what a breaker and the outlier detector count: UNAVAILABLE as a 503, NOT_FOUND is no failure
    assert is_failure(status, None) == (status >= 500)


def test_the_retry_names_of_codes() -> None:
    w = wire()
    assert w.condition(GrpcOutcome(grpc.StatusCode.UNAVAILABLE)) == "unavailable"
    assert w.condition(GrpcOutcome(grpc.StatusCode.RESOURCE_EXHAUSTED)) == "resource-exhausted"
    assert w.condition(GrpcOutcome(grpc.StatusCode.DEADLINE_EXCEEDED)) == "deadline-exceeded"


def test_retry_conditions_name_codes_and_keep_their_http_meaning() -> None:
    call = call_of()
    internal = RetryPolicy(RetrySpec(on=("internal",)))
    assert internal.should_retry(call, GrpcOutcome(grpc.StatusCode.INTERNAL), None)
    assert not internal.should_retry(call, GrpcOutcome(grpc.StatusCode.UNKNOWN), None)  # also a 500
    gateway = RetryPolicy(RetrySpec(on=("gateway-error",)))
    assert gateway.should_retry(call, GrpcOutcome(grpc.StatusCode.UNAVAILABLE), None)
    assert not gateway.should_retry(call, GrpcOutcome(grpc.StatusCode.INTERNAL), None)
    streamed = call_of(STREAM_STREAM, iter(()))
    unavailable = RetryPolicy(RetrySpec(on=("unavailable",)))
    assert not unavailable.should_retry(streamed, GrpcOutcome(grpc.StatusCode.UNAVAILABLE), None)
    per_try = RetryPolicy(RetrySpec(on=("deadline-exceeded",)))
    assert per_try.should_retry(call, None, AttemptTimeout(RuntimeError("late")))


def test_unary_requests_are_replayable_and_only_unary_unary_is_hedged() -> None:
    w = wire()
    assert w.body_size(call_of().request) == 3
    assert w.body_size(call_of(STREAM_STREAM, iter(())).request) is None
    assert w.idempotent(call_of(UNARY_STREAM)) and not w.idempotent(call_of(UNARY_STREAM), concurrent=True)
    assert w.idempotent(call_of(), concurrent=True)
    copy = w.copy_request(call_of().request)
    copy.headers["traceparent"] = "x"
    assert "traceparent" not in call_of().request.headers


def test_an_injected_abort_is_a_grpc_status_and_pushback_is_read_from_trailers() -> None:
    w = wire()
    outcome = w.synthesize(call_of(), 503, "fault injected")
    assert outcome.code is grpc.StatusCode.UNAVAILABLE and w.header(outcome, FAULT) == "abort"
    assert w.synthesize(call_of(), 429, "x").code is grpc.StatusCode.RESOURCE_EXHAUSTED
    pushed = GrpcOutcome(grpc.StatusCode.UNAVAILABLE, trailing=((PUSHBACK, "250"), ("bin-bin", b"\0")))
    assert w.header(pushed, PUSHBACK) == "250"
    assert w.failure_kind(AttemptTimeout(RuntimeError())) is Failure.TIMEOUT
    assert w.failure_kind(RuntimeError()) is None


def test_an_abort_outside_grpcs_mapping_is_unknown_never_ok() -> None:
    """docs/grpc.md: statuses outside gRPC's HTTP mapping go out UNKNOWN; a 2xx as OK would
    hand the caller a None answer."""
    w = wire()
    for status in (200, 204, 299, 301, 302, 308, 418, 500):
        outcome = w.synthesize(call_of(), status, "fault injected")
        assert outcome.code is grpc.StatusCode.UNKNOWN, status
        assert (
            outcome.details == f"fault injected: fault.abort of route '?' of service 'svc', status {status}"
        )
    assert w.synthesize(call_of(), 404, "fault injected").code is grpc.StatusCode.UNIMPLEMENTED


def test_a_streams_close_callbacks_wait_for_its_end() -> None:
    w = wire()
    done: list[str] = []
    stream = GrpcOutcome(grpc.StatusCode.OK, done=False)
    w.on_close(stream, lambda: done.append("load"))
    assert done == []
    w.close(stream)
    assert done == ["load"]
    w.on_close(GrpcOutcome(grpc.StatusCode.OK), lambda: done.append("unary"))
    assert done == ["load", "unary"]


def test_a_stream_ends_once_with_its_status_and_runs_its_callbacks_in_order() -> None:
    w = wire()
    outcome = GrpcOutcome(grpc.StatusCode.OK, done=False)
    seen: list[object] = []
    assert w.open(outcome)
    w.on_end(outcome, lambda error: seen.append(("health", w.status(outcome), error)))
    w.on_close(outcome, lambda: seen.append("load"))
    w.on_end(outcome, lambda error: seen.append(("stats", w.status(outcome), error)))
    assert seen == []
    assert outcome.end(grpc.StatusCode.UNAVAILABLE, "gone")
    assert not outcome.end(grpc.StatusCode.OK)  # the first end wins
    assert seen == [("health", 503, None), "load", ("stats", 503, None)]
    assert not w.open(outcome)
    w.on_end(outcome, lambda error: seen.append(("late", w.status(outcome), error)))
    assert seen[-1] == ("late", 503, None)  # registered after the end: run at once


def test_an_abandoned_stream_ends_cancelled_and_says_so() -> None:
    w = wire()
    cancelled = []
    rpc = SimpleNamespace(cancel=lambda: cancelled.append(True) or True)
    outcome = GrpcOutcome(grpc.StatusCode.OK, rpc=rpc, done=False)
    errors: list[BaseException | None] = []
    w.on_end(outcome, errors.append)
    w.close(outcome)  # discarded (or given up by the caller): cancelled
    assert cancelled == [True] and outcome.code is grpc.StatusCode.CANCELLED and outcome.abandoned
    assert len(errors) == 1 and isinstance(errors[0], Abandoned)
    assert not isinstance(errors[0], Exception)  # a cancellation: no verdict on the endpoint


def test_a_stream_grpc_ended_first_keeps_its_own_status_when_abandoned() -> None:
    rpc = SimpleNamespace(
        cancel=lambda: False,
        code=lambda: grpc.StatusCode.INTERNAL,
        details=lambda: "x",
        trailing_metadata=lambda: (),
    )
    outcome = GrpcOutcome(grpc.StatusCode.OK, rpc=rpc, done=False)
    outcome.abandon()
    assert outcome.code is grpc.StatusCode.INTERNAL and not outcome.abandoned
    server_cancelled = GrpcOutcome(grpc.StatusCode.OK, done=False)
    server_cancelled.end(grpc.StatusCode.CANCELLED)  # a CANCELLED the peer sent: no abandonment
    assert not server_cancelled.abandoned
