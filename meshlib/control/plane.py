"""The control plane: the control service's state and operations, independent of HTTP.

Rules changes are serialised by one lock and committed off the event loop; the in-memory copy
of the current rules is only updated once the store has the new version, and the `rules` event
goes out after that. The loop-side state (registry, hub) is only touched from the event loop.

On etcd several replicas share the rules and the registry: each watches the store
(`run_store_watch`, a task of the app's lifespan; one watch over the registry and the rules
versions, in the store's order) and publishes every change once, whichever replica made it, at
the position of its commit in the store (the watch stream's event ids are then the same on every
replica; meshlib.control.stream). A replica's own changes reach its subscribers the same way:
the request waits (briefly) for its watch to bring the change back. The registry in etcd is
meshlib.control.etcd_registry; `registry` is then this replica's mirror of it, which never
expires an instance by itself (etcd's lease does, once, for every replica).

On etcd the replicas also share the admin token, join tokens, CA and client bindings
(meshlib.control.etcd_security; `security_api.run_shared` is their watch, a lifespan task).

The data dir holds `admin.token`, `rules.db` (the store, unless `ControlSettings.etcd` puts the
rules in etcd) and `registry.json` (not on etcd): the registry is
saved there (at most every half second, when instances came, went or heartbeated) so that a
restart of the control service does not tell every client that every registered service is
gone; restored instances keep the time they had left (their expiry is saved as wall-clock
time, and heartbeats are saved at most once a second), so one that died while the service was
down does not come back for a fresh TTL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from meshlib.control.auth import AdminToken, ensure_token
from meshlib.control.binding import ClientBindings
from meshlib.control.etcd_client import EtcdError, KeyValue, prefix_end
from meshlib.control.etcd_clients import SharedClients
from meshlib.control.etcd_registry import EtcdRegistry, check_item
from meshlib.control.etcd_store import EtcdStore
from meshlib.control.etcd_watch import EtcdCompacted, WatchBatch, WatchEvent, watch
from meshlib.control.parsing import ApiError
from meshlib.control.registry import Registry, RegistryFull
from meshlib.control.store import MAX_VERSION, SQLiteStore, Store, StoreConflict, VersionInfo
from meshlib.control.stream import Event, Hub
from meshlib.rules import EndpointSpec, RulesError, RuleSet

if TYPE_CHECKING:
    from meshlib.control.etcd_ca import SharedCA
    from meshlib.control.etcd_client import EtcdOptions
    from meshlib.control.etcd_security import SharedSecurity
    from meshlib.security.ca import CertificateAuthority
    from meshlib.security.tokens import TokenStore

log = logging.getLogger("meshlib.control")

STORE_FILE = "rules.db"
REGISTRY_FILE = "registry.json"
REGISTRY_BEATS_SAVE = 1.0  # seconds between saves when only heartbeats moved expiries on
REGISTRY_WRITE_TIMEOUT = 3.0  # etcd: a registration retried through an election, then a 503
REPLAY_LIMIT = 10_000
"""etcd revisions of history a starting replica reads again, for the deregistrations between the
newest registry key and its read (`ControlPlane.__init__`); beyond it, it serves from the read."""

WATCH_CATCH_UP = 2.0  # etcd: how long a change waits for the watch to bring it back

_T = TypeVar("_T")
_NO_KV = KeyValue(key=b"", value=b"", create_revision=0, mod_revision=0, version=0)


@dataclass(frozen=True)
class ControlSettings:
    """How a control service runs; `create_app(ControlSettings(data_dir))` takes the defaults.

    `ping` is the heartbeat interval of watch streams, `stale_after` how long a client may take
    to ack a revision, `max_body` the largest request body accepted; `queue_size` and
    `buffer_size` bound each subscriber's queue and the replay buffer, `send_timeout` closes
    a stream whose client stopped reading; `max_instances` bounds the registry.

    `security` turns on the CA and join tokens (meshlib.control.security_api): `watch`, `ack`,
    `registry` and `telemetry` then need a join token or a mesh certificate. `trust_domain`
    names the mesh in SPIFFE ids; `ca_cert`/`ca_key` plug in an operator's CA instead of one
    created in the data dir. Serve it over TLS with `server_tls.uvicorn_tls_options`.
    """

    data_dir: str | Path
    ping: float = 15.0
    stale_after: float = 5.0
    max_body: int = 1 << 20
    queue_size: int = 256
    buffer_size: int = 1024
    send_timeout: float | None = 30.0
    max_instances: int = 100_000
    security: bool = False
    trust_domain: str = "mesh.local"
    ca_cert: str | Path | None = None
    ca_key: str | Path | None = None
    etcd: EtcdOptions | None = None
    """Keep the rules in etcd (meshlib.control.etcd_store) instead of `rules.db` in the data dir."""
    xds_port: int | None = None
    """Serve xDS (ADS) for proxyless gRPC clients on this port (meshlib.control.xds); off when None."""
    xds_host: str = "127.0.0.1"
    store_timeout: float = 10.0
    """How long a change waits for another process's lock on `rules.db` before it is answered
    503 (the store busy); not on etcd."""


# --------------------------------------------------------------------------------------------
# The control plane


class ControlPlane:
    """The control service's state and operations, independent of HTTP.

    Async methods run on the app's event loop; `store` is also safe to read from other threads.
    """

    def __init__(self, settings: ControlSettings, *, store: Store | None = None) -> None:
        s = self.settings = settings
        self.data_dir = Path(s.data_dir)
        self.auth: AdminToken
        self.new_admin_token: str | None = None
        """The admin token if this start created it (for the CLI to print once), else None."""
        self.ca: CertificateAuthority | None = None
        self.tokens: TokenStore | None = None
        self.clients = ClientBindings()  # client id -> service, with security on
        # on etcd the admin token, join tokens, CA and bindings are the replicas' (etcd_security)
        self.shared_security: SharedSecurity | None = None
        self.shared_ca: SharedCA | None = None
        # The store first: one that cannot be opened (a file that is not a database) stops the
        # start before an admin token is created, which would then never be printed.
        if store is None and s.etcd is not None:
            store = EtcdStore(s.etcd)
        elif store is None:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            store = SQLiteStore(self.data_dir / STORE_FILE, timeout=s.store_timeout)
        self.store: Store = store
        try:
            if s.etcd is not None:
                self._share_security(s)
            else:
                token, created = ensure_token(self.data_dir)
                self.auth = AdminToken(token)
                self.new_admin_token = token if created else None
                if s.security:  # the CA and join tokens (meshlib.control.security_api)
                    from meshlib.security.ca import CertificateAuthority
                    from meshlib.security.tokens import FileTokenStore

                    self.ca = CertificateAuthority(
                        self.data_dir, trust_domain=s.trust_domain, ca_cert=s.ca_cert, ca_key=s.ca_key
                    )
                    self.tokens = FileTokenStore(self.data_dir)
        except BaseException:
            close = getattr(store, "close", None)
            if close is not None:
                close()
            raise
        # `_head`: the store's latest version as last seen, the base of the next commit; the
        # version served may be older when the newest stored ones are not valid today
        self._watch_from = 0  # etcd: the revision the watch of the store starts at
        self._replayed_to = 0  # etcd: deletions up to this revision were read past at start
        self._watched = 0  # etcd: the revision up to which the watch's changes are applied here
        self._watching = False  # etcd: the watch is open (or opening)
        self._progress = asyncio.Event()  # set (and replaced) when `_watched` moves on
        self._own: dict[int, RuleSet] = {}  # versions this replica committed, until watched
        self.registry = Registry(max_instances=s.max_instances)
        self.etcd_registry: EtcdRegistry | None = None
        self._registry_failing = False  # etcd refused the last registry change (logged once)
        store_revision: int | None = None
        if isinstance(self.store, EtcdStore):
            self.etcd_registry = EtcdRegistry(self.store.options, write_timeout=REGISTRY_WRITE_TIMEOUT)
            read_at, newest = self._mirror_all()  # before the head: see `_resync`
            head = self.store.head()
            self._head, self.version, self.rules = _valid_at(self.store, head.version)
            # The position served: the last change clients see (a rules commit or a registry
            # key), not the head's alone, so a client whose last event was a registration resumes
            # here with nothing to send. Deletions leave no key to read: the watch starts after
            # that position and brings those up to the read again, published (`_replayed_to`).
            # Past REPLAY_LIMIT revisions of history (or once etcd compacted it: `_resync`) the
            # read's own revision is served instead: a client from before it gets a snapshot.
            store_revision = max(head.revision, newest)
            if read_at - store_revision <= REPLAY_LIMIT:
                self._watch_from = min(store_revision, read_at) + 1
                self._replayed_to = read_at
            else:
                store_revision = max(head.revision, read_at)
                self._watch_from = read_at + 1
        else:
            self._head, self.version, self.rules = _last_valid(self.store)
        self._documents = self.rules.to_dicts()
        self._registry_path = self.data_dir / REGISTRY_FILE
        self._registry_dirty = False
        self._registry_beats = False  # heartbeats since the last save (saved less often)
        self._registry_saved = 0.0
        self._registry_unsaved = False  # the last save failed (logged once until one succeeds)
        if self.etcd_registry is None:
            self._load_registry()
        self.hub = Hub(
            queue_size=s.queue_size,
            buffer_size=s.buffer_size,
            stale_after=s.stale_after,
            epoch=self.store.epoch if isinstance(self.store, EtcdStore) else None,
            store_revision=store_revision,
        )
        self.hub.version = self.version
        self.ping, self.send_timeout, self.max_body = s.ping, s.send_timeout, s.max_body
        self.applies_total = 0
        self.rejected_total = 0
        self.started = time.time()
        self.replica_id = secrets.token_hex(6)
        self._lock = asyncio.Lock()
        self._snapshot: tuple[int, Event] | None = None
        self.client_sources: list[Callable[[], list[dict[str, Any]]]] = []
        """More `/v1/clients` rows, this replica's (the xDS server's clients)."""
        self.shared_clients: SharedClients | None = None
        """On etcd: this replica's client records written for the others, theirs read back."""
        if isinstance(self.store, EtcdStore):
            self.shared_clients = SharedClients(
                self.store.options, self.replica_id, self.hub, sources=self.client_sources
            )
        self._telemetry: collections.OrderedDict[str, tuple[float, Any, int]] = collections.OrderedDict()
        self._telemetry_bytes = 0
        self.telemetry_budget = 64 << 20
        self.telemetry_max_clients = 10_000

    def _share_security(self, s: ControlSettings) -> None:
        """The admin token, and with security on the join tokens, the CA (unless the operator
        gave its files) and client bindings, from the `security/` keys every replica shares."""
        from meshlib.control.etcd_admin import SharedAdminToken
        from meshlib.control.etcd_security import SharedSecurity

        assert s.etcd is not None
        shared = self.shared_security = SharedSecurity(s.etcd)
        try:
            admin = SharedAdminToken(shared, self.data_dir)
            self.auth, self.new_admin_token = admin.auth, admin.new_token
            if not s.security:
                return
            from meshlib.control.etcd_bindings import SharedClientBindings
            from meshlib.control.etcd_ca import SharedCA
            from meshlib.control.etcd_tokens import EtcdTokenStore
            from meshlib.security.ca import CertificateAuthority

            self.tokens = EtcdTokenStore(shared)
            if s.ca_cert is None:
                self.shared_ca = SharedCA(shared, self.data_dir, trust_domain=s.trust_domain)
                self.ca = self.shared_ca.ca
            else:
                self.ca = CertificateAuthority(
                    self.data_dir, trust_domain=s.trust_domain, ca_cert=s.ca_cert, ca_key=s.ca_key
                )
            self.clients = SharedClientBindings(shared)
        except BaseException:
            shared.close()
            raise

    # -- rules --------------------------------------------------------------------------------

    @property
    def documents(self) -> list[dict[str, Any]]:
        """The current documents as JSON-able dicts (shared: do not modify)."""
        return self._documents

    async def apply(
        self, docs: list[Any], *, message: str | None = None, dry_run: bool = False
    ) -> dict[str, Any]:
        """Upsert documents by (kind, service) as one new version; RulesError if invalid."""
        if dry_run:
            current = self.rules
            try:
                new = await asyncio.to_thread(self._applied, current, docs)
            except RulesError:
                self.rejected_total += 1
                raise
            return {"valid": True, "version": self.version, "changed": new != current}

        def compute(current: RuleSet) -> tuple[RuleSet, str]:
            new = self._applied(current, docs)
            return new, message or _describe_change("apply", current, new)

        version, changed = await self._change(compute)
        return {"version": version, "changed": changed}

    def _applied(self, current: RuleSet, docs: list[Any]) -> RuleSet:
        """`current` with `docs` applied; with xDS served, a path or header regex RE2 refuses is
        refused too (it would make every gRPC xDS client refuse the route configuration: docs/xds.md)."""
        new = current.apply(docs, source="request")
        if self.settings.xds_port is not None:
            from meshlib.control.xds import re2

            problems = re2.problems(current, new)
            if problems:
                raise RulesError(problems)
        return new

    async def delete(self, kind: str, service: str) -> int:
        """Remove one document; ApiError 404 if absent, RulesError if others refer to it."""

        def compute(current: RuleSet) -> tuple[RuleSet, str]:
            try:
                doc = current.get(kind, service)
            except ValueError:
                raise ApiError(404, f"no such document: unknown kind {kind[:100]!r}") from None
            if doc is None:
                raise ApiError(404, f"no such document: {kind}/{service[:100]}")
            return current.without(kind, service), f"delete {kind}/{service}"

        version, _ = await self._change(compute)
        return version

    async def rollback(self, version: int) -> dict[str, Any]:
        """Commit the documents of an old version as a new one; ApiError 404 if there is none."""
        _, old = await self._stored(version)

        def compute(current: RuleSet) -> tuple[RuleSet, str]:
            return old, f"rollback to version {version}"

        new_version, changed = await self._change(compute)
        return {"version": new_version, "changed": changed}

    async def _change(self, compute: Callable[[RuleSet], tuple[RuleSet, str]]) -> tuple[int, bool]:
        # Shielded: once a commit starts, the store, the in-memory copy and the event all happen,
        # even if the request that asked for it goes away.
        return await _shielded(self._change_locked(compute))

    async def _change_locked(self, compute: Callable[[RuleSet], tuple[RuleSet, str]]) -> tuple[int, bool]:
        async with self._lock:
            while True:
                current, base = self.rules, self._head
                try:
                    new, message = await asyncio.to_thread(compute, current)
                except RulesError:
                    self.rejected_total += 1
                    raise
                if new == current:
                    return self.version, False
                try:
                    if isinstance(self.store, EtcdStore):
                        version, at = await asyncio.to_thread(self.store.commit_at, new, message, base=base)
                    else:
                        version, at = (
                            await asyncio.to_thread(self.store.commit, new, message, base=base),
                            None,
                        )
                    break
                except StoreConflict:
                    # another replica on the same store committed since: take its version (and
                    # tell this replica's subscribers), then compute the change on top of it
                    await self._refresh()
            self.applies_total += 1
            log.info("rules version %d committed: %s", version, message)
            if at is not None:  # published by the watch, in the store's order, when it is open
                self._own[version] = new
                try:
                    await self._caught_up(at)
                finally:
                    self._own.pop(version, None)
            self._take(version, new, at)  # nothing left to do if the watch took it
            return version, True

    def _take(self, version: int, rules: RuleSet, store_revision: int | None) -> bool:
        """Serve `version` and publish it, unless this replica has it (or a later one) already:
        on etcd a version arrives twice, from the commit and from the watch, and goes out once."""
        self._head = max(self._head, version)
        if version <= self.version:
            return False
        base = (self.version, self._documents)  # what a delta of this version applies to
        self.version, self.rules, self._documents = version, rules, rules.to_dicts()
        self.hub.publish(
            "rules",
            {"version": version, "documents": self._documents},
            store_revision=store_revision,
            base=base,
        )
        return True

    async def _refresh(self) -> None:
        """Read the store's latest version (a commit refused, a watch that lost its place)."""
        if isinstance(self.store, EtcdStore):
            head = await asyncio.to_thread(self.store.head)
            if self._watching and await self._caught_up(head.revision):
                self._head = max(self._head, head.version)  # the watch published it, in order
                return
            if head.version > self.version:
                _, version, rules = await asyncio.to_thread(_valid_at, self.store, head.version)
                if self._take(version, rules, head.revision):
                    log.info("rules version %d committed elsewhere", version)
            self._head = max(self._head, head.version)
            self._watch_from = max(self._watch_from, head.watch_from)
            return
        self._head, version, rules = await asyncio.to_thread(_last_valid, self.store)
        if version != self.version:
            base = (self.version, self._documents)
            self.version, self.rules, self._documents = version, rules, rules.to_dicts()
            log.info("rules version %d committed elsewhere", version)
            self.hub.publish("rules", {"version": version, "documents": self._documents}, base=base)

    async def run_store_watch(self, retry: tuple[float, float] = (0.1, 2.0)) -> None:
        """On etcd: apply what other replicas (and this one) change, as the watch delivers it.

        ONE watch over `registry/` up to the rules versions (in key order: registry/, replicas/,
        rules/head, rules/info/, rules/versions/; only the first and the last are read), so
        registry and rules changes come in the store's order and each is published once, at
        its position. A batch of versions is taken as its last one (subscribers get the latest
        rules, not each step). A compacted watch or one etcd refuses falls back to reading the
        registry and the head again (publishing only what differs) and watching from there;
        etcd out of reach leaves the last state served (the watch logs one WARNING per outage
        and moves between members on its own). Never raises but to cancel."""
        store = self.store
        if not isinstance(store, EtcdStore):
            return
        low, high = retry
        delay, failing = low, False
        versions = store.versions_prefix
        first = self.etcd_registry.prefix if self.etcd_registry is not None else versions
        while True:
            try:
                if failing:
                    await self._resync()  # what changed while the watch was not there
                self._watching = True
                async for batch in watch(
                    store.options, first, prefix_end(versions), start_revision=self._watch_from
                ):
                    if failing:
                        log.info("control: watching etcd again (version %d)", self.version)
                        failing, delay = False, low
                    await self._take_batch(store, batch)
            except asyncio.CancelledError:
                self._watching = False
                raise
            except EtcdCompacted as exc:
                self._watching = False
                log.info("control: the etcd watch lost its place (%s); reading the store again", exc)
                failing = True
                continue
            except Exception as exc:
                self._watching = False
                level = logging.DEBUG if failing else logging.WARNING
                log.log(
                    level,
                    "control: watching etcd failed (%s); serving version %d meanwhile",
                    exc,
                    self.version,
                )
                failing = True
                if not isinstance(exc, EtcdError):
                    log.debug("control: the etcd watch failed", exc_info=exc)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, high)

    async def _take_batch(self, store: EtcdStore, batch: WatchBatch) -> None:
        """A watched batch, in order: registry changes into the mirror (and out as `endpoint`
        events), the batch's last rules version taken where it stands among them."""
        versions = store.versions_prefix
        last_rules = max(
            (i for i, e in enumerate(batch.events) if e.kind == "put" and e.kv.key.startswith(versions)),
            default=-1,
        )
        reg = self.etcd_registry
        for i, event in enumerate(batch.events):
            if i == last_rules:
                await self._take_watched(store, event.kv)
            elif reg is not None and event.kv.key.startswith(reg.prefix):
                self._mirror(event)
        self._watch_from = max(self._watch_from, batch.revision + 1)
        self._advance(batch.revision)

    def _advance(self, revision: int) -> None:
        if revision > self._watched:
            self._watched = revision
            if revision >= self._replayed_to:
                self._replayed_to = 0  # the start's replay is done
            self._progress.set()
            self._progress = asyncio.Event()

    async def _caught_up(self, revision: int, timeout: float = WATCH_CATCH_UP) -> bool:
        """Wait until the watch has applied `revision` here; False (at once when no watch is
        open, else after `timeout`) if it has not."""
        deadline = time.monotonic() + timeout
        while self._watched < revision:
            left = deadline - time.monotonic()
            if not self._watching or left <= 0:
                return False
            try:
                await asyncio.wait_for(self._progress.wait(), left)
            except TimeoutError:
                return False
        return True

    async def _resync(self) -> None:
        """After the watch lost its place: the registry read again (publishing what differs),
        then the rules head; the watch goes on from the registry's read, the earlier of the
        two (a rules version seen twice is taken once)."""
        read_at = None
        if self.etcd_registry is not None:
            read_at = await self._mirror_all_async()
        await self._refresh()
        if read_at is not None:
            if self._replayed_to:  # the start's replay of deregistrations was cut short
                self.hub.restart_at(read_at)
                self._replayed_to = 0
            self._watch_from = read_at + 1
            self._advance(read_at)

    async def _take_watched(self, store: EtcdStore, kv: KeyValue) -> None:
        if self._own:  # committed here: taken as committed, not parsed and validated again
            version = int(json.loads(kv.value)["version"])
            own = self._own.get(version)
            if own is not None:
                self._take(version, own, kv.mod_revision)
                return
        newer_than = self.version  # this replica's own commits come back too: not parsed again
        try:
            taken = await asyncio.to_thread(store.parse_version, kv, newer_than=newer_than)
        except RulesError as exc:
            self._head = max(self._head, int(json.loads(kv.value)["version"]))
            log.warning("rules: a version committed elsewhere is not valid here; not serving it:\n%s", exc)
            return
        if taken is not None and self._take(*taken, kv.mod_revision):
            log.info("rules version %d committed elsewhere", taken[0])

    async def history(self, limit: int) -> list[dict[str, Any]]:
        return [info.to_dict() for info in await asyncio.to_thread(self.store.history, limit)]

    async def get_version(self, version: int) -> dict[str, Any]:
        """One stored version with its documents; ApiError 404 if there is none."""
        info, rules = await self._stored(version)
        return {
            "version": info.version,
            "created": info.created,
            "message": info.message,
            "documents": rules.to_dicts(),
        }

    async def _stored(self, version: int) -> tuple[VersionInfo, RuleSet]:
        try:
            return await asyncio.to_thread(self.store.get, version)
        except KeyError:
            raise ApiError(404, f"no version {version}") from None

    # -- registry -----------------------------------------------------------------------------

    async def register(self, service: str, endpoint: EndpointSpec, ttl: float) -> str:
        """Add an instance (replacing the one at its address); its id. RegistryFull when there is
        no room; on etcd, ApiError 503 when etcd does not take it."""
        reg = self.etcd_registry
        if reg is None:
            return self._register_here(service, endpoint, ttl)
        # the bound as this replica sees it: registrations in flight elsewhere may pass it by a few
        if (
            len(self.registry) >= self.settings.max_instances
            and self.registry.at(service, endpoint.address) is None
        ):
            raise RegistryFull(f"the registry holds {self.settings.max_instances} instances already")
        done = await self._on_etcd(
            reg.register, service, endpoint.address, labels=endpoint.labels, weight=endpoint.weight, ttl=ttl
        )
        await self._caught_up(done.revision)  # so this replica's registry shows it when we answer
        return done.id

    def _register_here(self, service: str, endpoint: EndpointSpec, ttl: float) -> str:
        old = self.registry.at(service, endpoint.address)
        before = (old.id, old.endpoint()) if old is not None else None
        instance_id = self.registry.register(
            service, endpoint.address, labels=endpoint.labels, weight=endpoint.weight, ttl=ttl
        )
        inst = self.registry.get(service, instance_id)
        assert inst is not None
        if (inst.id, inst.endpoint()) != before:
            self._publish_endpoint(service, inst.address, inst.endpoint(), inst.id)
        self._registry_dirty = True
        return instance_id

    async def heartbeat(self, service: str, instance_id: str, ttl: float | None = None) -> float:
        """Extend an instance's life (with a new ttl if given); its ttl. KeyError if unknown or expired."""
        reg = self.etcd_registry
        if reg is None:
            self._registry_beats = True  # the saved expiry moves on
            return self.registry.heartbeat(service, instance_id, ttl).ttl
        hint = self.registry.get(service, instance_id)
        kept, revision = await self._on_etcd(reg.heartbeat, service, instance_id, ttl, hint=hint)
        if revision is not None:
            await self._caught_up(revision)
        return kept

    async def deregister(self, service: str, instance_id: str) -> None:
        """Remove an instance; KeyError if unknown (or no longer this id: replaced)."""
        reg = self.etcd_registry
        if reg is None:
            inst = self.registry.get(service, instance_id)
            self.registry.deregister(service, instance_id)
            assert inst is not None
            self._publish_endpoint(service, inst.address, None)
            self._registry_dirty = True
            return
        hint = self.registry.get(service, instance_id)
        revision = await self._on_etcd(reg.deregister, service, instance_id, hint=hint)
        await self._caught_up(revision)

    async def describe_registry(self, service: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """`GET /v1/registry`: each instance with its time left; on etcd, its lease's, which
        etcd is asked for where this replica has not heard of it lately (a heartbeat on another
        replica renews it unseen): at most once a second per lease, however often it is listed."""
        reg = self.etcd_registry
        if reg is None:
            return self.registry.describe(service)
        stale = reg.leases.stale(self.registry.leases(service))
        if stale:
            await asyncio.to_thread(reg.refresh, stale)
        return self.registry.describe(service, lambda inst: reg.time_left(inst.lease) if inst.lease else None)

    async def _on_etcd(self, call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """A blocking registry call to etcd off the loop; etcd out of reach is a 503 (the client
        tries again, or another replica), not a 500."""
        try:
            result = await asyncio.to_thread(call, *args, **kwargs)
        except EtcdError as exc:
            level = logging.DEBUG if self._registry_failing else logging.WARNING  # once per outage
            self._registry_failing = True
            log.log(level, "registry: etcd did not take a change (answering 503 until it does): %s", exc)
            raise ApiError(
                503, "the registry's store (etcd) is not reachable; try again", headers={"Retry-After": "1"}
            ) from None
        if self._registry_failing:
            self._registry_failing = False
            log.info("registry: etcd takes changes again")
        return result

    def expire(self) -> set[str]:
        """Remove the instances whose TTL ran out (not on etcd: its leases do that, and the
        mirror's instances never expire by this replica's clock)."""
        gone = self.registry.expire_instances()
        if gone:
            self._registry_dirty = True
        for inst in sorted(gone, key=lambda i: (i.service, i.address)):
            log.info("registry: instance %s of %s at %s expired", inst.id, inst.service, inst.address)
            self._publish_endpoint(inst.service, inst.address, None)
        return {inst.service for inst in gone}

    def _publish_endpoint(
        self,
        service: str,
        address: str,
        endpoint: dict[str, Any] | None,
        instance_id: str | None = None,
        *,
        store_revision: int | None = None,
    ) -> None:
        """One instance's change as an `endpoint` event (None: it is gone): an event's size does not
        grow with the service's instance count, so neither does the replay buffer. The instance id
        tells clients when a new process answers at an address (its breaker closes). On etcd,
        `store_revision` is the change's position in the store (the same event id on every replica)."""
        self.hub.publish(
            "endpoint",
            {"service": service, "address": address, "endpoint": endpoint, "id": instance_id},
            store_revision=store_revision,
        )

    # -- the registry's mirror (etcd) ---------------------------------------------------------

    def _mirror(self, event: WatchEvent, store_revision: int | None = None) -> None:
        """One watched registry key into the mirror, published if what clients see changed."""
        reg = self.etcd_registry
        assert reg is not None
        kv = event.kv
        at = kv.mod_revision if store_revision is None else store_revision
        try:
            service, address = reg.names(kv.key)
        except ValueError as exc:
            log.warning("registry: ignoring a key in etcd: %s", exc)
            return
        if event.kind == "put":
            try:
                inst = reg.instance(kv, time.monotonic())
            except (KeyError, TypeError, ValueError) as exc:
                log.warning(
                    "registry: %s at %s in etcd is not a valid instance today; not serving it: %s",
                    service[:100],
                    address[:100],
                    str(exc)[:300],
                )
            else:
                old = self.registry.put(inst)
                if old is None or (old.id, old.endpoint()) != (inst.id, inst.endpoint()):
                    self._publish_endpoint(service, address, inst.endpoint(), inst.id, store_revision=at)
                return
        gone = self.registry.remove_at(service, address)
        if gone is not None:
            log.info("registry: instance %s of %s at %s left", gone.id, service, address)
            self._publish_endpoint(service, address, None, store_revision=at)
        elif event.kind == "delete" and at <= self._replayed_to:
            # gone before this replica read the registry: its clients may still have it
            self._publish_endpoint(service, address, None, store_revision=at)

    def _mirror_all(self) -> tuple[int, int]:
        """Read the whole registry from etcd into the mirror (at start: no events); the revision
        it was read at and the newest change among the keys read."""
        assert self.etcd_registry is not None
        kvs, read_at = self.etcd_registry.load()
        for kv in kvs:
            try:
                self.registry.put(self.etcd_registry.instance(kv, time.monotonic()))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("registry: %r in etcd is not a valid instance today: %s", kv.key[:200], exc)
        if kvs:
            log.info("registry: %d instances in etcd", len(self.registry))
        return read_at, max((kv.mod_revision for kv in kvs), default=0)

    async def _mirror_all_async(self) -> int:
        """Read the whole registry again and publish only what differs from the mirror, at the
        revision it was read at (a watch that lost its place)."""
        reg = self.etcd_registry
        assert reg is not None
        kvs, read_at = await asyncio.to_thread(reg.load)
        present = set()
        for kv in kvs:
            with contextlib.suppress(ValueError):
                present.add(reg.names(kv.key))
            self._mirror(WatchEvent("put", kv), read_at)
        for inst in self.registry.every():
            if (inst.service, inst.address) not in present:
                self._mirror(
                    WatchEvent("delete", replace(_NO_KV, key=reg.key(inst.service, inst.address))), read_at
                )
        return read_at

    def _load_registry(self) -> None:
        """Instances saved by the previous run, with the time they had left: a restart of the
        control service neither empties every service nor revives instances that died."""
        try:
            items = json.loads(self._registry_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("registry: ignoring %s: %s", self._registry_path, exc)
            return
        good, bad = [], 0
        for item in items if isinstance(items, list) else []:
            try:
                check_item(item)  # within today's bounds
                good.append(item)
            except (KeyError, TypeError, ValueError):
                bad += 1
        if bad:
            log.warning(
                "registry: %d saved instances in %s are invalid now; not restored", bad, self._registry_path
            )
        added = self.registry.restore(good)
        if added:
            log.info("registry: restored %d instances from the previous run", added)

    async def save_registry(self, *, final: bool = False) -> None:
        """Write the registry to the data dir if it changed (atomically, off the event loop);
        heartbeats alone at most every REGISTRY_BEATS_SAVE seconds, unless `final`. Not on etcd:
        the registry is there."""
        if self.etcd_registry is not None:
            return
        now = time.monotonic()
        beats = self._registry_beats and (final or now - self._registry_saved >= REGISTRY_BEATS_SAVE)
        if not (self._registry_dirty or beats):
            return
        self._registry_dirty = self._registry_beats = False
        self._registry_saved = now
        data = json.dumps(self.registry.export(), separators=(",", ":"), ensure_ascii=False)
        try:
            await asyncio.to_thread(_write_atomic, self._registry_path, data)
        except OSError as exc:
            self._registry_dirty = True  # retried by the reaper: one WARNING, then DEBUG
            level = logging.DEBUG if self._registry_unsaved else logging.WARNING
            self._registry_unsaved = True
            log.log(
                level,
                "registry: cannot save %s: %s (retrying, quietly until a save works)",
                self._registry_path,
                exc,
            )
            return
        if self._registry_unsaved:
            self._registry_unsaved = False
            log.info("registry: saved %s again", self._registry_path)

    # -- watch --------------------------------------------------------------------------------

    def snapshot_event(self) -> Event:
        """The `snapshot` event for the current revision (built once per revision)."""
        cached = self._snapshot
        if cached is not None and cached[0] == self.hub.revision:
            return cached[1]
        endpoints = self.registry.all()
        payload = {
            "version": self.version,
            "documents": self._documents,
            "endpoints": endpoints,
            "instances": {s: {i.address: i.id for i in self.registry.instances(s)} for s in endpoints},
        }
        if self.ca is not None:
            payload["bundle"] = self.ca.bundle.decode("ascii")
        event = self.hub.snapshot(payload)
        self._snapshot = (self.hub.revision, event)
        return event

    async def client_rows(self) -> list[dict[str, Any]]:
        """The `/v1/clients` view: every replica's clients on etcd, this one's otherwise; each
        row names the replica the client is on."""
        if self.shared_clients is not None:
            return await self.shared_clients.merged()  # the sources' rows too
        rows = [{**row, "replica": self.replica_id} for row in self.hub.clients()]
        for source in self.client_sources:
            rows.extend(source())
        return rows

    # -- telemetry ----------------------------------------------------------------------------

    def report(self, client: str, report: Any, size: int) -> None:
        """Keep the last telemetry report of a client, within a memory budget: `size` is the
        memory the kept report takes (graph.kept_size), the oldest reports go first."""
        old = self._telemetry.pop(client, None)
        if old is not None:
            self._telemetry_bytes -= old[2]
        self._telemetry[client] = (time.time(), report, size)
        self._telemetry_bytes += size
        while self._telemetry and (
            self._telemetry_bytes > self.telemetry_budget or len(self._telemetry) > self.telemetry_max_clients
        ):
            _, (_, _, dropped) = self._telemetry.popitem(last=False)
            self._telemetry_bytes -= dropped
        self.hub.seen(client)

    def telemetry(self) -> dict[str, dict[str, Any]]:
        """The last report of every client: {client: {"received": unix seconds, "report": ...}}."""
        return {c: {"received": t, "report": r} for c, (t, r, _) in self._telemetry.items()}

    # -- lifecycle ----------------------------------------------------------------------------

    async def run_reaper(self, interval: float = 0.5) -> None:
        """Expire registry instances (on time, not just every `interval`) and old client records."""
        clock = time.monotonic
        while True:
            nxt = self.registry.next_expiry()
            delay = interval if nxt is None else min(interval, max(0.0, nxt - clock()) + 0.005)
            await asyncio.sleep(delay)
            try:
                self.expire()
                self.hub.forget()
                await self.save_registry()
            except Exception:
                log.exception("control: the registry reaper failed; it keeps running")

    def close(self) -> None:
        """End every watch stream and close the store."""
        self.hub.close()
        if self.shared_security is not None:
            self.shared_security.close()
        if self.etcd_registry is not None:
            self.etcd_registry.close()
        if self.shared_clients is not None:
            self.shared_clients.release()
        close = getattr(self.store, "close", None)
        if close is not None:
            close()

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "version": self.version,
            "revision": self.hub.revision,
            "epoch": self.hub.epoch,
        }

    def metrics(self) -> str:
        hub, lines = self.hub, []
        for name, help_text, value in (  # counters end in _total, the rest are gauges
            ("version", "Current rules version.", self.version),
            ("revision", "Revision of the last published change (on etcd: from the store).", hub.revision),
            ("subscribers", "Open watch streams.", hub.subscribers),
            (
                "subscribers_dropped_total",
                "Watch streams closed because the subscriber fell behind.",
                hub.dropped_total,
            ),
            ("applies_total", "Rules versions committed (apply, delete, rollback).", self.applies_total),
            ("rejected_total", "Rules changes refused as invalid.", self.rejected_total),
            ("registry_instances", "Instances in the registry.", len(self.registry)),
            (
                "replay_buffer_bytes",
                "Bytes of the events kept for Last-Event-ID resumes.",
                hub.buffered_bytes(),
            ),
        ):
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# HELP meshlib_control_{name} {help_text}", f"# TYPE meshlib_control_{name} {kind}"]
            lines.append(f"meshlib_control_{name} {value}")
        return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


async def _shielded(coro: Awaitable[Any]) -> Any:
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return await asyncio.shield(task)


def _describe_change(verb: str, old: RuleSet, new: RuleSet) -> str:
    before = set(old.documents)
    keys = [f"{d.kind}/{d.service}" for d in new.documents if d not in before]
    if len(keys) > 8:
        keys = [*keys[:8], f"and {len(keys) - 8} more"]
    return f"{verb} {', '.join(keys)}" if keys else verb


def _valid_at(store: EtcdStore, version: int) -> tuple[int, int, RuleSet]:
    """Like `_last_valid`, for a head already read: (head, version served, its rules)."""
    try:
        return version, version, store.get(version)[1]
    except RulesError:
        return _last_valid(store)


def _last_valid(store: Store) -> tuple[int, int, RuleSet]:
    """The store's latest version, and the newest stored version that is valid rules today
    with its rules.

    A version committed before a bound existed (a 4,000-digit count was once accepted) is not
    valid now; starting on it would fail, and with the service down nothing could roll it back.
    Such versions are passed over, each with a WARNING naming it, and the service starts on the
    newest good one (version 0, empty, at the least); the next apply supersedes them."""
    try:
        version, rules = store.current()
        return version, version, rules
    except RulesError as exc:
        log.warning("rules: the newest stored version is not valid now; passing it over:\n%s", exc)
    versions = store.history(limit=MAX_VERSION)
    head = versions[0].version if versions else 0
    for info in versions[1:]:
        try:
            _, rules = store.get(info.version)
        except RulesError as exc:
            log.warning("rules: stored version %d is not valid now; passing it over:\n%s", info.version, exc)
            continue
        log.warning("rules: serving stored version %d, the newest valid one", info.version)
        return head, info.version, rules
    return head, 0, RuleSet.EMPTY
