"""`meshlib demo`: a canary release of a service, watched live, on this machine alone.

What it does:

1. starts three `orders` instances in this process on 127.0.0.1 (two v1, one v2), each a
   small ASGI app behind the mesh's server middleware, on ports the OS picks;
2. writes a rules file into a temporary directory and makes the `checkout` Mesh from it;
3. has a few workers call `http://orders/orders/N` through the mesh, about 200 requests/s,
   every 4th request carrying `x-canary: true`;
4. moves through the phases below by editing the rules file: nothing calls the Mesh, its file
   watch picks each edit up and the traffic split changes live.

The figures are what checkout's own mesh measured (`mesh.stats`) over the last second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
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
import yaml

from meshlib.mesh import Mesh
from meshlib.stats import TrafficStats
from meshlib.testing import RunningServer, serve

log = logging.getLogger("meshlib.demo")

SUBSETS = ("v1", "v2")
INSTANCE_VERSIONS = ("v1", "v1", "v2")
CANARY_HEADER = {"x-canary": "true"}
RULES_APPLY_TIMEOUT = 5.0  # seconds to wait for the file watch to pick up an edit


# --------------------------------------------------------------------------------------------
# The phases: each is the Route document written to the rules file.


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


def rules_documents(instances: list[tuple[str, str]], phase: Phase) -> list[dict[str, Any]]:
    """The rules for one phase; `instances` are (address, version) pairs."""
    return [
        {
            "kind": "Endpoints",
            "service": "orders",
            "endpoints": [{"address": address, "labels": {"version": v}} for address, v in instances],
        },
        {
            "kind": "Destination",
            "service": "orders",
            "load_balancer": "round_robin",
            "subsets": {name: {"version": name} for name in SUBSETS},
        },
        {"kind": "Route", "service": "orders", "routes": phase.routes},
    ]


def write_rules(path: Path, instances: list[tuple[str, str]], phase: Phase) -> None:
    """Write the rules file atomically: the watch sees the old file or the new one, never half."""
    text = f"# meshlib demo, phase: {phase.name}\n" + yaml.safe_dump_all(
        rules_documents(instances, phase), sort_keys=False
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The orders instances


def orders_app(version: str, name: str) -> Callable[..., Any]:
    """A tiny orders instance: answers any GET with its name and version after a few ms of work.

    v2 is made a little slower than v1, so that the p99 column has something to show.
    """
    rng = random.Random()
    low, high = (0.001, 0.004) if version == "v1" else (0.002, 0.007)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await asyncio.sleep(rng.uniform(low, high))
        body = json.dumps({"instance": name, "version": version, "path": scope["path"]}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


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
            edge = self.stats.edge("out", "orders", subset)
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
        recent = sorted(list(self.stats.edge("out", "orders", subset).latencies)[-last:])
        return 1000.0 * recent[min(len(recent) - 1, int(0.99 * len(recent)))]


# --------------------------------------------------------------------------------------------
# State and results


@dataclass(frozen=True)
class PhaseResult:
    number: int
    phase: Phase
    version: str
    requests: int
    shares: dict[str, float]
    success: float | None

    def line(self) -> str:
        shares = " ".join(f"{s}={self.shares[s]:.1f}%" for s in SUBSETS)
        success = f"{self.success:.1f}%" if self.success is not None else "-"
        return (
            f"phase {self.number}/{len(PHASES)} done: {self.phase.name}: requests={self.requests} "
            f"{shares} success={success} rules={self.version}"
        )


def phase_result(number: int, phase: Phase, version: str, start: Counts, end: Counts) -> PhaseResult:
    sent = {s: end[s][0] - start[s][0] for s in SUBSETS}
    ok = sum(end[s][1] - start[s][1] for s in SUBSETS)
    total = sum(sent.values())
    shares = {s: 100.0 * sent[s] / total if total else 0.0 for s in SUBSETS}
    return PhaseResult(number, phase, version, total, shares, 100.0 * ok / total if total else None)


@dataclass
class DemoState:
    """What the views show; the driver updates it."""

    mesh: Mesh
    rules_path: Path
    instances: list[tuple[str, str]]
    phase_seconds: float
    number: int = 0  # current phase, from 1
    phase_started: float = field(default_factory=time.monotonic)
    applied_ms: float | None = None  # how long the watch took to apply the edit
    results: list[PhaseResult] = field(default_factory=list)

    @property
    def phase(self) -> Phase:
        return PHASES[self.number - 1]

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.phase_started


# --------------------------------------------------------------------------------------------
# Views: a live rich table for a terminal, plain lines for logs


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

    def step(self, text: str) -> None:
        print(f"  {text}", flush=True)

    @contextlib.contextmanager
    def showing(self, state: DemoState) -> Iterator[None]:
        yield

    def phase_started(self, state: DemoState) -> None:
        when = "from the start" if state.applied_ms is None else f"{state.applied_ms:.0f} ms after the edit"
        print(
            f"phase {state.number}/{len(PHASES)} {state.phase.name} ({state.phase.says}): "
            f"rules {state.mesh.snapshot.version} in force {when}",
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
        print(f"{elapsed:6.1f}s  phase {state.number}/{len(PHASES)}  " + " | ".join(parts), flush=True)

    def phase_done(self, result: PhaseResult) -> None:
        print(result.line(), flush=True)

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

    def step(self, text: str) -> None:
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

    def finished(self, state: DemoState) -> None:
        from rich.table import Table

        table = Table(title="phases", title_justify="left", box=None, pad_edge=False)
        for column in ("phase", "rules", "requests", *(f"{s} share" for s in SUBSETS), "success"):
            table.add_column(column, justify="left" if column in ("phase", "rules") else "right")
        for r in state.results:
            success = f"{r.success:.1f}%" if r.success is not None else "-"
            shares = (f"{r.shares[s]:.1f}%" for s in SUBSETS)
            table.add_row(f"{r.number} {r.phase.name}", r.phase.says, str(r.requests), *shares, success)
        self.console.print(table)

    def _render(self, state: DemoState, figures: dict[str, Figures]) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        applied = (
            "in force from the start"
            if state.applied_ms is None
            else f"applied {state.applied_ms:.0f} ms after the edit"
        )
        head = Table.grid(padding=(0, 2))
        head.add_row(
            Text(f"phase {state.number}/{len(PHASES)}", style="bold"),
            Text(state.phase.name, style="bold cyan"),
            Text(state.phase.says),
        )
        head.add_row(
            Text("rules", style="bold"),
            Text(state.mesh.snapshot.version, style="magenta"),
            Text(applied, style="dim"),
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
                str(sum(1 for _, v in state.instances if v == s)),
                f"{f.rate:.0f}",
                Text.assemble((f"{bar:<20}", "green" if s == "v1" else "yellow"), f" {f.share:5.1f}%"),
                f"{f.success:.1f}%" if f.success is not None else "-",
                f"{f.p99_ms:.1f} ms" if f.p99_ms is not None else "-",
            )

        done = Text()
        for r in state.results:
            shares = "  ".join(f"{s} {r.shares[s]:5.1f}%" for s in SUBSETS)
            done.append(f"✓ {r.number} {r.phase.name:<14} {shares}  ({r.requests} requests)\n", style="dim")
        footer = Text("Ctrl-C stops the demo", style="dim")
        return Group(head, Text(), table, done, footer)


View = PlainView | LiveView


# --------------------------------------------------------------------------------------------
# Running it


async def _wait_for_new_rules(mesh: Mesh, old_version: str) -> float | None:
    """Milliseconds until the mesh has swapped in rules other than `old_version` (None: it did not)."""
    started = time.monotonic()
    while mesh.snapshot.version == old_version:
        if time.monotonic() - started > RULES_APPLY_TIMEOUT:
            log.warning("the rules file edit was not applied within %.0f s", RULES_APPLY_TIMEOUT)
            return None
        await asyncio.sleep(0.005)
    return 1000.0 * (time.monotonic() - started)


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


async def drive(state: DemoState, view: View, rate: float) -> None:
    """Send traffic through the mesh and walk through the phases by editing the rules file."""
    mesh = state.mesh
    meter = Meter(mesh.stats)
    async with mesh.client(timeout=5.0) as client:
        traffic = Traffic(client, rate)
        tasks = [*traffic.start(), asyncio.create_task(_refresh(view, state, meter), name="demo-view")]
        try:
            for number, phase in enumerate(PHASES, start=1):
                applied_ms = None
                if number > 1:
                    old_version = mesh.snapshot.version
                    write_rules(state.rules_path, state.instances, phase)
                    log.debug("wrote phase %d to %s", number, state.rules_path)
                    applied_ms = await _wait_for_new_rules(mesh, old_version)
                    await traffic.settled()
                state.number, state.applied_ms, state.phase_started = number, applied_ms, time.monotonic()
                view.phase_started(state)
                start, version = meter.counts(), mesh.snapshot.version
                await _sleep_watching(tasks, state.phase_seconds)
                result = phase_result(number, phase, version, start, meter.counts())
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
            print("the live table needs rich (pip install 'meshlib[demo]'); showing plain lines", flush=True)
    return PlainView()


def run(
    phase_seconds: float = 4.0, *, live: bool | None = None, rate: float = 200.0, verbose: bool = False
) -> int:
    """Run the demo to the end (or Ctrl-C); returns the exit code. `live=None`: live on a TTY."""
    view = _make_view(live)
    with _logging_to(view, verbose), contextlib.ExitStack() as cleanup:
        try:
            state = _start(cleanup, view, phase_seconds)
            with view.showing(state):
                asyncio.run(drive(state, view, rate))
            view.finished(state)
        except KeyboardInterrupt:
            print("\ninterrupted; stopping", flush=True)
    return 0


def _start(cleanup: contextlib.ExitStack, view: View, phase_seconds: float) -> DemoState:
    """Start the orders instances and the checkout Mesh; `cleanup` stops them all."""
    view.heading("meshlib demo: a canary release of `orders`, driven by edits of a rules file")
    instances: list[tuple[str, str]] = []
    for i, version in enumerate(INSTANCE_VERSIONS, start=1):
        name = f"orders-{version}-{i}"
        orders_mesh = Mesh("orders", labels={"version": version})
        cleanup.callback(orders_mesh.close)
        server: RunningServer = serve(orders_mesh.asgi(orders_app(version, name)), log_config=None)
        cleanup.callback(server.stop)
        instances.append((server.address, version))
        view.step(f"{name} listening on {server.address}")

    tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="meshlib-demo-")))
    rules_path = tmp / "mesh.yaml"
    write_rules(rules_path, instances, PHASES[0])
    view.step(f"rules written to {rules_path}")

    mesh = Mesh("checkout", config=rules_path, watch_interval=0.1)
    cleanup.callback(mesh.close)
    view.step(f"checkout mesh up, rules {mesh.snapshot.version}, watching the file")
    view.step(f"{len(PHASES)} phases of {phase_seconds:g} s: " + " -> ".join(p.name for p in PHASES))
    return DemoState(mesh, rules_path, instances, phase_seconds)
