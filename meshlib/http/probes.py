"""Prequal's probes over HTTP: sent off the request path, on kept-alive connections, rate-bound.

A pick asks (`HttpProber.probe`) and returns at once: the probes run on the Mesh's runtime loop
(its daemon thread), whichever client asked, so a sync client's threads and an async client's
loop are treated alike and neither ever waits for a probe. They go out over an `AsyncH1Transport`
of the prober's own on that loop (mTLS as the Mesh's clients speak it, the peer's SPIFFE id
checked); a connection to an endpoint is kept and reused by the next probe (connections belong
to one loop, so the clients' own cannot carry them).

Bounds: `meshlib.balancing.probe_budget` (one probe in flight per endpoint, a rate per
destination and for the process, a cap on probes in flight); what exceeds them is not sent.
Each probe has `probe_timeout` for all of it; a failed one takes its endpoint's answer out of the
pool (`ProbePool.fail`) and counts as `probes_failed`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import httpx

from meshlib.balancing.orca import HEADER
from meshlib.balancing.probe_budget import ProbeBudget
from meshlib.http.h1 import AsyncH1Transport
from meshlib.probing import PROBE_PATH, PROBE_STATUS, read

if TYPE_CHECKING:
    from meshlib.balancing.prequal import PrequalOptions, ProbePool
    from meshlib.endpoint import Endpoint
    from meshlib.mesh import Mesh

log = logging.getLogger("meshlib.probes")


class HttpProber:
    """The `Prober` of a Mesh's HTTP clients (set on its `LoadBook` with the first client)."""

    def __init__(self, mesh: Mesh, budget: ProbeBudget | None = None) -> None:
        self._mesh = mesh
        self.budget = budget if budget is not None else ProbeBudget()
        self._transport: httpx.AsyncBaseTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def probe(self, pool: ProbePool, targets: Sequence[Endpoint], options: PrequalOptions) -> None:
        chosen = self.budget.admit(pool, targets, options)
        if not chosen:
            return
        mesh = self._mesh
        mesh.stats.count("probes_sent", pool.service, len(chosen))
        loop = mesh.runtime.loop
        for endpoint in chosen:
            try:
                loop.call_soon_threadsafe(self._start, pool, endpoint, options)
            except RuntimeError:  # the Mesh is closed: its loop runs no more
                self.budget.done(pool, endpoint)

    def _start(self, pool: ProbePool, endpoint: Endpoint, options: PrequalOptions) -> None:
        task = asyncio.ensure_future(self._run(pool, endpoint, options))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, pool: ProbePool, endpoint: Endpoint, options: PrequalOptions) -> None:
        address = endpoint.address
        answer: tuple[int, float] | None = None
        timeout = options.probe_timeout
        try:
            async with asyncio.timeout(timeout):
                answer = await self._ask(pool.service, endpoint, timeout)
        except Exception as exc:  # a probe's failure is its endpoint's, never the caller's
            log.debug("probe of %s (%s) failed: %r", address, pool.service, exc)
        finally:
            self.budget.done(pool, endpoint)
        if answer is None:
            pool.fail(address)
            self._mesh.stats.count("probes_failed", pool.service)
            return
        rif, latency = answer
        pool.add(address, rif, latency, options.pool_size, load=endpoint.load)

    async def _ask(self, service: str, endpoint: Endpoint, timeout: float) -> tuple[int, float] | None:
        transport = self._transport
        if transport is None:
            transport = self._transport = self._make_transport()
        url = httpx.URL(scheme="http", host=endpoint.host, port=endpoint.port, path=PROBE_PATH)
        request = httpx.Request(
            "GET",
            url,
            headers={"host": service},
            extensions={"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}},
        )
        identity = self._mesh.credentials
        if identity is not None:
            identity.secure(request, service)
        response = await transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        if response.status_code != PROBE_STATUS:
            return None
        return read(response.headers.get(HEADER))

    def _make_transport(self) -> httpx.AsyncBaseTransport:
        most = self.budget.max_in_flight
        limits = httpx.Limits(max_connections=most, max_keepalive_connections=most)
        identity = self._mesh.credentials
        if identity is None:
            return AsyncH1Transport(limits=limits)
        from meshlib.security import tls

        context = identity.client_context
        return tls.AsyncSplitTransport(
            lambda: AsyncH1Transport(ssl_context=context, limits=limits), AsyncH1Transport(limits=limits)
        )

    async def aclose(self) -> None:
        """Close the connections (on the runtime's loop, at the Mesh's close)."""
        for task in list(self._tasks):
            task.cancel()
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.aclose()
