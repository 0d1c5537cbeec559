"""The Mesh's background runtime: one asyncio loop in a daemon thread.

Everything that keeps a Snapshot fresh (file and discovery watches, the control-service
subscription, certificate renewal, telemetry) runs here, away from the application's own
threads and loops, so a sync Flask app and an async FastAPI app get the same machinery.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("meshlib.runtime")


class Runtime:
    def __init__(self, name: str = "meshlib") -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._tasks: set[concurrent.futures.Future[Any]] = set()
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        self._loop.run_forever()
        # finalise async generators (an SSE stream's) here, not as orphan tasks after close
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Run a coroutine on the runtime's loop; failures are logged, never lost silently."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        self._tasks.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: concurrent.futures.Future[Any]) -> None:
        self._tasks.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("background task failed", exc_info=future.exception())

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the background tasks and stop the loop (idempotent)."""
        if not self._thread.is_alive():
            return
        for f in list(self._tasks):
            f.cancel()

        async def _drain() -> None:
            tasks = [t for t in asyncio.all_tasks(self._loop) if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):  # shutting down: nothing useful to do with it
            asyncio.run_coroutine_threadsafe(_drain(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
