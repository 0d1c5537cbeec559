"""A Mesh's telemetry settings, asked by every request what there is to do.

One per Mesh. The client stages and the server middleware ask it, per request, for a tracer,
for the instruments and for the access log; each answer is None when that kind of telemetry is
off or has nowhere to go, and is cheap to get either way (see `providers`).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from meshlib.telemetry.access_log import AccessLog, open_access_log
from meshlib.telemetry.metrics import meter_source
from meshlib.telemetry.trace_facts import tracer_source

if TYPE_CHECKING:
    from meshlib.mesh import Mesh
    from meshlib.snapshot import Snapshot
    from meshlib.stats import TrafficStats


class Telemetry:
    """`Mesh(tracing=, metrics=, metrics_path=, access_log=)`, resolved.

    tracing: a TracerProvider; None or True for the global one (spans only once the app has
        installed an SDK provider); False for no spans. Trace context is passed on either way.
    metrics: a MeterProvider; None or True for the global one; False for no OTel instruments.
    metrics_path: the path on which the mesh's middleware answers Prometheus scrapes itself
        (default None: it does not).
    access_log: see `meshlib.telemetry.access_log.open_access_log` (default off).
    `Mesh` gives both from its settings: `MESH_METRICS_PATH` and `MESH_ACCESS_LOG` when not
    given explicitly.
    """

    def __init__(
        self,
        mesh: Mesh,
        *,
        tracing: Any = None,
        metrics: Any = None,
        metrics_path: str | None = None,
        access_log: Any = None,
    ) -> None:
        self.mesh = mesh
        self.ahead: list[Any] = []
        """New traces decided before a request needs one (`server.observe`)."""
        self.children: list[Any] = []
        """Dropped children of callers' unsampled traces, made before a request needs one
        (`server.unsampled`)."""
        self.inflight: deque[None] = deque()
        """One item per inbound request in flight (counted only while some metrics output is on):
        a deque's append and pop are atomic, so no lock is taken per request."""
        path = metrics_path
        if path is not None and not path.startswith("/"):
            raise ValueError(f"metrics_path must start with '/', not {path!r}")
        self.metrics_path: str | None = path
        self.exposed = path is not None
        """True once Prometheus text is served (the middleware's path or `metrics_app`)."""
        self.access: AccessLog | None = open_access_log(access_log)
        self.traces = tracer_source(tracing)
        self.meters = meter_source(metrics, self)

    @property
    def service(self) -> str:
        return self.mesh.service or ""

    @property
    def stats(self) -> TrafficStats:
        return self.mesh.stats

    @property
    def snapshot(self) -> Snapshot:
        return self.mesh.snapshot

    @property
    def active_in(self) -> int:
        """Inbound requests in flight (counted only while some metrics output is on)."""
        return len(self.inflight)

    def counting(self, instruments: Any) -> bool:
        """Whether inbound requests in flight need counting (a metrics output is on)."""
        return self.exposed or instruments is not None

    def close(self) -> None:
        instruments = self.meters.get()
        if instruments is not None:
            instruments.unwatch(self)
        self.meters.close()
        self.traces.close()
        self.ahead.clear()
        self.children.clear()
        access, self.access = self.access, None
        if access is not None:
            access.close()
