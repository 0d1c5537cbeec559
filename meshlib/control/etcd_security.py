"""What control service replicas on one etcd share about security, under `<prefix>security/`:

    security/admin            {"hash": sha256 of the admin token}      (meshlib.control.auth)
    security/tokens/<id>      a join token's record, never the token   (etcd_tokens)
    security/ca               the CA: root, key, previous roots         (etcd_ca)
    security/clients/<id>     the service a client id is bound to       (etcd_bindings)

Each part loads its keys when the plane is built and then follows the others' changes through
ONE watch of the prefix (`SharedSecurity.run`, a task of the app's lifespan), so every check on
the request path reads memory. A part applies a change only if it is newer than what it holds
(`mod_revision`): its own writes and the watch's echo of them, or a load and a replayed event,
arrive in either order and end the same.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Protocol

from meshlib.control.etcd_client import (
    EtcdClient,
    EtcdError,
    EtcdIndeterminate,
    EtcdOptions,
    EtcdUnavailable,
    KeyValue,
    compare_mod,
    prefix_end,
    put_op,
    range_op,
)
from meshlib.control.etcd_watch import EtcdCompacted, WatchEvent, watch

log = logging.getLogger("meshlib.control.security")

SUBPREFIX = b"security/"


class SharedPart(Protocol):
    """A piece of shared security state that follows its keys in etcd."""

    key: bytes  # its key, or the prefix of its keys (ending in "/")

    def reload(self, kvs: list[KeyValue]) -> None:
        """Take the current values of every key of the part (after a compacted watch)."""

    def apply(self, event: WatchEvent) -> None:
        """Take one change, if newer than what the part holds."""


class SharedSecurity:
    """The `security/` keys of one store prefix: where each part reads, and the one watch."""

    def __init__(self, options: EtcdOptions, *, client: EtcdClient | None = None) -> None:
        self.options = options
        self.client = client if client is not None else EtcdClient(options)
        self.prefix = options.prefix.encode() + SUBPREFIX
        self._parts: list[SharedPart] = []
        self._watch_from = 0  # the earliest revision after a part's load

    def key(self, name: str) -> bytes:
        return self.prefix + name.encode()

    def load(self, key: bytes) -> list[KeyValue]:
        """The values of a part's key (a prefix: every key under it), noting where to watch from."""
        end = prefix_end(key) if key.endswith(b"/") else None
        kvs, revision = self.client.range_at(key, end)
        self._watch_from = revision + 1 if not self._watch_from else min(self._watch_from, revision + 1)
        return kvs

    def create(self, key: bytes, value: bytes, timeout: float = 10.0) -> KeyValue:
        """Put `value` under `key` unless it exists (create-if-absent); what the key holds then,
        this value or another replica's. Retried while etcd is electing or an answer is lost: a
        second attempt after one that landed finds the same value, so it still counts as ours."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                result = self.client.txn([compare_mod(key, 0)], [put_op(key, value)], [range_op(key)])
                break
            except (EtcdUnavailable, EtcdIndeterminate):
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 0.5)
        if result.succeeded:
            return KeyValue(key, value, result.revision, result.revision, 1)
        (found,) = result.ranges()
        return found[0]

    def attach(self, part: SharedPart) -> None:
        """Send `part` the changes of its keys once the watch runs."""
        self._parts.append(part)

    def dispatch(self, event: WatchEvent) -> None:
        for part in self._parts:
            if event.kv.key == part.key or (part.key.endswith(b"/") and event.kv.key.startswith(part.key)):
                try:
                    part.apply(event)
                except Exception:
                    log.exception("security: cannot apply a change of %r", event.kv.key[-60:])
                return

    async def run(self, retry: tuple[float, float] = (0.1, 2.0)) -> None:
        """Follow the prefix until cancelled. A compacted watch reloads every part and watches on
        from there; etcd out of reach leaves every part as it is (one WARNING per outage)."""
        low, high = retry
        delay, failing = low, False
        while True:
            try:
                if failing or not self._watch_from:
                    await asyncio.to_thread(self._reload)
                async for batch in watch(
                    self.options, self.prefix, prefix_end(self.prefix), start_revision=self._watch_from
                ):
                    if failing:
                        log.info("security: watching etcd again")
                        failing, delay = False, low
                    for event in batch.events:
                        self.dispatch(event)
                    self._watch_from = max(self._watch_from, batch.revision + 1)
            except asyncio.CancelledError:
                raise
            except EtcdCompacted as exc:
                log.info("security: the etcd watch lost its place (%s); reading the keys again", exc)
                failing = True
                continue
            except Exception as exc:
                log.log(
                    logging.DEBUG if failing else logging.WARNING,
                    "security: watching etcd failed (%s); keeping the tokens, CA and bindings held",
                    exc,
                )
                failing = True
                if not isinstance(exc, EtcdError):
                    log.debug("security: the etcd watch failed", exc_info=exc)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, high)

    def _reload(self) -> None:
        kvs, revision = self.client.range_at(self.prefix, prefix_end(self.prefix))
        for part in self._parts:
            mine = [
                kv
                for kv in kvs
                if kv.key == part.key or (part.key.endswith(b"/") and kv.key.startswith(part.key))
            ]
            part.reload(mine)
        self._watch_from = revision + 1

    def close(self) -> None:
        self.client.close()
