"""Load balancing around a slow instance: round_robin, least_request and peak_ewma, end to end.

Backends: eight instances of a pure-ASGI app under uvicorn, in one separate process on
127.0.0.1 (one uvicorn server listening on eight sockets; the app tells the instances apart by
the local port and answers with its number). Each instance's service time, failure status and
hit count live in shared memory (`multiprocessing.RawArray`): the side channel the benchmark
uses to slow one down. Instances 0-3 serve the scenarios with a slowdown, 4-7 the baseline.

Client: this process. Each scenario has its own `meshlib.Mesh` given rules as YAML
(`meshlib.rules.load_yaml`): an Endpoints document with four addresses, a Destination naming
the balancer, and a Route whose one rule has `timeout: 250ms`; each calls service "backend"
through its own `mesh.client()`. The scenarios run at the same time, their arrivals
interleaved, so that the machine's noise (other processes, CPU steal) hits them alike. Load is
open loop: each scenario starts requests at a fixed rate, evenly spaced, whatever the answers
do, so a slow instance cannot slow the client down and hide its own latency.

Halfway through the run instance 3 becomes 10x slower (10 ms -> 100 ms by default).
Figures are over the requests *started* after that, every one counted: latency is from the
start of `client.get` to the end of the body, failures (the 250 ms deadline) included at their
time to failure; success is a 200 within the deadline. The all-healthy baseline is round_robin
over instances 4-7, which never slow down, measured over the same seconds.

Target: peak_ewma p99 within 1.5x of the all-healthy p99, while round_robin is not. Peak EWMA
runs with its default decay (10 s, Finagle's); a second peak_ewma scenario with a 1 s decay
(`peak_ewma: {decay: 1s}` in its Destination) is shown as well and labelled as not the default.

    python bench/load_balancing.py              # full run (~2.5 minutes)
    python bench/load_balancing.py --quick      # smoke run (~35 s)
    python bench/load_balancing.py --seconds 240 --rate 30 --service-ms 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from _common import RESULTS, load_average, machine_info, median, percentile, run_server, table, write_json

from meshlib import Mesh
from meshlib.rules import RuleSet, load_yaml
from meshlib.testing import bind

SERVICE = "backend"
SERVICE_MS = 10.0  # service time of a healthy instance (--service-ms)
SLOWDOWN = 10.0  # the slow instance's service time is multiplied by this
TIMEOUT = "250ms"  # route timeout: the per-request deadline
TARGET_RATIO = 1.5  # peak_ewma p99 at most this times the all-healthy p99
QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=1000, keepalive_expiry=300)


# -- backends (their own process) -----------------------------------------------------------


def _listen() -> socket.socket:
    # meshlib.testing.bind: a TCP socket on 127.0.0.1 (IPPROTO_TCP, so asyncio sets TCP_NODELAY)
    return bind()


def _exit_with_parent(parent: int) -> None:
    """End this process if the benchmark that started it is gone (killed, crashed)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def _serve_backends(indices: list[int], ports: Any, delays: Any, fails: Any, hits: Any, parent: int) -> None:
    """Child process: one uvicorn server on one socket per instance in `indices`."""

    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    socks = [_listen() for _ in indices]
    by_port = {s.getsockname()[1]: i for s, i in zip(socks, indices, strict=True)}
    ports.put([(i, s.getsockname()[1]) for s, i in zip(socks, indices, strict=True)])
    bodies = {i: f"{i:04d}".encode() for i in indices}  # the answer names the instance
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"4")]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        i = by_port[scope["server"][1]]
        hits[i] += 1  # one writer per index (this process's only loop), read by the parent
        delay = delays[i]
        if delay > 0:
            await asyncio.sleep(delay)
        status = fails[i] or 200
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": bodies[i]})

    run_server(app, socks)


class Fleet:
    """`count` backend instances in child processes: all in one (`separate=False`) or one
    process each (`separate=True`, so that one can be killed on its own).

    `delays[i]` (seconds), `fails[i]` (a status to answer with, 0 for 200) steer instance i
    while it runs; `hits[i]` counts the requests it received.
    """

    def __init__(self, count: int, *, separate: bool = False, delay: float = 0.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.delays = ctx.RawArray("d", count)
        self.fails = ctx.RawArray("i", count)
        self.hits = ctx.RawArray("q", count)
        for i in range(count):
            self.delays[i] = delay
        self.addresses: list[str] = [""] * count
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self._owner: dict[int, multiprocessing.process.BaseProcess] = {}
        groups = [[i] for i in range(count)] if separate else [list(range(count))]
        queue = ctx.Queue()
        try:
            for group in groups:
                p = ctx.Process(
                    target=_serve_backends,
                    args=(group, queue, self.delays, self.fails, self.hits, os.getpid()),
                    daemon=True,
                    name=f"bench-backend-{group[0]}",
                )
                p.start()
                self.processes.append(p)
                for i in group:
                    self._owner[i] = p
            for _ in groups:
                for i, port in queue.get(timeout=30):
                    self.addresses[i] = f"127.0.0.1:{port}"
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        for address in self.addresses:
            while True:
                try:
                    if httpx.get(f"http://{address}/ready", timeout=2).status_code < 600:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"backend {address} did not start")
                time.sleep(0.05)

    def hit_counts(self) -> list[int]:
        return list(self.hits)

    def kill(self, i: int) -> None:
        """SIGKILL the process of instance i (needs `separate=True`): a crash, no goodbye."""
        p = self._owner[i]
        if sum(1 for q in self._owner.values() if q is p) != 1:
            raise ValueError("kill() needs one process per instance (Fleet(separate=True))")
        if p.pid is not None and p.is_alive():
            os.kill(p.pid, signal.SIGKILL)

    def close(self) -> None:
        for p in self.processes:
            if p.is_alive():
                p.terminate()
        for p in self.processes:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- open-loop load -------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """One request: when it was due (s from the start), how late it started, how long it took,
    its status (or the name of the exception it failed with), the instance that answered and
    the number of the attempt that answered (`x-mesh-attempt`, 1 when not retried)."""

    due: float
    lag: float
    latency: float
    status: int | None
    error: str | None
    instance: int | None = None
    attempt: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


Send = Callable[[], Awaitable[httpx.Response]]
"""Sends one request and returns its response, body read."""


async def open_loop(
    send: Send,
    rate: float,
    seconds: float,
    *,
    start: float | None = None,
    offset: float = 0.0,
    events: Sequence[tuple[float, Callable[[], None]]] = (),
    every_second: Callable[[float], None] | None = None,
    max_in_flight: int = 1000,
    drain: float = 10.0,
) -> list[Outcome]:
    """Start `send()` `rate` times a second, evenly spaced, for `seconds`, whatever the answers.

    `start`: the loop time of t = 0 (to line up several loops; default: now); the first request
    is due at `offset`. `events`: (seconds from the start, fn) run at that time.
    `every_second(t)` runs at t = 0, 1, 2, ... A request due while `max_in_flight` are
    outstanding is not sent and counts as a failure ("client-saturated"). After the last start,
    outstanding requests get `drain` seconds; any still running then are cancelled and count as
    failures ("cancelled"). Every loop is bounded: in requests, in time, in requests in flight.
    """
    loop = asyncio.get_running_loop()
    if start is None:
        start = loop.time() + 0.05
    outcomes: list[Outcome] = []
    tasks: set[asyncio.Task[None]] = set()
    handles = [loop.call_at(start + at, fn) for at, fn in events]
    if every_second is not None:
        handles += [loop.call_at(start + s, every_second, float(s)) for s in range(int(seconds) + 1)]

    async def one(due: float) -> None:
        t0 = loop.time()
        lag = t0 - (start + due)
        status: int | None = None
        error: str | None = None
        instance: int | None = None
        attempt: int | None = None
        try:
            response = await send()
            status = response.status_code
            if status == 200 and response.content.isdigit():  # the backends answer with their number
                instance = int(response.content)
            attempt = int(response.request.headers.get("x-mesh-attempt", "1"))
        except Exception as exc:
            error = type(exc).__name__
        outcomes.append(Outcome(due, lag, loop.time() - t0, status, error, instance, attempt))

    total = int(rate * seconds)
    try:
        for n in range(total):
            due = offset + n / rate
            wait = start + due - loop.time()
            await asyncio.sleep(max(wait, 0.0))  # behind schedule: still let the others run
            if len(tasks) >= max_in_flight:
                outcomes.append(Outcome(due, 0.0, 0.0, None, "client-saturated"))
                continue
            task = asyncio.create_task(one(due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=drain)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
                outcomes.extend(Outcome(seconds, 0.0, drain, None, "cancelled") for _ in pending)
    finally:
        for h in handles:
            h.cancel()
        for task in list(tasks):
            task.cancel()
    outcomes.sort(key=lambda o: o.due)
    return outcomes


def figures(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Latency percentiles (ms, every request counted), success rate, failures by kind."""
    lat = sorted(o.latency for o in outcomes)
    lags = sorted(o.lag for o in outcomes)
    ok = sum(1 for o in outcomes if o.ok)
    failures = Counter(o.error or f"status {o.status}" for o in outcomes if not o.ok)
    n = len(outcomes)
    return {
        "requests": n,
        "succeeded": ok,
        "success_rate": ok / n if n else math.nan,
        "p50_ms": percentile(lat, 0.50) * 1e3,
        "p90_ms": percentile(lat, 0.90) * 1e3,
        "p99_ms": percentile(lat, 0.99) * 1e3,
        "p999_ms": percentile(lat, 0.999) * 1e3,
        "max_ms": lat[-1] * 1e3 if lat else math.nan,
        "start_lag_p99_ms": percentile(lags, 0.99) * 1e3,
        "failures": dict(failures),
    }


# -- the benchmark ---------------------------------------------------------------------------


def rules_yaml(addresses: Sequence[str], balancer: str, decay: float | None = None) -> str:
    """The rules a scenario's Mesh runs with, as a rules file would hold them."""
    endpoints = "\n".join(f"  - {{address: {a}, labels: {{name: b{i}}}}}" for i, a in enumerate(addresses))
    options = f"peak_ewma: {{decay: {decay:g}s}}\n" if decay is not None else ""
    return (
        f"kind: Endpoints\nservice: {SERVICE}\nendpoints:\n{endpoints}\n"
        f"---\nkind: Destination\nservice: {SERVICE}\nload_balancer: {balancer}\n{options}"
        f"---\nkind: Route\nservice: {SERVICE}\nroutes:\n  - name: all\n    timeout: {TIMEOUT}\n"
    )


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    balancer: str
    slowdown: bool  # on the instances that slow down (else on the 4 that stay healthy)
    decay: float | None = None  # peak-EWMA decay override (None: the default, 10 s)


SCENARIOS = [
    Scenario("baseline", "all healthy (round_robin)", "round_robin", slowdown=False),
    Scenario("round_robin", "round_robin", "round_robin", slowdown=True),
    Scenario("least_request", "least_request", "least_request", slowdown=True),
    Scenario("peak_ewma", "peak_ewma (default decay 10 s)", "peak_ewma", slowdown=True),
    Scenario("peak_ewma_decay_1s", "peak_ewma, decay 1 s (NOT default)", "peak_ewma", True, 1.0),
]
BLOCK = 10.0  # seconds: the blocks over which p99s are also compared, time-matched
SLOW = 3  # the instance that slows down: 0-3 serve the slowdown scenarios, 4-7 the baseline


def run_all(fleet: Fleet, args: argparse.Namespace) -> dict[str, list[Outcome]]:
    """Every scenario at once, each with its own Mesh and client, over the same seconds."""
    half = args.seconds / 2
    meshes: dict[str, Mesh] = {}

    def slow_down() -> None:
        fleet.delays[SLOW] = args.service_ms / 1e3 * SLOWDOWN

    async def main() -> dict[str, list[Outcome]]:
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            sends: list[Send] = []
            for sc in SCENARIOS:
                client = await stack.enter_async_context(meshes[sc.key].client(limits=LIMITS))

                async def send(client: httpx.AsyncClient = client) -> httpx.Response:
                    return await client.get(f"http://{SERVICE}/work")

                sends.append(send)
            start = loop.time() + 0.2
            spread = 1 / (args.rate * len(SCENARIOS))  # the scenarios' arrivals interleave
            runs = await asyncio.gather(
                *(
                    open_loop(
                        send,
                        args.rate,
                        args.seconds,
                        start=start,
                        offset=k * spread,
                        events=[(half, slow_down)] if k == 0 else (),
                    )
                    for k, send in enumerate(sends)
                )
            )
        return {sc.key: run for sc, run in zip(SCENARIOS, runs, strict=True)}

    try:
        for sc in SCENARIOS:
            addresses = fleet.addresses[:4] if sc.slowdown else fleet.addresses[4:]
            text = rules_yaml(addresses, sc.balancer, sc.decay)
            rules: RuleSet = load_yaml(text, source=f"{sc.key}.yaml")
            mesh = meshes[sc.key] = Mesh(service=f"lb-{sc.key.replace('_', '-')}")
            mesh.apply_rules(rules, sc.key)
        return asyncio.run(main())
    finally:
        for mesh in meshes.values():
            mesh.close()
        fleet.delays[SLOW] = args.service_ms / 1e3


def summarize(sc: Scenario, outcomes: list[Outcome], args: argparse.Namespace) -> dict[str, Any]:
    half = args.seconds / 2
    after = [o for o in outcomes if o.due >= half]
    # the healthy first half of the same run, without its first seconds (connections opening)
    before = [o for o in outcomes if min(5.0, half / 4) <= o.due < half]
    second = figures(after)
    answered = [o for o in after if o.ok]
    second["slow_share"] = (
        sum(1 for o in answered if o.instance == SLOW) / len(answered) if sc.slowdown and answered else None
    )
    lat = sorted(o.latency for o in after)
    timeline = []  # p99 of each 10 s of the run, from the start
    for b in range(math.ceil(args.seconds / BLOCK)):
        chunk = sorted(o.latency for o in outcomes if b * BLOCK <= o.due < (b + 1) * BLOCK)
        timeline.append(round(percentile(chunk, 0.99) * 1e3, 1) if chunk else None)
    blocks = []  # p99 of each whole 10 s after the slowdown: compared block by block with the baseline
    for b in range(int((args.seconds - half) // BLOCK)):
        lo = half + b * BLOCK
        blocks.append(percentile(sorted(o.latency for o in after if lo <= o.due < lo + BLOCK), 0.99) * 1e3)
    return {
        "title": sc.title,
        "balancer": sc.balancer,
        "slowdown": sc.slowdown,
        "decay_s": sc.decay if sc.decay is not None else 10.0,
        "second_half": second,
        "first_half": figures(before),
        "p99_ms_per_10s_from_start": timeline,
        "p99_ms_per_10s_after_slowdown": [round(x, 1) for x in blocks],
        "quantiles_ms_second_half": {str(q): round(percentile(lat, q) * 1e3, 2) for q in QUANTILES},
        "_latencies": [x * 1e3 for x in lat],  # for the plot; not written out
    }


def plot(results: dict[str, Any], baseline_p99: float, service_ms: float, path: Path) -> bool:
    """Complementary CDF of the second-half latencies per scenario; False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results.values():
        lat = r["_latencies"]
        n = len(lat)
        if n:
            ax.step(lat, [1 - i / n for i in range(n)], where="post", label=r["title"])
    ax.axvline(baseline_p99 * TARGET_RATIO, color="grey", linestyle="--", label="1.5 x all-healthy p99")
    ax.set_xscale("log")
    values = [x for r in results.values() for x in r["_latencies"]]
    if values:
        lo, hi = min(values) * 0.9, max(values) * 1.1
        ax.set_xlim(lo, hi)
        ax.set_xticks([t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000) if lo <= t <= hi])
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 1.05)
    ax.set_xlabel("latency, ms (log)")
    ax.set_ylabel("share of requests slower (log)")
    slow = service_ms * SLOWDOWN
    ax.set_title(
        f"After one of 4 instances became {SLOWDOWN:g}x slower ({service_ms:g} -> {slow:g} ms), "
        f"timeout {TIMEOUT}"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# -- issue 17: backends of modelled capacity that report their load --------------------------
#
# Each instance has `slots` requests in service at once, each taking `service_s` (a semaphore and
# a sleep: a server of known capacity, slots / service_s requests a second, whatever the machine
# does); requests beyond that wait their turn in the server. Every instance runs behind the mesh's
# ASGI middleware with load reports on, and says how busy it is: its application utilization is
# its reported rate times the service time over its slots, the busy share of the same second
# (what a CPU figure is for a CPU-bound server), so A58's weight, qps / utilization, comes out
# as its capacity.

CAPACITY_TIMEOUT = "2s"  # route timeout of the capacity scenarios: a request queued longer fails
UNIT_SLOTS = 1  # slots of a 1x instance
UNIT_SERVICE_MS = 100.0  # service time: a 1x instance serves 10 requests a second
HETEROGENEOUS = (1, 1, 2, 4)  # capacities, in units
HETEROGENEOUS_LOAD = 0.9  # offered load, a share of the total capacity
SLOWED = (2, 2, 2, 2)  # capacities of the slow-backend scenario, one slowed 10x halfway
SLOWED_LOAD = 0.6  # of the capacity before the slowdown (77% of what is left after it)
TARGET_HETEROGENEOUS = 0.7  # weighted_round_robin and prequal p99 at most this times peak_ewma's
WRR_OPTIONS = "{blackout_period: 2s}"  # defaults (A58's, meshlib's latency_tolerance), a short blackout
LOAD_AWARE = ("weighted_round_robin", "prequal")
WARMUP_LOAD = 0.5  # the warm-up's load, a share of the scenario's


def _serve_modelled(
    specs: list[tuple[int, int]], ports: Any, service: Any, busy: Any, hits: Any, parent: int
) -> None:
    """Child process: one uvicorn server, one socket per instance (index, slots), each instance
    behind its own Mesh's middleware with load reports on."""

    from meshlib.asgi import MeshMiddleware

    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    socks = [_listen() for _ in specs]
    ports.put([(i, s.getsockname()[1]) for s, (i, _) in zip(socks, specs, strict=True)])
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"4")]
    meshes = {i: Mesh(service=SERVICE, load_reports=True) for i, _ in specs}

    def instance(i: int, slots: int) -> Any:
        gate = asyncio.Semaphore(slots)
        body = f"{i:04d}".encode()

        load = meshes[i].load

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            hits[i] += 1
            async with gate:
                took = service[i]
                await asyncio.sleep(took)
                busy[i] += took
            # the busy share of its slots over the second its reported rate is counted in: what a
            # CPU-bound server's CPU figure says, rate and utilization of the same window
            load.set_application_utilization(min(load.report().rps_fractional * took / slots, 1.0))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        return MeshMiddleware(app, mesh=meshes[i], register=False)

    apps = {s.getsockname()[1]: instance(i, slots) for s, (i, slots) in zip(socks, specs, strict=True)}

    async def dispatch(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await apps[scope["server"][1]](scope, receive, send)

    run_server(dispatch, socks, timeout_keep_alive=5)  # uvicorn's default, as before


class ModelledFleet:
    """Instances of known capacity (`capacities[i]` units) in one child process."""

    def __init__(self, capacities: Sequence[int]) -> None:
        ctx = multiprocessing.get_context("spawn")
        n = len(capacities)
        self.capacities = list(capacities)
        self.service = ctx.RawArray("d", n)
        self.busy = ctx.RawArray("d", n)
        self.hits = ctx.RawArray("q", n)
        for i in range(n):
            self.service[i] = UNIT_SERVICE_MS / 1e3
        queue = ctx.Queue()
        specs = [(i, c * UNIT_SLOTS) for i, c in enumerate(capacities)]
        self.process = ctx.Process(
            target=_serve_modelled,
            args=(specs, queue, self.service, self.busy, self.hits, os.getpid()),
            daemon=True,
            name="bench-modelled",
        )
        self.process.start()
        self.addresses = [""] * n
        try:
            for i, port in queue.get(timeout=60):
                self.addresses[i] = f"127.0.0.1:{port}"
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(5)

    def __enter__(self) -> ModelledFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def capacity_rules(addresses: Sequence[str], balancer: str) -> str:
    endpoints = "\n".join(f"  - {{address: {a}}}" for a in addresses)
    options = f"weighted_round_robin: {WRR_OPTIONS}\n" if balancer == "weighted_round_robin" else ""
    return (
        f"kind: Endpoints\nservice: {SERVICE}\nendpoints:\n{endpoints}\n"
        f"---\nkind: Destination\nservice: {SERVICE}\nload_balancer: {balancer}\n{options}"
        f"---\nkind: Route\nservice: {SERVICE}\nroutes:\n  - name: all\n    timeout: {CAPACITY_TIMEOUT}\n"
    )


def capacity_balancers() -> list[str]:
    """Every registered balancer (prequal too, where it is registered), the load-aware first."""
    from meshlib.balancing import REGISTRY

    names = [name for name, _, _ in REGISTRY]
    return sorted(names, key=lambda n: (n not in LOAD_AWARE, n != "peak_ewma", names.index(n)))


def run_capacity(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """One of issue 17's scenarios, every balancer at once over instances of its own."""
    heterogeneous = kind == "heterogeneous"
    capacities = HETEROGENEOUS if heterogeneous else SLOWED
    share = HETEROGENEOUS_LOAD if heterogeneous else SLOWED_LOAD
    unit_rate = UNIT_SLOTS / (UNIT_SERVICE_MS / 1e3)
    rate = share * sum(capacities) * unit_rate
    seconds = args.capacity_seconds
    warmup = args.capacity_warmup
    measure_from = seconds / 2 if not heterogeneous else 0.0
    names = capacity_balancers()
    print(
        f"\n{kind}: capacities {'/'.join(f'{c}x' for c in capacities)} (1x = {unit_rate:g} req/s), "
        f"{rate:g} req/s per balancer ({share:.0%} of the total) for {seconds:g} s after {warmup:g} s at "
        f"{WARMUP_LOAD:.0%} of that (not measured)"
        + ("" if heterogeneous else "; the last instance 10x slower from half, measured from then")
        + f"; {', '.join(names)}",
        flush=True,
    )
    n = len(capacities)
    with ModelledFleet(list(capacities) * len(names)) as fleet:
        meshes = {}
        for k, name in enumerate(names):
            mesh = meshes[name] = Mesh(service=f"lb-{name.replace('_', '-')}")
            text = capacity_rules(fleet.addresses[k * n : (k + 1) * n], name)
            mesh.apply_rules(load_yaml(text, source=f"{name}.yaml"), name)

        def slow_down() -> None:
            for k in range(len(names)):
                fleet.service[k * n + n - 1] = UNIT_SERVICE_MS / 1e3 * SLOWDOWN

        async def main() -> list[list[Outcome]]:
            loop = asyncio.get_running_loop()
            async with contextlib.AsyncExitStack() as stack:
                sends: list[Send] = []
                for name in names:
                    client = await stack.enter_async_context(meshes[name].client(limits=LIMITS))

                    async def send(client: httpx.AsyncClient = client) -> httpx.Response:
                        return await client.get(f"http://{SERVICE}/work")

                    sends.append(send)
                if warmup > 0:  # weights and averages learned at a lower load, as in production
                    start = loop.time() + 0.2
                    spread = 1 / (rate * WARMUP_LOAD * len(names))
                    await asyncio.gather(
                        *(
                            open_loop(send, rate * WARMUP_LOAD, warmup, start=start, offset=k * spread)
                            for k, send in enumerate(sends)
                        )
                    )
                start = loop.time() + 0.2
                spread = 1 / (rate * len(names))
                events = [] if heterogeneous else [(seconds / 2, slow_down)]
                return list(
                    await asyncio.gather(
                        *(
                            open_loop(
                                send,
                                rate,
                                seconds,
                                start=start,
                                offset=k * spread,
                                events=events if k == 0 else (),
                            )
                            for k, send in enumerate(sends)
                        )
                    )
                )

        try:
            runs = asyncio.run(main())
        finally:
            for mesh in meshes.values():
                mesh.close()
    results: dict[str, Any] = {}
    for k, (name, outcomes) in enumerate(zip(names, runs, strict=True)):
        after = [o for o in outcomes if o.due >= measure_from]
        r = figures(after)
        answered = Counter(o.instance - k * n for o in after if o.ok and o.instance is not None)
        total = sum(answered.values()) or 1
        r["shares"] = [round(answered.get(i, 0) / total, 3) for i in range(n)]
        results[name] = r
    return {
        "capacities": list(capacities),
        "rate_per_s": rate,
        "offered_share_of_capacity": share,
        "seconds": seconds,
        "warmup_s": warmup,
        "warmup_share_of_load": WARMUP_LOAD,
        "measured_from_s": measure_from,
        "balancers": results,
    }


def report_capacity(kind: str, data: dict[str, Any]) -> dict[str, bool]:
    results = data["balancers"]
    reference = results.get("peak_ewma", {}).get("p99_ms", math.nan)
    rows = []
    for name, r in results.items():
        rows.append(
            [
                name,
                f"{r['p50_ms']:.0f}",
                f"{r['p99_ms']:.0f}",
                f"{r['p999_ms']:.0f}",
                f"x{r['p99_ms'] / reference:.2f}",
                f"{r['success_rate']:.2%}",
                " ".join(f"{x:.0%}" for x in r["shares"]),
            ]
        )
    capacity_shares = " ".join(f"{c / sum(data['capacities']):.0%}" for c in data["capacities"])
    print(
        table(
            [
                "balancer",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                "p99/peak_ewma",
                "success",
                f"shares ({capacity_shares})",
            ],
            rows,
        )
    )
    limit = TARGET_HETEROGENEOUS if kind == "heterogeneous" else 1.0
    targets = {}
    for name in LOAD_AWARE:
        if name in results:
            ratio = results[name]["p99_ms"] / reference
            targets[f"{name}_p99_at_most_{limit:g}x_peak_ewma"] = ratio <= limit
            print(f"{name} p99 at most {limit:g}x peak_ewma's: {verdict(ratio <= limit)} (x{ratio:.2f})")
    return targets


def main_capacity(args: argparse.Namespace) -> int:
    kinds = ["heterogeneous", "slow-backend"] if args.scenario == "issue17" else [args.scenario]
    info = machine_info()
    print(f"python {info['python']} on {info['cpu_count']} CPUs, load {info['load_average']}", flush=True)
    out: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for kind in kinds:
        data = run_capacity(kind, args)
        targets[kind] = report_capacity(kind, data)
        out[kind] = data
    info["load_average_end"] = load_average()
    path = (
        args.json
        if args.json != RESULTS / "load_balancing.json"
        else RESULTS / "load_balancing_capacity.json"
    )
    write_json(
        path,
        {
            "benchmark": "load_balancing_capacity",
            "machine": info,
            "config": {
                "backends": "one uvicorn process; each instance behind the mesh's ASGI middleware with load "
                "reports on; capacity modelled as slots (a semaphore) x service time (a sleep); "
                "application utilization = busy share of the slots over the last second",
                "unit": f"{UNIT_SLOTS} slot x {UNIT_SERVICE_MS:g} ms",
                "route_timeout": CAPACITY_TIMEOUT,
                "weighted_round_robin": WRR_OPTIONS,
                "arrivals": "open loop, evenly spaced; every balancer at once, arrivals interleaved",
                "quick": args.quick,
            },
            "targets": targets,
            "scenarios": out,
        },
    )
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=150.0, help="length of the run (slowdown at half)")
    parser.add_argument("--rate", type=float, default=20.0, help="requests started per second, per scenario")
    parser.add_argument("--service-ms", type=float, default=SERVICE_MS, help="healthy service time, ms")
    parser.add_argument("--quick", action="store_true", help="a short run, for a smoke test")
    parser.add_argument(
        "--scenario",
        choices=("slow-instance", "heterogeneous", "slow-backend", "issue17"),
        default="slow-instance",
        help="slow-instance: the 8-instance run above; heterogeneous, slow-backend: issue 17's capacity "
        "scenarios (issue17: both)",
    )
    parser.add_argument(
        "--capacity-seconds", type=float, default=60.0, help="length of each capacity scenario"
    )
    parser.add_argument(
        "--capacity-warmup", type=float, default=15.0, help="seconds at half the load first (not measured)"
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "load_balancing.json", help="results file")
    parser.add_argument("--png", type=Path, default=RESULTS / "load_balancing.png", help="plot file")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 30.0)
        args.capacity_seconds = min(args.capacity_seconds, 16.0)
        args.capacity_warmup = min(args.capacity_warmup, 6.0)
    if args.scenario != "slow-instance":
        return main_capacity(args)

    info = machine_info()
    print(
        f"python {info['python']} on {info['cpu_count']} CPUs ({info['cpu_model']}), "
        f"httpx {info['packages']['httpx']}, uvicorn {info['packages']['uvicorn']}, "
        f"load {info['load_average']}"
    )
    print(
        f"{len(SCENARIOS)} scenarios at once, {args.rate:g} req/s each (open loop) for {args.seconds:g} s; "
        f"4 instances at {args.service_ms:g} ms, one {SLOWDOWN:g}x slower from {args.seconds / 2:g} s "
        f"(the baseline has 4 instances of its own); route timeout {TIMEOUT}",
        flush=True,
    )
    started = time.perf_counter()
    with Fleet(8, delay=args.service_ms / 1e3) as fleet:
        runs = run_all(fleet, args)
    elapsed = time.perf_counter() - started
    results = {sc.key: summarize(sc, runs[sc.key], args) for sc in SCENARIOS}

    base_p99 = results["baseline"]["second_half"]["p99_ms"]
    ratios = {k: r["second_half"]["p99_ms"] / base_p99 for k, r in results.items()}
    # the same ratio block by block (each block's p99 against the baseline's over the same 10 s):
    # a burst of load from elsewhere on the machine then weighs on one block, not on the verdict's p99
    base_blocks = results["baseline"]["p99_ms_per_10s_after_slowdown"]
    block_ratios = {}
    for k, r in results.items():
        data = sorted(x / b for x, b in zip(r["p99_ms_per_10s_after_slowdown"], base_blocks, strict=True))
        block_ratios[k] = [percentile(data, 0.25), median(data), percentile(data, 0.75)] if data else None
    targets = {
        "peak_ewma_p99_within_1_5x": ratios["peak_ewma"] <= TARGET_RATIO,
        "round_robin_p99_not_within_1_5x": ratios["round_robin"] > TARGET_RATIO,
    }
    rows = []
    for key, r in results.items():
        s, f = r["second_half"], r["first_half"]
        rows.append(
            [
                r["title"],
                f"{s['p50_ms']:.1f}",
                f"{s['p99_ms']:.1f}",
                f"{s['p999_ms']:.1f}",
                f"x{ratios[key]:.2f}",
                "x{1:.2f} ({0:.2f}-{2:.2f})".format(*block_ratios[key]) if block_ratios[key] else "-",
                f"{s['success_rate']:.2%}",
                f"{s['slow_share']:.1%}" if s["slow_share"] is not None else "-",
                f"{f['p99_ms']:.1f}",
            ]
        )
    print()
    print(
        table(
            [
                "after the slowdown",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                "p99/healthy",
                f"per {BLOCK:g} s (IQR)",
                "success",
                "to slow one",
                "p99 before",
            ],
            rows,
        )
    )
    lags = max(r["second_half"]["start_lag_p99_ms"] for r in results.values())
    print(
        f"\n(every request started after the slowdown: {results['baseline']['second_half']['requests']} per "
        f"scenario; per {BLOCK:g} s: the median and quartiles, over the {BLOCK:g} s blocks after the "
        f"slowdown, of a block's p99 over the baseline's in the same block; client start lag p99 at most "
        f"{lags:.1f} ms; {elapsed:.0f} s)"
    )
    print(
        f"peak_ewma p99 within {TARGET_RATIO}x of the all-healthy p99 ({base_p99:.1f} ms): "
        f"{verdict(targets['peak_ewma_p99_within_1_5x'])} (x{ratios['peak_ewma']:.2f})"
    )
    print(
        f"round_robin p99 not within {TARGET_RATIO}x: "
        f"{verdict(targets['round_robin_p99_not_within_1_5x'])} (x{ratios['round_robin']:.2f})"
    )

    png = plot(results, base_p99, args.service_ms, args.png)
    if png:
        print(f"wrote {args.png}")
    for r in results.values():
        del r["_latencies"]
    info["load_average_end"] = load_average()
    write_json(
        args.json,
        {
            "benchmark": "load_balancing",
            "machine": info,
            "config": {
                "scenarios_run": "concurrently, each with its own Mesh and AsyncClient, arrivals interleaved",
                "backends": "8 instances (4 for the slowdown scenarios, 4 for the baseline): uvicorn "
                "(h11, asyncio), pure ASGI app, in one separate process",
                "service_time_ms": args.service_ms,
                "slowdown_factor": SLOWDOWN,
                "slowdown_at_s": args.seconds / 2,
                "seconds": args.seconds,
                "rate_per_s_per_scenario": args.rate,
                "arrivals": "open loop, evenly spaced",
                "route_timeout": TIMEOUT,
                "measured": "requests started after the slowdown; every request counted, failures at "
                "their time to failure",
                "rules_example": rules_yaml(["ADDR0", "ADDR1", "ADDR2", "ADDR3"], "peak_ewma"),
                "quick": args.quick,
                "elapsed_s": round(elapsed, 1),
                "plot": str(args.png) if png else None,
            },
            "targets": {"p99_ratio_max": TARGET_RATIO, **targets},
            "p99_ratio_to_healthy": ratios,
            "p99_ratio_to_healthy_per_10s_block_quartiles": block_ratios,
            "scenarios": results,
        },
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
