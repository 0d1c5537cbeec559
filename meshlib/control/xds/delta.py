"""Incremental xDS (DeltaAggregatedResources): the client names the resources it subscribes to
and unsubscribes from, and on reconnecting the versions it holds; the server sends only the
resources whose version differs from what the client holds, and names those removed.

A resource's version is a digest of its bytes, so the same content has the same version on
every replica and after a restart: a client reconnecting with `initial_resource_versions` is
sent only what changed. Each response still carries the type's version (`system_version_info`),
which is what `/v1/clients` shows as sent, acked and refused, as for state of the world. A
NACK leaves the client with what it held before the refused response; nothing is sent again
until the resources change.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from meshlib.control.xds.connection import WILDCARD_TYPES, Connection, DeltaState

if TYPE_CHECKING:
    from meshlib.control.xds.server import XdsServer

log = logging.getLogger("meshlib.control.xds")

WILDCARD = "*"


def digest(resource: any_pb2.Any) -> str:
    return hashlib.blake2b(resource.value, digest_size=8).hexdigest()


def answer(
    server: XdsServer, conn: Connection, request: discovery_pb2.DeltaDiscoveryRequest
) -> list[discovery_pb2.DeltaDiscoveryResponse]:
    """The response one request calls for: none for an ACK or a NACK, else what its new
    subscriptions add (and, on the first request of a type, everything it asked for)."""
    server.seen(conn, request)
    type_url = request.type_url
    if type_url not in server.resources.packed:
        return []  # a type this server does not serve
    state = conn.types.get(type_url)
    first = not isinstance(state, DeltaState)
    if not isinstance(state, DeltaState):
        state = conn.types[type_url] = DeltaState(names=frozenset())
        state.known = dict(request.initial_resource_versions)
    if request.response_nonce and request.response_nonce == state.nonce:  # else stale: left alone
        _answered(conn, type_url, state, request)
    subscribe = set(request.resource_names_subscribe)
    unsubscribe = set(request.resource_names_unsubscribe)
    if first:
        state.wildcard = WILDCARD in subscribe or (not subscribe and type_url in WILDCARD_TYPES)
    elif WILDCARD in subscribe or WILDCARD in unsubscribe:
        state.wildcard = WILDCARD in subscribe
    had = state.names or frozenset()
    state.names = frozenset((had | subscribe) - unsubscribe - {WILDCARD})
    for name in unsubscribe:
        state.known.pop(name, None)
    if not first and not subscribe:
        return []
    response = _changes(server, conn, type_url, state, asked=state.names - had, always=first)
    return [response] if response is not None else []


def _answered(
    conn: Connection, type_url: str, state: DeltaState, request: discovery_pb2.DeltaDiscoveryRequest
) -> None:
    if request.HasField("error_detail"):
        state.nack(conn.node or conn.peer, type_url, request.error_detail.message)
        # the client keeps what it held; what it refused is not sent again until it changes
        state.refused = {n: v for n, v in state.known.items() if state.before.get(n) != v}
        state.known = dict(state.before)
    else:
        state.acked, state.nacked, state.error = state.sent, None, None


def pushes(server: XdsServer, conn: Connection) -> list[discovery_pb2.DeltaDiscoveryResponse]:
    """After a rebuild: per subscribed type, what changed for this client, if anything."""
    out = []
    for type_url, state in conn.types.items():
        if isinstance(state, DeltaState):
            response = _changes(server, conn, type_url, state, asked=frozenset(), always=False)
            if response is not None:
                out.append(response)
    return out


def _changes(
    server: XdsServer,
    conn: Connection,
    type_url: str,
    state: DeltaState,
    *,
    asked: frozenset[str],
    always: bool,
) -> discovery_pb2.DeltaDiscoveryResponse | None:
    """The resources whose version differs from what the client holds, and the names it holds
    that are gone or that it asked for and do not exist (how delta xDS says "no such one")."""
    resources = server.resources
    have = resources.available(type_url, conn.cluster)
    versions = resources.resource_versions(type_url, conn.cluster)
    names = state.names or frozenset()
    wanted = have.keys() if state.wildcard else names & have.keys()
    state.refused = {n: v for n, v in state.refused.items() if versions.get(n) == v}
    updated = sorted(
        n for n in wanted if state.known.get(n) != versions[n] and state.refused.get(n) != versions[n]
    )
    removed = sorted((state.known.keys() - wanted) | (asked - have.keys()))
    if not updated and not removed and not always:
        return None
    state.before = dict(state.known)
    for name in updated:
        state.known[name] = versions[name]
    for name in removed:
        state.known.pop(name, None)
    state.nonce = server.nonce()
    state.sent = str(resources.versions[type_url])
    return discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=state.sent,
        type_url=type_url,
        nonce=state.nonce,
        resources=[discovery_pb2.Resource(name=n, version=versions[n], resource=have[n]) for n in updated],
        removed_resources=removed,
    )
