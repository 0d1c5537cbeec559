"""Many subscribers on one control service, pushes in a burst: every ack lands (none fails,
none is lost) and every client's record reaches the latest revision. Not timed: the numbers
are in bench/convergence.py; this checks that load loses nothing."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from pathlib import Path

import httpx

from meshlib.control.subscriber import ControlState, Subscriber
from tests.control import Control, wait_for

N = 200


class CountingAcks(httpx.AsyncBaseTransport):
    """Under a subscriber's client: counts the acks sent and those that failed."""

    def __init__(self, counts: collections.Counter[str]) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.counts = counts

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/ack":
            return await self.inner.handle_async_request(request)
        self.counts["sent"] += 1
        try:
            response = await self.inner.handle_async_request(request)
        except BaseException as exc:
            self.counts[type(exc).__name__] += 1
            raise
        if response.status_code != 204:
            self.counts[f"HTTP {response.status_code}"] += 1
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def endpoints(port: int) -> dict:
    return {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": f"127.0.0.1:{port}"}]}


async def test_every_ack_of_two_hundred_subscribers_lands_at_the_latest_revision(tmp_path: Path) -> None:
    control = Control(tmp_path / "data", stale_after=30.0)
    counts: collections.Counter[str] = collections.Counter()
    clients = [httpx.AsyncClient(transport=CountingAcks(counts), timeout=30.0) for _ in range(N)]
    applied: dict[str, int] = {}

    def sink_of(name: str) -> object:
        def sink(state: ControlState) -> None:
            applied[name] = state.version

        return sink

    subs = [
        Subscriber(control.url, service="load", client_id=f"c{i}", sink=sink_of(f"c{i}"), http=clients[i])
        for i in range(N)
    ]
    tasks = [asyncio.create_task(s.run()) for s in subs]
    try:
        await wait_for(lambda: len(applied) == N, 30.0, "every snapshot applied")
        for port in range(8001, 8006):  # five versions back to back: a burst
            reply = await asyncio.to_thread(control.apply, [endpoints(port)])
            assert reply.status_code == 200
        version, revision = control.plane.version, control.plane.hub.revision
        await wait_for(lambda: all(v == version for v in applied.values()), 30.0, "every sink at the latest")

        def records_current() -> bool:
            rows = control.http.get("/v1/clients").json()
            return len(rows) == N and all(r["revision"] == revision and r["version"] == version for r in rows)

        await wait_for(records_current, 30.0, "every client's record at the latest revision")
        assert set(counts) == {"sent"}, counts  # not one ack failed
        # one ack at least per subscriber, and the burst coalesced: a snapshot's ack still waiting
        # (its spread or a retry on a loaded machine) when the burst comes is replaced by its ack
        assert N <= counts["sent"] <= N * 6
        rows = control.http.get("/v1/clients").json()
        assert not any(r["stale"] for r in rows) and all(r["connected"] for r in rows)
        assert control.plane.hub.dropped_total == 0
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(c.aclose() for c in clients))
        control.stop()
