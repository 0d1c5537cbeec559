"""The service registry in etcd: control service replicas share one registry, and an instance's
TTL is an etcd lease, so an instance whose process died is removed by etcd itself, once, for
every replica, whatever their clocks say.

Keys, under the store prefix (`/meshlib/` by default):

    registry/<service>/<address>    {"id", "labels", "weight", "ttl", "registered"}
    registry-ids/<service>/<id>     <address>   (where an id is: a heartbeat names the id only)

service, address and id percent-encoded (a key names one instance, so one per (service,
address) holds by construction). An instance's two keys are attached to a lease of its own,
granted with the instance's TTL rounded up to whole seconds: etcd grants no less than its
minimum lease TTL (about 1.5 election timeouts: 2 s with etcd's defaults), and removes a lease
up to ~0.5 s after it ran out.

- register: a new lease, then ONE transaction that reads the key and puts the new instance (its
  two keys) on it, replacing whatever was there; the replaced instance's lease is then revoked
  (it holds no key any more), so its process can no longer keep anything alive.
- heartbeat: a keepalive of the instance's lease (one request, answered by the leader without a
  raft write). A new ttl: a new lease and a put that compares the key's mod revision, so a
  heartbeat of a replaced instance cannot move the new one.
- time left: known here for the leases this replica granted or kept alive, asked of etcd for
  the others, at most once a second each (`refresh`, meshlib.control.lease_clock).
- deregister: a delete comparing the key's mod revision read with the id checked, so a late
  deregistration by a replaced process never removes its successor.

Every change is answered within a time of its own, whatever etcd does (EtcdError past it: the
control API's 503 with Retry-After), so a process is told "not now" well before its own request
times out and takes the replica for dead: a registration or deregistration within
`write_timeout` (retried through an election), a heartbeat within `heartbeat_timeout(ttl)`:
half of what the process waits for its answer (meshlib.control.registration: a third of the
TTL, 1 to 5 s). While etcd leaves heartbeats waiting, one heartbeat a second tries it and the
others are refused at once (`_Gate`): a fleet's heartbeats do not each hold one of the
replica's threads for that long while etcd is down.

The id of an instance is not in its key: the caller passes what its mirror knows (`hint`, the
instance with that id as last watched); without one (a mirror a moment behind, an id it never
saw) `registry-ids/` says where the id is, in one read whatever the registry's size. That prefix
sorts before `registry/`, outside what replicas watch. Blocking calls: run them off the event
loop. Replicas learn of every change from their watch (ControlPlane.run_store_watch), never
from the request they served.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from meshlib.control.etcd_client import (
    EtcdClient,
    EtcdError,
    EtcdIndeterminate,
    EtcdOptions,
    EtcdUnavailable,
    KeyValue,
    compare_mod,
    delete_op,
    prefix_end,
    put_op,
    range_op,
)
from meshlib.control.lease_clock import LeaseClock
from meshlib.control.parsing import RegisterBody, _check_id, _service_adapter
from meshlib.control.registry import MAX_TTL, MIN_TTL, Instance
from meshlib.rules import EndpointSpec

log = logging.getLogger("meshlib.control")

REGISTRY = "registry/"
IDS = "registry-ids/"
PAGE = 1000  # keys per range request when reading the whole registry
HEARTBEAT_TIMEOUT = (0.5, 3.0)
"""Seconds a heartbeat may wait for etcd: a sixth of the instance's TTL within these bounds (the
process waits a third of it, at least 1 s: meshlib.control.registration.BEAT_TIMEOUT), and never
more than `write_timeout`."""
RETRY_AFTER = 1.0
"""Seconds heartbeats are refused at once after one that etcd did not answer (the 503's
Retry-After); then one tries etcd again."""
SLOW_FAILURE = 0.2
"""Seconds after which a heartbeat that failed shuts the gate (one that failed at once, every
member refusing connections, holds no thread: the next ones may try as well)."""
REVOKE_TIMEOUT = 0.5  # a lease that holds nothing any more: revoked if etcd answers, else it runs out
REFRESH_TIMEOUT = 1.0  # asking etcd the time left of leases, for one listing: past it, what was known
MAX_ASKED = 64
"""Leases whose time left one listing asks etcd for (one request each); the rest keep what was
heard of them, or show their TTL."""

_T = TypeVar("_T")


def lease_ttl(ttl: float) -> int:
    """The lease TTL for an instance TTL: whole seconds, rounded up (etcd may grant more)."""
    return max(1, math.ceil(ttl))


def check_item(item: Mapping[str, Any]) -> None:
    """An instance as stored (registry.json or an etcd value with its key's service and address)
    within today's bounds; KeyError, TypeError or ValueError otherwise."""
    _service_adapter.validate_python(item["service"])
    fields = {"address": item["address"], "labels": item.get("labels") or {}, "weight": item["weight"]}
    RegisterBody.model_validate(fields)
    EndpointSpec.model_validate(fields)
    _check_id(item["id"])
    ttl = item["ttl"]
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not MIN_TTL <= ttl <= MAX_TTL:
        raise ValueError(f"ttl must be from {MIN_TTL:g} to {MAX_TTL:g} seconds")


@dataclass(frozen=True)
class Registered:
    """What a change wrote: the instance id and the etcd revision of the write."""

    id: str
    revision: int


class EtcdRegistry:
    """The registry's writes and reads in etcd; safe to use from several threads."""

    def __init__(
        self, options: EtcdOptions, *, client: EtcdClient | None = None, write_timeout: float = 10.0
    ) -> None:
        self.options = options
        self.write_timeout = write_timeout
        self._client = client if client is not None else EtcdClient(options)
        self.prefix = (options.prefix + REGISTRY).encode()
        self.ids = (options.prefix + IDS).encode()
        self.leases = LeaseClock()
        self._gate = _Gate(RETRY_AFTER)  # heartbeats while etcd does not answer them

    def heartbeat_timeout(self, ttl: float | None) -> float:
        """Seconds a heartbeat of an instance with `ttl` may wait for etcd (None: not known)."""
        low, high = HEARTBEAT_TIMEOUT
        return min(self.write_timeout, high, max(low, ttl / 6 if ttl is not None else low))

    # -- keys ---------------------------------------------------------------------------------

    def key(self, service: str, address: str) -> bytes:
        return self.prefix + f"{quote(service, safe='')}/{quote(address, safe='')}".encode()

    def id_key(self, service: str, instance_id: str) -> bytes:
        return self.ids + f"{quote(service, safe='')}/{quote(instance_id, safe='')}".encode()

    def instance(self, kv: KeyValue, now: float) -> Instance:
        """A watched or read key as a mirror's instance (never expiring there: etcd expires it);
        ValueError (or KeyError, TypeError) if it is not one valid today."""
        service, address = self.names(kv.key)
        data = json.loads(kv.value)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        item = {**data, "service": service, "address": address}
        check_item(item)
        return Instance(
            id=item["id"],
            service=service,
            address=address,
            labels=dict(item.get("labels") or {}),
            weight=int(item["weight"]),
            ttl=float(item["ttl"]),
            expires=math.inf,
            registered=now,
            lease=kv.lease,
        )

    def names(self, key: bytes) -> tuple[str, str]:
        """(service, address) of a registry key; ValueError if it is not one."""
        if not key.startswith(self.prefix):
            raise ValueError(f"not a registry key: {key[:200]!r}")
        service, slash, address = key[len(self.prefix) :].decode().partition("/")
        if not slash or "/" in address:
            raise ValueError(f"not a registry key: {key[:200]!r}")
        return unquote(service), unquote(address)

    # -- reads --------------------------------------------------------------------------------

    def load(self) -> tuple[list[KeyValue], int]:
        """Every registry key and the revision they were read at (one consistent view, in pages)."""
        return self._range_all(self.prefix, prefix_end(self.prefix))

    def time_left(self, lease: int) -> float | None:
        """Seconds `lease` has left as this replica knows it (no request); None if unknown."""
        return self.leases.left(lease)

    def refresh(self, leases: Iterable[int], limit: int = MAX_ASKED) -> None:
        """Ask etcd the time left of those `leases` not heard of lately (at most `limit` of
        them: one request each, all within REFRESH_TIMEOUT); etcd out of reach leaves what
        was known."""
        budget = _Budget(REFRESH_TIMEOUT)
        for lease in self.leases.stale(leases)[:limit]:
            try:
                self.leases.heard_truncated(lease, self._client.time_to_live(lease, timeout=budget.left()))
            except EtcdError as exc:
                log.debug("registry: the time left of lease %x is not known: %s", lease, exc)
                return

    # -- writes -------------------------------------------------------------------------------

    def register(
        self, service: str, address: str, *, labels: Mapping[str, str], weight: int, ttl: float
    ) -> Registered:
        """Put a new instance at (service, address), replacing any, on a lease of its own.

        Lands once or raises EtcdError: a lost answer is checked by reading the key (does it hold
        this id?) before sending the put again; given up after `write_timeout`, the lease is
        revoked, so a put that still lands later goes with it."""
        if not MIN_TTL <= ttl <= MAX_TTL:
            raise ValueError(f"ttl must be from {MIN_TTL:g} to {MAX_TTL:g} seconds")
        key = self.key(service, address)
        instance_id = secrets.token_hex(8)
        record = {"id": instance_id, "labels": dict(labels), "weight": weight, "ttl": ttl}
        value = _dump({**record, "registered": time.time()})
        deadline = time.monotonic() + self.write_timeout
        lease, granted = self._retrying(
            deadline, lambda: self._client.grant(lease_ttl(ttl), timeout=_left(deadline))
        )
        self.leases.heard(lease, granted)
        compare: list[dict[str, Any]] = []
        sent = False
        error: EtcdError | None = None
        backoff = 0.05
        while True:
            if time.monotonic() > deadline:
                self._revoke_quietly(lease)
                raise EtcdError(f"etcd: registration not confirmed within {self.write_timeout:g} s")
            try:
                if sent:  # an attempt without an answer: did it land?
                    kv = self._client.get(key, timeout=_left(deadline))
                    if kv is not None and _id_of(kv) == instance_id:
                        log.info("registry: registration of %s at %s landed although its answer was lost",
                                 service, address)  # fmt: skip
                        return Registered(instance_id, kv.mod_revision)
                    compare = [compare_mod(key, kv.mod_revision if kv is not None else 0)]
                result = self._client.txn(
                    compare,
                    [
                        range_op(key),
                        put_op(key, value, lease),
                        put_op(self.id_key(service, instance_id), address.encode(), lease),
                    ],
                    timeout=_left(deadline),
                )
                if result.succeeded:
                    break
                continue  # changed between the read and the put: read again
            except EtcdIndeterminate as exc:
                sent, error = True, exc
            except EtcdUnavailable as exc:
                error = exc
            if time.monotonic() + backoff > deadline:
                self._revoke_quietly(lease)
                raise EtcdError(f"etcd: registration not confirmed within {self.write_timeout:g} s: {error}")
            time.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, 0.5)
        (previous,) = result.ranges()
        if previous and previous[0].lease and previous[0].lease != lease:
            self._revoke_quietly(previous[0].lease)
        return Registered(instance_id, result.revision)

    def heartbeat(
        self, service: str, instance_id: str, ttl: float | None = None, *, hint: Instance | None = None
    ) -> tuple[float, int | None]:
        """Keep an instance alive: (its ttl, the revision of the put when the ttl changed, else
        None). KeyError if there is no such instance (expired, replaced, deregistered);
        EtcdError if etcd does not answer within `heartbeat_timeout`, or did not answer the
        last heartbeat less than RETRY_AFTER ago (then at once)."""
        if ttl is not None and not MIN_TTL <= ttl <= MAX_TTL:
            raise ValueError(f"ttl must be from {MIN_TTL:g} to {MAX_TTL:g} seconds")
        known = hint.ttl if hint is not None and hint.id == instance_id else None
        budget = _Budget(self.heartbeat_timeout(ttl if ttl is not None else known))
        self._gate.enter()
        try:
            kept = self._heartbeat(service, instance_id, ttl, hint, budget)
        except (EtcdUnavailable, EtcdIndeterminate) as exc:
            if budget.spent() >= SLOW_FAILURE:  # etcd hangs: the next ones would wait as long
                self._gate.failed(exc)
            raise
        except KeyError:
            self._gate.ok()  # etcd answered: no such instance
            raise
        self._gate.ok()
        return kept

    def _heartbeat(
        self, service: str, instance_id: str, ttl: float | None, hint: Instance | None, budget: _Budget
    ) -> tuple[float, int | None]:
        mirrored = hint is not None and hint.id == instance_id and hint.lease and ttl in (None, hint.ttl)
        if hint is not None and mirrored and self._keepalive(hint.lease, budget):
            return hint.ttl, None
        # not known here, expired, or the mirror is behind (replaced, a ttl changed elsewhere): ask etcd
        kv, stored = self._find(service, instance_id, hint, budget)
        if ttl is None or ttl == stored.ttl:
            if stored.lease and self._keepalive(stored.lease, budget):
                return stored.ttl, None
            raise KeyError(instance_id)
        lease, granted = self._client.grant(lease_ttl(ttl), timeout=budget.left())
        self.leases.heard(lease, granted)
        data = {**json.loads(kv.value), "ttl": ttl}
        try:
            result = self._client.txn(
                [compare_mod(kv.key, kv.mod_revision)],
                [
                    put_op(kv.key, _dump(data), lease),
                    put_op(self.id_key(service, instance_id), stored.address.encode(), lease),
                ],
                timeout=budget.left(),
            )
        except EtcdUnavailable:
            self._revoke_quietly(lease)
            raise
        if not result.succeeded:  # replaced or deregistered since it was read
            self._revoke_quietly(lease)
            raise KeyError(instance_id)
        self._revoke_quietly(stored.lease)
        return ttl, result.revision

    def deregister(self, service: str, instance_id: str, *, hint: Instance | None = None) -> int:
        """Delete an instance if its key still holds it; the revision of the delete (0: it was
        gone already after an attempt without an answer). KeyError if there is no such instance."""
        lost_answer = False
        budget = _Budget(self.write_timeout)
        for _ in range(8):
            try:
                kv, stored = self._find(service, instance_id, hint, budget)
            except KeyError:
                if lost_answer:
                    return 0
                raise
            try:
                result = self._client.txn(
                    [compare_mod(kv.key, kv.mod_revision)],
                    [delete_op(kv.key), delete_op(self.id_key(service, instance_id))],
                    timeout=budget.left(),
                )
            except EtcdIndeterminate:
                lost_answer = True
                continue
            if result.succeeded:
                self._revoke_quietly(stored.lease)
                return result.revision
            hint = None  # changed since it was read (a new ttl, say): find it again
        raise EtcdError("etcd: the instance kept changing while being deregistered")

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> EtcdRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _find(
        self, service: str, instance_id: str, hint: Instance | None, budget: _Budget
    ) -> tuple[KeyValue, Instance]:
        """The key holding `instance_id` of `service`, read from etcd now; KeyError if none.

        The mirror's address first; else the id's key says where it is (a stale one, left by a
        replaced instance whose lease was not revoked, points to a key holding another id)."""
        address = None
        if hint is not None and hint.id == instance_id and hint.service == service:
            address = hint.address
        else:
            where = self._client.get(self.id_key(service, instance_id), timeout=budget.left())
            if where is None:
                raise KeyError(instance_id)
            address = where.value.decode("utf-8", "replace")
        kv = self._client.get(self.key(service, address), timeout=budget.left())
        if kv is None or _id_of(kv) != instance_id:
            if hint is not None:  # the mirror is behind: ask the index
                return self._find(service, instance_id, None, budget)
            raise KeyError(instance_id)
        try:
            return kv, self.instance(kv, 0.0)
        except (KeyError, TypeError, ValueError):
            raise KeyError(instance_id) from None

    def _keepalive(self, lease: int, budget: _Budget) -> bool:
        """Renew `lease` once; whether it was still there (its time left is then its TTL)."""
        left = self._client.keepalive(lease, timeout=budget.left())
        self.leases.heard(lease, left)
        return left > 0

    def _range_all(self, key: bytes, end: bytes) -> tuple[list[KeyValue], int]:
        kvs: list[KeyValue] = []
        revision = 0
        for page, at in self._pages(key, end):
            kvs += page
            revision = at
        return kvs, revision

    def _pages(self, key: bytes, end: bytes) -> Iterator[tuple[list[KeyValue], int]]:
        revision = 0
        while True:
            body: dict[str, Any] = {"key": _b64(key), "range_end": _b64(end), "limit": str(PAGE)}
            if revision:
                body["revision"] = str(revision)  # every page at the first page's revision
            reply = self._client.call("/v3/kv/range", body, write=False)
            revision = revision or int(reply["header"]["revision"])
            page = [KeyValue.from_json(kv) for kv in reply.get("kvs", [])]
            yield page, revision
            if not reply.get("more") or not page:
                return
            key = page[-1].key + b"\0"

    def _retrying(self, deadline: float, call: Callable[[], _T]) -> _T:
        backoff = 0.05
        while True:
            try:
                return call()
            except (EtcdUnavailable, EtcdIndeterminate) as exc:
                if time.monotonic() + backoff > deadline:
                    raise EtcdError(f"etcd: no answer within {self.write_timeout:g} s: {exc}") from exc
                time.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, 0.5)

    def _revoke_quietly(self, lease: int) -> None:
        """Revoke a lease that holds nothing any more; if etcd does not answer, it runs out."""
        if not lease:
            return
        try:
            self._client.revoke(lease, timeout=REVOKE_TIMEOUT)
        except EtcdError as exc:
            log.debug("registry: lease %x not revoked (it runs out on its own): %s", lease, exc)


class _Budget:
    """The time one registry call has for all its requests to etcd."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()
        self.end = self.start + seconds

    def spent(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds left for the next request; EtcdUnavailable (nothing more is sent) once none."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise EtcdUnavailable(f"etcd: no answer within {self.seconds:g} s")
        return left


def _left(deadline: float) -> float:
    return max(0.01, deadline - time.monotonic())


class _Gate:
    """Heartbeats while etcd does not answer them: after one that waited for etcd and failed
    (no leader, a member that hangs, too slow), the others fail at once for `pause` seconds,
    then one tries etcd again (and so on, one a pause, until one gets an answer). Without it,
    every heartbeat of a fleet would wait its whole time for etcd on one of the replica's
    threads, and the replica would answer later and later."""

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self._lock = threading.Lock()
        self._shut_until = 0.0  # monotonic; 0: etcd answered the last heartbeat
        self._why = ""

    def enter(self) -> None:
        with self._lock:
            if not self._shut_until:
                return
            now = time.monotonic()
            if now < self._shut_until:
                raise EtcdUnavailable(
                    f"etcd did not answer a heartbeat {self.pause:g} s ago or less ({self._why})"
                )
            self._shut_until = now + self.pause  # this one tries; the others wait for what it finds

    def failed(self, exc: EtcdError) -> None:
        with self._lock:
            self._shut_until = time.monotonic() + self.pause
            self._why = str(exc)[:200]

    def ok(self) -> None:
        with self._lock:
            self._shut_until = 0.0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _id_of(kv: KeyValue) -> str | None:
    try:
        data = json.loads(kv.value)
    except ValueError:
        return None
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None
