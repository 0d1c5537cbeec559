"""`meshlib demo`: a canary release of a service through the control service, watched live.

Everything runs in this process, on 127.0.0.1, with ports the OS picks and a temporary data dir:

1. the control service (what `meshlib control` runs): rules store, registry, SSE push;
2. three `orders` instances (v1, v1, v2): each a small Starlette app behind the mesh's
   server middleware, with its own `Mesh("orders", control=..., labels=..., address=...)`;
   the middleware registers the instance with the registry when the server starts, keeps it
   there with heartbeats, and deregisters it when the server stops;
3. a `checkout` Mesh subscribed to the control service: it learns the orders instances from
   the registry and the rules from the store, both pushed over Server-Sent Events; a few
   workers call `http://orders/orders/N` through it, about 200 requests/s, every 4th request
   carrying `x-canary: true`;
4. the phases below, each one `PUT /v1/config` with the admin token: a Destination (subsets
   v1 and v2, by the `version` label) and a Route. The demo measures how long checkout takes
   to have each new rules version in force, counted from the PUT's answer.

The figures are what checkout's own mesh measured (`mesh.stats`) over the last second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from meshlib.asgi import MeshMiddleware
from meshlib.control.app import ControlSettings, create_app
from meshlib.mesh import Mesh
from meshlib.snapshot import Snapshot
from meshlib.stats import TrafficStats
from meshlib.testing import RunningServer, bind, serve

log = logging.getLogger("meshlib.demo")

SERVICE = "orders"
SUBSETS = ("v1", "v2")
INSTANCE_VERSIONS = ("v1", "v1", "v2")
CANARY_HEADER = {"x-canary": "true"}
START_TIMEOUT = 10.0  # seconds to wait for registration and the first push
CONVERGE_TIMEOUT = 5.0  # seconds to wait for checkout to have a new rules version in force
REGISTRY_POLL = 1.0  # seconds between two looks at the registry while the phases run


# --------------------------------------------------------------------------------------------
# The phases: each is one PUT /v1/config of these documents.


@dataclass(frozen=True)
class Phase:
    name: str
    says: str  # what the route says, in a few words
    routes: list[dict[str, Any]]


def _split(v1: int, v2: int) -> list[dict[str, Any]]:
    return [{"name": "split", "to": [{"subset": "v1", "weight": v1}, {"subset": "v2", "weight": v2}]}]


PHASES = (
    Phase("v1 only", "v1 100 / v2 0", _split(100, 0)),
    Phase("canary 10%", "v1 90 / v2 10", _split(90, 10)),
    Phase("half and half", "v1 50 / v2 50", _split(50, 50)),
    Phase("v2 only", "v1 0 / v2 100", _split(0, 100)),
    Phase(
        "header route",
        "x-canary: true -> v2, the rest -> v1",
        [
            {
                "name": "canary-testers",
                "match": {"headers": {"x-canary": {"exact": "true"}}},
                "to": [{"subset": "v2"}],
            },
            {"name": "everyone-else", "to": [{"subset": "v1"}]},
        ],
    ),
)


def rules_documents(phase: Phase) -> list[dict[str, Any]]:
    """The rules for one phase. No Endpoints document: the instances come from the registry."""
    return [
        {
            "kind": "Destination",
            "service": SERVICE,
            "load_balancer": "round_robin",
            "subsets": {name: {"version": name} for name in SUBSETS},
        },
        {"kind": "Route", "service": SERVICE, "routes": phase.routes},
    ]


# --------------------------------------------------------------------------------------------
# The control service's API, as the demo uses it (docs/control-api.md)


async def apply_rules(admin: httpx.AsyncClient, documents: list[dict[str, Any]]) -> int:
    """`PUT /v1/config` (the client carries the admin token); returns the new rules version."""
    r = await admin.put("/v1/config", json=documents)
    if r.status_code != 200:
        raise RuntimeError(f"PUT /v1/config answered {r.status_code}: {r.text}")
    return int(r.json()["version"])


def registered(control_url: str) -> list[dict[str, Any]]:
    """`GET /v1/registry/orders`: the instances the registry holds."""
    return _instances(httpx.get(f"{control_url}/v1/registry/{SERVICE}", timeout=5.0))


def _instances(response: httpx.Response) -> list[dict[str, Any]]:
    """`{"orders": [{"id", "address", "labels", "weight", "expires_in"}, ...]}`, sorted by address."""
    response.raise_for_status()
    return sorted(response.json().get(SERVICE, []), key=lambda i: i["address"])


# --------------------------------------------------------------------------------------------
# The orders instances


def orders_app(version: str, name: str) -> Starlette:
    """A tiny orders service: `GET /orders/{id}` answers with the instance that served it,
    after a few ms of work. v2 is made a little slower than v1, so the p99 column has
    something to show."""
    rng = random.Random()
    low, high = (0.001, 0.004) if version == "v1" else (0.002, 0.007)

    async def get_order(request: Request) -> JSONResponse:
        await asyncio.sleep(rng.uniform(low, high))
        order = request.path_params["order_id"]
        return JSONResponse({"order": order, "instance": name, "version": version})

    return Starlette(routes=[Route("/orders/{order_id}", get_order)])


# --------------------------------------------------------------------------------------------
# Traffic


class Traffic:
    """Workers calling orders through the mesh at a steady total rate."""

    def __init__(self, client: httpx.AsyncClient, rate: float, workers: int = 8) -> None:
        self.client = client
        self.rate = rate
        self.workers = workers
        self.sent = 0
        self.failed = 0
        self._in_flight: set[int] = set()

    def start(self) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self._worker(i), name=f"demo-worker-{i}") for i in range(self.workers)]

    async def settled(self, timeout: float = 5.0) -> None:
        """Wait until the requests sent so far have finished.

        Requests still in flight when the rules change were routed by the old rules: waiting
        for them keeps them out of the new phase's figures.
        """
        sent, deadline = self.sent, time.monotonic() + timeout
        while any(n < sent for n in self._in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.002)

    async def _worker(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        interval = self.workers / self.rate
        next_at = loop.time() + index * interval / self.workers
        while True:
            n = self.sent
            self.sent += 1
            headers = CANARY_HEADER if n % 4 == 3 else None  # every 4th request is a canary tester
            self._in_flight.add(n)
            try:
                await self.client.get(f"http://orders/orders/{n}", headers=headers)
            except httpx.HTTPError as exc:  # counted by the mesh as an error; keep going
                self.failed += 1
                level = logging.WARNING if self.failed == 1 else logging.DEBUG
                log.log(level, "request %d failed: %r", n, exc)
            finally:
                self._in_flight.discard(n)
            next_at = max(next_at + interval, loop.time() - 1.0)  # do not burst to catch up
            await asyncio.sleep(max(0.0, next_at - loop.time()))


# --------------------------------------------------------------------------------------------
# Measuring: per-subset figures over a sliding window, from checkout's `mesh.stats`


@dataclass(frozen=True)
class Figures:
    rate: float  # requests/s
    share: float  # percent of all requests in the window
    success: float | None  # percent answered 2xx; None without requests
    p99_ms: float | None


Counts = dict[str, tuple[int, int]]  # subset -> (requests, 2xx)


class Meter:
    """Per-subset figures over the last `window` seconds, from deltas of the cumulative counts."""

    def __init__(self, stats: TrafficStats, window: float = 1.0) -> None:
        self.stats = stats
        self.window = window
        self._samples: deque[tuple[float, Counts]] = deque([(time.monotonic(), self.counts())])

    def counts(self) -> Counts:
        """Requests and successes so far, per subset (since the start)."""
        out: Counts = {}
        for subset in SUBSETS:
            edge = self.stats.edge("out", SERVICE, subset)
            out[subset] = (edge.total, edge.by_class.get("2xx", 0))
        return out

    def figures(self) -> dict[str, Figures]:
        now = time.monotonic()
        counts = self.counts()
        self._samples.append((now, counts))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()
        then, before = self._samples[0]
        elapsed = max(now - then, 1e-9)
        sent = {s: counts[s][0] - before[s][0] for s in SUBSETS}
        total = sum(sent.values())
        out = {}
        for s in SUBSETS:
            n, ok = sent[s], counts[s][1] - before[s][1]
            out[s] = Figures(
                rate=n / elapsed,
                share=100.0 * n / total if total else 0.0,
                success=100.0 * ok / n if n else None,
                p99_ms=self._p99_ms(s, n),
            )
        return out

    def _p99_ms(self, subset: str, last: int) -> float | None:
        """The p99 of the `last` requests of a subset (latencies are kept in arrival order)."""
        if last <= 0:
            return None
        recent = sorted(list(self.stats.edge("out", SERVICE, subset).latencies)[-last:])
        return 1000.0 * recent[min(len(recent) - 1, int(0.99 * len(recent)))]


class RulesClock:
    """When checkout's mesh first had each rules version in force.

    `mesh.on_update` calls us from the mesh's runtime thread right after each Snapshot swap,
    so the time is taken when `mesh.snapshot.version` changes, not when someone looks.
    """

    def __init__(self, mesh: Mesh) -> None:
        self._seen: dict[str, float] = {}
        mesh.on_update(self._updated)

    def _updated(self, snapshot: Snapshot) -> None:
        self._seen.setdefault(snapshot.version, time.monotonic())

    async def in_force_at(self, version: str) -> float:
        """The `time.monotonic()` at which `version` came into force (waits for it)."""
        deadline = time.monotonic() + CONVERGE_TIMEOUT
        while version not in self._seen:
            if time.monotonic() > deadline:
                raise RuntimeError(f"checkout did not get rules version {version} in {CONVERGE_TIMEOUT:g} s")
            await asyncio.sleep(0.001)
        return self._seen[version]


@dataclass(frozen=True)
class Timing:
    """How one rules change reached checkout (`time.monotonic()` values)."""

    sent: float  # the PUT was sent
    answered: float  # its answer came back: the version is committed
    in_force: float  # checkout's mesh had the new version in force

    @property
    def converged_ms(self) -> float:
        """From the PUT's answer until in force at checkout; 0 when it was in force before."""
        return max(0.0, 1000.0 * (self.in_force - self.answered))

    @property
    def sent_ms(self) -> float:
        """From the PUT's request until in force: commit, push over SSE, Snapshot swap."""
        return 1000.0 * (self.in_force - self.sent)

    def describe(self) -> str:
        """When checkout had it, in words: "3.1 ms after the PUT answered (9.8 ms after it was sent)"."""
        when = (
            f"{self.converged_ms:.1f} ms after the PUT answered"
            if self.in_force > self.answered
            else "before the PUT's answer came back"
        )
        return f"{when} ({self.sent_ms:.1f} ms after it was sent)"


# --------------------------------------------------------------------------------------------
# State and results


@dataclass(frozen=True)
class PhaseResult:
    number: int
    phase: Phase
    version: str
    timing: Timing
    requests: int
    shares: dict[str, float]
    success: float | None

    def line(self) -> str:
        shares = " ".join(f"{s}={self.shares[s]:.1f}%" for s in SUBSETS)
        success = f"{self.success:.1f}%" if self.success is not None else "-"
        return (
            f"phase {self.number}/{len(PHASES)} done: {self.phase.name}: requests={self.requests} "
            f"{shares} success={success} rules={self.version} "
            f"converged={self.timing.converged_ms:.1f}ms since_request={self.timing.sent_ms:.1f}ms"
        )


def phase_result(
    number: int, phase: Phase, version: str, timing: Timing, start: Counts, end: Counts
) -> PhaseResult:
    sent = {s: end[s][0] - start[s][0] for s in SUBSETS}
    ok = sum(end[s][1] - start[s][1] for s in SUBSETS)
    total = sum(sent.values())
    shares = {s: 100.0 * sent[s] / total if total else 0.0 for s in SUBSETS}
    success = 100.0 * ok / total if total else None
    return PhaseResult(number, phase, version, timing, total, shares, success)


@dataclass
class DemoState:
    """What the views show; `_start` fills it in and `drive` updates it."""

    control_url: str
    token: str  # the control service's admin token
    checkout: Mesh
    clock: RulesClock
    phase_seconds: float
    instances: list[dict[str, Any]]  # GET /v1/registry/orders, refreshed while the phases run
    number: int = 0  # current phase, from 1
    phase_started: float = field(default_factory=time.monotonic)
    timing: Timing | None = None  # how this phase's rules reached checkout
    results: list[PhaseResult] = field(default_factory=list)

    @property
    def phase(self) -> Phase:
        return PHASES[self.number - 1]

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.phase_started

    def instances_of(self, subset: str) -> int:
        return sum(1 for i in self.instances if i["labels"].get("version") == subset)


# --------------------------------------------------------------------------------------------
# Views: a live rich table for a terminal, plain lines for logs


@dataclass
class Step:
    """A start-up step: the view shows `doing` while it runs, then `done`."""

    doing: str
    done: str = ""


def _describe(instances: list[dict[str, Any]]) -> str:
    return ", ".join(f"{i['address']} ({i['labels'].get('version', '-')})" for i in instances) or "none"


class PlainView:
    """One line per second, and one per finished phase; for CI logs and pipes."""

    interval = 1.0

    def __init__(self) -> None:
        self._started = time.monotonic()

    def log_handler(self) -> logging.Handler:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        return handler

    def heading(self, text: str) -> None:
        print(text, flush=True)

    @contextlib.contextmanager
    def step(self, doing: str) -> Iterator[Step]:
        step = Step(doing)
        started = time.monotonic()
        yield step
        print(f"  {step.done or doing} [{1000 * (time.monotonic() - started):.0f} ms]", flush=True)

    def note(self, text: str) -> None:
        print(f"  {text}", flush=True)

    @contextlib.contextmanager
    def showing(self, state: DemoState) -> Iterator[None]:
        yield

    def phase_started(self, state: DemoState) -> None:
        timing = state.timing.describe() if state.timing else ""
        print(
            f"phase {state.number}/{len(PHASES)} {state.phase.name} ({state.phase.says}): "
            f"rules version {state.checkout.snapshot.version} in force at checkout {timing}",
            flush=True,
        )

    def refresh(self, state: DemoState, figures: dict[str, Figures]) -> None:
        parts = []
        for s in SUBSETS:
            f = figures[s]
            success = f"{f.success:.1f}%" if f.success is not None else "-"
            p99 = f"{f.p99_ms:.1f}ms" if f.p99_ms is not None else "-"
            parts.append(f"{s} {f.rate:6.1f}/s share {f.share:5.1f}% ok {success:>6} p99 {p99:>7}")
        elapsed = time.monotonic() - self._started
        print(
            f"{elapsed:6.1f}s  phase {state.number}/{len(PHASES)}  "
            + " | ".join(parts)
            + f" | registered {len(state.instances)}",
            flush=True,
        )

    def phase_done(self, result: PhaseResult) -> None:
        print(result.line(), flush=True)

    def interrupted(self) -> None:
        print("\ninterrupted; stopping", flush=True)

    def finished(self, state: DemoState) -> None:
        total = sum(r.requests for r in state.results)
        print(f"demo finished: {len(state.results)} phases, {total} requests", flush=True)


class LiveView:
    """A table that redraws in place (rich.live.Live)."""

    interval = 0.25

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console()
        self._live: Any = None

    def log_handler(self) -> logging.Handler:
        from rich.logging import RichHandler

        return RichHandler(console=self.console, show_path=False)

    def heading(self, text: str) -> None:
        self.console.print(text, style="bold", highlight=False)

    @contextlib.contextmanager
    def step(self, doing: str) -> Iterator[Step]:
        from rich.text import Text

        step = Step(doing)
        with self.console.status(f"{doing} ..."):
            yield step
        self.console.print(Text.assemble(("✓ ", "green"), step.done or doing))

    def note(self, text: str) -> None:
        from rich.text import Text

        self.console.print(Text.assemble(("✓ ", "green"), text))

    @contextlib.contextmanager
    def showing(self, state: DemoState) -> Iterator[None]:
        from rich.live import Live

        with Live(console=self.console, auto_refresh=False, transient=False) as live:
            self._live = live
            try:
                yield
            finally:
                self._live = None

    def phase_started(self, state: DemoState) -> None:
        pass  # the table shows the phase

    def refresh(self, state: DemoState, figures: dict[str, Figures]) -> None:
        if self._live is not None:
            self._live.update(self._render(state, figures), refresh=True)

    def phase_done(self, result: PhaseResult) -> None:
        pass  # listed under the table

    def interrupted(self) -> None:
        self.console.print("interrupted; stopping", style="bold yellow")

    def finished(self, state: DemoState) -> None:
        from rich.table import Table

        table = Table(title="phases", title_justify="left", box=None, pad_edge=False)
        columns = ("phase", "route", "rules", "converged", "requests", *(f"{s} share" for s in SUBSETS))
        for column in (*columns, "success"):
            table.add_column(column, justify="left" if column in ("phase", "route") else "right")
        for r in state.results:
            success = f"{r.success:.1f}%" if r.success is not None else "-"
            shares = (f"{r.shares[s]:.1f}%" for s in SUBSETS)
            table.add_row(
                f"{r.number} {r.phase.name}",
                r.phase.says,
                r.version,
                f"{r.timing.converged_ms:.1f} ms",
                str(r.requests),
                *shares,
                success,
            )
        self.console.print(table)

    def _render(self, state: DemoState, figures: dict[str, Figures]) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        head = Table.grid(padding=(0, 2))
        head.add_row(
            Text(f"phase {state.number}/{len(PHASES)}", style="bold"),
            Text(state.phase.name, style="bold cyan"),
            Text(state.phase.says),
        )
        head.add_row(
            Text("rules", style="bold"),
            Text(f"version {state.checkout.snapshot.version}", style="magenta"),
            Text(f"PUT {state.control_url}/v1/config", style="dim"),
        )
        if state.timing is not None:
            head.add_row(
                Text("converged", style="bold"),
                Text(f"{state.timing.converged_ms:.1f} ms"),
                Text(f"in force at checkout {state.timing.describe()}", style="dim"),
            )
        head.add_row(
            Text("time", style="bold"),
            ProgressBar(
                total=state.phase_seconds, completed=min(state.elapsed, state.phase_seconds), width=24
            ),
            Text(f"{state.elapsed:.1f} / {state.phase_seconds:g} s", style="dim"),
        )

        table = Table(
            title="checkout → orders, as checkout's mesh sees it (last second)", title_justify="left"
        )
        table.add_column("subset")
        table.add_column("instances", justify="right")
        table.add_column("req/s", justify="right")
        table.add_column("share", justify="left", min_width=30)
        table.add_column("success", justify="right")
        table.add_column("p99", justify="right")
        for s in SUBSETS:
            f = figures[s]
            bar = "█" * round(f.share / 5)
            table.add_row(
                Text(s, style="bold"),
                str(state.instances_of(s)),
                f"{f.rate:.0f}",
                Text.assemble((f"{bar:<20}", "green" if s == "v1" else "yellow"), f" {f.share:5.1f}%"),
                f"{f.success:.1f}%" if f.success is not None else "-",
                f"{f.p99_ms:.1f} ms" if f.p99_ms is not None else "-",
            )

        registry = Table(
            title=f"registered instances (GET /v1/registry/{SERVICE})", title_justify="left", box=None
        )
        for column in ("id", "address", "version", "expires in"):
            registry.add_column(column, justify="right" if column == "expires in" else "left", style="dim")
        for i in state.instances:
            registry.add_row(
                i["id"], i["address"], i["labels"].get("version", "-"), f"{i['expires_in']:.1f} s"
            )

        done = Text()
        for r in state.results:
            shares = "  ".join(f"{s} {r.shares[s]:5.1f}%" for s in SUBSETS)
            done.append(
                f"✓ {r.number} {r.phase.name:<14} {shares}  ({r.requests} requests, "
                f"rules {r.version} converged in {r.timing.converged_ms:.1f} ms)\n",
                style="dim",
            )
        footer = Text("Ctrl-C stops the demo", style="dim")
        return Group(head, Text(), table, Text(), registry, Text(), done, footer)


View = PlainView | LiveView


# --------------------------------------------------------------------------------------------
# Running it


async def _sleep_watching(tasks: list[asyncio.Task[None]], seconds: float) -> None:
    """Sleep, but raise at once if one of the background tasks (which never end) has failed."""
    done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        task.result()
        raise RuntimeError(f"{task.get_name()} stopped")


async def _refresh(view: View, state: DemoState, meter: Meter) -> None:
    while True:
        await asyncio.sleep(view.interval)
        view.refresh(state, meter.figures())


async def _watch_registry(admin: httpx.AsyncClient, state: DemoState) -> None:
    """Keep `state.instances` up to date (the instances heartbeat; `expires_in` shows it)."""
    while True:
        await asyncio.sleep(REGISTRY_POLL)
        try:
            state.instances = _instances(await admin.get(f"/v1/registry/{SERVICE}"))
        except httpx.HTTPError as exc:
            log.warning("GET /v1/registry/%s failed: %r", SERVICE, exc)


async def drive(state: DemoState, view: View, rate: float) -> None:
    """Walk through the phases, one PUT /v1/config each, with traffic flowing through checkout."""
    checkout = state.checkout
    meter = Meter(checkout.stats)
    admin = httpx.AsyncClient(
        base_url=state.control_url, headers={"authorization": f"Bearer {state.token}"}, timeout=5.0
    )
    async with admin, checkout.client(timeout=5.0) as client:
        traffic = Traffic(client, rate)
        tasks = [
            asyncio.create_task(_refresh(view, state, meter), name="demo-view"),
            asyncio.create_task(_watch_registry(admin, state), name="demo-registry"),
        ]
        try:
            for number, phase in enumerate(PHASES, start=1):
                sent = time.monotonic()
                version = str(await apply_rules(admin, rules_documents(phase)))
                answered = time.monotonic()
                timing = Timing(sent, answered, in_force=await state.clock.in_force_at(version))
                if number == 1:
                    tasks += traffic.start()  # the traffic starts once the first rules are in force
                else:
                    await traffic.settled()  # requests routed by the previous rules: not this phase's
                state.number, state.timing, state.phase_started = number, timing, time.monotonic()
                view.phase_started(state)
                start = meter.counts()
                await _sleep_watching(tasks, state.phase_seconds)
                result = phase_result(number, phase, version, timing, start, meter.counts())
                state.results.append(result)
                view.phase_done(result)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.contextmanager
def _logging_to(view: View, verbose: bool) -> Iterator[None]:
    """Send meshlib's and uvicorn's log records to the view for the duration of the demo."""
    handler = view.log_handler()
    loggers = [logging.getLogger("meshlib"), logging.getLogger("uvicorn")]
    meshlib_logger = loggers[0]
    old_level = meshlib_logger.level
    if verbose:
        meshlib_logger.setLevel(logging.INFO)
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        meshlib_logger.setLevel(old_level)


def _make_view(live: bool | None) -> View:
    if live is None:
        live = sys.stdout.isatty()
    if live:
        try:
            return LiveView()
        except ImportError:
            print("the live table needs rich (pip install rich); showing plain lines", flush=True)
    return PlainView()


def run(
    phase_seconds: float = 4.0, *, live: bool | None = None, rate: float = 200.0, verbose: bool = False
) -> int:
    """Run the demo to the end (or Ctrl-C); returns the exit code. `live=None`: live on a TTY."""
    view = _make_view(live)
    state: DemoState | None = None
    with _logging_to(view, verbose):
        with contextlib.ExitStack() as cleanup:  # stops everything, in reverse order of start
            try:
                state = _start(cleanup, view, phase_seconds)
                with view.showing(state):
                    asyncio.run(drive(state, view, rate))
            except KeyboardInterrupt:
                view.interrupted()
                state = None
        view.note("everything stopped, temporary files removed")
        if state is not None:
            view.finished(state)
    return 0


def _wait_for(what: str, predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {START_TIMEOUT:g} s waiting for {what}")
        time.sleep(0.01)


def _start(cleanup: contextlib.ExitStack, view: View, phase_seconds: float) -> DemoState:
    """Start the control service, the orders instances and checkout; `cleanup` stops them all."""
    view.heading("meshlib demo: a canary release of `orders`, driven through the control service")
    tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="meshlib-demo-")))

    # 1. The control service, as `meshlib control --data DIR` runs it. The data dir is new, so
    #    the admin token is created now (it is also in DIR/admin.token).
    with view.step("starting the control service") as step:
        data = tmp / "control"
        control_app = create_app(ControlSettings(data))
        control = serve(control_app, lifespan="on", log_config=None)
        cleanup.callback(control.stop)
        token = control_app.state.control.new_admin_token or (data / "admin.token").read_text().strip()
        step.done = f"control service on {control.url}, dashboard at {control.url}/ (data dir {data})"

    # 2. The orders instances. The socket is bound first so that the Mesh knows its address
    #    before the server starts; MeshMiddleware registers it on the app's lifespan start-up,
    #    heartbeats, and deregisters it on shutdown.
    servers: list[RunningServer] = []
    meshes: list[Mesh] = []
    cleanup.callback(_stop_orders, view, control.url, servers, meshes)
    for i, version in enumerate(INSTANCE_VERSIONS, start=1):
        name = f"orders-{version}-{i}"
        with view.step(f"starting {name}") as step:
            sock = bind()
            address = f"127.0.0.1:{sock.getsockname()[1]}"
            orders_mesh = Mesh(
                SERVICE,
                control=control.url,
                labels={"version": version},
                address=address,
                cache_dir=tmp / "cache" / name,  # where the mesh keeps its last-known-good state
            )
            meshes.append(orders_mesh)
            app = orders_app(version, name)
            app.add_middleware(MeshMiddleware, mesh=orders_mesh)
            servers.append(serve(app, sock=sock, lifespan="on", log_config=None))
            step.done = f"{name} serving on {address}, labels {{version: {version}}}"

    with view.step("waiting for the instances to register") as step:
        instances: list[dict[str, Any]] = []

        def all_registered() -> bool:
            instances[:] = registered(control.url)
            return len(instances) == len(INSTANCE_VERSIONS)

        _wait_for("the orders instances to register", all_registered)
        step.done = f"registry (GET /v1/registry/{SERVICE}): {_describe(instances)}"

    # 3. checkout, the caller: it subscribes to the control service, which pushes it the rules
    #    and the registered instances of every service.
    with view.step("starting checkout") as step:
        checkout = Mesh("checkout", control=control.url, cache_dir=tmp / "cache" / "checkout")
        cleanup.callback(checkout.close)
        clock = RulesClock(checkout)
        if not checkout.wait_for_control(START_TIMEOUT):
            raise RuntimeError("checkout did not hear from the control service")

        def known_instances() -> int:
            plan = checkout.snapshot.plan(SERVICE)
            return len(plan.endpoints) if plan is not None else 0

        _wait_for("checkout to see the orders instances", lambda: known_instances() == len(instances))
        step.done = (
            f"checkout subscribed: sees {known_instances()} orders instances, "
            f"rules version {checkout.snapshot.version}"
        )

    view.note(f"{len(PHASES)} phases of {phase_seconds:g} s: " + " -> ".join(p.name for p in PHASES))
    return DemoState(control.url, token, checkout, clock, phase_seconds, instances)


def _stop_orders(view: View, control_url: str, servers: list[RunningServer], meshes: list[Mesh]) -> None:
    """Stop the orders servers (each deregisters itself on shutdown), then their meshes."""
    for server in servers:  # ask them all first: the shutdowns overlap
        server.server.should_exit = True
    for server in servers:
        server.stop()
    for mesh in meshes:
        mesh.close()
    if servers:
        try:
            left = registered(control_url)
        except httpx.HTTPError as exc:
            log.warning("GET /v1/registry/%s failed: %r", SERVICE, exc)
            return
        view.note(f"{len(servers)} orders instances stopped and deregistered: the registry lists {len(left)}")
