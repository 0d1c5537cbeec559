"""Client id -> service bindings shared by the control service replicas of an etcd store.

Why shared and not per replica: a binding is what stops a token of `payments` from acking or
reporting as a client of `orders`. Kept per replica, that client moving from A to B would find
its id free on B (anyone could have taken it there first, and it would be refused), and
`payments` could speak for it on every replica it is not connected to.

`security/clients/<client id>` holds the service. Checks stay in memory (the request path never
waits on etcd): a replica binds a new client id at once, as a single service does, and writes
the new bindings in batches behind it (`run`, every `interval`), each one create-if-absent. Two
replicas binding the same new id to two services within that moment: the first write wins, and
the loser's binding is replaced by the watch (its next request for the other service is
refused). Other replicas' bindings arrive through the security watch.

The bound is the single service's: `per_service` bindings per service on each replica, least
recently used dropped first; a replica that drops one deletes it in etcd too (only if it still
names that service), so etcd holds about `per_service` per service. A dropped client that comes
back binds again.
"""

from __future__ import annotations

import asyncio
import logging

from meshlib.control.binding import ClientBindings
from meshlib.control.etcd_client import (
    EtcdError,
    KeyValue,
    compare_mod,
    compare_value,
    delete_op,
    put_op,
    range_op,
)
from meshlib.control.etcd_security import SharedSecurity
from meshlib.control.etcd_watch import WatchEvent

log = logging.getLogger("meshlib.control.security")

BATCH = 64  # bindings per transaction (etcd's default --max-txn-ops is 128)


class SharedClientBindings(ClientBindings):
    """`ClientBindings` whose bindings every replica of the store prefix shares."""

    def __init__(self, shared: SharedSecurity, per_service: int = 10_000) -> None:
        super().__init__(per_service)
        self.key = shared.key("clients/")
        self._client = shared.client
        self._new: dict[str, str] = {}  # bound here, not yet written
        self._dropped: dict[str, str] = {}  # dropped here, to delete if still theirs
        # client -> the latest etcd revision known of its key (a put or a delete): the watch's
        # echo of an older write (this replica's own, say, of a binding dropped since) is ignored
        self._revisions: dict[str, int] = {}
        self._wake = asyncio.Event()
        self.reload(shared.load(self.key))
        shared.attach(self)

    def _bind(self, client: str, service: str) -> list[str]:
        new = client not in self._owner
        dropped = super()._bind(client, service)
        if new:
            self._new[client] = service
            self._dropped.pop(client, None)
        for old in dropped:
            if self._new.pop(old, None) is None:
                self._dropped[old] = service  # a service only ever drops its own clients
        if new or dropped:
            self._wake.set()
        return dropped

    # -- following etcd -----------------------------------------------------------------------

    def reload(self, kvs: list[KeyValue]) -> None:
        stored = {self._client_id(kv): kv.value.decode("utf-8", "replace") for kv in kvs}
        for client in [c for c in self._owner if c not in stored and c not in self._new]:
            self._unbind(client)
        for client, service in stored.items():
            self._take(client, service)
        self._revisions = {self._client_id(kv): kv.mod_revision for kv in kvs}

    def apply(self, event: WatchEvent) -> None:
        client = self._client_id(event.kv)
        if not self._newer(client, event.kv.mod_revision):
            return
        if event.kind == "put":
            self._take(client, event.kv.value.decode("utf-8", "replace"))
        elif client not in self._new:
            self._unbind(client)

    def _take(self, client: str, service: str) -> None:
        """etcd's binding wins over this replica's (a write of it that lost, or none yet)."""
        self._new.pop(client, None)
        if self._owner.get(client) not in (None, service):
            log.info("security: client id %r is bound to %s by another replica", client[:100], service)
            self._unbind(client)
        if client not in self._owner:
            for old in super()._bind(client, service):  # dropping what the others bound: not ours to delete
                self._new.pop(old, None)

    def _newer(self, client: str, revision: int) -> bool:
        """Whether `revision` is newer than what is known of `client`'s key (then it is known)."""
        if revision <= self._revisions.get(client, 0):
            return False
        self._revisions[client] = revision
        if len(self._revisions) > 2 * len(self._owner) + 4096:  # forget old deletions
            for gone in [c for c in self._revisions if c not in self._owner][:4096]:
                del self._revisions[gone]
        return True

    # -- writing ------------------------------------------------------------------------------

    async def run(self, interval: float = 0.05, retry: float = 1.0) -> None:
        """Write this replica's new and dropped bindings, a batch at a time, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(interval)  # let a burst of new clients make one batch
            new, self._new = self._new, {}  # in flight: dropped now, they are deleted after
            dropped, self._dropped = self._dropped, {}
            try:
                taken, revisions = await asyncio.to_thread(self.write, new, dropped)
            except EtcdError as exc:
                log.warning("security: cannot write client bindings (%s); retrying", exc)
                for client, service in new.items():
                    if self._owner.get(client) == service:
                        self._new.setdefault(client, service)
                for client, service in dropped.items():
                    if client not in self._owner:
                        self._dropped.setdefault(client, service)
                self._wake.set()
                await asyncio.sleep(retry)
                continue
            for client, revision in revisions.items():
                self._newer(client, revision)
            for client, service in taken.items():
                self._take(client, service)

    def write(self, new: dict[str, str], dropped: dict[str, str]) -> tuple[dict[str, str], dict[str, int]]:
        """Write bindings create-if-absent and delete dropped ones that still name their service
        (blocking). Returns the bindings another replica had made first (client -> its service)
        and the revision of each key written or read."""
        taken: dict[str, str] = {}
        revisions: dict[str, int] = {}
        items = list(new.items())
        for start in range(0, len(items), BATCH):
            chunk = items[start : start + BATCH]
            keys = [self._key(c) for c, _ in chunk]
            result = self._client.txn(
                [compare_mod(k, 0) for k in keys],
                [put_op(k, s.encode()) for k, (_, s) in zip(keys, chunk, strict=True)],
            )
            if result.succeeded:
                revisions.update((c, result.revision) for c, _ in chunk)
                continue
            for key, (client, service) in zip(keys, chunk, strict=True):  # someone got one first
                one = self._client.txn(
                    [compare_mod(key, 0)], [put_op(key, service.encode())], [range_op(key)]
                )
                if one.succeeded:
                    revisions[client] = one.revision
                elif found := one.ranges()[0]:
                    revisions[client] = found[0].mod_revision
                    if found[0].value.decode("utf-8", "replace") != service:
                        taken[client] = found[0].value.decode("utf-8", "replace")
        for client, service in dropped.items():
            key = self._key(client)
            result = self._client.txn([compare_value(key, service.encode())], [delete_op(key)])
            if result.succeeded:
                revisions[client] = result.revision
        return taken, revisions

    def _key(self, client: str) -> bytes:
        return self.key + client.encode("utf-8", "surrogatepass")

    def _client_id(self, kv: KeyValue) -> str:
        return kv.key[len(self.key) :].decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"SharedClientBindings({len(self)} bindings)"
