"""`AioMeshChannel`: a `grpc.aio.Channel` whose RPCs run the mesh's client stack (the asyncio
shell, the same stack as `MeshChannel`'s, driven with `build_async`).

As with grpc.aio, calling a method starts the RPC at once (a task running the stack) and
returns a call object to await (unary answers) or to iterate (streaming answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from functools import partial
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from meshlib.grpc.egress import origin_security, pool_key
from meshlib.grpc.pool import ChannelPool
from meshlib.grpc.rpc import attempt_metadata, committed, failed, refusal, start, stream_timeout
from meshlib.grpc.wire import (
    LOCALLY_CANCELLED,
    STREAM_STREAM,
    STREAM_UNARY,
    UNARY_STREAM,
    UNARY_UNARY,
    GrpcOutcome,
    GrpcRequest,
    Metadata,
)
from meshlib.grpc.written import DONE, WrittenRequests
from meshlib.pipeline import Call

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

_OK = grpc.StatusCode.OK


class AioMeshChannel(grpc.aio.Channel):
    """A grpc.aio channel to one mesh service, `EchoStub(mesh.grpc_aio_channel("echo"))`, or to a
    port of an External host (`MeshChannel`)."""

    def __init__(self, mesh: Mesh, service: str) -> None:
        self._mesh = mesh
        self.service = service
        self._clients = mesh.grpc_clients()
        self._wire = self._clients.wire
        self._run = mesh.stack.build_async(self._send)
        self._pool: tuple[asyncio.AbstractEventLoop, ChannelPool] | None = None

    @property
    def pool(self) -> ChannelPool:
        """The endpoint channels of the running loop (a grpc.aio channel belongs to one loop)."""
        loop = asyncio.get_running_loop()
        kept = self._pool
        if kept is None or kept[0] is not loop:
            kept = self._pool = (loop, self._clients.aio_pool(self.service))
        return kept[1]

    # -- grpc.aio.Channel ----------------------------------------------------------------

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _AioUnary(self, UNARY_UNARY, method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _AioStreaming(self, UNARY_STREAM, method, request_serializer, response_deserializer)

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _AioStreamUnary(self, STREAM_UNARY, method, request_serializer, response_deserializer)

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _AioStreaming(self, STREAM_STREAM, method, request_serializer, response_deserializer)

    async def __aenter__(self) -> AioMeshChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        """The endpoint channels belong to the Mesh (shared, closed with it): nothing to do."""

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return grpc.ChannelConnectivity.READY

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await asyncio.Event().wait()  # the mesh's channel is always ready: no change comes

    async def channel_ready(self) -> None:
        return None

    # -- the stack -----------------------------------------------------------------------

    async def invoke(
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
    ) -> GrpcOutcome:
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
            )
            outcome: GrpcOutcome = await self._run(call)
        except Exception as exc:
            refused = refusal(exc)
            if refused is None:
                raise
            return refused
        return outcome

    async def _send(self, call: Call) -> GrpcOutcome:
        """The terminal: one attempt on the picked endpoint's channel."""
        request: GrpcRequest = call.request
        endpoint = call.endpoint
        assert endpoint is not None
        external = call.plan.external
        if external is None:
            lease = self.pool.lease(endpoint.address)
        else:  # an External's port: its own pool and security (never the mesh's identity)
            pool = self._clients.aio_pool(pool_key(call.plan))
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
        rpc: Any = None
        try:
            if unary_answer:
                rpc = send(  # keywords as grpc.aio takes them, not a dict per RPC
                    request.payload,
                    timeout=timeout,
                    metadata=metadata,
                    credentials=request.credentials,
                    wait_for_ready=request.wait_for_ready,
                    compression=request.compression,
                )
                try:
                    value = await rpc
                except grpc.aio.AioRpcError as exc:
                    outcome = failed(call, exc, started, timeout)
                    return outcome
                route = call.route
                if (route is None or route.retry is None) and not call.plan.load_reports:
                    # nothing here reads an OK answer's metadata (a retry policy, load reports)
                    outcome = GrpcOutcome(_OK, None, value, rpc, None, rpc)
                    return outcome
                outcome = GrpcOutcome(
                    grpc.StatusCode.OK,
                    value=value,
                    rpc=rpc,
                    initial=tuple(await rpc.initial_metadata() or ()),
                    trailing=tuple(await rpc.trailing_metadata() or ()),
                )
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
                first = await rpc.read()  # until the first message is in, the RPC may be retried
            except grpc.aio.AioRpcError as exc:
                outcome = failed(call, exc, started, timeout)
                return outcome
            if first is grpc.aio.EOF:
                outcome = GrpcOutcome(
                    await rpc.code(),
                    await rpc.details(),
                    rpc=rpc,
                    trailing=tuple(await rpc.trailing_metadata()),
                )
                return outcome
            outcome = committed(call, GrpcOutcome(grpc.StatusCode.OK, rpc=rpc, stream=[first], done=False))
            outcome.callbacks.append(lease.release)
            return outcome
        except asyncio.CancelledError:  # a hedge that lost, or the caller gave up
            if rpc is not None:
                rpc.cancel()
            raise
        finally:
            if outcome is None or outcome.done:
                lease.release()


_READING_ENDS: set[asyncio.Task[None]] = set()  # the tasks reading ended streams' statuses (kept alive)


def _end_with_rpc(outcome: GrpcOutcome, rpc: Any) -> None:
    """A committed stream ends when its RPC does, whether or not the caller reads to the end:
    grpc's done callback hands the status it ended with to the stages waiting for it (health,
    stats, spans) and gives back the load, slot and channel lease. grpc.aio gives the status
    only to a coroutine: a task reads it, unless the caller's read ended the stream first.
    Watched only once the stack's task is done: a stream that ends while the stack still runs
    must not change the status its retry stage judges (committed: OK)."""

    def ended(_: Any) -> None:
        if outcome.done:
            return
        task = asyncio.ensure_future(_read_end(outcome, rpc))
        _READING_ENDS.add(task)
        task.add_done_callback(_READING_ENDS.discard)

    rpc.add_done_callback(ended)


def _watch_end(task: asyncio.Future[GrpcOutcome]) -> None:
    """The stack's task is done: an open stream it gave the caller ends when its RPC does."""
    if task.cancelled() or task.exception() is not None:
        return
    outcome = task.result()
    if not outcome.done and outcome.rpc is not None:
        _end_with_rpc(outcome, outcome.rpc)


async def _read_end(outcome: GrpcOutcome, rpc: Any) -> None:
    try:
        outcome.end(await rpc.code(), await rpc.details(), tuple(await rpc.trailing_metadata() or ()))
    except Exception:
        outcome.end(grpc.StatusCode.UNKNOWN, "the stream's status could not be read")


class _AioCallable:
    def __init__(
        self,
        channel: AioMeshChannel,
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

    def _start(
        self,
        request: Any,
        timeout: float | None,
        metadata: Metadata | None,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Coroutine[Any, Any, GrpcOutcome]:
        if self._kind in (UNARY_UNARY, UNARY_STREAM):
            payload = self._serializer(request) if self._serializer is not None else request
        elif request is None:
            raise ValueError("a mesh channel's streaming request takes an iterator of messages")
        elif self._serializer is not None:
            payload = _serialized(request, self._serializer)
        else:
            payload = request
        return self._channel.invoke(
            self._kind,
            self._method,
            payload,
            self._deserializer,
            timeout,
            metadata,
            credentials,
            wait_for_ready,
            compression,
        )


async def _refused_at_once(error: Exception) -> GrpcOutcome:
    """A call refused as it was made: its status once awaited (an error not the mesh's raises)."""
    refused = refusal(error)
    if refused is None:
        raise error
    return refused


async def _refused(coro: Coroutine[Any, Any, GrpcOutcome]) -> GrpcOutcome:
    """The stack's run, its refusals (no endpoint, open breaker, deadline) as statuses."""
    try:
        return await coro
    except Exception as exc:
        refused = refusal(exc)
        if refused is None:
            raise
        return refused


def _serialized(messages: Any, serialize: Callable[[Any], bytes]) -> Any:
    if hasattr(messages, "__aiter__"):

        async def each() -> AsyncIterator[bytes]:
            async for message in messages:
                yield serialize(message)

        return each()
    return (serialize(message) for message in messages)


class _AioUnary(_AioCallable):
    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> AioUnaryCall:
        # the Call made here and the stack's own coroutine handed over (not `invoke`'s): one
        # coroutine fewer per RPC; the call object turns the mesh's refusals into statuses
        channel = self._channel
        serializer = self._serializer
        payload = serializer(request) if serializer is not None else request
        try:
            call = start(
                channel._mesh,
                channel._wire,
                channel.service,
                self._kind,
                self._method,
                payload,
                self._deserializer,
                timeout,
                metadata,
                credentials,
                wait_for_ready,
                compression,
            )
        except Exception as exc:  # refused at once (no endpoint): the status, once awaited
            return AioUnaryCall(_refused_at_once(exc), False)
        return AioUnaryCall(channel._run(call), False, True)  # type: ignore[arg-type]  # a coroutine


class _AioStreamUnary(_AioUnary):
    """A client-streaming method: its requests come as an iterator, or, without one, by
    `call.write()` and `call.done_writing()` (`WrittenRequests`)."""

    def __call__(
        self,
        request: Any = None,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> AioUnaryCall:
        requests = WrittenRequests() if request is None else None
        call = AioUnaryCall(  # started at once: the caller writes before it awaits
            self._start(requests or request, timeout, metadata, credentials, wait_for_ready, compression),
            True,
        )
        if requests is not None:
            call.written_by(requests)
        return call


class _AioStreaming(_AioCallable):
    def __call__(
        self,
        request: Any = None,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> AioStreamCall:
        requests = WrittenRequests() if request is None and self._kind == STREAM_STREAM else None
        call = AioStreamCall(
            self._start(requests or request, timeout, metadata, credentials, wait_for_ready, compression),
            True,
        )
        if requests is not None:
            call.written_by(requests)
        return call


def _error(outcome: GrpcOutcome) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        outcome.code,
        grpc.aio.Metadata(*outcome.initial),
        grpc.aio.Metadata(*outcome.trailing),
        outcome.details,
    )


class _AioCall:
    """What grpc.aio's call objects offer, over the coroutine that runs the stack.

    As with grpc.aio, the RPC starts at once: in a task of its own, from the loop's next turn.
    A unary call awaited before that turn (`await stub.Method(request)`, the usual case) runs
    its stack in the awaiting task instead (`__await__`): no task, and two fewer turns of the loop
    per RPC. The call object behaves the same either way; `cancel()` of a call run so cancels
    the future its stack waits on, as `Task.cancel()` would."""

    # defaults on the class, not set per call object (each store costs on the hot path)
    _requests: WrittenRequests | None = None  # requests by `write()`, not an iterator
    _settled = False  # its outcome was handed over and is done with: nothing left to cancel
    _task: asyncio.Future[GrpcOutcome] | None = None  # a task, or a run's stand-in future
    _kick: asyncio.Handle | None = None
    # a run in the awaiting task: running, what its stack awaits, a cancel() to deliver,
    # and its end (outcome, error)
    _driving = False
    _awaited: Any = None
    _cancel_asked = False
    _ended: tuple[GrpcOutcome | None, BaseException | None] | None = None
    _raw = False  # `_coro` is the stack's own: its refusals are turned into statuses here

    def __init__(self, coro: Coroutine[Any, Any, GrpcOutcome], eager: bool, raw: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._coro: Coroutine[Any, Any, GrpcOutcome] | None = coro  # not started yet
        if raw:
            self._raw = True
        if eager:
            self._start_task()
        else:
            self._kick = loop.call_soon(self._start_task)

    def _start_task(self) -> None:
        coro = self._coro
        if coro is not None:
            self._coro = None
            if self._raw:
                task = self._task = self._loop.create_task(_refused(coro))
                # a task cancelled before its first step never starts the stack's coroutine:
                # closed, it is not reported "never awaited"
                task.add_done_callback(lambda _: coro.close())
            else:
                self._task = self._loop.create_task(coro)

    def _future(self) -> asyncio.Future[GrpcOutcome]:
        """The task the RPC runs in (started now if it has not started), or, for a run in an
        awaiting task, a future that ends with it."""
        if self._task is None:
            if self._coro is not None:
                self._start_task()
            else:
                self._task = self._loop.create_future()
                if self._ended is not None:
                    self._settle(*self._ended)
        assert self._task is not None
        return self._task

    def _settle(self, outcome: GrpcOutcome | None, error: BaseException | None) -> None:
        self._ended = (outcome, error)
        future = self._task
        if future is None or future.done():
            return
        if error is None:
            future.set_result(outcome)  # type: ignore[arg-type]
        elif isinstance(error, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(error)
            future.exception()  # the awaiting task got it already: not "never retrieved"

    def __del__(self) -> None:
        """A call dropped before its end is cancelled, and stops counting as load."""
        if self._settled:
            return
        with contextlib.suppress(Exception):
            self.cancel()

    async def _outcome(self) -> GrpcOutcome:
        return await asyncio.shield(self._future())

    async def _status(self) -> GrpcOutcome:
        """The outcome whose status `code()`, `details()` and the metadata report: a call
        cancelled before its stack gave one is CANCELLED, as grpc.aio says. Its cancelled future
        must not raise CancelledError into the asking task, which would cancel that task; only
        the asking task's own cancellation is raised."""
        future = self._future()
        if not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not future.cancelled() or (task is not None and task.cancelling()):
                    raise
        if future.cancelled():
            return GrpcOutcome(grpc.StatusCode.CANCELLED, LOCALLY_CANCELLED)
        return future.result()

    def cancel(self) -> bool:
        if self._driving:  # as Task.cancel: cancel what the stack waits on, else at its next step
            awaited = self._awaited
            if awaited is None or not awaited.cancel():
                self._cancel_asked = True
            return True
        task = self._future()
        if not task.done():
            return task.cancel()
        outcome = task.result() if not task.cancelled() and task.exception() is None else None
        if outcome is not None and not outcome.done:
            outcome.abandon()  # it ends CANCELLED: no verdict on the endpoint
            return True
        return False

    def written_by(self, requests: WrittenRequests) -> None:
        """Requests come by `write()`: they are over when the call ends (refused, failed, or
        its stream ended)."""
        self._requests = requests

        def over(outcome: GrpcOutcome | None) -> None:
            failed = outcome is not None and outcome.code is not grpc.StatusCode.OK
            requests.end(partial(_error, outcome) if outcome is not None and failed else None)

        def started(task: asyncio.Future[GrpcOutcome]) -> None:
            outcome = None if task.cancelled() or task.exception() is not None else task.result()
            if outcome is None or outcome.done:
                over(outcome)
            else:
                outcome.add(lambda: over(outcome))

        self._future().add_done_callback(started)

    async def write(self, request: Any) -> None:
        """Send one request message (a call made without a request iterator)."""
        if self._requests is None:
            raise grpc.aio.UsageError("The iterator and read/write APIs may not be mixed on a single RPC.")
        await self._requests.put(request)

    async def done_writing(self) -> None:
        """No more request messages (idempotent; nothing to do once the call ended)."""
        requests = self._requests
        if requests is None:
            raise grpc.aio.UsageError("The iterator and read/write APIs may not be mixed on a single RPC.")
        if requests.closed or requests.over.is_set():
            return
        with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
            await requests.put(DONE)
        requests.closed = True

    def cancelled(self) -> bool:
        """Cancelled before its stack gave an outcome, or a stream given up by `cancel()` after."""
        task = self._future()
        if task.cancelled():
            return True
        if not task.done() or task.exception() is not None:
            return False
        outcome = task.result()
        return outcome.abandoned and outcome.code is grpc.StatusCode.CANCELLED

    def done(self) -> bool:
        task = self._future()
        if not task.done():
            return False
        return task.cancelled() or task.exception() is not None or task.result().done

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._future().add_done_callback(lambda _: callback(self))

    def time_remaining(self) -> float | None:
        return None

    async def code(self) -> grpc.StatusCode:
        outcome = await self._status()
        if outcome.rpc is not None and not outcome.done:
            return await outcome.rpc.code()
        return outcome.code

    async def details(self) -> str | None:
        outcome = await self._status()
        if outcome.rpc is not None and not outcome.done:
            return await outcome.rpc.details()
        return outcome.details

    async def initial_metadata(self) -> grpc.aio.Metadata:
        outcome = await self._status()
        if outcome.rpc is not None and not outcome.done:
            return await outcome.rpc.initial_metadata()
        if outcome.aio_metadata_of is not None:
            return grpc.aio.Metadata(*(await outcome.aio_metadata_of.initial_metadata() or ()))
        return grpc.aio.Metadata(*outcome.initial)

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        outcome = await self._status()
        if outcome.rpc is not None and not outcome.done:
            return await outcome.rpc.trailing_metadata()
        if outcome.aio_metadata_of is not None:
            return grpc.aio.Metadata(*(await outcome.aio_metadata_of.trailing_metadata() or ()))
        return grpc.aio.Metadata(*outcome.trailing)

    async def wait_for_connection(self) -> None:
        await self._outcome()


class AioUnaryCall(_AioCall):
    """Await it for the answer; a status that is not OK raises `grpc.aio.AioRpcError`."""

    def __await__(self) -> Generator[Any, None, Any]:
        coro = self._coro
        if coro is None:  # started: its task (or a run in another awaiting task) gives the outcome
            outcome = yield from self._future().__await__()
        else:  # not started: run its stack here, in the awaiting task (one generator, no task)
            self._coro = None
            if self._kick is not None:
                self._kick.cancel()
            self._driving = True
            error: BaseException | None = None
            try:
                while True:  # what the stack awaits passes through to the awaiting task
                    try:
                        awaited = coro.send(None) if error is None else coro.throw(error)
                    except StopIteration as stop:
                        outcome = stop.value
                        if self._task is None:  # nobody asked for a future: kept for one asked later
                            self._ended = (outcome, None)
                        else:
                            self._settle(outcome, None)
                        break
                    except BaseException as exc:
                        refused = refusal(exc) if self._raw and isinstance(exc, Exception) else None
                        if refused is None:
                            self._settle(None, exc)
                            raise
                        outcome = refused
                        self._settle(outcome, None)
                        break
                    self._awaited = awaited
                    try:
                        yield awaited
                        error = None
                    except BaseException as exc:  # the awaited future failed or was cancelled
                        error = exc
                    self._awaited = None
                    if self._cancel_asked and error is None:
                        self._cancel_asked = False
                        error = asyncio.CancelledError()
            finally:
                self._driving = False
        self._settled = outcome.done
        if outcome.code is not _OK:
            raise _error(outcome)
        return outcome.value


class AioStreamCall(_AioCall):
    """Iterate it (`async for`) or `read()` it for the messages; a status that is not OK raises
    `grpc.aio.AioRpcError`. Streaming requests come as an iterator given to the call, or by
    `write()` / `done_writing()` when none is given."""

    def __init__(self, coro: Coroutine[Any, Any, GrpcOutcome], eager: bool = True) -> None:
        super().__init__(coro, eager)
        self._future().add_done_callback(_watch_end)

    async def read(self) -> Any:
        outcome = await self._outcome()
        stream = outcome.stream
        if stream is None:
            if outcome.code is grpc.StatusCode.OK:
                return grpc.aio.EOF
            raise _error(outcome)
        if isinstance(stream, list):  # the first message, read to commit the RPC
            if stream:
                return stream.pop()
            stream = outcome.rpc
        try:
            message = await stream.read()
        except grpc.aio.AioRpcError as exc:  # ended with a status other than OK
            outcome.end(exc.code(), exc.details(), tuple(exc.trailing_metadata() or ()))
            raise
        except BaseException:  # the reader was cancelled: the stream is given up
            outcome.abandon()
            raise
        if message is grpc.aio.EOF:
            rpc = outcome.rpc
            outcome.end(await rpc.code(), await rpc.details(), tuple(await rpc.trailing_metadata() or ()))
        return message

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[Any]:
        while True:
            message = await self.read()
            if message is grpc.aio.EOF:
                return
            yield message
