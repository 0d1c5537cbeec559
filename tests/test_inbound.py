"""The server side's rate-limit check on an event loop."""

from __future__ import annotations

import asyncio
import threading

import meshlib
from meshlib.inbound import rate_limited_async
from meshlib.rules import parse_documents

LIMIT = [{"kind": "RateLimit", "service": "orders", "requests_per_second": 1, "burst": 1}]


class Recording:
    """A limiter that notes the thread asking it; `blocking` as a Redis-backed one says."""

    def __init__(self, blocking: bool) -> None:
        self.blocking = blocking
        self.threads: list[int] = []

    def try_acquire(self) -> float:
        self.threads.append(threading.get_ident())
        return 0.0 if len(self.threads) == 1 else 2.5


def check_twice(blocking: bool) -> tuple[Recording, list[int | None], int]:
    with meshlib.Mesh("orders") as mesh:
        mesh.apply_rules(parse_documents(LIMIT), "1")
        limiter = Recording(blocking)
        mesh.resilience.limiter = lambda doc: limiter  # type: ignore[method-assign]

        async def main() -> tuple[list[int | None], int]:
            return [await rate_limited_async(mesh), await rate_limited_async(mesh)], threading.get_ident()

        verdicts, loop_thread = asyncio.run(main())
        return limiter, verdicts, loop_thread


def test_a_blocking_limiter_is_asked_off_the_event_loop() -> None:
    limiter, verdicts, loop_thread = check_twice(blocking=True)
    assert verdicts == [None, 3]  # admitted, then refused with retry-after rounded up
    assert loop_thread not in limiter.threads


def test_a_local_limiter_is_asked_on_the_loop_itself() -> None:
    limiter, verdicts, loop_thread = check_twice(blocking=False)
    assert verdicts == [None, 3]
    assert limiter.threads == [loop_thread, loop_thread]  # no thread hop for a local bucket
