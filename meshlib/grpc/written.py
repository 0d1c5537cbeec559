"""`WrittenRequests`: the request stream of an asyncio call written with `call.write(msg)` and
`await call.done_writing()` rather than given as an iterator.

This is sound on top of the stack because a streamed request goes to one endpoint only: the
stack picks it when the call starts, whether or not a message is written yet (the messages
wait here), the RPC on the picked endpoint reads them as its request iterator, and a streamed
request is never replayed (no retry, hedge or mirror moves it elsewhere).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

DONE = object()
"""Put by `done_writing()`: the end of the requests."""


class WrittenRequests:
    """The messages written to one call, read by its RPC as an async iterator.

    A queue of one: `put` returns once the RPC has taken the message before (close to grpc's
    own `write`, which returns once the message is sent). Once the call has ended (`end`),
    a `put` raises the call's status, or InvalidStateError if it ended well."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self.over = asyncio.Event()  # the call ended: no one reads what is written any more
        self._error: Callable[[], BaseException] | None = None
        self.closed = False

    def __aiter__(self) -> WrittenRequests:
        return self

    async def __anext__(self) -> Any:
        message = await self._queue.get()
        if message is DONE:
            raise StopAsyncIteration
        return message

    def end(self, error: Callable[[], BaseException] | None) -> None:
        """The call ended (refused, failed, or its stream ended): `error()` makes what a later
        `put` raises (its status); None when it ended well."""
        self._error = error
        self.over.set()

    async def put(self, message: Any) -> None:
        if self.closed:
            raise asyncio.InvalidStateError('the requests were closed by "done_writing"')
        if not self.over.is_set():
            try:
                self._queue.put_nowait(message)
                return
            except asyncio.QueueFull:
                pass
            put = asyncio.ensure_future(self._queue.put(message))
            over = asyncio.ensure_future(self.over.wait())
            try:
                await asyncio.wait((put, over), return_when=asyncio.FIRST_COMPLETED)
            finally:
                over.cancel()
                sent = put.done() and not put.cancelled()
                put.cancel()  # the writer was cancelled, or the call is over: nothing goes in later
            if sent:
                return
        if self._error is not None:
            raise self._error()
        raise asyncio.InvalidStateError("RPC already finished.")
