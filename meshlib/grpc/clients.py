"""What a Mesh keeps for its gRPC channels: the wire, and the channel pools that outlive any
one MeshChannel (one sync pool per service, one asyncio pool per service and event loop,
since a grpc.aio channel belongs to the loop that opened it; a closed loop's are let go)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import TYPE_CHECKING, Any

import grpc

from meshlib.balancing.prequal import GRPC
from meshlib.grpc.egress import keyed_plan
from meshlib.grpc.pool import ChannelPool
from meshlib.grpc.probes import GrpcProber
from meshlib.grpc.wire import GrpcWire

if TYPE_CHECKING:
    from meshlib.mesh import Mesh
    from meshlib.snapshot import Snapshot


def _open_sync(address: str, security: Any) -> grpc.Channel:
    if security is None:
        return grpc.insecure_channel(address)
    if security.credentials is None:  # an External's plaintext port: its authority
        return grpc.insecure_channel(address, options=security.options)
    return grpc.secure_channel(address, security.credentials, options=security.options)


def _close_sync(channel: grpc.Channel) -> None:
    channel.close()


def _aio_opener(address: str, security: Any) -> grpc.aio.Channel:
    if security is None:
        return grpc.aio.insecure_channel(address)
    if security.credentials is None:
        return grpc.aio.insecure_channel(address, options=security.options)
    return grpc.aio.secure_channel(address, security.credentials, options=security.options)


def _aio_closer(loop: asyncio.AbstractEventLoop) -> Any:
    """Close an aio channel on its own loop, from whichever thread retires it."""

    def close(channel: grpc.aio.Channel) -> None:
        if loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.create_task(channel.close())
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(lambda: loop.create_task(channel.close()))

    return close


class GrpcClients:
    """The gRPC side of one Mesh: `mesh.grpc_clients()` makes it once."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self._lock = threading.Lock()
        self._sync: dict[str, ChannelPool] = {}
        # by loop; not weak keys: a loop's channels hold it, so its entry would never expire
        self._aio: dict[asyncio.AbstractEventLoop, dict[str, ChannelPool]] = {}
        self.wire = GrpcWire(self.pool)
        mesh.on_update(self._observe)
        # prequal's probes of gRPC endpoints: unary calls on these channels (meshlib.grpc.probes)
        hub = mesh.loads.probes
        hub.probers[GRPC] = GrpcProber(mesh, hub.budget)

    def pool(self, service: str) -> ChannelPool:
        """The sync channels to `service`'s endpoints (mirrored copies leave from these too);
        an External port's are named `host:port` (`meshlib.grpc.egress.pool_key`)."""
        pool = self._sync.get(service)
        if pool is None:
            with self._lock:
                pool = self._sync.get(service)
                if pool is None:
                    pool = self._sync[service] = ChannelPool(self._mesh, service, _open_sync, _close_sync)
        return pool

    def aio_pool(self, service: str) -> ChannelPool:
        """The asyncio channels to `service`'s endpoints, for the running loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            pools = self._aio.get(loop)
            if pools is None:
                self._forget_closed_loops()
                pools = self._aio[loop] = {}
            pool = pools.get(service)
            if pool is None:
                pool = pools[service] = ChannelPool(self._mesh, service, _aio_opener, _aio_closer(loop))
        return pool

    def _pools(self) -> list[ChannelPool]:
        with self._lock:
            self._forget_closed_loops()
            return [*self._sync.values(), *(p for pools in self._aio.values() for p in pools.values())]

    def _forget_closed_loops(self) -> None:
        """Under the lock: let go of the pools of event loops that have closed (each
        `asyncio.run` has a loop of its own). Their channels cannot be closed any more (that
        takes their loop); grpc closes each one as it is collected."""
        for loop in [loop for loop in self._aio if loop.is_closed()]:
            del self._aio[loop]

    def _observe(self, snapshot: Snapshot) -> None:
        """Close the channels of endpoints that left (from the Mesh's update listener)."""
        for pool in self._pools():
            plan = keyed_plan(snapshot, pool.service)
            pool.keep(frozenset(e.address for e in plan.endpoints) if plan is not None else frozenset())

    def close(self) -> None:
        for pool in self._pools():
            pool.close()
