"""A Mesh's link to the control service: subscription, last-known-good cache, registration.

Every loop of the link talks to the replica in use of one shared `ControlEndpoints`, so a
replica that fails moves the watch, the heartbeats, the acks and the reports on together.

The cache is the state last applied, written atomically (0600) after each change, and loaded at
start-up: a process whose control service is down starts and serves on the rules it last had.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import ValidationError

from meshlib.control.endpoints import ControlEndpoints
from meshlib.control.outage import Outage
from meshlib.control.registration import Registration
from meshlib.control.subscriber import ControlState, Subscriber, control_client
from meshlib.control.telemetry import DEFAULT_INTERVAL, TelemetryReporter
from meshlib.rules import EndpointSpec, RulesError, RuleSet, parse_documents
from meshlib.snapshot import Snapshot

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

log = logging.getLogger("meshlib.control")

SHARED_TIMEOUT = httpx.Timeout(5.0)
"""The link's client's default: a heartbeat's and a report's; the watch and acks set their own."""


async def _close_at_exit(http: httpx.AsyncClient) -> None:
    """Close the link's client when the Mesh's runtime stops (it cancels every task)."""
    try:
        await asyncio.Event().wait()
    finally:
        await http.aclose()


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/meshlib, else ~/.cache/meshlib (`Mesh(cache_dir=)` / $MESH_CACHE_DIR win)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meshlib"


class ControlLink:
    def __init__(self, mesh: Mesh, url: str | ControlEndpoints, cache_dir: Path | None) -> None:
        self.mesh = mesh
        # the replicas and the one in use, shared by every loop of the link (and the enrollment)
        self.endpoints = url if isinstance(url, ControlEndpoints) else ControlEndpoints(url)
        name = mesh.service or "client"
        self.client_id = f"{name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # one cache per control service: its replicas, in the order given (one URL: as before)
        digest = hashlib.sha256(str(self.endpoints).encode()).hexdigest()[:10]
        self.cache_path = (cache_dir or default_cache_dir()) / f"{name}-{digest}.json"
        self._rules: tuple[int, RuleSet] | None = None  # the version whose rules are parsed
        self._parsed = ParsedDocuments()  # the last version's documents, validated
        self._specs: dict[str, tuple[Sequence[Mapping[str, Any]], list[EndpointSpec]]] = {}
        self.state: ControlState | None = None
        self._registrations: dict[str, tuple[Registration, Future[Any]]] = {}  # by address
        self.subscriber: Subscriber | None = None
        self.http: httpx.AsyncClient | None = None  # every loop's, from `start`
        self.reporter: TelemetryReporter | None = None

    @property
    def url(self) -> str:
        """The replica in use."""
        return self.endpoints.current

    @property
    def outage(self) -> Outage:
        """One WARNING per outage of every replica, whichever loop meets it first."""
        return self.endpoints.outage

    # -- start-up ------------------------------------------------------------------------

    def start(self) -> None:
        cached = self._load_cache()
        if cached is not None:
            error = self.apply(cached, cache=False)
            if error is None:
                log.info(
                    "serving on cached control version %s until the control service answers", cached.version
                )
            else:
                log.warning("ignoring the cached control state: %s", error)
                cached = None
        options = self.mesh.control_http_options()  # join token; for https, TLS both ways
        credentials = self.mesh.credentials
        # One client for every loop of the link (the watch, acks, heartbeats, reports): they talk
        # to one replica at a time, so the requests that are not the watch share a kept-alive
        # connection, and a move to another replica opens two connections there, not four.
        self.http = control_client(SHARED_TIMEOUT, options)
        self.mesh.runtime.submit(_close_at_exit(self.http))
        self.subscriber = Subscriber(
            self.endpoints,
            service=self.mesh.service,
            client_id=self.client_id,
            sink=self.apply,
            state=cached,
            http=self.http,
            http_options=options,
            on_bundle=credentials.update_bundle if credentials is not None else None,
        )
        self.mesh.runtime.submit(self.subscriber.run())
        interval = self.mesh.settings.telemetry_interval
        if interval is None:
            interval = DEFAULT_INTERVAL
        if interval > 0:  # edge summaries for the service graph
            self.reporter = TelemetryReporter(
                self.mesh, self.endpoints, self.client_id, interval=interval, http=self.http
            )
            self.mesh.runtime.submit(self.reporter.run())

    def _load_cache(self) -> ControlState | None:
        try:
            return ControlState.from_json(json.loads(self.cache_path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable control cache %s: %s", self.cache_path, exc)
            return None

    # -- applying ------------------------------------------------------------------------

    def apply(self, state: ControlState, *, cache: bool = True) -> str | None:
        """Build and swap in the Snapshot for `state`; the reason it is refused, if it is."""
        try:
            rules = self._rules_of(state)
            endpoints = self._endpoints_of(state.endpoints)
        except RulesError as exc:
            return str(exc)
        except (ValidationError, TypeError, ValueError) as exc:
            return f"invalid endpoints: {exc}"
        mesh = self.mesh
        mesh.update(
            lambda cur: Snapshot(
                rules,
                version=str(state.version),
                loads=mesh.loads,
                discovered=mesh.discovery.merged(endpoints),  # the registry, with the watched sources
                revision=state.revision,
                instances=state.instances,
            )
        )
        self.state = state
        if cache:
            self._write_cache(state)
        return None

    def _rules_of(self, state: ControlState) -> RuleSet:
        if self._rules is not None and self._rules[0] == state.version:
            return self._rules[1]
        rules = self._parsed.parse(state.documents, source=f"control version {state.version}")
        self._rules = (state.version, rules)
        return rules

    def _endpoints_of(self, raw: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, list[EndpointSpec]]:
        """Every service's registered endpoints as specs, validated only for the services whose
        list changed: an event leaves the other services' lists as they were (the same objects,
        `subscriber.fold`), and a rules event leaves them all."""
        specs: dict[str, tuple[Sequence[Mapping[str, Any]], list[EndpointSpec]]] = {}
        for service, items in raw.items():
            known = self._specs.get(service)
            if known is None or known[0] is not items:
                known = (items, [EndpointSpec.model_validate(e) for e in items])
            specs[service] = known
        self._specs = specs
        return {service: list(known[1]) for service, known in specs.items()}

    def _write_cache(self, state: ControlState) -> None:
        path = self.cache_path
        tmp = path.with_suffix(f".{uuid.uuid4().hex[:12]}.tmp")  # one per writer, even in one process
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(state.to_json(), f)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write the control cache %s: %s", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    # -- registration --------------------------------------------------------------------

    @property
    def registration(self) -> Registration | None:
        """The first instance this process registered (its HTTP one, when it has both)."""
        return next(iter(self._registrations.values()), (None,))[0]

    def register(self, address: str, labels: Mapping[str, str], ttl: float) -> Registration:
        """Keep `address` registered; one process may register several (an HTTP and a gRPC
        port: the registry holds one instance per address), each heartbeating on its own."""
        existing = self._registrations.get(address)
        if existing is not None:
            return existing[0]
        assert self.mesh.service, "registering needs Mesh(service=...)"
        registration = Registration(
            self.endpoints,
            self.mesh.service,
            address,
            labels=labels,
            ttl=ttl,
            http=self.http,
            http_options=self.mesh.control_http_options(),
        )
        task = self.mesh.runtime.submit(registration.run())
        self._registrations[address] = (registration, task)
        return registration

    def deregister(self, address: str | None = None, timeout: float = 5.0) -> None:
        """Stop heartbeating and remove the instance at `address` (every one, when None) from
        the registry; waits for that."""
        addresses = [address] if address is not None else list(self._registrations)
        stopping = [self._registrations.pop(a) for a in addresses if a in self._registrations]
        loop = self.mesh.runtime.loop if stopping else None
        for registration, _ in stopping:
            assert loop is not None
            loop.call_soon_threadsafe(registration.stop)
        for _, task in stopping:
            with contextlib.suppress(Exception):
                task.result(timeout)


class ParsedDocuments:
    """Parses each pushed version's documents, validating again only those that differ from the
    last version's: a push carries the whole rule set, and an apply usually changes a few
    documents of many. A document is the same when its JSON text is (types included: `1`, `1.0`
    and `true` are not, though Python's == says so; the control service writes a document's keys
    in one order, and another order only costs a validation); its validated model (immutable) is
    then taken as it is, and the checks across documents run on the whole set as always. A
    version whose documents are all the last one's (a rule set applied again, or sent again in
    full) is the last RuleSet, as it is."""

    def __init__(self) -> None:
        self._models: dict[str, Any] = {}  # a document's JSON text -> its model (last version's)
        self._last: RuleSet | None = None

    def parse(self, documents: Sequence[Any], *, source: str) -> RuleSet:
        texts = [_text(raw) for raw in documents]
        models = self._models
        if (
            self._last is not None
            and len(texts) == len(models)
            and len(set(texts)) == len(texts)
            and all(text is not None and text in models for text in texts)
        ):
            return self._last  # the same documents (each once): the same set, checked already
        items = [
            model if text is not None and (model := models.get(text)) is not None else raw
            for raw, text in zip(documents, texts, strict=True)
        ]
        rules = parse_documents(items, source=source)
        fresh: dict[str, Any] = {}
        for raw, text in zip(documents, texts, strict=True):
            if text is not None:
                model = rules.get(raw["kind"], raw["service"])
                if model is not None:
                    fresh[text] = model
        self._models = fresh
        self._last = rules
        return rules


def _text(raw: Any) -> str | None:
    """A document's JSON text (its identity for `ParsedDocuments`); None for anything that is not
    a document with a known kind and a service (it is validated, and refused, every time)."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("service"), str):
        return None
    from meshlib.rules import KINDS

    if raw.get("kind") not in KINDS:
        return None
    try:
        return json.dumps(raw, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None
