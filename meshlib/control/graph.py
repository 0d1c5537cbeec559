"""The live service graph, built from the telemetry reports the meshes send.

A report (meshlib.control.telemetry) covers one process's traffic over its last window. The
graph keeps, for each client, only its last report, and only while it is fresh (younger than
three report intervals and `max_age`): a process that stops reporting drops out of the graph.

Each edge source -> destination is measured from the calling side (the `out` edges of the
source's processes) when any of them reported it, which is the view that includes connect
failures and the caller's retries; otherwise from the called side (the `in` edges of the
destination's processes, keyed by the `x-mesh-source` they were sent), so a caller that is not
connected to the control service still shows up. Rates add across processes (each over its
own window); success rates are weighted by those rates; latency percentiles come from the
merged histograms, so they are exact to within a bucket (about 9%).

Reports are validated when they arrive (`parse_report`): a malformed one is refused with a 422
and the graph only ever reads well-formed data. What a report may hold is bounded (MAX_EDGES
edges, MAX_ENDPOINTS endpoints, one count per latency bucket, names of at most 256 characters;
more is a 422), it is kept in a compact form (latencies as one array of integers), and
`kept_size` says how much memory the kept form takes: the control service's telemetry budget
counts that, not the bytes of the request.
"""

from __future__ import annotations

import sys
import time
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from meshlib.control.telemetry import MAX_BUCKET, MAX_EDGES, MAX_ENDPOINTS, MIN_BUCKET, bucket_bounds
from meshlib.settings import MAX_TELEMETRY_INTERVAL

if TYPE_CHECKING:
    from starlette.requests import Request

    from meshlib.control.plane import ControlPlane

UNKNOWN = "unknown"
"""The node of callers that did not say who they are (and of reports without a service)."""

MAX_AGE = 30.0
STALE_INTERVALS = 3
MIN_WINDOW = 0.05  # seconds: a shorter window says little and would inflate the rate
_BREAKER_RANK = {"closed": 0, "half-open": 1, "open": 2}


# --------------------------------------------------------------------------------------------
# The report as it arrives


def _name(value: str) -> str:
    if not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError("must be printable characters without spaces")
    return value


Name = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_name)]
StatusClass = Literal["1xx", "2xx", "3xx", "4xx", "5xx", "error"]
Count = Annotated[int, Field(ge=0, le=10**12)]


def _bucket(pair: list[int]) -> list[int]:
    if not MIN_BUCKET <= pair[0] <= MAX_BUCKET:
        raise ValueError(f"latency bucket must be from {MIN_BUCKET} to {MAX_BUCKET}")
    if pair[1] < 1:
        raise ValueError("latency bucket count must be positive")
    return pair


Bucket = Annotated[
    list[Annotated[int, Field(ge=-(10**12), le=10**12)]],
    Field(min_length=2, max_length=2),
    AfterValidator(_bucket),
]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class EdgeReport(_Strict):
    dir: Literal["in", "out"]
    peer: Name
    subset: Annotated[str, Field(max_length=256)] = ""
    counts: dict[StatusClass, Count] = {}
    lat: Annotated[list[Bucket], Field(max_length=MAX_BUCKET - MIN_BUCKET + 1)] = []


class EndpointReport(_Strict):
    service: Name
    address: Annotated[str, Field(min_length=1, max_length=300)]
    breaker: Literal["closed", "open", "half-open"] = "closed"
    ejected: bool = False


class LimitReport(_Strict):
    dir: Literal["in", "out"]
    service: Name
    limit: Count
    in_flight: Count


class WeightReport(_Strict):
    """An endpoint's weight in a caller's weighted_round_robin balancer (from its load reports)."""

    service: Name
    address: Annotated[str, Field(min_length=1, max_length=300)]
    weight: Annotated[float, Field(ge=0, le=1e12)]


class Report(_Strict):
    """One process's report; unknown top-level fields are ignored (newer clients)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)

    client: Name
    service: Name | None = None
    interval: Annotated[float, Field(ge=0, le=MAX_TELEMETRY_INTERVAL)] = 5.0
    window: Annotated[float, Field(gt=0, le=86400)] | None = None
    edges: Annotated[list[EdgeReport], Field(max_length=MAX_EDGES)] = []
    endpoints: Annotated[list[EndpointReport], Field(max_length=MAX_ENDPOINTS)] = []
    limits: Annotated[list[LimitReport], Field(max_length=MAX_ENDPOINTS)] = []
    weights: Annotated[list[WeightReport], Field(max_length=MAX_ENDPOINTS)] = []  # a top-level field:
    # an older control service ignores it (a field inside `endpoints` would fail the whole report)


def parse_report(data: Any) -> dict[str, Any]:
    """A validated report in the form the control plane keeps (a dict; each edge's `lat` an
    array of bucket, count, bucket, count, ...); ValidationError if bad."""
    report = Report.model_validate(data)
    edges: list[dict[str, Any]] = [
        {
            "dir": e.dir,
            "peer": e.peer,
            "subset": e.subset,
            "counts": {str(k): v for k, v in e.counts.items()},
            "lat": array("q", [n for pair in e.lat for n in pair]),
        }
        for e in report.edges
    ]
    return {
        "client": report.client,
        "service": report.service,
        "interval": report.interval,
        "window": report.window if report.window is not None else (report.interval or MAX_AGE),
        "edges": edges,
        "endpoints": [e.model_dump() for e in report.endpoints],
        **({"limits": [e.model_dump() for e in report.limits]} if report.limits else {}),  # rare: kept then
        **(
            {"weights": [w.model_dump() for w in report.weights]} if report.weights else {}
        ),  # rare: kept only then
    }


_INT = sys.getsizeof(10**12)
_ENTRY = 200  # a client's place in the control plane's book (ordered dict entry, tuple, float)


def kept_size(report: Mapping[str, Any]) -> int:
    """The memory a kept report takes, in bytes (its containers, strings and numbers), counted
    from the objects themselves: cheap (a few calls per edge) and never less than the truth."""
    size = _ENTRY + sys.getsizeof(report) + sys.getsizeof(report["client"]) + 2 * _INT
    size += sys.getsizeof(report["service"] or "") + sys.getsizeof(report["edges"])
    size += sys.getsizeof(report["endpoints"])
    for e in report["edges"]:
        size += sys.getsizeof(e) + sys.getsizeof(e["peer"]) + sys.getsizeof(e["subset"])
        size += sys.getsizeof(e["counts"]) + _INT * len(e["counts"]) + sys.getsizeof(e["lat"])
    for ep in report["endpoints"]:
        size += sys.getsizeof(ep) + sys.getsizeof(ep["service"]) + sys.getsizeof(ep["address"])
    size += sys.getsizeof(report.get("limits", ()))
    for lim in report.get("limits", ()):
        size += sys.getsizeof(lim) + sys.getsizeof(lim["service"]) + 2 * _INT
    weights = report.get("weights", ())
    size += sys.getsizeof(weights)
    for w in weights:
        size += sys.getsizeof(w) + sys.getsizeof(w["service"]) + sys.getsizeof(w["address"]) + _INT
    return size


# --------------------------------------------------------------------------------------------
# Merging


def percentile(hist: Mapping[int, int], q: float) -> float | None:
    """The q-quantile (0..1) in milliseconds of a {bucket: count} histogram, interpolated
    geometrically inside the bucket it falls in; None for an empty histogram."""
    total = sum(hist.values())
    if total <= 0:
        return None
    target = min(max(q, 0.0), 1.0) * total
    seen = 0
    for bucket in sorted(hist):
        n = hist[bucket]
        if seen + n >= target:
            low, high = bucket_bounds(bucket)
            frac = (target - seen) / n
            return low * (high / low) ** frac
        seen += n
    return bucket_bounds(max(hist))[1]


@dataclass
class _Edge:
    rps: float = 0.0
    ok_rps: float = 0.0
    requests: int = 0
    hist: dict[int, int] = field(default_factory=dict)
    reporters: set[str] = field(default_factory=set)
    subsets: dict[str, list[float]] = field(default_factory=dict)  # subset -> [rps, ok_rps]
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    limit: int | None = None  # the callers' adaptive concurrency limits, summed over processes

    def add(self, client: str, edge: Mapping[str, Any], window: float) -> None:
        counts = edge["counts"]
        total = sum(counts.values())
        failed = counts.get("5xx", 0) + counts.get("error", 0)
        rps, ok = total / window, (total - failed) / window
        self.rps += rps
        self.ok_rps += ok
        self.requests += total
        self.reporters.add(client)
        lat = edge["lat"]  # bucket, count, bucket, count, ...
        for i in range(0, len(lat) - 1, 2):
            bucket, n = lat[i], lat[i + 1]
            self.hist[bucket] = self.hist.get(bucket, 0) + n
        if edge["subset"]:
            acc = self.subsets.setdefault(edge["subset"], [0.0, 0.0])
            acc[0] += rps
            acc[1] += ok

    def add_endpoint(self, client: str, ep: Mapping[str, Any]) -> None:
        cur = self.endpoints.setdefault(
            ep["address"], {"address": ep["address"], "breaker": "closed", "ejected": False, "reporters": 0}
        )
        if _BREAKER_RANK[ep["breaker"]] > _BREAKER_RANK[cur["breaker"]]:
            cur["breaker"] = ep["breaker"]
        cur["ejected"] = cur["ejected"] or ep["ejected"]
        cur["reporters"] += 1

    def add_weight(self, client: str, w: Mapping[str, Any]) -> None:
        """An endpoint's weight in one caller's balancer: the edge shows the callers' mean."""
        cur = self.endpoints.setdefault(
            w["address"], {"address": w["address"], "breaker": "closed", "ejected": False, "reporters": 0}
        )
        n = cur.get("weight_reporters", 0)
        cur["weight"] = round((cur.get("weight", 0.0) * n + w["weight"]) / (n + 1), 6)
        cur["weight_reporters"] = n + 1

    def to_dict(self, source: str, destination: str, view: str) -> dict[str, Any]:
        endpoints = sorted(self.endpoints.values(), key=lambda e: e["address"])
        return {
            "source": source,
            "destination": destination,
            "view": view,
            "rps": round(self.rps, 3),
            "success_rate": _ratio(self.ok_rps, self.rps),
            "requests": self.requests,
            "p50_ms": _ms(percentile(self.hist, 0.50)),
            "p90_ms": _ms(percentile(self.hist, 0.90)),
            "p99_ms": _ms(percentile(self.hist, 0.99)),
            "subsets": {
                name: {"rps": round(r, 3), "success_rate": _ratio(ok, r)}
                for name, (r, ok) in sorted(self.subsets.items())
            },
            "breakers": {
                "open": sum(e["breaker"] == "open" for e in endpoints),
                "half_open": sum(e["breaker"] == "half-open" for e in endpoints),
                "ejected": sum(e["ejected"] for e in endpoints),
            },
            "endpoints": endpoints,
            "concurrency_limit": self.limit,
            "reporters": len(self.reporters),
        }


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole > 0 else None


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def fresh(entry: Mapping[str, Any], now: float, max_age: float = MAX_AGE) -> bool:
    """Is a stored report recent enough to be in the graph?"""
    interval = entry["report"].get("interval") or max_age
    return now - entry["received"] <= min(max_age, STALE_INTERVALS * interval)


def build_graph(
    telemetry: Mapping[str, Mapping[str, Any]],
    instances: Mapping[str, int],
    *,
    now: float,
    max_age: float = MAX_AGE,
) -> dict[str, Any]:
    """The graph from `{client: {"received": unix seconds, "report": parse_report(...)}}` and
    the registry's instance count per service."""
    out: dict[tuple[str, str], _Edge] = {}
    into: dict[tuple[str, str], _Edge] = {}
    reporters: dict[str, int] = {}
    limits: dict[str, int] = {}  # service -> its instances' inbound limits, summed
    for client, entry in telemetry.items():
        if not fresh(entry, now, max_age):
            continue
        report = entry["report"]
        me = report.get("service") or UNKNOWN
        reporters[me] = reporters.get(me, 0) + 1
        window = max(float(report.get("window") or report.get("interval") or max_age), MIN_WINDOW)
        for edge in report["edges"]:
            if edge["dir"] == "out":
                out.setdefault((me, edge["peer"]), _Edge()).add(client, edge, window)
            else:
                into.setdefault((edge["peer"], me), _Edge()).add(client, edge, window)
        for ep in report["endpoints"]:
            out.setdefault((me, ep["service"]), _Edge()).add_endpoint(client, ep)
        for lim in report.get("limits", ()):
            if lim["dir"] == "in":
                limits[me] = limits.get(me, 0) + lim["limit"]
            else:
                acc = out.setdefault((me, lim["service"]), _Edge())
                acc.limit = (acc.limit or 0) + lim["limit"]
        for w in report.get("weights", ()):
            out.setdefault((me, w["service"]), _Edge()).add_weight(client, w)
    edges = [acc.to_dict(src, dst, "out") for (src, dst), acc in out.items()]
    edges += [acc.to_dict(src, dst, "in") for (src, dst), acc in into.items() if (src, dst) not in out]
    edges.sort(key=lambda e: (e["source"], e["destination"]))
    names = set(instances) | set(reporters)
    for e in edges:
        names.update((e["source"], e["destination"]))
    nodes = [
        {
            "service": name,
            "instances": instances.get(name, 0),
            "reporters": reporters.get(name, 0),
            **({"concurrency_limit": limits[name]} if name in limits else {}),
        }
        for name in sorted(names)
    ]
    return {"generated": round(now, 3), "max_age": max_age, "nodes": nodes, "edges": edges}


# --------------------------------------------------------------------------------------------
# The endpoint


async def get_graph(plane: ControlPlane, request: Request) -> Response:
    """`GET /v1/graph`: the service graph from the fresh reports."""
    instances = {service: len(items) for service, items in plane.registry.all().items()}
    return JSONResponse(build_graph(plane.telemetry(), instances, now=time.time()))
