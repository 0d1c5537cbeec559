"""One grpc channel per endpoint address, reused by every RPC to it.

grpcio balances only with its built-in policies; the mesh picks the endpoint itself, so each
endpoint gets a channel of its own (one HTTP/2 connection, kept). A channel is retired when
its endpoint leaves the Snapshot or, under mTLS, when the certificates rotate (a new
`generation`): new RPCs get a new channel, and the old one is closed once the RPCs still on
it are done (drained), so neither change fails an RPC in flight.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

log = logging.getLogger("meshlib.grpc")

Opener = Callable[[str, Any], Any]
"""(address, the channel security or None) -> a new grpc channel."""

MESH_SECURITY: Any = object()
"""`lease`'s default: the mesh's own security for the pool's service (mTLS, or plaintext)."""


class PooledChannel:
    """A channel of the pool and the RPCs in flight on it (a lease each).

    The leases are tokens in a deque, whose append and pop are atomic: an RPC on a channel in
    use takes and returns its lease without the pool's lock, which 50 threads at once would
    queue on. Who retires a channel sets `retired` before it counts the leases, a lease is
    counted before it checks `retired`: one of the two sees the other (see `ChannelPool`)."""

    __slots__ = ("address", "channel", "generation", "leases", "methods", "pool", "retired")

    def __init__(self, pool: ChannelPool, address: str, channel: Any, generation: Any) -> None:
        self.pool = pool
        self.address = address
        self.channel = channel
        self.generation = generation
        self.leases: deque[None] = deque()
        self.retired = False
        self.methods: dict[tuple[str, str, Any], Any] = {}

    @property
    def inflight(self) -> int:
        return len(self.leases)

    def method(self, kind: str, name: str, deserializer: Any) -> Any:
        """The channel's multicallable for one method (made once: every RPC of it reuses it).
        Requests go out as the bytes the mesh serialized once; answers are deserialized here."""
        key = (kind, name, deserializer)
        found = self.methods.get(key)
        if found is None:
            make = getattr(self.channel, kind)
            found = self.methods[key] = make(name, None, deserializer, _registered_method=True)
        return found

    def release(self) -> None:
        """One RPC on this channel is done; a retired channel closes with its last RPC."""
        self.leases.pop()
        if self.retired and not self.leases:
            self.pool._close_drained(self)


class ChannelPool:
    """The channels of one service's endpoints (for one flavour of channel: sync or asyncio).

    Security comes from `meshlib.grpc.credentials.channel_security(mesh, service)` when the
    mesh has credentials (imported only then); without them channels are plaintext."""

    def __init__(self, mesh: Mesh, service: str, open: Opener, close: Callable[[Any], None]) -> None:
        self._mesh = mesh
        self.service = service
        self._open = open
        self._close = close
        self._lock = threading.Lock()
        self._channels: dict[str, PooledChannel] = {}
        self._draining: set[PooledChannel] = set()
        self.opened = 0  # channels opened so far (tests and stats read it)
        self.closed = 0
        self._shut = False

    def _security(self) -> Any:
        if self._mesh.credentials is None:
            return None
        # imported only under mTLS; it returns .credentials, .options and .generation
        credentials = importlib.import_module("meshlib.grpc.credentials")
        return credentials.channel_security(self._mesh, self.service)

    def lease(self, address: str, security: Any = MESH_SECURITY) -> PooledChannel:
        """The channel to `address` (opened on first use, or anew after a rotation), held for
        one RPC until `release`. `security`: the channel's own (an External's: its `generation`
        changes with its CAs), else the mesh's for the service."""
        if security is MESH_SECURITY:
            security = self._security()
        generation = security.generation if security is not None else None
        entry = self._channels.get(address)
        if entry is not None and entry.generation == generation:
            entry.leases.append(None)
            if not entry.retired:
                return entry
            self._release(entry)  # retired meanwhile: take the new one, under the lock
        with self._lock:
            entry = self._channels.get(address)
            if entry is None or entry.generation != generation:
                if entry is not None:
                    self._retire(entry)
                entry = PooledChannel(self, address, self._open(address, security), generation)
                self._channels[address] = entry
                self.opened += 1
            entry.leases.append(None)
            return entry

    def channels(self) -> dict[str, Any]:
        """The channels in use, by address."""
        with self._lock:
            return {address: entry.channel for address, entry in self._channels.items()}

    def keep(self, addresses: Collection[str]) -> None:
        """Retire the channels of endpoints no longer in `addresses` (they left the Snapshot)."""
        with self._lock:
            for address in [a for a in self._channels if a not in addresses]:
                self._retire(self._channels.pop(address))

    def close(self) -> None:
        with self._lock:
            self._shut = True
            entries = [*self._channels.values(), *self._draining]
            self._channels.clear()
            self._draining.clear()
        for entry in entries:
            self._shut_channel(entry)

    def _retire(self, entry: PooledChannel) -> None:
        """Under the lock: no new RPC takes `entry`; it closes when its last RPC is done (by
        whoever sees it last: here if it has none now, else the release that finds it
        draining)."""
        entry.retired = True
        if self._channels.get(entry.address) is entry:
            del self._channels[entry.address]
        if entry.leases:
            self._draining.add(entry)
        else:
            self._shut_channel(entry)

    def _release(self, entry: PooledChannel) -> None:
        entry.release()

    def _close_drained(self, entry: PooledChannel) -> None:
        """A retired channel's last lease came back: close it (once, whoever sees it last)."""
        with self._lock:
            last = not entry.leases and entry in self._draining
            if last:
                self._draining.discard(entry)
        if last:
            self._shut_channel(entry)

    def _shut_channel(self, entry: PooledChannel) -> None:
        self.closed += 1
        try:
            self._close(entry.channel)
        except Exception:
            log.debug("closing the channel to %s failed", entry.address, exc_info=True)
