"""Server-Sent Events fan-out: the hub every rules and endpoints change goes through.

The hub lives on the control app's event loop and is only touched from it, so it needs no
locks. Each change gets the next *revision*; its event is encoded once (id `EPOCH:REVISION`,
JSON data) and the same bytes are queued to every subscriber. Memory stays bounded whatever the
clients do:

- the last `buffer_size` events, and no more than `buffer_bytes` of them (the newest is always
  kept), are kept in a ring buffer for `Last-Event-ID` resumes; a resume from further back
  gets a snapshot;
- each subscriber has a queue of at most `queue_size` events; publishing never waits: a
  subscriber whose queue is full is dropped at once (its queue is emptied, its stream ends, and
  `dropped_total` counts it). It reconnects and resumes from its last event id.

A subscriber that is behind gets the latest rules, not every version it missed: a `rules`
event carries the whole rule set, so of the `rules` events waiting in its queue only the last
is sent (endpoint events, which are deltas, all go out, in order).

A `rules` event is encoded twice: whole, and as a delta against the version before it (the
documents that did not change named by their index in that version's list). A stream whose
client asked for deltas (`?delta=1`) gets the delta when its client holds that version (it
said so as it connected, or it got it on this stream), the whole event otherwise: after a
coalesced burst, a snapshot of another version, a replica that skipped a version. A delta's
size is that of the change, not of the rule set, and so is the client's work decoding it.

With a store shared by replicas (etcd), the epoch is the store's and a `rules` event's revision
is its commit's store revision times `STEP`: the same id on every replica, so a client resumes on
any of them; so is an `endpoint` event's (the registry is in etcd too, watched with the rules).
Events of this replica alone (the trust bundle) take the next number after it, never a
multiple of `STEP`, so they are never mistaken for a store position; the stream's revisions
then rise but are not consecutive. A client that resumes at a store position this replica has
not reached yet (it comes from a replica whose watch of the store is ahead) is held, not sent a
snapshot of the older state: it gets the events after its position once this replica has them,
and a snapshot only if that takes longer than `ahead_wait` seconds.

Every subscriber acks every event; past 500 streams an event also carries `ack_window`, the
seconds over which its acks should be spread (1 ms per stream, at most half of `stale_after`),
so that a push's acks stay a bounded share of the service's CPU however many subscribers there
are.

The hub also keeps the books for `GET /v1/clients`: who is connected, from where, and the last
revision/version each client acknowledged; disconnected clients are remembered for a while.

Streams are served by `WatchResponse`, a lean ASGI response of this module (docs/decisions.md,
"A lean watch response"): the connection's own task sends the events as they are queued, one
task per stream listens for the client going away, the heartbeat (`: ping`) is a timer of the
event loop that queues a ping when nothing else is queued, and each send is bounded by asyncio's
timeout (a send that times out, a client that stopped reading, closes the stream with a warning).
sse-starlette's `EventSourceResponse` ran four tasks under an anyio task group per stream; a
replica that takes over thousands of subscribers at once paid for them on every resume. What
is kept of sse-starlette: the event encoding (`ServerSentEvent`) and its hook on uvicorn's exit
(`AppStatus.should_exit`), which one task per hub polls to end every stream when the server is
told to exit (else uvicorn would wait for them forever).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sse_starlette.event import ServerSentEvent
from sse_starlette.sse import AppStatus
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from meshlib.control import rules_delta

log = logging.getLogger("meshlib.control")

SEP = "\r\n"

ACK_SPREAD = 0.001
"""Seconds of ack window per subscriber (an ack costs the service about 0.3 ms of CPU)."""
ACK_HINT_FROM = 0.5  # the subscriber's own ack delay (meshlib.control.subscriber): no hint below

STEP = 1_000_000
"""With store positions: revision = store revision * STEP; this replica's own events fill the gap."""

AHEAD_WAIT = 2.0
"""Seconds a client resuming ahead of this replica (a store position it has not reached) waits
for the replica's watch to catch up before it gets a snapshot instead: a watch of etcd lags by
milliseconds; one that does not catch up in this time is cut off (or the client's id is of
another history under the same epoch), and the snapshot is then the answer."""


def encode_event(kind: str, event_id: str, data: str) -> bytes:
    """One SSE event on the wire."""
    return ServerSentEvent(data, event=kind, id=event_id, sep=SEP).encode()


def _json(value: Any) -> str:
    # ASCII only: some SSE readers split lines with str.splitlines(), which also breaks on
    # U+0085, U+2028 and U+2029; escaped, no character of the data can end a line.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


@dataclass(frozen=True, slots=True)
class Event:
    """One published change (or a snapshot), encoded once for every subscriber."""

    revision: int
    kind: str
    published: float  # monotonic clock
    wire: bytes = field(repr=False)
    version: int = -1  # the rules version a `rules` event or a snapshot brings
    base: int = -1  # the version `delta` applies to
    delta: bytes | None = field(default=None, repr=False)  # a `rules` event as a delta (see the module doc)

    @property
    def size(self) -> int:
        """Its bytes in the replay buffer."""
        return len(self.wire) + (len(self.delta) if self.delta is not None else 0)


class Subscriber:
    """One open watch stream: its bounded queue and who is on the other end."""

    __slots__ = (
        "after", "client", "closed", "deltas", "dropped", "gone", "peer", "queue", "rules", "service",
    )  # fmt: skip

    def __init__(self, client: str, service: str | None, peer: str | None, queue_size: int) -> None:
        self.client = client
        self.service = service
        self.peer = peer
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(queue_size)
        self.dropped = False
        self.closed = False
        self.gone = False  # the client went away (nothing more can be sent)
        self.after = 0  # held: the client has every event up to this revision (0: not held)
        self.deltas = False  # the client takes `rules` events as deltas
        self.rules = -1  # the rules version the client holds (-1: not known)

    def __repr__(self) -> str:
        return f"Subscriber({self.client!r}, service={self.service!r}, peer={self.peer!r})"


@dataclass
class ClientRecord:
    """What the control service knows about one client id."""

    client: str
    service: str | None = None
    peer: str | None = None
    connections: int = 0
    connected_at: float | None = None  # unix seconds, of the latest connection
    last_seen: float | None = None  # unix seconds
    revision: int | None = None  # last acknowledged
    version: int | None = None
    ok: bool | None = None
    error: str | None = None
    connected_mono: float = 0.0
    disconnected_mono: float | None = None


_E = TypeVar("_E", bound="Event | None")


class Hub:
    """Revisions, the replay buffer, subscribers and client bookkeeping (event loop only)."""

    def __init__(
        self,
        *,
        epoch: str | None = None,
        buffer_size: int = 1024,
        buffer_bytes: int = 16 << 20,
        queue_size: int = 256,
        stale_after: float = 5.0,
        forget_after: float = 300.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        store_revision: int | None = None,
        ahead_wait: float = AHEAD_WAIT,
    ) -> None:
        """`store_revision`: the hub starts at that position of a shared store (see the module's
        doc); `epoch` must then be the store's."""
        if buffer_size < 1 or queue_size < 1:
            raise ValueError("buffer_size and queue_size must be at least 1")
        self.epoch = epoch or secrets.token_hex(8)
        self.store_positions = store_revision is not None
        self.revision = store_revision * STEP if store_revision is not None else 0
        self._floor = self.revision  # resumes from before this need a snapshot
        self.coalesced_total = 0
        self.ahead_wait = ahead_wait
        self.version: int | None = None  # the rules version of the latest `rules` event (or the start's)
        self.held_total = 0  # resumes from a store position this replica had not reached yet
        self.queue_size = queue_size
        self.stale_after = stale_after
        self.forget_after = forget_after
        self.max_clients = max_clients
        self.dropped_total = 0
        self.stale_acks_total = 0
        self.changes = 0
        """Moves on whenever a client record changes (the etcd writer's cue)."""
        self._clock = clock
        self._wall = wall
        self._started = clock()
        self._buffer: collections.deque[Event] = collections.deque()
        self._buffer_size = buffer_size
        self.buffer_bytes = buffer_bytes
        self._buffered_bytes = 0
        self._subscribers: set[Subscriber] = set()
        self._index: tuple[int, dict[str, int]] = (-1, {})  # the last rules version's documents, by JSON
        self._clients: dict[str, ClientRecord] = {}
        self._gone: dict[str, None] = {}  # clients with no stream, in the order they went
        self._exit_watch: asyncio.Task[None] | None = None

    # -- publishing ---------------------------------------------------------------------------

    def publish(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        store_revision: int | None = None,
        base: tuple[int, Sequence[Any]] | None = None,
    ) -> Event:
        """Give the change the next revision and queue it to every subscriber; never waits.

        `store_revision`: the change is the shared store's at that revision (hubs started with
        `store_revision` only); its revision is then the same on every replica. `base`: for a
        `rules` event, the version before it and its documents (the delta's base)."""
        self.revision = self._next(store_revision)
        hint = self._ack_hint()
        head = {"epoch": self.epoch, "revision": self.revision}
        wire = encode_event(kind, self.event_id(), _json({**head, **payload, **hint}))
        version = payload.get("version") if kind == "rules" else None
        delta_wire: bytes | None = None
        base_version = -1
        if isinstance(version, int):
            self.version = version
            documents = payload.get("documents")
            delta = self._delta(version, documents, base) if isinstance(documents, list) else None
            if delta is not None:
                base_version = delta["base"]
                delta_wire = encode_event(kind, self.event_id(), _json({**head, **payload, **delta, **hint}))
        else:
            version = -1
        event = Event(self.revision, kind, self._clock(), wire, version, base_version, delta_wire)
        self._buffer.append(event)
        self._buffered_bytes += event.size
        while len(self._buffer) > 1 and (
            len(self._buffer) > self._buffer_size or self._buffered_bytes > self.buffer_bytes
        ):
            evicted = self._buffer.popleft()
            self._buffered_bytes -= evicted.size
            self._floor = evicted.revision
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                self._drop(sub)
        return event

    def _delta(
        self, version: int, documents: Sequence[Any], base: tuple[int, Sequence[Any]] | None
    ) -> dict[str, Any] | None:
        """`{"base": V, "documents": [...]}`: the documents of `version` with those that version
        V has too replaced by their index in V's list; None with no base or nothing in common.
        Documents are compared by their JSON (each is encoded once more here, once per event)."""
        keys = [_json(doc) for doc in documents]
        known, self._index = self._index, (version, {key: i for i, key in enumerate(keys)})
        if base is None:
            return None
        base_version, base_documents = base
        if known[0] != base_version:
            known = (base_version, {_json(doc): i for i, doc in enumerate(base_documents)})
        out = rules_delta.documents_of(keys, documents, known[1])
        # nothing shared (a whole new rule set): the delta would be the event again
        return {"base": base_version, "documents": out} if out is not None else None

    def wire(self, sub: Subscriber, event: Event) -> bytes:
        """The bytes of `event` for `sub`: a `rules` event's delta when its client holds the
        delta's base, else the event whole (and the version its client holds from then on)."""
        if sub.deltas and event.version >= 0:
            held, sub.rules = sub.rules, event.version
            if event.delta is not None and held == event.base:
                return event.delta
        return event.wire

    def restart_at(self, store_revision: int) -> None:
        """Nothing from before that store position can be resumed from (its events could not
        all be published): a client from an earlier position gets a snapshot; what was
        published after it still replays."""
        revision = store_revision * STEP
        self.revision = max(self.revision, revision)
        if revision > self._floor:
            self._floor = revision
            while self._buffer and self._buffer[0].revision <= revision:
                self._buffered_bytes -= self._buffer.popleft().size

    def _next(self, store_revision: int | None) -> int:
        if not self.store_positions:
            return self.revision + 1
        if store_revision is not None and store_revision * STEP > self.revision:
            return store_revision * STEP
        # this replica's own event (or, after STEP - 1 of them in a row, a store event that can
        # no longer have its exact position: clients there resume on this replica only)
        nxt = self.revision + 1
        return nxt + 1 if nxt % STEP == 0 else nxt

    def snapshot(self, payload: dict[str, Any]) -> Event:
        """A `snapshot` event at the current revision (not buffered: it is never replayed)."""
        data = _json({"epoch": self.epoch, "revision": self.revision, **payload, **self._ack_hint()})
        version = payload.get("version")
        return Event(
            self.revision,
            "snapshot",
            self._clock(),
            encode_event("snapshot", self.event_id(), data),
            version if isinstance(version, int) else -1,
        )

    def ack_window(self) -> float:
        """Seconds over which the subscribers should spread their acks of the next event: every
        one of them acks it, and at ACK_SPREAD seconds per subscriber the acks take about a
        third of a core whatever their number (at most half of `stale_after`, so an ack still
        comes in time)."""
        return min(len(self._subscribers) * ACK_SPREAD, self.stale_after / 2)

    def _ack_hint(self) -> dict[str, float]:
        """`ack_window` in the event when it is wider than the subscribers' own delay (0.5 s):
        only with more than 500 streams, so small meshes see no new field."""
        window = self.ack_window()
        return {"ack_window": round(window, 3)} if window > ACK_HINT_FROM else {}

    def event_id(self, revision: int | None = None) -> str:
        return f"{self.epoch}:{self.revision if revision is None else revision}"

    def replay_after(self, last_event_id: str | None) -> list[Event] | None:
        """The buffered events after `EPOCH:REVISION`, or None when a snapshot is needed."""
        rev = self._position(last_event_id)
        if rev is None or rev > self.revision:
            return None
        if rev == self.revision:
            return []
        if rev < self._floor:
            return None  # some of the missed events are no longer buffered
        events = list(self._buffer)
        start = bisect.bisect_right(events, rev, key=lambda e: e.revision)
        known = rev == self._floor or (start > 0 and events[start - 1].revision == rev)
        if not known and not (self.store_positions and rev % STEP == 0):
            return None  # not a position of this stream (nor a store position every replica has)
        return events[start:]

    def ahead_of(self, last_event_id: str | None) -> int | None:
        """The store position of `last_event_id` when it is one of this store that this replica
        has not reached yet (its client comes from a replica whose watch is ahead); else None."""
        if not self.store_positions:
            return None
        rev = self._position(last_event_id)
        return rev if rev is not None and rev > self.revision and rev % STEP == 0 else None

    def _position(self, last_event_id: str | None) -> int | None:
        """The revision of an `EPOCH:REVISION` id of this stream's epoch; None for anything else."""
        if not last_event_id:
            return None
        epoch, sep, rev_text = last_event_id.strip().rpartition(":")
        if not sep or epoch != self.epoch or not rev_text.isascii() or not rev_text.isdigit():
            return None
        return int(rev_text) if len(rev_text) <= 19 else None

    def published_at(self, revision: int) -> float:
        """Monotonic time at which the first revision from `revision` on was published (start
        time if it is not buffered)."""
        if revision <= self._floor or not self._buffer:
            return self._started
        if self.store_positions:
            index = bisect.bisect_left(self._buffer, revision, key=lambda e: e.revision)
        else:  # consecutive revisions: no search (this runs for every client in /v1/clients)
            index = revision - self._buffer[0].revision
        return self._buffer[index].published if index < len(self._buffer) else self._started

    # -- subscribers --------------------------------------------------------------------------

    def open(
        self,
        client: str,
        service: str | None,
        peer: str | None,
        last_event_id: str | None,
        snapshot: Callable[[], Event],
        *,
        applied: bool = False,
        deltas: bool = False,
        rules: int | None = None,
    ) -> tuple[Subscriber, list[Event]]:
        """Subscribe and return the events to send first (a replay, or a snapshot).

        Synchronous on purpose: nothing can be published between choosing the first events
        and joining the fan-out, so a subscriber never misses or repeats a revision.

        `applied`: the client says its `last_event_id` is the state it applied (meshlib's
        subscriber, `?applied=1`); a resume with nothing to send then counts as its ack of this
        replica's state, which it would otherwise never send (no event, no ack), and a client
        that moved here without a change since would be listed as stale until the next one.

        `deltas`: the client takes `rules` events as deltas; `rules`: the rules version it
        holds (trusted on a resume only, which is of this epoch: a snapshot says its own).
        """
        replay = self.replay_after(last_event_id)
        ahead = self.ahead_of(last_event_id) if replay is None else None
        sub = Subscriber(client, service, peer, self.queue_size)
        sub.deltas = deltas
        if rules is not None and (replay is not None or ahead is not None):
            sub.rules = rules
        if ahead is not None:  # held until this replica has what the client has: no older snapshot
            sub.after = ahead
            self.held_total += 1
            first: list[Event] = []
        else:
            first = replay if replay is not None else [snapshot()]
        self._subscribers.add(sub)
        now, wall = self._clock(), self._wall()
        rec = self._record(client, force=True)
        assert rec is not None
        rec.service = service or rec.service
        rec.peer = peer
        rec.connections += 1
        rec.connected_at = wall
        rec.last_seen = wall
        rec.connected_mono = now
        rec.disconnected_mono = None
        if applied and replay == [] and (rec.revision is None or rec.revision < self.revision):
            rec.revision, rec.version, rec.ok, rec.error = self.revision, self.version, True, None
        self.changes += 1
        log.info("watch: client %s (%s) connected from %s", client, service or "-", peer or "-")
        return sub, first

    def listen(self) -> Subscriber:
        """A subscriber that is no client (the xDS server's cue to rebuild): every published event
        is queued to it too, and it is dropped like any other when it falls behind."""
        sub = Subscriber("", None, None, self.queue_size)
        self._subscribers.add(sub)
        return sub

    def unlisten(self, sub: Subscriber) -> None:
        sub.closed = True
        self._subscribers.discard(sub)

    def close_subscriber(self, sub: Subscriber) -> None:
        """Forget a subscriber whose stream ended; safe to call more than once."""
        if sub.closed:
            return
        sub.closed = True
        self._subscribers.discard(sub)
        rec = self._clients.get(sub.client)
        self.changes += 1
        if rec is not None and rec.connections > 0:
            rec.connections -= 1
            rec.last_seen = self._wall()
            if rec.connections == 0:
                rec.disconnected_mono = self._clock()
                self._gone.pop(sub.client, None)
                self._gone[sub.client] = None
        if not sub.dropped:
            log.info("watch: client %s disconnected", sub.client)

    def _drop(self, sub: Subscriber) -> None:
        sub.dropped = True
        self.dropped_total += 1
        log.warning(
            "watch: client %s (%s) fell %d events behind and was disconnected",
            sub.client,
            sub.peer or "-",
            self.queue_size,
        )
        self._end(sub)
        self.close_subscriber(sub)

    @staticmethod
    def _end(sub: Subscriber) -> None:
        while not sub.queue.empty():  # free the queued events now; the stream may be stuck
            sub.queue.get_nowait()
        sub.queue.put_nowait(None)

    def close(self) -> None:
        """End every stream (shutdown)."""
        for sub in list(self._subscribers):
            self._end(sub)
            self.close_subscriber(sub)

    def watch_exit(self) -> bool:
        """Called as a stream starts: False when the server is exiting (no stream should
        start); else makes sure one task ends every stream once it is told to exit."""
        if AppStatus.should_exit:
            return False
        if self._exit_watch is None or self._exit_watch.done():
            self._exit_watch = asyncio.get_running_loop().create_task(self._close_on_exit())
        return True

    async def _close_on_exit(self) -> None:
        while not AppStatus.should_exit:
            await asyncio.sleep(EXIT_POLL)
        self.close()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def queued(self) -> int:
        """Events waiting in all subscriber queues together."""
        return sum(sub.queue.qsize() for sub in list(self._subscribers))

    def buffered(self) -> int:
        return len(self._buffer)

    def buffered_bytes(self) -> int:
        """The size on the wire of the buffered events together."""
        return self._buffered_bytes

    # -- acks and clients ---------------------------------------------------------------------

    def ack(
        self,
        client: str,
        *,
        service: str | None,
        revision: int | None,
        version: int | None,
        ok: bool,
        error: str | None,
        peer: str | None = None,
        epoch: str | None = None,
    ) -> bool:
        """Record what a client applied (or refused). Unknown clients are recorded if there is room.

        With `epoch` (clients since acks carry it) the latest ack wins: one of an older revision
        than recorded (a retry that arrived after a newer ack) is not taken, nor one of another
        epoch (a stream of another store or an earlier run); both still count as a sign of life.
        True when the ack was taken."""
        rec = self._record(client, force=False)
        if rec is None:
            return False
        self.changes += 1
        rec.last_seen = self._wall()
        if epoch is not None and (
            epoch != self.epoch or (revision is not None and (rec.revision or 0) > revision)
        ):
            self.stale_acks_total += 1
            return False
        if service:
            rec.service = service
        if rec.peer is None:
            rec.peer = peer
        if revision is not None:
            rec.revision = revision
        if version is not None:
            rec.version = version
        rec.ok = ok
        rec.error = error
        return True

    def seen(self, client: str) -> None:
        rec = self._clients.get(client)
        if rec is not None:
            rec.last_seen = self._wall()
            self.changes += 1

    def clients(self) -> list[dict[str, Any]]:
        """The `/v1/clients` view, sorted by client id."""
        self.forget()
        now = self._clock()
        return [
            {
                "client": rec.client,
                "service": rec.service,
                "peer": rec.peer,
                "connected": rec.connections > 0,
                "revision": rec.revision,
                "version": rec.version,
                "ok": rec.ok,
                "error": rec.error,
                "stale": self._stale(rec, now),
                "connected_at": rec.connected_at,
                "last_seen": rec.last_seen,
            }
            for rec in sorted(list(self._clients.values()), key=lambda r: r.client)
        ]

    def forget(self) -> None:
        """Drop records of clients disconnected longer than `forget_after`.

        Runs twice a second and on every `/v1/clients`: it looks only at the records that can
        be due (`_gone` is in the order clients went), not at every client."""
        now = self._clock()
        forgotten = 0
        while self._gone:
            key = next(iter(self._gone))
            rec = self._clients.get(key)
            if rec is None or rec.connections > 0 or rec.disconnected_mono is None:
                del self._gone[key]  # forgotten already, or back
                continue
            if now - rec.disconnected_mono <= self.forget_after:
                break
            del self._gone[key], self._clients[key]
            forgotten += 1
        if forgotten:
            self.changes += 1

    def _stale(self, rec: ClientRecord, now: float) -> bool:
        """Connected, and the oldest revision it has not acked is older than `stale_after`."""
        if rec.connections == 0:
            return False
        acked = rec.revision
        if acked is not None and acked >= self.revision:
            return False
        pending = 0 if acked is None else acked + 1
        since = max(self.published_at(pending), rec.connected_mono)
        return now - since > self.stale_after

    def _record(self, client: str, *, force: bool) -> ClientRecord | None:
        rec = self._clients.get(client)
        if rec is not None:
            return rec
        if len(self._clients) >= self.max_clients:
            self.forget()
        if len(self._clients) >= self.max_clients:
            gone = [r for r in self._clients.values() if r.connections == 0]
            if gone:
                oldest = min(gone, key=lambda r: r.disconnected_mono or -math.inf)
                del self._clients[oldest.client]
            elif not force:
                return None
        rec = ClientRecord(client, disconnected_mono=self._clock())
        self._clients[client] = rec
        self._gone.pop(client, None)
        self._gone[client] = None
        return rec

    def stats(self) -> dict[str, int]:
        return {
            "revision": self.revision,
            "subscribers": self.subscribers,
            "dropped_total": self.dropped_total,
            "coalesced_total": self.coalesced_total,
            "queued": self.queued(),
            "buffered": self.buffered(),
            "clients": len(self._clients),
        }

    # -- streaming ----------------------------------------------------------------------------

    async def stream(
        self,
        client: str,
        service: str | None,
        peer: str | None,
        last_event_id: str | None,
        snapshot: Callable[[], Event],
        *,
        deltas: bool = False,
        rules: int | None = None,
    ) -> AsyncIterator[bytes]:
        """The body of one watch response. Subscribes on first iteration, so a response that
        never starts (HEAD, a client gone at once) leaves nothing behind."""
        sub, first = self.open(client, service, peer, last_event_id, snapshot, deltas=deltas, rules=rules)
        timer = self.hold(sub)
        try:
            for event in self._coalesce(first):
                yield self.wire(sub, event)
            while True:
                pending = [await sub.queue.get()]
                while not sub.queue.empty():
                    pending.append(sub.queue.get_nowait())
                for pushed in self.due(sub, pending, snapshot):
                    if pushed is None:
                        return
                    yield self.wire(sub, pushed)
        finally:
            if timer is not None:
                timer.cancel()
            self.close_subscriber(sub)

    def hold(self, sub: Subscriber) -> asyncio.TimerHandle | None:
        """For a held subscriber (see `open`): a timer that asks for a snapshot after
        `ahead_wait` seconds unless this replica has caught up with it by then."""
        if not sub.after:
            return None

        def give_up() -> None:
            if sub.after and not sub.closed:
                try:
                    sub.queue.put_nowait(RESYNC)
                except asyncio.QueueFull:
                    self._drop(sub)

        return asyncio.get_running_loop().call_later(self.ahead_wait, give_up)

    def due(self, sub: Subscriber, events: list[_E], snapshot: Callable[[], Event]) -> list[_E]:
        """The events to send of those waiting (`_coalesce`); for a held subscriber, only those
        after its position (it has the store's up to there) and this replica's own, or the
        snapshot when the wait for them ran out."""
        kept = self._coalesce(events)
        if not sub.after:
            return [e for e in kept if e is not RESYNC]
        out: list[Any] = []
        for event in kept:
            if event is None or event is PING or not sub.after:
                out.append(event)
            elif event is RESYNC:
                log.info("watch: client %s is ahead of this replica; sending a snapshot", sub.client)
                full = snapshot()
                out.append(full)
                sub.after = full.revision  # the events already in it are not sent again
            elif event.revision > sub.after:
                sub.after = 0
                out.append(event)
            elif event.revision % STEP:  # this replica's own (a trust bundle): not the client's yet
                out.append(event)
        return [e for e in out if e is not RESYNC]

    def _coalesce(self, events: list[_E]) -> list[_E]:
        """The events to send of those waiting: every `rules` event but the last is left out
        (the last carries the whole rule set; the ones before it would be stale on arrival)."""
        last = max((i for i, e in enumerate(events) if e is not None and e.kind == "rules"), default=-1)
        kept = [e for i, e in enumerate(events) if i >= last or e is None or e.kind != "rules"]
        self.coalesced_total += len(events) - len(kept)
        return kept


PING_WIRE = f": ping{SEP}".encode()
"""The heartbeat: one comment line with no blank line after it. A blank line ends an event,
and some clients (httpx-sse among them) then dispatch an empty `message` event carrying the
last event id; a lone comment line is ignored by all of them."""

PING = Event(-1, "ping", 0.0, PING_WIRE)
"""Queued to a stream by its heartbeat timer (never published, never buffered)."""

RESYNC = Event(-2, "resync", 0.0, b"")
"""Queued to a held stream when its wait ran out (`Hub.hold`): a snapshot goes out instead."""

EXIT_POLL = 0.5
"""Seconds between looks at the server's exit flag (sse-starlette's AppStatus)."""

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),  # a proxy in front (nginx) passes each event on at once
]
"""sse-starlette's headers but `Connection: keep-alive`: HTTP/1.1's default, which h11 would
parse back out of the response on every stream."""
_START: Message = {"type": "http.response.start", "status": 200, "headers": _HEADERS}
_END: Message = {"type": "http.response.body", "body": b"", "more_body": False}


class _SendTimeout(Exception):
    """A send to a stream did not complete within the send timeout."""


class WatchResponse(Response):
    """One watch stream as an ASGI response (see the module doc): subscribes when the response
    starts (a HEAD gets the headers and no stream), sends the first events and then every
    queued one, and unsubscribes however it ends. A Starlette `Response` only in name and
    headers: it renders no body."""

    def __init__(
        self,
        hub: Hub,
        client: str,
        service: str | None,
        peer: str | None,
        last_event_id: str | None,
        snapshot: Callable[[], Event],
        *,
        ping: float,
        send_timeout: float | None,
        applied: bool = False,
        deltas: bool = False,
        rules: int | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = list(_HEADERS)
        self.hub = hub
        self.args = (client, service, peer, last_event_id, snapshot)
        self.ping = ping
        self.send_timeout = send_timeout
        self.applied = applied
        self.deltas = deltas
        self.rules = rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") == "HEAD":
            await send(_START)
            await send(_END)
            return
        hub = self.hub
        if not hub.watch_exit():  # the server is exiting: an empty stream, the client goes elsewhere
            await send(_START)
            await send(_END)
            return
        await send(_START)
        sub, first = hub.open(*self.args, applied=self.applied, deltas=self.deltas, rules=self.rules)
        loop = asyncio.get_running_loop()
        listener = loop.create_task(_listen(receive, hub, sub))
        beat = _Heartbeat(loop, sub.queue, self.ping) if self.ping > 0 else None
        timer = hub.hold(sub)
        snapshot = self.args[4]
        ended = False
        try:
            pending: list[Event | None] = list(first)
            queue = sub.queue
            while True:
                for event in hub.due(sub, pending, snapshot):
                    if event is None:
                        ended = True
                        break
                    await self._send(send, hub.wire(sub, event))
                if ended:
                    break
                pending = [await queue.get()]
                while not queue.empty():
                    pending.append(queue.get_nowait())
            if not sub.gone:
                await self._send(send, None)
        except _SendTimeout:
            host, port = scope.get("client") or ("-", 0)
            log.warning("watch: closed a stream to %s:%s that stopped reading", host, port)
        finally:
            hub.close_subscriber(sub)
            if beat is not None:
                beat.cancel()
            if timer is not None:
                timer.cancel()
            listener.cancel()

    async def _send(self, send: Send, wire: bytes | None) -> None:
        message = _END if wire is None else {"type": "http.response.body", "body": wire, "more_body": True}
        if self.send_timeout is None:
            await send(message)
            return
        try:
            async with asyncio.timeout(self.send_timeout):
                await send(message)
        except TimeoutError:
            raise _SendTimeout() from None


async def _listen(receive: Receive, hub: Hub, sub: Subscriber) -> None:
    """End the stream when the client goes away (the server says so through `receive`)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            sub.gone = True
            hub._end(sub)
            return


class _Heartbeat:
    """Queues a ping to one stream every `interval` seconds when nothing else is queued: a
    timer of the loop, not a task."""

    __slots__ = ("_handle", "_interval", "_loop", "_queue")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Event | None], interval: float):
        self._loop = loop
        self._queue = queue
        self._interval = interval
        self._handle = loop.call_later(interval, self._beat)

    def _beat(self) -> None:
        if self._queue.empty():
            self._queue.put_nowait(PING)
        self._handle = self._loop.call_later(self._interval, self._beat)

    def cancel(self) -> None:
        self._handle.cancel()
