"""An etcd v3 watch over the JSON gateway (`POST /v3/watch`, one streamed JSON object a line),
asyncio, that outlives its members: what a control service replica holds open to hear of every
change the other replicas make.

Each batch of events carries etcd's revision. When a stream breaks (the member died, lost its
leader, or the connection did), the watch opens again on the next member from the revision after
the last one it delivered, so no event is lost and none is seen twice. Only etcd's compaction can
take events away: then `EtcdCompacted` says from which revision on history is left, and the
caller reads the current state again (a range) and watches from there.

Streams are opened with gRPC's `hasleader` metadata (the gateway forwards `Grpc-Metadata-*`
headers): a member cut off from its cluster's leader ends the stream, instead of holding a
watch that will never see another event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from meshlib.control.etcd_client import EtcdError, EtcdOptions, KeyValue, ssl_context

log = logging.getLogger("meshlib.control.etcd")

RETRY_MIN, RETRY_MAX = 0.05, 2.0  # seconds between attempts when no member takes the watch


class EtcdCompacted(EtcdError):
    """The revision to watch from is compacted away: read the state again and watch from there."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"etcd: revisions before {revision} are compacted")
        self.revision = revision


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "put" or "delete"
    kv: KeyValue  # for a delete, the key and the revision of the deletion (mod_revision)


@dataclass(frozen=True)
class WatchBatch:
    """Events in revision order; `revision` is the last one's. A later batch starts after it.

    Not etcd's header revision: a watch catching up may be sent a header revision well past
    the events it holds (the rest follow), so resuming from the header could skip events."""

    revision: int
    events: tuple[WatchEvent, ...]


async def watch(
    options: EtcdOptions,
    key: bytes,
    range_end: bytes | None = None,
    *,
    start_revision: int = 0,
    http: httpx.AsyncClient | None = None,
) -> AsyncIterator[WatchBatch]:
    """Every change to `key` (or [key, range_end)) from `start_revision` on (0: from now), for
    as long as the caller iterates; reconnects on its own. EtcdCompacted when etcd no longer
    has `start_revision`; EtcdError when etcd refuses the watch (a permission, say)."""
    own = http is None
    client = http or httpx.AsyncClient(verify=ssl_context(options), timeout=httpx.Timeout(None, connect=1.0))
    endpoints = options.endpoints
    index, delay, down_since = 0, RETRY_MIN, False
    next_revision = start_revision
    token: str | None = None
    try:
        while True:
            url = endpoints[index % len(endpoints)]
            try:
                if options.user is not None and token is None:
                    token = await _authenticate(client, url, options)
                request = {"key": _b64(key)}
                if range_end is not None:
                    request["range_end"] = _b64(range_end)
                if next_revision:
                    request["start_revision"] = str(next_revision)
                headers = {"Grpc-Metadata-hasleader": "true", **({"Authorization": token} if token else {})}
                async with client.stream(
                    "POST", f"{url}/v3/watch", json={"create_request": request}, headers=headers
                ) as reply:
                    if reply.status_code == 401 and token is not None:
                        token = None  # expired: log in again
                        continue
                    if reply.status_code != 200:
                        await reply.aread()
                        raise EtcdError(f"etcd at {url} refused the watch: {reply.text[:200]}")
                    async for line in reply.aiter_lines():
                        if not line.strip():
                            continue
                        batch = _batch(json.loads(line), url)
                        if batch is None:
                            continue
                        if isinstance(batch, int):  # created: the revision the watch starts after
                            if not next_revision:
                                next_revision = batch + 1
                            if down_since:
                                log.info("etcd: watching again, on %s", url)
                            delay, down_since = RETRY_MIN, False
                            continue
                        next_revision = batch.revision + 1
                        yield batch
                    raise _StreamEnded("the member ended the stream")
            except (httpx.TransportError, _StreamEnded) as exc:
                if not down_since:
                    log.warning("etcd: the watch on %s broke (%s); trying the next member", url, exc)
                    down_since = True
                else:
                    log.debug("etcd: the watch on %s failed again: %s", url, exc)
                index += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, RETRY_MAX)
    finally:
        if own:
            await client.aclose()


class _StreamEnded(Exception):
    pass


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _batch(message: dict[str, Any], url: str) -> WatchBatch | int | None:
    """A streamed message as events, the start revision (int) of a created watch, or None."""
    if "error" in message:
        error = message["error"]
        raise _StreamEnded(error.get("message") or error.get("error") or str(error))
    result = message.get("result", {})
    revision = int(result.get("header", {}).get("revision", 0))
    compacted = int(result.get("compact_revision", 0))
    if compacted:
        raise EtcdCompacted(compacted)
    if result.get("canceled"):  # no leader (hasleader), or the member is going away
        raise _StreamEnded(result.get("cancel_reason") or "the watch was canceled")
    if result.get("created"):
        return revision
    events = tuple(
        WatchEvent("delete" if e.get("type") == "DELETE" else "put", KeyValue.from_json(e.get("kv", {})))
        for e in result.get("events", [])
    )
    return WatchBatch(events[-1].kv.mod_revision, events) if events else None  # None: progress only


async def _authenticate(client: httpx.AsyncClient, url: str, options: EtcdOptions) -> str:
    reply = await client.post(
        f"{url}/v3/auth/authenticate", json={"name": options.user, "password": options.password}
    )
    if reply.status_code != 200:
        raise EtcdError(f"etcd refused user {options.user!r}")
    return str(reply.json()["token"])
