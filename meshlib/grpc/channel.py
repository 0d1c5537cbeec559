"""`MeshChannel`: a `grpc.Channel` whose RPCs run the mesh's client stack (the sync shell).

Generated stubs take it unchanged. Each RPC becomes a `Call` (meshlib.grpc.rpc.start) run
through `mesh.stack`; the stack's terminal sends it on the picked endpoint's channel from the
pool. Everything the mesh decides (route, subset, pick, retries, hedges, breakers) is the
stack's; this module only sends, and hands grpc's own shapes back to the caller.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from meshlib.grpc.egress import origin_security, pool_key
from meshlib.grpc.rpc import RpcResult, attempt_metadata, committed, failed, refusal, start, stream_timeout
from meshlib.grpc.wire import (
    LOCALLY_CANCELLED,
    STREAM_STREAM,
    STREAM_UNARY,
    UNARY_STREAM,
    UNARY_UNARY,
    Cancellation,
    GrpcOutcome,
    GrpcRequest,
    Metadata,
)
from meshlib.pipeline import Abandoned, Call

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

_OK = grpc.StatusCode.OK

FUTURE_THREADS = 16
"""Threads a MeshChannel runs `future()` calls on (the stack blocks; grpc's future does not)."""


class MeshChannel(grpc.Channel):
    """A channel to one mesh service, `EchoStub(mesh.grpc_channel("echo"))`, or to a port of an
    External host, `mesh.grpc_channel("payments.example:443")` (docs/egress.md)."""

    def __init__(self, mesh: Mesh, service: str) -> None:
        self._mesh = mesh
        self.service = service
        clients = self._clients = mesh.grpc_clients()
        self._wire = clients.wire
        self.pool = clients.pool(service)
        self._run = mesh.stack.build(self._send)
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    # -- grpc.Channel --------------------------------------------------------------------

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryUnaryMultiCallable:
        return _UnaryUnary(self, UNARY_UNARY, method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryStreamMultiCallable:
        return _UnaryStream(self, UNARY_STREAM, method, request_serializer, response_deserializer)

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamUnaryMultiCallable:
        return _StreamUnary(self, STREAM_UNARY, method, request_serializer, response_deserializer)

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamStreamMultiCallable:
        return _StreamStream(self, STREAM_STREAM, method, request_serializer, response_deserializer)

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        """The mesh keeps its endpoints' channels itself: to the caller it is always ready."""
        callback(grpc.ChannelConnectivity.READY)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        pass

    def close(self) -> None:
        """The endpoint channels belong to the Mesh (shared, closed with it); this only stops
        the threads of `future()`."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def __enter__(self) -> MeshChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the stack -----------------------------------------------------------------------

    def invoke(
        self,
        kind: str,
        method: str,
        payload: Any,
        deserializer: Any,
        timeout: float | None,
        metadata: Metadata | None,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
        call_wanted: bool = True,
        cancel: Cancellation | None = None,
    ) -> GrpcOutcome:
        """Run one RPC through the stack; a refusal of the mesh's comes back as its status."""
        try:
            call = start(
                self._mesh,
                self._wire,
                self.service,
                kind,
                method,
                payload,
                deserializer,
                timeout,
                metadata,
                credentials,
                wait_for_ready,
                compression,
                call_wanted,
            )
            if cancel is not None:
                call.request.cancel = cancel
            outcome: GrpcOutcome = self._run(call)
        except Exception as exc:
            refused = refusal(exc)
            if refused is None:
                raise
            return refused
        return outcome

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        FUTURE_THREADS, thread_name_prefix="meshlib-grpc"
                    )
        return self._executor.submit(fn)

    def _send(self, call: Call) -> GrpcOutcome:
        """The terminal: one attempt on the picked endpoint's channel."""
        request: GrpcRequest = call.request
        endpoint = call.endpoint
        assert endpoint is not None
        external = call.plan.external
        if external is None:
            lease = self.pool.lease(endpoint.address)
        else:  # an External's port: its own pool and security (never the mesh's identity)
            pool = self._clients.pool(pool_key(call.plan))
            lease = pool.lease(endpoint.address, origin_security(external))
        outcome: GrpcOutcome | None = None
        kind = request.kind
        unary_answer = kind in (UNARY_UNARY, STREAM_UNARY)
        timeout = call.attempt_timeout if unary_answer else stream_timeout(call)
        if timeout is None and call.attempt <= 1 and not request.extra:  # the usual first try
            metadata: Metadata = tuple(request.headers.items())
        else:
            metadata = attempt_metadata(call, timeout)
        send = lease.method(kind, request.method, request.deserializer)
        started = time.monotonic() if timeout is not None else 0.0  # read only to judge a timeout
        try:
            if unary_answer:
                if request.cancel is not None:  # a future(): sent so that its cancel() reaches it
                    outcome = _send_cancellable(call, send, request.cancel, timeout, metadata, started)
                    return outcome
                route = call.route
                if (
                    not request.call_wanted
                    and (route is None or route.retry is None)
                    and not call.plan.load_reports
                ):
                    # nothing reads an OK answer's metadata (no retry policy, no balancer weighing by
                    # load reports): grpc's plain call makes no call object
                    try:
                        value = send(
                            request.payload,
                            timeout,
                            metadata,
                            request.credentials,
                            request.wait_for_ready,
                            request.compression,
                        )
                    except grpc.RpcError as exc:
                        outcome = failed(call, exc, started, timeout)
                        return outcome
                    outcome = GrpcOutcome(_OK, None, value)
                    return outcome
                try:
                    value, rpc = send.with_call(
                        request.payload,
                        timeout,
                        metadata,
                        request.credentials,
                        request.wait_for_ready,
                        request.compression,
                    )
                except grpc.RpcError as exc:
                    outcome = failed(call, exc, started, timeout)
                    return outcome
                # the metadata are read if asked for (with_call, a retry decision): rarely
                outcome = GrpcOutcome(_OK, None, value, rpc, rpc)
                return outcome
            options = {
                "timeout": timeout,
                "metadata": metadata,
                "credentials": request.credentials,
                "wait_for_ready": request.wait_for_ready,
                "compression": request.compression,
            }
            if kind == STREAM_STREAM:  # committed as it starts: the caller's requests drive it
                rpc = send(request.payload, **options)
                outcome = committed(call, GrpcOutcome(grpc.StatusCode.OK, rpc=rpc, stream=rpc, done=False))
                outcome.callbacks.append(lease.release)
                return outcome
            rpc = send(request.payload, **options)
            try:
                first = next(rpc)  # until the first message is in, the RPC may be retried
            except StopIteration:
                outcome = GrpcOutcome(
                    rpc.code(), rpc.details(), rpc=rpc, trailing=tuple(rpc.trailing_metadata() or ())
                )
                return outcome
            except grpc.RpcError as exc:
                outcome = failed(call, exc, started, timeout)
                return outcome
            outcome = committed(
                call,
                GrpcOutcome(
                    grpc.StatusCode.OK,
                    rpc=rpc,
                    stream=_Resumed(first, rpc),
                    initial=tuple(rpc.initial_metadata() or ()),
                    done=False,
                ),
            )
            outcome.callbacks.append(lease.release)
            return outcome
        finally:
            if outcome is None or outcome.done:
                lease.release()


def _send_cancellable(
    call: Call, send: Any, cancel: Cancellation, timeout: float | None, metadata: Metadata, started: float
) -> GrpcOutcome:
    """A unary answer sent with grpc's future, watched by the call's `Cancellation`: the thread
    waits for it as `with_call` would, and a `cancel()` of the caller's cancels it at the server.
    Cancelled, it raises `Abandoned` (a cancelled attempt to the stack); never sent if the call
    was cancelled before."""
    if cancel.cancelled:
        raise Abandoned("cancelled by the caller before it was sent")
    request: GrpcRequest = call.request
    rpc = send.future(
        request.payload,
        timeout,
        metadata,
        request.credentials,
        request.wait_for_ready,
        request.compression,
    )
    cancel.watch(rpc)
    try:
        value = rpc.result()
    except grpc.FutureCancelledError:
        if cancel.cancelled:
            raise Abandoned("cancelled by the caller") from None
        return failed(call, rpc, started, timeout)  # grpc's own cancel (a channel closed): its status
    except grpc.RpcError as exc:
        return failed(call, exc, started, timeout)
    finally:
        cancel.unwatch(rpc)
    return GrpcOutcome(_OK, None, value, rpc, rpc)  # its metadata read if asked for


def _end_with_rpc(outcome: GrpcOutcome, rpc: Any) -> None:
    """A committed stream ends when its RPC does, whether or not the caller reads to the end:
    grpc's done callback (on its own thread) hands the status it ended with to the stages
    waiting for it (health, stats, spans), and gives back the load, slot and channel lease.
    Watched only once the stack is done with the stream: a stream that ends while the stack
    still runs must not change the status its retry stage judges (committed: OK)."""

    def ended(_: Any) -> None:
        try:
            outcome.end(rpc.code(), rpc.details(), tuple(rpc.trailing_metadata() or ()))
        except Exception:
            outcome.end(grpc.StatusCode.UNKNOWN, "the stream's status could not be read")

    rpc.add_done_callback(ended)


class _Resumed:
    """A stream whose first message was read already (to commit it): that one, then the rest."""

    __slots__ = ("first", "rest")

    def __init__(self, first: Any, rest: Iterator[Any]) -> None:
        self.first = [first]
        self.rest = rest

    def __iter__(self) -> _Resumed:
        return self

    def __next__(self) -> Any:
        if self.first:
            return self.first.pop()
        return next(self.rest)


class _Callable:
    def __init__(
        self,
        channel: MeshChannel,
        kind: str,
        method: str,
        serializer: Callable[[Any], bytes] | None,
        deserializer: Callable[[bytes], Any] | None,
    ) -> None:
        self._channel = channel
        self._kind = kind
        self._method = method
        self._serializer = serializer
        self._deserializer = deserializer
        self._unary = kind in (UNARY_UNARY, UNARY_STREAM)
        # what makes the payload of a request: for a unary one, the serializer itself (no frame)
        self._encode = serializer if self._unary and serializer is not None else self._payload

    def _payload(self, request: Any) -> Any:
        """A unary request is serialized once: every attempt, hedge and mirror sends these bytes."""
        if self._unary:
            return self._serializer(request) if self._serializer is not None else request
        if self._serializer is None:
            return request
        serialize = self._serializer
        return (serialize(message) for message in request)

    def _invoke(
        self,
        request: Any,
        timeout: float | None,
        metadata: Metadata | None,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
        call_wanted: bool = True,
        cancel: Cancellation | None = None,
    ) -> GrpcOutcome:
        return self._channel.invoke(
            self._kind,
            self._method,
            self._payload(request),
            self._deserializer,
            timeout,
            metadata,
            credentials,
            wait_for_ready,
            compression,
            call_wanted,
            cancel,
        )


class _Unary(_Callable):
    """`__call__`, `with_call` and `future` for the kinds with one answer."""

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        outcome = self._channel.invoke(  # not through `_invoke`: one frame less on the common call
            self._kind,
            self._method,
            self._encode(request),
            self._deserializer,
            timeout,
            metadata,
            credentials,
            wait_for_ready,
            compression,
            False,
        )
        if outcome.code is _OK:
            return outcome.value
        raise RpcResult(outcome)

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        result = RpcResult(self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression))
        return result.value(), result

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> _FutureRpc:
        """The RPC runs the stack on a thread of the channel. Its deadline is set now, as grpc's
        future's: a call still queued for a thread when it passes fails with DEADLINE_EXCEEDED,
        unsent; `cancel()` reaches it queued or in flight."""
        deadline = time.monotonic() + timeout if timeout is not None else None
        context = contextvars.copy_context()  # the inbound deadline and trace go along
        future = _FutureRpc(Cancellation(), deadline)

        def run() -> None:
            if future.done():  # cancelled as the thread took it
                return
            # what is left of the deadline (spent: the stack refuses the call, DEADLINE_EXCEEDED)
            left = deadline - time.monotonic() if deadline is not None else None
            try:
                outcome = context.run(
                    self._invoke,
                    request,
                    left,
                    metadata,
                    credentials,
                    wait_for_ready,
                    compression,
                    True,
                    future.cancellation,
                )
            except BaseException as exc:  # an error not the mesh's (or the cancel's Abandoned)
                future.finish(None, exc)
            else:
                future.finish(RpcResult(outcome), None)

        future.job = self._channel.submit(run)
        return future


class _UnaryUnary(_Unary, grpc.UnaryUnaryMultiCallable):
    pass


class _StreamUnary(_Unary, grpc.StreamUnaryMultiCallable):
    pass


class _Streaming(_Callable):
    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> ResponseStream:
        return ResponseStream(
            self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression)
        )


class _UnaryStream(_Streaming, grpc.UnaryStreamMultiCallable):
    pass


class _StreamStream(_Streaming, grpc.StreamStreamMultiCallable):
    pass


class ResponseStream(grpc.Call, grpc.Future):
    """A streaming answer as grpc hands one back: iterate it for the messages; a status that is
    not OK is raised (a grpc.RpcError) from the iteration, as grpc does."""

    def __init__(self, outcome: GrpcOutcome) -> None:
        self._outcome = outcome
        if not outcome.done and outcome.rpc is not None:
            _end_with_rpc(outcome, outcome.rpc)  # not before: the stack judged it committed (OK)

    def __del__(self) -> None:
        """A stream dropped before its end is cancelled (abandoned: it ends CANCELLED), and
        gives back its load and bulkhead slot."""
        if not self._outcome.done:
            with contextlib.suppress(Exception):
                self.cancel()

    def __iter__(self) -> ResponseStream:
        return self

    def __next__(self) -> Any:
        outcome = self._outcome
        if outcome.stream is None:
            if outcome.code is grpc.StatusCode.OK:
                raise StopIteration
            raise RpcResult(outcome)
        try:
            return next(outcome.stream)
        except StopIteration:  # the end: its status is in (grpc's done callback may be later)
            rpc = outcome.rpc
            outcome.end(rpc.code(), rpc.details(), tuple(rpc.trailing_metadata() or ()))
            raise
        except grpc.RpcError as exc:  # ended with a status other than OK
            e: Any = exc
            outcome.end(e.code(), e.details(), tuple(e.trailing_metadata() or ()))
            raise
        except BaseException:
            outcome.abandon()
            raise

    def _rpc(self) -> Any:
        return self._outcome.rpc if self._outcome.stream is not None else None

    def code(self) -> grpc.StatusCode:
        rpc = self._rpc()
        return rpc.code() if rpc is not None else self._outcome.code

    def details(self) -> str | None:
        rpc = self._rpc()
        return rpc.details() if rpc is not None else self._outcome.details

    def initial_metadata(self) -> Metadata:
        rpc = self._rpc()
        return rpc.initial_metadata() if rpc is not None else self._outcome.initial

    def trailing_metadata(self) -> Metadata:
        rpc = self._rpc()
        return rpc.trailing_metadata() if rpc is not None else self._outcome.trailing

    def is_active(self) -> bool:
        rpc = self._rpc()
        return bool(rpc.is_active()) if rpc is not None else False

    def time_remaining(self) -> float | None:
        rpc = self._rpc()
        return rpc.time_remaining() if rpc is not None else None

    def cancel(self) -> bool:
        """Give the stream up: it ends CANCELLED (no verdict on the endpoint), unless it had
        ended already."""
        outcome = self._outcome
        if outcome.stream is None or outcome.done:
            return False
        outcome.abandon()
        return outcome.abandoned

    def add_callback(self, callback: Callable[[], None]) -> bool:
        rpc = self._rpc()
        return bool(rpc.add_callback(callback)) if rpc is not None else False

    def cancelled(self) -> bool:
        return self.code() is grpc.StatusCode.CANCELLED

    def running(self) -> bool:
        return self.is_active()

    def done(self) -> bool:
        return not self.is_active()

    def result(self, timeout: float | None = None) -> Any:
        rpc = self._rpc()
        return rpc.result(timeout) if rpc is not None else RpcResult(self._outcome).value()

    def exception(self, timeout: float | None = None) -> Any:
        rpc = self._rpc()
        return rpc.exception(timeout) if rpc is not None else RpcResult(self._outcome).exception()

    def traceback(self, timeout: float | None = None) -> Any:
        rpc = self._rpc()
        return rpc.traceback(timeout) if rpc is not None else None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        rpc = self._rpc()
        if rpc is not None:
            rpc.add_done_callback(lambda _: fn(self))
        else:
            fn(self)


class _FutureRpc(grpc.Call, grpc.Future):
    """`future()`: the RPC runs the stack on one of the channel's threads (`job`). The caller's
    view is a future of its own, so that `cancel()` ends it at once, as grpc's does, while the
    thread still unwinds the cancelled RPC."""

    def __init__(self, cancellation: Cancellation, deadline: float | None) -> None:
        self.cancellation = cancellation
        self._deadline = deadline
        self._future: concurrent.futures.Future[RpcResult] = concurrent.futures.Future()
        self.job: concurrent.futures.Future[None] | None = None

    def finish(self, result: RpcResult | None, error: BaseException | None) -> None:
        """The thread's end of the RPC (dropped if the caller cancelled it first)."""
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            if error is not None:
                self._future.set_exception(error)
            else:
                self._future.set_result(result)  # type: ignore[arg-type]

    def _result(self, timeout: float | None = None) -> RpcResult:
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise grpc.FutureTimeoutError() from None
        except concurrent.futures.CancelledError:
            raise grpc.FutureCancelledError() from None

    def result(self, timeout: float | None = None) -> Any:
        return self._result(timeout).value()

    def exception(self, timeout: float | None = None) -> Any:
        return self._result(timeout).exception()

    def traceback(self, timeout: float | None = None) -> Any:
        return self._result(timeout).traceback()

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._future.add_done_callback(lambda _: fn(self))

    def cancel(self) -> bool:
        """As grpc's: a call not done is cancelled (True) and done at once; queued for a thread,
        it is never sent; in flight, its RPC is cancelled at the server and its slot comes back."""
        if self._future.done() or not self._future.cancel():  # (cancel() says True twice)
            return False
        if self.job is not None:
            self.job.cancel()
        self.cancellation.cancel()
        return True

    def cancelled(self) -> bool:
        return self._future.cancelled()

    def running(self) -> bool:
        return self.job is not None and self.job.running() and not self._future.done()

    def done(self) -> bool:
        return self._future.done()

    def code(self) -> grpc.StatusCode:
        if self._future.cancelled():
            return grpc.StatusCode.CANCELLED
        return self._result().code()

    def details(self) -> str | None:
        if self._future.cancelled():
            return LOCALLY_CANCELLED
        return self._result().details()

    def initial_metadata(self) -> Metadata:
        return () if self._future.cancelled() else self._result().initial_metadata()

    def trailing_metadata(self) -> Metadata:
        return () if self._future.cancelled() else self._result().trailing_metadata()

    def is_active(self) -> bool:
        return not self._future.done()

    def time_remaining(self) -> float | None:
        return max(0.0, self._deadline - time.monotonic()) if self._deadline is not None else None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self._future.add_done_callback(lambda _: callback())
        return True
