"""The ADS server: one gRPC stream per xDS client carries every type, state of the world here
and incremental in meshlib.control.xds.delta (the same resources, connections and rows).

Each type URL has one version, moved on when that type's resources change; every response
carries a fresh nonce. A request whose nonce is not the last one sent for its type is stale and
left alone (xDS's rule), one with `error_detail` is a NACK (recorded, nothing resent until the
resources change), any other one an ACK. A client gets a type again when its subscription to
it changes or the type's version moves on. The resources are rebuilt from the ControlPlane
whenever its hub publishes (rules or registry), the same fan-out the SSE streams ride on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from meshlib.control.xds import delta, translate
from meshlib.control.xds.connection import MAX_NAME, SHORT, WILDCARD_TYPES, Connection, TypeState
from meshlib.rules import RuleSet

if TYPE_CHECKING:
    from meshlib.control.plane import ControlPlane

log = logging.getLogger("meshlib.control.xds")

MAX_PAUSE = 0.5  # seconds: the longest wait between rebuilds (as long as the last one took)
MAX_CONNECTIONS = 10_000  # as many as the SSE hub keeps client records for


Packed = dict[str, dict[str, any_pb2.Any]]


@dataclass
class Build:
    """One translation, packed: every resource, and per caller the route configurations it
    sees otherwise."""

    packed: Packed
    by_caller: dict[str, dict[str, any_pb2.Any]]
    callers: frozenset[str]  # those it was built for
    left_out: dict[str, list[str]] = field(default_factory=dict)  # translate.left_out
    digests: dict[str, dict[str, str]] = field(default_factory=dict)  # per type, each resource's


class Resources:
    """The current resources, packed once, and a version per type URL."""

    def __init__(self) -> None:
        self.packed: Packed = {t: {} for t in translate.TYPES}
        self.by_caller: dict[str, dict[str, any_pb2.Any]] = {}
        self.versions: dict[str, int] = dict.fromkeys(translate.TYPES, 0)
        self.digests: dict[str, dict[str, str]] = {t: {} for t in translate.TYPES}

    def update(self, build: Build) -> list[str]:
        """Take a new build; the type URLs whose resources changed (their version moved on)."""
        changed = []
        for type_url, found in build.packed.items():
            differs = found != self.packed[type_url]
            if type_url == translate.ROUTE:
                differs = differs or build.by_caller != self.by_caller
                self.by_caller = build.by_caller
            if differs or self.versions[type_url] == 0:
                self.packed[type_url] = found
                self.digests[type_url] = build.digests.get(type_url) or _digests(found)
                self.versions[type_url] += 1
                changed.append(type_url)
        return changed

    def resource_versions(self, type_url: str, caller: str = "") -> dict[str, str]:
        """The version of each resource of `available` (incremental xDS)."""
        digests = self.digests[type_url]
        if type_url == translate.ROUTE and self.by_caller.get(caller):
            digests = {**digests, **{n: delta.digest(r) for n, r in self.by_caller[caller].items()}}
        return digests

    def available(self, type_url: str, caller: str = "") -> dict[str, any_pb2.Any]:
        """Every resource of the type as `caller` sees it (its own route configurations)."""
        have = self.packed[type_url]
        if type_url == translate.ROUTE and self.by_caller.get(caller):
            have = {**have, **self.by_caller[caller]}
        return have

    def response(
        self, type_url: str, names: frozenset[str], nonce: str, caller: str = ""
    ) -> discovery_pb2.DiscoveryResponse:
        have = self.available(type_url, caller)
        wanted = sorted(have) if not names and type_url in WILDCARD_TYPES else sorted(names & have.keys())
        return discovery_pb2.DiscoveryResponse(
            version_info=str(self.versions[type_url]),
            type_url=type_url,
            nonce=nonce,
            resources=[have[n] for n in wanted],
        )


def _digests(found: dict[str, any_pb2.Any]) -> dict[str, str]:
    return {name: delta.digest(resource) for name, resource in found.items()}


def _pack(found: dict[str, Any]) -> dict[str, any_pb2.Any]:
    return {name: translate.packed(message) for name, message in found.items()}


class XdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """ADS over the ControlPlane's rules and registry; `run` keeps the resources current."""

    def __init__(self, plane: ControlPlane, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self.plane = plane
        self.max_connections = max_connections
        self.resources = Resources()
        self.connections: dict[int, Connection] = {}
        self._numbers = itertools.count(1)
        self._nonces = itertools.count(1)
        self.left_out: dict[str, list[str]] = {}  # per service, what its routes leave out
        self.rebuild()

    def rebuild(self) -> None:
        """The resources of the rules and registry now, built here (at start)."""
        self._take(self._build(*self._inputs()))

    async def rebuild_off_loop(self) -> None:
        """The same, built in a thread: the inputs are copied on the loop (the registry is the
        loop's), the translation, the slow part, runs off it. A failure keeps the last ones."""
        try:
            self._take(await asyncio.to_thread(self._build, *self._inputs()))
        except Exception:
            log.exception("xds: the resources could not be rebuilt; the previous ones stay")

    def _inputs(self) -> tuple[RuleSet, dict[str, list[translate.Instance]], frozenset[str]]:
        registry = self.plane.registry
        endpoints = {
            service: [
                translate.Instance(i.address, dict(i.labels), i.weight) for i in registry.instances(service)
            ]
            for service in registry.all()
        }
        callers = frozenset(c.cluster for c in self.connections.values() if c.cluster)
        return self.plane.rules, endpoints, callers

    @staticmethod
    def _build(
        rules: RuleSet, endpoints: dict[str, list[translate.Instance]], callers: frozenset[str]
    ) -> Build:
        packed = {t: _pack(found) for t, found in translate.resources(rules, endpoints).items()}
        by_caller = {caller: _pack(translate.caller_routes(rules, caller)) for caller in sorted(callers)}
        mine = {caller: found for caller, found in by_caller.items() if found}
        digests = {t: _digests(found) for t, found in packed.items()}  # here, off the loop
        return Build(packed, mine, callers, translate.left_out(rules), digests)

    def _take(self, build: Build) -> None:
        # a caller that connected while the build ran keeps the route configurations it was given
        for caller in {c.cluster for c in self.connections.values()} - build.callers:
            if caller in self.resources.by_caller:
                build.by_caller[caller] = self.resources.by_caller[caller]
        for service, notes in build.left_out.items():
            for note in set(notes) - set(self.left_out.get(service, ())):
                log.warning("xds: a rule is left out of the routes of %s: %s", service, note)
        self.left_out = build.left_out
        changed = self.resources.update(build)
        if changed:
            log.debug("xds: new versions of %s", ", ".join(SHORT[t] for t in changed))
            for conn in self.connections.values():
                conn.changed.set()

    def rows(self) -> list[dict[str, Any]]:
        return [c.row(self.plane.replica_id, self.left_out) for c in self.connections.values()]

    async def run(self) -> None:
        """Rebuild after every change the hub publishes. Changes that come while a rebuild runs
        make one rebuild after it, and rebuilds are paced to at most half of the time (a
        registry in constant churn cannot keep a thread translating all the time)."""
        hub = self.plane.hub
        while True:
            sub = hub.listen()
            try:
                await self.rebuild_off_loop()  # what changed before listening (or while dropped)
                while True:
                    event = await sub.queue.get()
                    if event is None:
                        break  # fell behind and was dropped: listen again
                    while not sub.queue.empty():
                        sub.queue.get_nowait()
                    started = time.monotonic()
                    await self.rebuild_off_loop()
                    await asyncio.sleep(min(time.monotonic() - started, MAX_PAUSE))
            finally:
                hub.unlisten(sub)

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Any
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        async for response in self._stream(request_iterator, context, self._answer, self._pushes):
            yield response

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: Any
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        """Incremental xDS (meshlib.control.xds.delta): per resource versions, only what changed."""
        answer, pushes = functools.partial(delta.answer, self), functools.partial(delta.pushes, self)
        async for response in self._stream(request_iterator, context, answer, pushes):
            yield response

    async def _stream(
        self,
        requests: AsyncIterator[Any],
        context: Any,
        answer: Callable[[Connection, Any], list[Any]],
        pushes: Callable[[Connection], list[Any]],
    ) -> AsyncIterator[Any]:
        """One stream, either variant: a request gets its `answer`, a change its `pushes`."""
        if len(self.connections) >= self.max_connections:
            log.warning("xds: %d streams open; refused one from %s", len(self.connections), context.peer())
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "too many xDS streams on this control service"
            )
        conn = Connection(next(self._numbers), peer=context.peer())
        self.connections[conn.number] = conn
        reader = asyncio.create_task(self._read(requests, conn))
        try:
            while True:
                waiting_change = asyncio.ensure_future(conn.changed.wait())
                waiting_request = asyncio.ensure_future(conn.inbox.get())
                done, _ = await asyncio.wait(
                    {waiting_change, waiting_request}, return_when=asyncio.FIRST_COMPLETED
                )
                for pending in (waiting_change, waiting_request):
                    if pending not in done:
                        pending.cancel()
                if waiting_request in done:
                    request = waiting_request.result()
                    if request is None:
                        return
                    for response in answer(conn, request):
                        yield response
                if waiting_change in done:
                    conn.changed.clear()
                    for response in pushes(conn):
                        yield response
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self.connections.pop(conn.number, None)
            log.info("xds: client %s (%s) disconnected", conn.node or "-", conn.cluster or "-")

    async def _read(self, requests: AsyncIterator[Any], conn: Connection) -> None:
        try:
            async for request in requests:
                await conn.inbox.put(request)
        except grpc.RpcError:
            pass
        finally:
            await conn.inbox.put(None)

    def _answer(self, conn: Connection, request: discovery_pb2.DiscoveryRequest) -> list[Any]:
        """The responses one request calls for (none, or its type's resources)."""
        self.seen(conn, request)
        type_url = request.type_url
        if type_url not in self.resources.packed:
            return []  # a type this server does not serve: nothing is ever sent for it
        state = conn.types.setdefault(type_url, TypeState())
        if request.response_nonce and request.response_nonce != state.nonce:
            return []  # stale: answers a response that a newer one has replaced
        if request.response_nonce:
            if request.HasField("error_detail"):
                state.nack(conn.node or conn.peer, type_url, request.error_detail.message)
            else:
                state.acked, state.nacked, state.error = request.version_info, None, None
        names = frozenset(request.resource_names)
        if names == state.names and state.sent is not None:
            return []
        state.names = names
        return [self._send(conn, type_url, state)]

    def seen(self, conn: Connection, request: Any) -> None:
        """A request of either variant: the stream's node (from its first request that has one)."""
        conn.last_seen = time.time()
        if request.HasField("node") and not conn.node:
            conn.node, conn.cluster = request.node.id[:MAX_NAME], request.node.cluster[:MAX_NAME]
            self._add_caller(conn.cluster)
            log.info("xds: client %s (%s) connected from %s", conn.node, conn.cluster or "-", conn.peer)

    def nonce(self) -> str:
        return str(next(self._nonces))

    def _add_caller(self, caller: str) -> None:
        """A caller new to this server: its own route configurations now (it has been sent
        nothing, so no version moves); rebuilds keep them while one of its streams is open."""
        resources = self.resources
        if caller and caller not in resources.by_caller:
            found = _pack(translate.caller_routes(self.plane.rules, caller))
            if found:
                resources.by_caller = {**resources.by_caller, caller: found}

    def _pushes(self, conn: Connection) -> list[Any]:
        out = []
        for type_url, state in conn.types.items():
            if state.names is not None and state.sent != str(self.resources.versions[type_url]):
                out.append(self._send(conn, type_url, state))
        return out

    def _send(self, conn: Connection, type_url: str, state: TypeState) -> discovery_pb2.DiscoveryResponse:
        assert state.names is not None
        state.nonce = self.nonce()
        state.sent = str(self.resources.versions[type_url])
        return self.resources.response(type_url, state.names, state.nonce, conn.cluster)


async def serve(plane: ControlPlane, host: str, port: int, *, max_connections: int = MAX_CONNECTIONS) -> None:
    """Serve ADS on host:port until cancelled; its clients are added to `/v1/clients`."""
    xds = XdsServer(plane, max_connections=max_connections)
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(xds, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    plane.client_sources.append(xds.rows)
    log.info("xds: ADS on %s:%d", host, bound)
    try:
        await xds.run()
    finally:
        plane.client_sources.remove(xds.rows)
        await server.stop(grace=0.5)
