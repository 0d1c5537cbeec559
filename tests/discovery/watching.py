"""Watching a provider in a test: every set it yields, kept, and a way to wait for one."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from meshlib.discovery.base import EndpointSet, Provider, Target


class Watching:
    """Runs one `watch` in a task and keeps every set it yields."""

    def __init__(self, provider: Provider, target: Target) -> None:
        self.sets: list[EndpointSet] = []
        self.error: BaseException | None = None
        self.ended = asyncio.Event()
        self._changed = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run(provider.watch(target)))

    async def _run(self, sets: AsyncIterator[EndpointSet]) -> None:
        try:
            async for endpoints in sets:
                self.sets.append(endpoints)
                self._changed.set()
        except Exception as exc:
            self.error = exc
        finally:
            self.ended.set()
            self._changed.set()

    @property
    def last(self) -> EndpointSet:
        return self.sets[-1]

    def addresses(self) -> set[str]:
        return {e.address for e in self.last} if self.sets else set()

    async def until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.ended.is_set():
                raise AssertionError(f"the watch ended ({self.error!r}) before the condition held")
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"condition not met in {timeout}s; sets: {self.sets}")
            with contextlib.suppress(TimeoutError):  # a short poll: the condition may be the agent's state
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.02))

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
