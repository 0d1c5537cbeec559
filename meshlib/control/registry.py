"""The service registry: instances that announce themselves and stay while they heartbeat.

Pure bookkeeping with an injectable clock: no IO, no tasks, no locks. The control app calls it
from its event loop only and runs the reaper (`expire`) itself; every method that changes a
service's instances tells the caller which services changed, so it can publish them.

What one registration may hold is bounded (`check_labels`, `check_address`): every change is
pushed to every process and kept in the replay buffer, so an instance must stay small.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshlib.addresses import check_address as check_address  # importable from here too
from meshlib.addresses import dns_name

MIN_TTL = 1.0
MAX_TTL = 3600.0

MAX_LABELS = 32
MAX_LABEL_PREFIX = 253  # a DNS subdomain, as in Kubernetes
MAX_LABEL_NAME = 63
MAX_LABEL_VALUE = 256  # Kubernetes allows 63; a little more room for versions, zones, commits

_LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


# --------------------------------------------------------------------------------------------
# What a registration may hold


def check_labels(labels: Mapping[str, str]) -> Mapping[str, str]:
    """Labels in Kubernetes' shape, loosely: at most MAX_LABELS; a key is `[prefix/]name`, the
    name 1-63 letters, digits, '-', '_', '.' (alphanumeric at both ends), the prefix a DNS
    subdomain; a value at most MAX_LABEL_VALUE printable characters (no NUL or other control
    characters). ValueError naming the first offending label otherwise."""
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels.items():
        shown = key[:60]
        prefix, slash, name = key.rpartition("/")
        if slash and not dns_name(prefix, MAX_LABEL_PREFIX):
            raise ValueError(f"label key {shown!r}: the prefix before '/' must be a DNS subdomain")
        if not 1 <= len(name) <= MAX_LABEL_NAME or not _LABEL_NAME_RE.match(name):
            raise ValueError(
                f"label key {shown!r}: the name must be 1 to {MAX_LABEL_NAME} letters, digits, '-', '_' "
                "or '.', starting and ending with a letter or digit"
            )
        if len(value) > MAX_LABEL_VALUE:
            raise ValueError(f"label {shown!r}: the value is longer than {MAX_LABEL_VALUE} characters")
        if not value.isprintable():
            raise ValueError(f"label {shown!r}: the value must be printable (no control characters)")
    return labels


class RegistryFull(Exception):
    """Refused: the registry holds as many instances as it may."""


@dataclass
class Instance:
    """One registered instance of a service."""

    id: str
    service: str
    address: str
    labels: dict[str, str]
    weight: int
    ttl: float
    expires: float  # clock time at which it is removed unless heartbeated (inf: never here)
    registered: float = field(default=0.0)
    lease: int = 0  # on etcd: the lease its key is attached to (meshlib.control.etcd_registry)

    def endpoint(self) -> dict[str, Any]:
        """The instance as discovery sees it: the shape of an EndpointSpec."""
        return {"address": self.address, "labels": dict(self.labels), "weight": self.weight}


class Registry:
    """Instances per service with a TTL each.

    An address is registered at most once per service: registering it again replaces that
    instance with one under a new id, so a restarted process does not appear twice, and clients
    can tell it is a new process (they close its breaker), and a late deregistration by the
    process it replaced does not remove it.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_instances: int = 100_000) -> None:
        self._clock = clock
        self._max = max_instances
        self._by_id: dict[str, Instance] = {}
        self._services: dict[str, dict[str, Instance]] = {}  # service -> id -> instance
        self._at: dict[tuple[str, str], Instance] = {}  # (service, address) -> instance

    def register(
        self,
        service: str,
        address: str,
        *,
        labels: Mapping[str, str] | None = None,
        weight: int = 1,
        ttl: float = 10.0,
    ) -> str:
        """Add (or refresh) an instance; return its id. RegistryFull when there is no room."""
        if not MIN_TTL <= ttl <= MAX_TTL:
            raise ValueError(f"ttl must be from {MIN_TTL:g} to {MAX_TTL:g} seconds")
        now = self._clock()
        old = self.at(service, address)
        if old is not None:
            self._remove(old)  # a new registration is a new process: a new id (see above)
        if len(self._by_id) >= self._max:
            raise RegistryFull(f"the registry holds {self._max} instances already")
        inst = Instance(
            id=secrets.token_hex(8),
            service=service,
            address=address,
            labels=dict(labels or {}),
            weight=weight,
            ttl=ttl,
            expires=now + ttl,
            registered=now,
        )
        self._add(inst)
        return inst.id

    def get(self, service: str, instance_id: str) -> Instance | None:
        inst = self._by_id.get(instance_id)
        return inst if inst is not None and inst.service == service else None

    def at(self, service: str, address: str) -> Instance | None:
        """The instance of `service` registered at `address`, if any."""
        return self._at.get((service, address))

    def heartbeat(self, service: str, instance_id: str, ttl: float | None = None) -> Instance:
        """Extend an instance's life by its ttl (or a new one); KeyError if unknown or expired."""
        inst = self._find(service, instance_id)
        now = self._clock()
        if inst.expires <= now:  # expired: the reaper removes it (and announces the change)
            raise KeyError(instance_id)
        if ttl is not None:
            if not MIN_TTL <= ttl <= MAX_TTL:
                raise ValueError(f"ttl must be from {MIN_TTL:g} to {MAX_TTL:g} seconds")
            inst.ttl = ttl
        inst.expires = now + inst.ttl
        return inst

    def deregister(self, service: str, instance_id: str) -> None:
        """Remove an instance; KeyError if unknown."""
        self._remove(self._find(service, instance_id))

    def expire(self, now: float | None = None) -> set[str]:
        """Remove every instance whose TTL ran out; return the services that lost any."""
        return {inst.service for inst in self.expire_instances(now)}

    def expire_instances(self, now: float | None = None) -> list[Instance]:
        """Remove every instance whose TTL ran out; return them."""
        now = self._clock() if now is None else now
        gone = [inst for inst in self._by_id.values() if inst.expires <= now]
        for inst in gone:
            self._remove(inst)
        return gone

    def next_expiry(self) -> float | None:
        """The clock time of the next expiry, if any instance is registered."""
        return min((inst.expires for inst in self._by_id.values()), default=None)

    def endpoints(self, service: str) -> list[dict[str, Any]]:
        """The live instances of a service as endpoint dicts (address, labels, weight)."""
        return [inst.endpoint() for inst in self._sorted(service)]

    def instances(self, service: str) -> list[Instance]:
        return self._sorted(service)

    def all(self) -> dict[str, list[dict[str, Any]]]:
        """Every service with instances, mapped to its endpoint dicts."""
        return {service: self.endpoints(service) for service in sorted(self._services)}

    def describe(
        self, service: str | None = None, time_left: Callable[[Instance], float | None] | None = None
    ) -> dict[str, list[dict[str, Any]]]:
        """The registry as the API shows it: ids and the seconds left before expiry (a mirror's
        instances, which never expire here: `time_left`, where it knows; else their TTL)."""
        now = self._clock()
        services = [service] if service is not None else sorted(self._services)
        described: dict[str, list[dict[str, Any]]] = {}
        for s in services:
            listed = described[s] = []
            for inst in self._sorted(s):
                left = time_left(inst) if time_left is not None else None
                if left is None:
                    left = max(0.0, min(inst.ttl, inst.expires - now))
                listed.append(
                    {
                        "id": inst.id,
                        "address": inst.address,
                        "labels": dict(inst.labels),
                        "weight": inst.weight,
                        "expires_in": round(left, 3),
                    }
                )
        return described

    def leases(self, service: str | None = None) -> list[int]:
        """The leases of a service's instances (of all, without `service`), where they have one."""
        instances = self._sorted(service) if service is not None else self._by_id.values()
        return [inst.lease for inst in instances if inst.lease]

    def __len__(self) -> int:
        return len(self._by_id)

    # -- a mirror of a registry kept elsewhere (etcd) -----------------------------------------

    def put(self, inst: Instance) -> Instance | None:
        """Hold `inst` as the instance at its (service, address), whatever was there; return
        what was. For a mirror: the bound and the TTL range were checked where it was
        registered, and an instance with `expires` at infinity never expires here."""
        old = self.at(inst.service, inst.address)
        if old is not None:
            self._remove(old)
        dup = self._by_id.get(inst.id)
        if dup is not None:  # the same id at another address: a corrupt store; the last one wins
            self._remove(dup)
        self._add(inst)
        return old

    def remove_at(self, service: str, address: str) -> Instance | None:
        """Remove the instance at (service, address), if any, and return it."""
        old = self.at(service, address)
        if old is not None:
            self._remove(old)
        return old

    def every(self) -> list[Instance]:
        return list(self._by_id.values())

    def export(self, wall: float | None = None) -> list[dict[str, Any]]:
        """Every instance as a JSON-able dict (for saving across restarts of the control service),
        with `expires_at`, the wall-clock time (unix seconds) its TTL runs out."""
        now = self._clock()
        wall = time.time() if wall is None else wall
        return [
            {
                "id": inst.id,
                "service": inst.service,
                "address": inst.address,
                "labels": dict(inst.labels),
                "weight": inst.weight,
                "ttl": inst.ttl,
                "expires_at": round(wall + (inst.expires - now), 3),
            }
            for inst in self._by_id.values()
        ]

    def restore(self, items: list[dict[str, Any]], wall: float | None = None) -> int:
        """Add exported instances with the time they had left: an instance that died while the
        control service was down expires when it would have, not a full TTL after the restart.
        Expired ones are dropped; an item without `expires_at` (older files) gets a full TTL.
        Returns how many were added."""
        now = self._clock()
        wall = time.time() if wall is None else wall
        added = 0
        for item in items:
            service, address, instance_id = item["service"], item["address"], item["id"]
            ttl = float(item["ttl"])
            if instance_id in self._by_id or len(self._by_id) >= self._max:
                continue
            if not MIN_TTL <= ttl <= MAX_TTL:
                continue
            expires_at = item.get("expires_at")
            left = ttl
            if isinstance(expires_at, (int, float)) and not isinstance(expires_at, bool):
                left = min(float(expires_at) - wall, ttl)  # a clock set back gives no more than a TTL
                if not left > 0:  # also NaN
                    continue
            if self.at(service, address) is not None:
                continue
            inst = Instance(
                id=instance_id,
                service=service,
                address=address,
                labels=dict(item.get("labels") or {}),
                weight=int(item.get("weight", 1)),
                ttl=ttl,
                expires=now + left,
                registered=now,
            )
            self._add(inst)
            added += 1
        return added

    # -- internals ----------------------------------------------------------------------------

    def _find(self, service: str, instance_id: str) -> Instance:
        inst = self._by_id.get(instance_id)
        if inst is None or inst.service != service:
            raise KeyError(instance_id)
        return inst

    def _add(self, inst: Instance) -> None:
        self._by_id[inst.id] = inst
        self._services.setdefault(inst.service, {})[inst.id] = inst
        self._at[inst.service, inst.address] = inst

    def _remove(self, inst: Instance) -> None:
        self._by_id.pop(inst.id, None)
        if self._at.get((inst.service, inst.address)) is inst:
            del self._at[inst.service, inst.address]
        instances = self._services.get(inst.service)
        if instances is not None:
            instances.pop(inst.id, None)
            if not instances:
                del self._services[inst.service]

    def _sorted(self, service: str) -> list[Instance]:
        return sorted(self._services.get(service, {}).values(), key=lambda i: (i.address, i.id))
