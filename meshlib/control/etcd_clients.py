"""Client records shared by control service replicas on etcd (`GET /v1/clients` on any of them).

Each replica keeps the records of its own subscribers (meshlib.control.stream.Hub: who is
connected, the revision each acked, stale or not) and writes them all as ONE key,
`<prefix>clients/<replica id>`, at most once a `interval` (1 s) and only when the view changed:
with 5,000 subscribers acking a push within the same second, that is one etcd write, not 5,000.
The key is under a lease of the replica (kept alive by the same task), so the records of a
replica that dies go away when its lease expires (`ttl`, 10 s), and at once when it stops
cleanly (the lease is revoked).

The value is the rows of the replica's `/v1/clients` view as zlib-compressed JSON (a row is
about 250 bytes of JSON and compresses about tenfold: 10,000 clients, the Hub's bound, stay
well under etcd's 1.5 MiB request limit). `stale` is the owning replica's judgement, written
again as soon as it turns: only that replica knows when each of its revisions went out.

The rows are the Hub's and those of `sources` (the xDS server's clients: meshlib.control.xds),
so a gRPC xDS client on one replica shows on every one, with its acks and NACKs per type.

`merged` reads every replica's key (at most once per `interval`, cached) and merges them with
this replica's own rows, which are read from the Hub and the sources directly. Each row names
its `replica`.
A client seen by two replicas (it moved) is shown once: the connected row, else the one seen
last.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import Callable
from typing import Any

from meshlib.control.etcd_client import EtcdClient, EtcdError, EtcdOptions, prefix_end
from meshlib.control.stream import Hub

log = logging.getLogger("meshlib.control")

MAX_RECORDS_BYTES = 64 << 20  # decompressed size of one replica's records read back


class SharedClients:
    """This replica's client records in etcd, and every replica's merged (event loop side;
    the blocking etcd calls run in threads)."""

    def __init__(
        self,
        options: EtcdOptions,
        replica_id: str,
        hub: Hub,
        *,
        interval: float = 1.0,
        ttl: int = 10,
        client: EtcdClient | None = None,
        sources: list[Callable[[], list[dict[str, Any]]]] | None = None,
    ) -> None:
        """`sources`: more rows of this replica's, read on every write and merge (the list is
        kept, not copied: sources added later count)."""
        self.replica_id = replica_id
        self.hub = hub
        self.sources = sources if sources is not None else []
        self.interval = interval
        self.ttl = ttl
        self._etcd = client if client is not None else EtcdClient(options)
        self._own = client is None
        self.prefix = f"{options.prefix}clients/".encode()
        self.key = self.prefix + replica_id.encode()
        self._lease = 0
        self._renewed = 0.0
        self._written: list[dict[str, Any]] | None = None
        self._written_extra: list[dict[str, Any]] = []
        self._seen: tuple[int, int] | None = None  # the hub's (changes, revision) when last looked at
        self._may_turn = True  # a row of the last look may turn stale with time
        self._failing = False
        self._cache: tuple[float, dict[str, list[dict[str, Any]]]] | None = None
        self.writes_total = 0
        self.closed = False

    # -- writing this replica's records -------------------------------------------------------

    async def run(self) -> None:
        """Write the records when they changed, renew the lease; never raises but to cancel."""
        while True:
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._lost(exc)
            await asyncio.sleep(self.interval)

    async def flush(self) -> bool:
        """Write the records now if they changed since the last write (or the lease was lost);
        renew the lease when a third of its TTL has passed. True when something was written."""
        now = time.monotonic()
        if self._lease and now - self._renewed >= self.ttl / 3:
            if await asyncio.to_thread(self._etcd.keepalive, self._lease) <= 0:
                log.info("control: the lease of this replica's client records expired; writing them again")
                self._lease, self._written = 0, None
            self._renewed = now
        hub = self.hub
        seen = (hub.changes, hub.revision)
        extra = self._extra()
        if seen == self._seen and not self._may_turn and self._lease and extra == self._written_extra:
            return False  # nothing changed, and no row can turn stale by time alone
        rows = hub.clients()
        self._may_turn = any(
            r["connected"] and not r["stale"] and (r["revision"] is None or r["revision"] < hub.revision)
            for r in rows
        )
        self._written_extra = extra
        rows += extra
        if rows == self._written and self._lease:
            self._seen = seen
            self._recovered()
            return False
        if not self._lease:
            self._lease, _ = await asyncio.to_thread(self._etcd.grant, self.ttl)
            self._renewed = time.monotonic()
        value = self.encode(rows)
        await asyncio.to_thread(self._etcd.put, self.key, value, lease=self._lease)
        self._written, self._seen = rows, seen
        self.writes_total += 1
        self._recovered()
        return True

    def _extra(self) -> list[dict[str, Any]]:
        return [row for source in self.sources for row in source()]

    def encode(self, rows: list[dict[str, Any]]) -> bytes:
        data = {"replica": self.replica_id, "written": time.time(), "clients": rows}
        return zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 6)

    def _lost(self, exc: Exception) -> None:
        level = logging.DEBUG if self._failing else logging.WARNING
        log.log(level, "control: cannot write this replica's client records to etcd (%s); retrying", exc)
        if not isinstance(exc, EtcdError):
            log.debug("control: writing the client records failed", exc_info=exc)
        self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.info("control: this replica's client records are in etcd again")
            self._failing = False

    async def close(self) -> None:
        """Revoke the lease: this replica's records leave every other replica's view at once."""
        self.closed = True
        lease, self._lease = self._lease, 0
        try:
            if lease:
                await asyncio.to_thread(self._etcd.revoke, lease)
        except EtcdError as exc:
            log.info("control: could not revoke the client records' lease (%s); it expires on its own", exc)
        finally:
            self.release()

    def release(self) -> None:
        """Close the etcd connections this object opened (safe to call again)."""
        if self._own:
            self._etcd.close()

    # -- reading everyone's -------------------------------------------------------------------

    async def others(self) -> dict[str, list[dict[str, Any]]]:
        """The other replicas' rows by replica id, as last written (cached for `interval`)."""
        cached = self._cache
        if cached is not None and time.monotonic() - cached[0] < self.interval:
            return cached[1]
        kvs = await asyncio.to_thread(self._etcd.range, self.prefix, prefix_end(self.prefix))
        found: dict[str, list[dict[str, Any]]] = {}
        for kv in kvs:
            replica = kv.key[len(self.prefix) :].decode("utf-8", "replace")
            if replica == self.replica_id:
                continue
            try:
                data = json.loads(_inflate(kv.value))
                found[replica] = [dict(row) for row in data["clients"]]
            except (ValueError, KeyError, TypeError, zlib.error) as exc:
                log.warning("control: ignoring the client records of replica %s: %s", replica, exc)
        self._cache = (time.monotonic(), found)
        return found

    async def merged(self) -> list[dict[str, Any]]:
        """Every replica's clients, each row with its `replica`, sorted by client id; this
        replica's own rows are current, the others' as of their last write (at most about
        `interval` old)."""
        rows = [{**row, "replica": self.replica_id} for row in self.hub.clients() + self._extra()]
        try:
            others = await self.others()
        except EtcdError as exc:
            log.warning("control: listing this replica's clients only: cannot read the others' (%s)", exc)
            others = {}
        for replica, theirs in others.items():
            rows += [{**row, "replica": replica} for row in theirs]
        return merge(rows)


def merge(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per client: the connected one, else the one seen last; sorted by client id."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        old = best.get(row["client"])
        if old is None or _rank(row) > _rank(old):
            best[row["client"]] = row
    return [best[k] for k in sorted(best)]


def _rank(row: dict[str, Any]) -> tuple[bool, float]:
    return bool(row.get("connected")), float(row.get("last_seen") or 0.0)


def _inflate(value: bytes) -> bytes:
    inflater = zlib.decompressobj()
    data = inflater.decompress(value, MAX_RECORDS_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError(f"more than {MAX_RECORDS_BYTES} bytes of records")
    return data
