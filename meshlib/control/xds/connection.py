"""One xDS stream (either variant) as the server keeps it: who is on it, per type what was sent,
acked and refused, and its `/v1/clients` row."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from meshlib.control.xds import translate

SHORT = {
    translate.LISTENER: "lds",
    translate.ROUTE: "rds",
    translate.CLUSTER: "cds",
    translate.ENDPOINTS: "eds",
}
MAX_NAME = 256  # characters kept of a node's id and cluster (they are shown, and logged)
WILDCARD_TYPES = (translate.LISTENER, translate.CLUSTER)  # asked for with no name: every one

log = logging.getLogger("meshlib.control.xds")


@dataclass
class TypeState:
    """One type URL on one stream."""

    names: frozenset[str] | None = None  # None: not subscribed yet
    sent: str | None = None  # version last sent
    nonce: str = ""
    acked: str | None = None
    nacked: str | None = None
    error: str | None = None

    def nack(self, who: str, type_url: str, message: str) -> None:
        """The client refused what was last sent: kept with gRPC's reason, and logged."""
        self.nacked, self.error = self.sent, message[:2000]
        log.warning("xds: client %s refused %s version %s: %s", who, SHORT[type_url], self.sent, self.error)


@dataclass
class DeltaState(TypeState):
    """One type URL on an incremental stream: what the client has, resource by resource."""

    wildcard: bool = False  # every resource of the type (LDS, CDS), not `names` only
    known: dict[str, str] = field(default_factory=dict)  # name -> version the client holds
    before: dict[str, str] = field(default_factory=dict)  # `known` before the last response
    refused: dict[str, str] = field(default_factory=dict)  # name -> version it NACKed


@dataclass
class Connection:
    """One ADS stream and who is on it (the node of its first request)."""

    number: int
    peer: str
    node: str = ""
    cluster: str = ""
    connected_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    types: dict[str, TypeState] = field(default_factory=dict)
    inbox: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)  # requests, then None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def row(self, replica: str, left_out: dict[str, list[str]]) -> dict[str, Any]:
        """The `/v1/clients` row: the SSE rows' fields, plus `protocol`, per type its state, and
        the rules left out of the routes of the services it asked for (`left_out`: a regex RE2
        refuses)."""
        listeners = self.types.get(translate.LISTENER)
        asked = listeners.names if listeners is not None else frozenset()
        notes = [
            n for service, found in sorted(left_out.items()) if not asked or service in asked for n in found
        ]
        errors = [f"{SHORT[t]}: {s.error}" for t, s in sorted(self.types.items()) if s.error is not None]
        answered = any(s.acked is not None or s.nacked is not None for s in self.types.values())
        return {
            "client": self.node or f"xds-{self.number}",
            "service": self.cluster or None,
            "peer": self.peer,
            "connected": True,
            "revision": None,
            "version": None,
            "ok": (not errors) if answered else None,
            "error": "; ".join(errors) or None,
            "stale": False,
            "connected_at": self.connected_at,
            "last_seen": self.last_seen,
            "replica": replica,
            "protocol": "xds",
            "xds": {
                SHORT[t]: {"sent": s.sent, "acked": s.acked, "nacked": s.nacked, "error": s.error}
                for t, s in sorted(self.types.items())
            },
            "left_out": notes or None,
        }
