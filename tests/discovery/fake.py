"""A real provider for the tests: it implements the Provider protocol and its sets come from the
test, through one asyncio queue per watched name (fed from the test's thread, read on the
mesh's loop). An exception put on a queue is raised by the watch reading it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from meshlib.discovery import EndpointSet, Target
from meshlib.rules import EndpointSpec


class Options(BaseModel):
    """Per-service options of the fake provider (validated by the rules like a real one's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int = Field(80, ge=1, le=65535)
    tag: str | None = None


class FakeProvider:
    kind: ClassVar[str] = "fake"
    made: ClassVar[list[FakeProvider]] = []  # by from_url, newest last

    def __init__(self, url: str = "fake://") -> None:
        self.url = url
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queues: dict[str, asyncio.Queue[EndpointSet | Exception]] = {}
        self.targets: list[Target] = []  # one per call of watch: restarts show here
        self.closed = False
        self._lock = threading.Lock()
        self._pending: list[tuple[str, EndpointSet | Exception]] = []

    @classmethod
    def from_url(cls, url: str) -> FakeProvider:
        provider = cls(url)
        cls.made.append(provider)
        return provider

    def _queue(self, name: str) -> asyncio.Queue[EndpointSet | Exception]:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = asyncio.Queue()
        return queue

    def send(self, name: str, item: list[str | EndpointSpec] | Exception) -> None:
        """From the test's thread: the next answer (addresses or specs) or failure for `name`."""
        value: EndpointSet | Exception = (
            item
            if isinstance(item, Exception)
            else tuple(a if isinstance(a, EndpointSpec) else EndpointSpec(address=a) for a in item)
        )
        with self._lock:
            if self.loop is None:
                self._pending.append((name, value))
                return
        self.loop.call_soon_threadsafe(self._queue(name).put_nowait, value)

    async def watch(self, target: Target) -> AsyncIterator[EndpointSet]:
        with self._lock:
            if self.loop is None:
                self.loop = asyncio.get_running_loop()
                for name, value in self._pending:
                    self._queue(name).put_nowait(value)
                self._pending.clear()
        self.targets.append(target)
        queue = self._queue(target.name)
        while True:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            yield item

    async def aclose(self) -> None:
        self.closed = True
