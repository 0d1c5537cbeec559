"""Runs the discovery watches of one Mesh and merges every source of endpoints into its Snapshot.

One watch per service, on the Mesh's runtime loop: the service's `discovery:` block in the
rules, else (no `Endpoints` document at all) the process default provider (`Mesh(discovery=)`).
Each set a watch yields is merged with the other sources and swapped in as a new Snapshot, as
rules are (`Mesh.update`).

Precedence, for the endpoints at one address (the first source listing it wins its labels and
weight; the others add the addresses it lacks): the `endpoints:` list of the rules (merged in
`Snapshot`), then the service's `discovery:` block, then the control service's registry, then
the process default provider.

Names asked for by a lookup only (`look_up`: a call to a single-label host that had no endpoints)
are watched on a lease: a watch that has found no endpoints stops once it has not been looked up
for `lookup_idle` seconds, and at most `max_looked_up` of them run at once (past it, the least
recently looked up stops first), so hostnames that come from input cannot start watches without
end. A looked-up service that has endpoints is in use and stays; a name the rules, `@mesh.call`
or `wait_for_discovery` name (`want`) is watched for good.

Static stability (docs/discovery.md): a watch that raises keeps its last good set in force and
is restarted with jittered exponential backoff; one WARNING per outage, one INFO when it
answers again. An empty set replacing a non-empty one is applied at once from a healthy watch
(the provider says the source has none), but the first answer of a watch restarted after a
failure is held for `hold` seconds when it is empty: a source coming back from an outage may
answer before it knows its instances again, and the pool must not empty meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from meshlib.discovery.base import EndpointSet, Provider, Target
from meshlib.discovery.registry import provider_from_url, shown_url
from meshlib.rules import RuleSet

if TYPE_CHECKING:
    from meshlib.mesh import Mesh
    from meshlib.rules.models import EndpointSpec
    from meshlib.snapshot import Snapshot

log = logging.getLogger("meshlib.discovery")

BACKOFF_BASE = 0.5  # seconds before the first restart of a failed watch
BACKOFF_MAX = 30.0
HOLD = 30.0  # how long a restarted watch's empty first answer waits before it may empty a pool
LOOKUP_IDLE = 60.0
"""Seconds a looked-up service's watch runs without endpoints after its last lookup."""
MAX_LOOKED_UP = 16
"""Looked-up services without endpoints watched at once; past it the least recently looked up stops."""
_SECRET_RE = re.compile(r"(?i)(token|password|secret)=[^&\s]+")


@dataclass(slots=True)
class Watch:
    """One service's watch: where, and what it last said."""

    kind: str
    target: Target
    default: bool  # at the process default provider (no `Endpoints` document)
    good: EndpointSet | None = None  # the set in force; None until the first answer
    answered: threading.Event = field(default_factory=threading.Event)
    failing_since: float | None = None  # the outage in progress (one WARNING for all of it)
    error: str | None = None
    failures: int = 0  # since the last answer: the backoff's exponent
    suspect: bool = False  # failed since the set in force was applied: an empty answer is held
    held_since: float | None = None
    future: Future[Any] | None = None

    def same(self, other: Watch) -> bool:
        return (self.kind, self.target, self.default) == (other.kind, other.target, other.default)


class DiscoveryRunner:
    """The watches of one Mesh, and the merge of their sets with the registry's.

    `providers`: provider instances or URLs; the first is the process default. A kind the rules
    name that is not among them is made from `<kind>://` (the provider's own defaults).
    """

    def __init__(self, mesh: Mesh, providers: Sequence[Provider | str] = ()) -> None:
        self.mesh = mesh
        self.backoff_base = BACKOFF_BASE
        self.backoff_max = BACKOFF_MAX
        self.hold = HOLD
        self.lookup_idle = LOOKUP_IDLE
        self.max_looked_up = MAX_LOOKED_UP
        self.clock: Callable[[], float] = time.monotonic  # of lookups (a test's own, to expire them)
        self._providers: dict[str, Provider] = {}
        self._urls: dict[str, str] = {}
        self.default: str | None = None
        for item in providers:
            if isinstance(item, str) and urlsplit(item).scheme.lower() in self._providers:
                raise ValueError(
                    f"two discovery URLs for {urlsplit(item).scheme.lower()}: one provider per kind"
                )
            provider = provider_from_url(item) if isinstance(item, str) else item
            kind = type(provider).kind
            if kind in self._providers:
                raise ValueError(f"two discovery providers of kind {kind}: one provider per kind")
            self._providers[kind] = provider
            self._urls[kind] = shown_url(item) if isinstance(item, str) else f"{kind}://"
            self.default = self.default or kind
        self._lock = threading.Lock()
        self._watches: dict[str, Watch] = {}
        self._wanted: set[str] = set()  # asked for by name (calls), looked up at the default
        # asked for by a lookup only, looked up at the default too: the last lookup's time (or the
        # last sweep that found endpoints), least recent first
        self._looked_up: OrderedDict[str, float] = OrderedDict()
        self._crowded = False  # the bound on lookups was reached (one WARNING until they are gone)
        self._sweeping: asyncio.TimerHandle | None = None
        self._registry: Mapping[str, Sequence[EndpointSpec]] = MappingProxyType({})
        self._rules: RuleSet | None = None
        self._closed = False

    # -- what is watched -----------------------------------------------------------------

    def where(self, kind: str) -> str:
        """A provider's name for log lines (no credentials)."""
        return self._urls.get(kind, f"{kind}://")

    def watches(self) -> dict[str, Watch]:
        with self._lock:
            return dict(self._watches)

    def observe(self, snapshot: Snapshot) -> None:
        """After each swap: start and stop watches for the rules now in force (a Mesh listener)."""
        if snapshot.rules is self._rules or self._closed:
            return
        self._rules = snapshot.rules
        self._reconcile()

    def want(self, *services: str) -> None:
        """Look `services` up at the process default provider unless the rules say otherwise
        (a name given to `@mesh.call`, a service a call found no endpoints for)."""
        if self.default is None or self._closed:
            return
        with self._lock:
            new = set(services) - self._wanted
            self._wanted |= new
            for service in new:
                self._looked_up.pop(service, None)  # named now: for good
        if new:
            self._reconcile()

    def look_up(self, *services: str) -> None:
        """Look `services` up at the process default provider for a lookup only (a call to a
        single-label host found no endpoints), unless the rules say otherwise: a watch that
        finds none stops `lookup_idle` seconds after the last lookup, and past `max_looked_up`
        such watches the least recently looked up stops (see the module docstring). A name
        `want` was given, or later gets, is watched for good."""
        if self.default is None or self._closed:
            return
        now = self.clock()
        with self._lock:
            named = self._named()
            new = False
            for service in services:
                if service in named:
                    continue
                new = new or service not in self._looked_up
                self._looked_up[service] = now
                self._looked_up.move_to_end(service)
            if new:
                self._bound(named)
        if new:
            self._reconcile()
            self.mesh.runtime.loop.call_soon_threadsafe(self._arm)

    def sweep(self) -> None:
        """Stop the watches of lookups unused for `lookup_idle` seconds: no endpoints, and not
        looked up since (runs every quarter of `lookup_idle` while there are lookups)."""
        now = self.clock()
        with self._lock:
            named = self._named()
            for service in [s for s in self._looked_up if s in named]:
                del self._looked_up[service]
            for service in list(self._looked_up):
                watch = self._watches.get(service)
                if watch is not None and watch.good:
                    self._looked_up[service] = now  # in use: its endpoints serve calls
                elif now - self._looked_up[service] >= self.lookup_idle:
                    log.debug("discovery: stopping the lookup of %s (no endpoints, unused)", service)
                    del self._looked_up[service]
            if not any(not self._has_endpoints(s) for s in self._looked_up):
                self._crowded = False
        self._reconcile()

    def _named(self) -> set[str]:
        """The services the rules or `want` name (watched for good); call with the lock held."""
        rules = self._rules or RuleSet.EMPTY
        named = {d.service for d in rules.documents if d.kind in ("Route", "Destination", "Endpoints")}
        return named | self._wanted

    def _has_endpoints(self, service: str) -> bool:
        watch = self._watches.get(service)
        return watch is not None and bool(watch.good)

    def _bound(self, named: set[str]) -> None:
        """At most `max_looked_up` lookups without endpoints: the least recently looked up go
        (call with the lock held)."""
        idle = [s for s in self._looked_up if s not in named and not self._has_endpoints(s)]
        over = idle[: max(0, len(idle) - self.max_looked_up)]
        if not over:
            return
        log.log(
            logging.DEBUG if self._crowded else logging.WARNING,
            "discovery: more than %d services looked up at %s have no endpoints (single-label hosts "
            "taken from input?); stopping the least recently looked up (%s), logged once while it lasts",
            self.max_looked_up,
            self.where(self.default or ""),
            ", ".join(over[:5]) + (", ..." if len(over) > 5 else ""),
        )
        self._crowded = True
        for service in over:
            del self._looked_up[service]

    def _arm(self) -> None:
        """Sweep the lookups every quarter of `lookup_idle` while there are some (on the loop)."""
        if self._sweeping is None and self._looked_up and not self._closed:
            self._sweeping = asyncio.get_running_loop().call_later(self.lookup_idle / 4, self._tick)

    def _tick(self) -> None:
        self._sweeping = None
        self.sweep()
        self._arm()

    def wait(self, services: Sequence[str], timeout: float) -> bool:
        """Block until each service's watch has answered once (True), or `timeout` passes."""
        self.want(*services)
        deadline = time.monotonic() + timeout
        for service in services:
            watch = self.watches().get(service)
            if watch is None:
                continue  # not discovered: static, or no provider for it
            if not watch.answered.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def _desired(self) -> dict[str, Watch]:
        rules = self._rules or RuleSet.EMPTY
        desired: dict[str, Watch] = {}
        for doc in rules.documents:
            if doc.kind == "Endpoints" and doc.discovery is not None:
                spec = doc.discovery
                options = MappingProxyType(dict(spec.options))
                target = Target(doc.service, spec.name or doc.service, options)
                desired[doc.service] = Watch(spec.provider, target, default=False)
        if self.default is not None:
            # services called out to (a Route or Destination is about calls to it; Authorization
            # and RateLimit are about calls in), and those asked for by name
            called = {d.service for d in rules.documents if d.kind in ("Route", "Destination")}
            for service in called | self._wanted | set(self._looked_up):
                if service not in desired and rules.endpoints(service) is None:
                    desired[service] = Watch(self.default, Target(service, service), default=True)
        return desired

    def _reconcile(self) -> None:
        with self._lock:
            if self._closed:
                return
            desired = self._desired()
            stopped = [w for s, w in self._watches.items() if s not in desired or not w.same(desired[s])]
            for service, watch in desired.items():
                current = self._watches.get(service)
                if current is not None and current.same(watch):
                    continue
                if current is not None:
                    # a changed block (name, options, provider): the old set serves until the new
                    # watch answers, as Envoy keeps a cluster's endpoints while its update warms
                    watch.good = current.good
                self._watches[service] = watch
                watch.future = self.mesh.runtime.submit(self._run(watch))
            for service in [s for s in self._watches if s not in desired]:
                del self._watches[service]
        for watch in stopped:
            if watch.future is not None:
                watch.future.cancel()
        if any(w.good for w in stopped if w.target.service not in desired):
            self.mesh.runtime.loop.call_soon_threadsafe(self._publish)

    # -- running one watch ---------------------------------------------------------------

    def _provider(self, kind: str) -> Provider:
        provider = self._providers.get(kind)
        if provider is None:
            url = f"{kind}://"
            provider = provider_from_url(url)
            self._providers[kind] = provider
            self._urls[kind] = url
        return provider

    def _current(self, watch: Watch) -> bool:
        return self._watches.get(watch.target.service) is watch and not self._closed

    async def _run(self, watch: Watch) -> None:
        while self._current(watch):
            try:
                sets = self._provider(watch.kind).watch(watch.target)
                try:
                    async for endpoints in sets:
                        if not self._current(watch):
                            return
                        self._answer(watch, tuple(endpoints))
                finally:
                    close = getattr(sets, "aclose", None)  # an async generator's: its finally blocks run now
                    if close is not None:
                        await close()
                raise RuntimeError("the watch ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._current(watch):
                    return
                self._failed(watch, exc)
            delay = min(self.backoff_max, self.backoff_base * 2 ** min(watch.failures - 1, 30))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: restarts do not align

    def _failed(self, watch: Watch, exc: Exception) -> None:
        watch.failures += 1
        watch.suspect = True
        watch.held_since = None  # a held empty answer is not confirmed by a failing watch
        watch.error = _SECRET_RE.sub(r"\1=***", f"{type(exc).__name__}: {exc}")[:300]
        if watch.failing_since is None:
            watch.failing_since = time.monotonic()
            kept = f"keeping its last {len(watch.good)} endpoints" if watch.good else "no endpoints known yet"
            log.warning(
                "discovery of %s at %s failed (%s); %s, retrying with backoff",
                watch.target.service,
                self.where(watch.kind),
                watch.error,
                kept,
            )

    def _answer(self, watch: Watch, endpoints: EndpointSet) -> None:
        if watch.failing_since is not None:
            down = time.monotonic() - watch.failing_since
            log.info(
                "discovery of %s at %s answers again after %.1fs (%d endpoints)",
                watch.target.service,
                self.where(watch.kind),
                down,
                len(endpoints),
            )
            watch.failing_since = None
            watch.error = None
        watch.failures = 0
        watch.answered.set()
        if not endpoints and watch.good and watch.suspect:
            if watch.held_since is None:
                watch.held_since = stamp = time.monotonic()
                log.warning(
                    "discovery of %s at %s answered no endpoints after an outage; keeping the last %d "
                    "for %.0fs unless it answers with some",
                    watch.target.service,
                    self.where(watch.kind),
                    len(watch.good),
                    self.hold,
                )
                asyncio.get_running_loop().call_later(self.hold, self._confirm, watch, stamp)
            return
        self._apply(watch, endpoints)

    def _confirm(self, watch: Watch, stamp: float) -> None:
        """A held empty answer that stood for `hold` seconds of a healthy watch: applied."""
        if watch.held_since == stamp and self._current(watch):
            log.info("discovery of %s: no endpoints confirmed", watch.target.service)
            self._apply(watch, ())

    def _apply(self, watch: Watch, endpoints: EndpointSet) -> None:
        watch.suspect = False
        watch.held_since = None
        if endpoints == watch.good:
            return
        watch.good = endpoints
        self._publish()

    # -- merging -------------------------------------------------------------------------

    def merged(
        self, registry: Mapping[str, Sequence[EndpointSpec]] | None = None
    ) -> dict[str, list[EndpointSpec]]:
        """Every discovered endpoint by service, the sources in precedence order (the rules'
        `endpoints:` list is put first by the Snapshot). `registry`: the control service's,
        replacing the one kept (its link passes each state's)."""
        if registry is not None:
            self._registry = registry
        with self._lock:
            watches = list(self._watches.values())
        if not any(w.good for w in watches):
            return {service: list(specs) for service, specs in self._registry.items()}  # the registry alone
        block = {w.target.service: w.good for w in watches if not w.default and w.good}
        fallback = {w.target.service: w.good for w in watches if w.default and w.good}
        out: dict[str, list[EndpointSpec]] = {}
        for service in sorted(set(block) | set(self._registry) | set(fallback)):
            specs: list[EndpointSpec] = []
            seen: set[str] = set()
            for source in (block.get(service), self._registry.get(service), fallback.get(service)):
                for spec in source or ():
                    if spec.address not in seen:
                        seen.add(spec.address)
                        specs.append(spec)
            out[service] = specs
        return out

    def _publish(self) -> None:
        if not self._closed:
            self.mesh.update(lambda cur: cur.with_discovered(self.merged(), cur.version))

    # -- lifecycle -----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop every watch and close the providers."""
        with self._lock:
            self._closed = True
            watches = list(self._watches.values())
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None
        for watch in watches:
            if watch.future is not None:
                watch.future.cancel()
        for provider in list(self._providers.values()):
            try:
                await provider.aclose()
            except Exception:
                log.warning("closing the %s discovery provider failed", type(provider).kind, exc_info=True)
