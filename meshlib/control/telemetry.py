"""Telemetry reports: each Mesh tells the control service what its edges carried.

Every `interval` seconds (jittered, so a fleet started together does not report in step) the
reporter reads the Mesh's `TrafficStats`, takes the difference with what it read last time and
posts a small JSON body to `POST /v1/telemetry`:

    {"client": ID, "service": NAME, "interval": 5.0, "window": 5.02,
     "edges": [{"dir": "out", "peer": "orders", "subset": "v1",
                "counts": {"2xx": 120, "5xx": 1}, "lat": [[-3, 4], [0, 80], [2, 37]]}],
     "endpoints": [{"service": "orders", "address": "127.0.0.1:8001", "breaker": "open",
                    "ejected": false}],
     "limits": [{"dir": "out", "service": "orders", "limit": 14, "in_flight": 9}]}

`lat` is a sparse log histogram of the window's latencies (`bucket_of`): unlike percentiles it
can be merged across instances and subsets, which is what the service graph does, within the
bucket width (about 9%). `endpoints` lists only endpoints whose breaker is not closed or that
are ejected, so a healthy fleet sends none; `limits`, the adaptive concurrency limits in force
(inbound: a ConcurrencyLimit; outbound: a Destination's adaptive_concurrency), only when set.
An edge that goes idle is still listed (with no counts) for a few reports, so a slow edge does
not blink in and out of the graph.

The traffic of a window whose report fails is not sent later: the graph is a live view, and a
dead control service costs nothing but a debug log. With several replicas a report goes to the
one in use; one that cannot be reached moves the link on, and a report that never left
(connection refused or timed out before it was sent) is sent once more, to the next replica.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import httpx

from meshlib.control.endpoints import ControlEndpoints
from meshlib.settings import MeshSettings
from meshlib.telemetry.metrics import balancer_weights

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

log = logging.getLogger("meshlib.control")

DEFAULT_INTERVAL = 5.0

BUCKETS_PER_OCTAVE = 8
MIN_BUCKET = -10 * BUCKETS_PER_OCTAVE  # 2**-10 ms, about 1 µs
MAX_BUCKET = 25 * BUCKETS_PER_OCTAVE  # 2**25 ms, about 9 hours
IDLE_REPORTS = 3
"""Reports an edge stays listed (with no counts) after its last request."""
MAX_EDGES = 500
MAX_ENDPOINTS = 500


# --------------------------------------------------------------------------------------------
# The latency histogram (shared with the server side, meshlib.control.graph)


def bucket_of(ms: float) -> int:
    """The bucket of a latency in milliseconds: the smallest i with ms <= 2**(i/8)."""
    if not ms > 0:  # also NaN
        return MIN_BUCKET
    if math.isinf(ms):
        return MAX_BUCKET
    return min(MAX_BUCKET, max(MIN_BUCKET, math.ceil(math.log2(ms) * BUCKETS_PER_OCTAVE - 1e-9)))


def bucket_bounds(bucket: int) -> tuple[float, float]:
    """The (low, high] range of a bucket, in milliseconds."""
    return 2.0 ** ((bucket - 1) / BUCKETS_PER_OCTAVE), 2.0 ** (bucket / BUCKETS_PER_OCTAVE)


def histogram(seconds: Iterable[float]) -> list[list[int]]:
    """Latencies (seconds) as sorted [bucket, count] pairs."""
    counts: dict[int, int] = {}
    for s in seconds:
        b = bucket_of(s * 1000.0)
        counts[b] = counts.get(b, 0) + 1
    return [[b, counts[b]] for b in sorted(counts)]


def interval_from_env(default: float = DEFAULT_INTERVAL) -> float:
    """$MESH_TELEMETRY_INTERVAL in seconds (0: off), else `default` (a bad value is ignored
    with a warning, by meshlib.settings)."""
    interval = MeshSettings.resolve().telemetry_interval
    return default if interval is None else interval


# --------------------------------------------------------------------------------------------
# The reporter


class TelemetryReporter:
    """Periodic edge summaries of one Mesh, posted to its control service."""

    def __init__(
        self,
        mesh: Mesh,
        url: str | ControlEndpoints,
        client_id: str,
        *,
        interval: float = DEFAULT_INTERVAL,
        jitter: float = 0.2,
        http: httpx.AsyncClient | None = None,
        http_options: Mapping[str, Any] | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        """`http`: a client to use (not closed here); otherwise one is made with `http_options`
        (httpx.AsyncClient arguments: TLS verification, headers) and closed when `run` ends."""
        self.mesh = mesh
        self.endpoints = url if isinstance(url, ControlEndpoints) else ControlEndpoints(url)
        self.client_id = client_id
        self.interval = interval
        self.jitter = jitter
        self.sent = 0
        self.failed = 0
        self._http = http
        self._http_options = dict(http_options or {})
        self._timeout = httpx.Timeout(min(5.0, max(interval, 1.0)))  # also on a client it is given
        self._clock = clock
        self._counts: dict[tuple[str, str, str], dict[str, int]] = {}  # edge -> counts read last time
        self._idle: dict[tuple[str, str, str], int] = {}  # edge -> reports since its last request
        self._last = clock()
        self._refused_logged = False

    # -- building ------------------------------------------------------------------------

    def collect(self) -> dict[str, Any]:
        """The report for the traffic since the previous call (and start the next window)."""
        now = self._clock()
        window, self._last = max(now - self._last, 1e-3), now
        edges: dict[tuple[str, str, str], dict[str, Any]] = {}
        current = self.mesh.stats.edges()
        for gone in [k for k in self._counts if k not in current]:  # the stats were reset
            self._counts.pop(gone, None)
            self._idle.pop(gone, None)
        for key, stats in sorted(current.items()):
            counts = dict(stats.by_class)  # copies are atomic under the GIL; the hot path keeps writing
            delta = _delta(counts, self._counts.get(key, {}))
            self._counts[key] = counts
            new = sum(delta.values())
            latencies: list[float] = []
            if new > 0:
                self._idle[key] = 0
                latencies = list(stats.latencies.copy())[-new:]
            else:
                idle = self._idle.get(key, IDLE_REPORTS) + 1
                self._idle[key] = idle
                if idle > IDLE_REPORTS:
                    continue
            direction, peer, subset = key
            # a caller names itself in a header: anything that is not a plain name is "unknown"
            out_key = (direction, _plain(peer), _plain(subset) if subset else "")
            entry = edges.setdefault(out_key, {"counts": {}, "latencies": []})
            for cls, n in delta.items():
                entry["counts"][cls] = entry["counts"].get(cls, 0) + n
            entry["latencies"].extend(latencies)
        listed = [
            {"dir": d, "peer": p, "subset": s, "counts": e["counts"], "lat": histogram(e["latencies"])}
            for (d, p, s), e in edges.items()
        ]
        return {
            "client": self.client_id,
            "service": self.mesh.service,
            "interval": self.interval,
            "window": round(window, 3),
            "edges": listed[:MAX_EDGES],
            "endpoints": endpoint_states(self.mesh)[:MAX_ENDPOINTS],
            "weights": endpoint_weights(self.mesh)[:MAX_ENDPOINTS],
            **({"limits": limits[:MAX_ENDPOINTS]} if (limits := concurrency_limits(self.mesh)) else {}),
        }

    # -- sending -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The replica in use."""
        return self.endpoints.current

    def headers(self) -> dict[str, str]:
        token = self.mesh.token
        return {"authorization": f"Bearer {token}"} if token else {}

    async def report_once(self, http: httpx.AsyncClient) -> bool:
        """Collect and post one report; True if the control service took it."""
        try:
            body = self.collect()
        except Exception:
            log.warning("telemetry: building the report failed", exc_info=True)
            return False
        tries = len(self.endpoints.urls)
        while True:
            url = self.url
            try:
                r = await http.post(
                    f"{url}/v1/telemetry", json=body, headers=self.headers(), timeout=self._timeout
                )
                break
            except httpx.HTTPError as exc:
                self.failed += 1
                log.debug("telemetry: %s unreachable: %s", url, exc)
                self.endpoints.failed(url, exc, warn=False)  # the watch says when all are down
                tries -= 1
                # sent again only if it never left, and only to a replica not yet tried
                if tries <= 0 or not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                    return False
        if r.status_code >= 500:
            self.endpoints.failed(url, f"telemetry answered {r.status_code}", warn=False)
        else:
            self.endpoints.ok(url)  # an answer, even a refusal: the replica is reachable
        if r.status_code >= 300:
            self.failed += 1
            level = logging.DEBUG if self._refused_logged else logging.INFO
            self._refused_logged = True
            log.log(level, "telemetry: %s refused the report: %s %s", url, r.status_code, r.text[:200])
            return False
        self.sent += 1
        return True

    def pause(self) -> float:
        """The next wait: the interval, give or take `jitter` of it."""
        return self.interval * random.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    async def run(self) -> None:
        """Report until cancelled (on the Mesh's runtime loop)."""
        if self.interval <= 0:
            return
        own = self._http is None
        http = self._http or httpx.AsyncClient(timeout=self._timeout, **self._http_options)
        self._last = self._clock()
        try:
            while True:
                await asyncio.sleep(self.pause())
                await self.report_once(http)
        finally:
            if own:
                await http.aclose()


def _plain(name: str) -> str:
    """`name` if the control service accepts it as a name, else "unknown"."""
    if 0 < len(name) <= 256 and name.isprintable() and not any(c.isspace() for c in name):
        return name
    return "unknown"


def _delta(now: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    """Counts since `before`; all of `now` if some count went down (the stats were reset)."""
    if any(now.get(k, 0) < v for k, v in before.items()):
        before = {}
    return {k: v - before.get(k, 0) for k, v in now.items() if v > before.get(k, 0)}


def concurrency_limits(mesh: Mesh) -> list[dict[str, Any]]:
    """The adaptive concurrency limits in force in this process, and what each has in flight."""
    return [
        {"dir": direction, "service": service, "limit": limiter.current, "in_flight": limiter.in_flight}
        for direction, service, limiter in mesh.resilience.concurrency_limits()
    ]


def endpoint_weights(mesh: Mesh) -> list[dict[str, Any]]:
    """Each endpoint's weight in this process's weighted_round_robin balancers (in the first built
    that holds it, when subsets share it), with its service; nothing for the other balancers."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    try:
        for labels, weight in balancer_weights(mesh.telemetry):
            key = (labels["destination"], labels["endpoint"])
            if key not in seen and math.isfinite(weight):
                seen.add(key)
                out.append({"service": key[0], "address": key[1], "weight": round(weight, 6)})
    except Exception:  # a report, not a reason to fail
        return out
    return out


def endpoint_states(mesh: Mesh) -> list[dict[str, Any]]:
    """Endpoints whose breaker is not closed or that are ejected, with their service.

    Breakers are keyed by address and outlier detectors by service; the Snapshot's plans say
    which service an address belongs to. Anything unreadable is left out: this is a report,
    not a reason to fail.
    """
    resilience = getattr(mesh, "resilience", None)
    if resilience is None:
        return []
    try:
        breakers = resilience.breakers.states()
    except Exception:
        breakers = {}
    ejected: dict[str, set[str]] = {}
    for book in ("_detectors", "accruals"):
        detectors = getattr(resilience, book, None)
        if not isinstance(detectors, dict):
            continue
        for service, detector in list(detectors.items()):
            try:
                ejected.setdefault(service, set()).update(detector.ejected_addresses())
            except Exception:
                continue
    out: list[dict[str, Any]] = []
    for name, plan in mesh.snapshot.plans.items():
        gone = ejected.get(name, set())
        for endpoint in plan.every:
            state = breakers.get(endpoint.address, "closed")
            out_ejected = endpoint.address in gone
            if state != "closed" or out_ejected:
                out.append(
                    {"service": name, "address": endpoint.address, "breaker": state, "ejected": out_ejected}
                )
    return out
