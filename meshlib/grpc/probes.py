"""Prequal's probes over gRPC: the server interceptors' answer, and the channels' prober.

Server: the interceptors (sync and aio) answer the reserved method `/meshlib.Probe/Check`
themselves, before the servicers and outside every count, with an empty message and the
figures in the trailing metadata (meshlib.probing). Client: a probe is a unary call of that
method on the endpoint's own channel from the Mesh's pool (the connection the RPCs use, mTLS and
the peer's identity as for them), started with `future()` from the picking thread: grpc runs it
on its own threads, so the pick never waits and no event loop is involved, whichever channel
(sync or aio) the app uses. The bounds are the LoadBook's `ProbeBudget`, shared with HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import grpc

from meshlib.balancing.orca import HEADER
from meshlib.balancing.probe_budget import ProbeBudget
from meshlib.probing import PROBE_METHOD, read, report_text

if TYPE_CHECKING:
    from meshlib.balancing.prequal import PrequalOptions, ProbePool
    from meshlib.endpoint import Endpoint
    from meshlib.grpc.pool import PooledChannel
    from meshlib.mesh import Mesh
    from meshlib.server_load import ServerLoad

log = logging.getLogger("meshlib.probes")


def probe_handler(load: ServerLoad) -> grpc.RpcMethodHandler:
    """The handler of the probe method on a sync server."""

    def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata(((HEADER, report_text(load)),))
        return b""

    return grpc.unary_unary_rpc_method_handler(answer)


def aio_probe_handler(load: ServerLoad) -> grpc.RpcMethodHandler:
    """The handler of the probe method on a grpc.aio server."""

    async def answer(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        context.set_trailing_metadata(((HEADER, report_text(load)),))
        return b""

    return grpc.unary_unary_rpc_method_handler(answer)


def is_probe(handler_call_details: grpc.HandlerCallDetails) -> bool:
    return handler_call_details.method == PROBE_METHOD


class GrpcProber:
    """The `Prober` of a Mesh's gRPC channels (set on its `LoadBook` with `mesh.grpc_clients()`)."""

    def __init__(self, mesh: Mesh, budget: ProbeBudget | None = None) -> None:
        self._mesh = mesh
        self.budget = budget if budget is not None else ProbeBudget()

    def probe(self, pool: ProbePool, targets: Sequence[Endpoint], options: PrequalOptions) -> None:
        chosen = self.budget.admit(pool, targets, options)
        if not chosen:
            return
        mesh = self._mesh
        mesh.stats.count("probes_sent", pool.service, len(chosen))
        channels = mesh.grpc_clients().pool(pool.service)
        for endpoint in chosen:
            lease: PooledChannel | None = None
            try:
                lease = channels.lease(endpoint.address)
                call = lease.method("unary_unary", PROBE_METHOD, None).future(
                    b"", timeout=options.probe_timeout
                )
            except Exception as exc:  # a closed pool, a channel that would not open
                if lease is not None:
                    lease.release()
                log.debug("probe of %s (%s) not sent: %r", endpoint.address, pool.service, exc)
                self._over(pool, endpoint, None, options)
                continue
            call.add_done_callback(partial(self._done, pool, endpoint, lease, options))

    def _done(
        self, pool: ProbePool, endpoint: Endpoint, lease: PooledChannel, options: PrequalOptions, call: Any
    ) -> None:
        """On grpc's thread, when the probe is over."""
        lease.release()
        answer: tuple[int, float] | None = None
        try:
            if call.exception() is None:
                answer = read(dict(call.trailing_metadata() or ()).get(HEADER))
            else:
                log.debug("probe of %s (%s) failed: %s", endpoint.address, pool.service, call.code())
        except Exception as exc:  # cancelled, or a malformed answer: the endpoint's, not the caller's
            log.debug("probe of %s (%s) failed: %r", endpoint.address, pool.service, exc)
        self._over(pool, endpoint, answer, options)

    def _over(
        self, pool: ProbePool, endpoint: Endpoint, answer: tuple[int, float] | None, options: PrequalOptions
    ) -> None:
        self.budget.done(pool, endpoint)
        if answer is None:
            pool.fail(endpoint.address)
            self._mesh.stats.count("probes_failed", pool.service)
            return
        rif, latency = answer
        pool.add(endpoint.address, rif, latency, options.pool_size, load=endpoint.load)
