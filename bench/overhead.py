"""Mesh overhead: raw httpx against meshlib's httpx clients, same server, same process.

A minimal pure-ASGI app (200, body "ok") runs under uvicorn in a separate process on
127.0.0.1. The baseline calls it by address with a plain httpx client; meshlib calls service
"bench" through `mesh.sync_client()` / `mesh.client()`, so each request runs the whole client
path: route match, weighted subset draw, round-robin pick, load bookkeeping, stats, and the
rewrite of the URL to the picked endpoint.

Both clients stay open for a whole scenario and take turns in short blocks (ABBA ABBA ...:
100 requests per block sequentially, 4 s per block concurrently), so that drift in the
machine's speed (other work, CPU steal) hits baseline and meshlib alike. Latency percentiles
are over all the measured requests of a side; throughput is its requests over its time; the
spread of the per-block-pair ratios is reported as a check on the noise.

    python bench/overhead.py                 # full run (about seven minutes on 2 cores)
    python bench/overhead.py --quick         # smoke run
    python bench/overhead.py --no-telemetry  # without the "+ telemetry" runs (half the time)

Each scenario runs three times: with a Mesh as most apps have it (no OpenTelemetry SDK
installed, so the mesh makes no spans), then "+ telemetry": the same against a Mesh given an SDK
TracerProvider sampling every trace (AlwaysOn; BatchSpanProcessor to an exporter that drops the
spans) and an SDK MeterProvider (with an in-memory reader), then "+ telemetry 10%": the same
with 10% parent-based sampling. Each run sets meshlib against plain httpx WITHOUT telemetry.
    python bench/overhead.py --requests 20000 --duration 32 --json /tmp/overhead.json
    python bench/overhead.py --only sync_sequential,async_sequential   # some scenarios only
    python bench/overhead.py --sync-study-only --study-seconds 1 --study-rounds 4  # sync transports
    python bench/overhead.py --server-only   # the server side alone (below)

Last, the server side (`--no-server` skips it): the ASGI middleware against raw uvicorn, through
`bench/inbound.py`'s live run (an aiohttp client on one CPU, the uvicorn servers on the other,
their blocks in turn): at 10 concurrent without telemetry (throughput, target at least 95% of
raw uvicorn's), and one request at a time with the SDK sampling every trace, at 10% new traces,
and at 10% from a caller that did not sample (p50 at most +10%, +5%, +5% over raw uvicorn's).
`bench/inbound.py --live --runs N` measures the same longer, and as a median of runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _plots
import httpx
from _common import RESULTS, load_average, machine_info, median, percentile, run_server, table, write_json

from meshlib import Mesh
from meshlib.rules import RuleSet, parse_documents
from meshlib.testing import bind

SERVICE = "bench"
PATH = "/ping"
P50_BUDGET = 1.10  # meshlib p50 at most 10% above raw
P50_BUDGET_SAMPLED = 1.05  # with telemetry at 10% parent-based sampling: at most 5% above raw
RPS_FLOOR = 0.90  # meshlib keeps at least 90% of raw throughput
# Same pool for both sides. The default keeps only 20 idle connections, which would make the
# 50-way scenarios reconnect on most requests; and it drops connections idle for 5 s, which the
# side waiting for its turn would suffer, leaving the two pools with different sizes (httpcore's
# per-request cost grows with the number of connections in the pool).
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100, keepalive_expiry=300)


# -- the server (its own process) ----------------------------------------------------------


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


def _listen() -> socket.socket:
    # meshlib.testing.bind: a TCP socket on 127.0.0.1 (IPPROTO_TCP, so asyncio sets TCP_NODELAY)
    return bind()


def _serve(port_queue: Any) -> None:

    sock = _listen()
    port_queue.put(sock.getsockname()[1])
    run_server(_app, [sock])


class Server:
    """The ASGI app under uvicorn in a child process."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        self.process = ctx.Process(target=_serve, args=(queue,), daemon=True, name="bench-server")
        self.process.start()
        self.port: int = queue.get(timeout=30)
        self.address = f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://{self.address}{PATH}").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not self.process.is_alive():
                self.stop()
                raise RuntimeError("benchmark server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(10)


def rules_for(address: str) -> RuleSet:
    """One endpoint; a Destination with two subsets; one route rule split 90/10 by weight."""
    return parse_documents(
        [
            {
                "kind": "Endpoints",
                "service": SERVICE,
                "endpoints": [{"address": address, "labels": {"version": "v1"}}],
            },
            {
                "kind": "Destination",
                "service": SERVICE,
                "load_balancer": "round_robin",
                "subsets": {"v1": {"version": "v1"}},
            },
            {
                "kind": "Route",
                "service": SERVICE,
                "routes": [
                    {
                        "name": "split",
                        "match": {"path": {"prefix": "/"}},
                        # 90% to subset v1, 10% to the whole service: both hold the one endpoint.
                        "to": [{"subset": "v1", "weight": 90}, {"weight": 10}],
                    }
                ],
            },
        ],
        source="bench",
    )


# -- blocks --------------------------------------------------------------------------------


class Block:
    """One block of one side: latencies (ns), requests completed in the window, time, CPU."""

    __slots__ = ("completed", "cpu", "errors", "latencies", "wall")

    def __init__(self, latencies: list[int], completed: int, wall: float, cpu: float, errors: int) -> None:
        self.latencies = latencies
        self.completed = completed
        self.wall = wall
        self.cpu = cpu
        self.errors = errors

    @property
    def rps(self) -> float:
        return self.completed / self.wall

    @property
    def p50(self) -> float:
        return percentile(sorted(self.latencies), 0.5)


SIDES = ("httpx", "meshlib")


def _orders(blocks: int) -> list[tuple[str, str]]:
    """ABBA ABBA ...: each side goes first in half the pairs."""
    return [SIDES if i % 2 == 0 else SIDES[::-1] for i in range(blocks)]


def sync_sequential(clients: dict[str, httpx.Client], urls: dict[str, str], args: argparse.Namespace) -> dict:
    for side, client in clients.items():
        for _ in range(args.warmup):
            client.get(urls[side])
    out: dict[str, list[Block]] = {side: [] for side in SIDES}
    clock = time.perf_counter_ns
    gc.collect()
    for order in _orders(max(1, args.requests // args.block)):
        for side in order:
            get, url = clients[side].get, urls[side]
            lat: list[int] = []
            errors = 0
            cpu0, t0 = time.process_time(), time.perf_counter()
            for _ in range(args.block):
                t = clock()
                try:
                    ok = get(url).status_code == 200
                except httpx.TransportError:
                    ok = False
                lat.append(clock() - t)
                errors += not ok
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            out[side].append(Block(lat, len(lat), wall, cpu, errors))
    return out


def sync_threads(
    makers: dict[str, Callable[[], httpx.Client]], urls: dict[str, str], args: argparse.Namespace
) -> dict:
    """Each block gets new clients: httpcore checks every pooled connection for every request,
    so a client's cost per request follows the size of its pool, which its history of
    concurrency peaks sets. Shared across blocks, one side could keep a pool of 45 connections
    and the other one of 15, and the run would measure that (docs/benchmarks.md)."""
    threads = args.threads

    def block(make: Callable[[], httpx.Client], url: str, seconds: float | None, count: int | None) -> Block:
        with make() as client:
            return run_block(client, url, seconds, count)

    def run_block(client: httpx.Client, url: str, seconds: float | None, count: int | None) -> Block:
        lat: list[int] = []
        done = [0, 0]  # completed within the window, errors
        left = [count if count is not None else sys.maxsize]
        window = [0.0, 0.0]
        start = threading.Barrier(threads)

        def worker() -> None:
            clock, now, get = time.perf_counter_ns, time.perf_counter, client.get
            if start.wait() == 0:
                window[0] = now()
                window[1] = window[0] + seconds if seconds is not None else float("inf")
            start.wait()
            end = window[1]
            while left[0] > 0 and now() < end:
                left[0] -= 1
                t = clock()
                try:
                    ok = get(url).status_code == 200
                except httpx.TransportError:
                    ok = False
                t1 = clock()
                lat.append(t1 - t)
                if t1 / 1e9 <= end:
                    done[0] += 1
                if not ok:
                    done[1] += 1

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        cpu0 = time.process_time()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        cpu = time.process_time() - cpu0
        wall = seconds if seconds is not None else time.perf_counter() - window[0]
        return Block(lat, done[0], wall, cpu, done[1])

    for side in SIDES:
        block(makers[side], urls[side], None, 2 * threads)
    out: dict[str, list[Block]] = {side: [] for side in SIDES}
    gc.collect()
    for order in _orders(max(1, round(args.duration / args.block_seconds))):
        for side in order:
            out[side].append(block(makers[side], urls[side], args.block_seconds, None))
    return out


async def _ablock(
    client: httpx.AsyncClient, url: str, workers: int, seconds: float | None, count: int | None
) -> Block:
    left = count if count is not None else sys.maxsize
    lat: list[int] = []
    completed = errors = 0
    t0 = time.perf_counter()
    end = t0 + seconds if seconds is not None else float("inf")
    end_ns = end * 1e9

    async def worker() -> None:
        nonlocal left, completed, errors
        clock, now, get = time.perf_counter_ns, time.perf_counter, client.get
        while left > 0 and now() < end:
            left -= 1
            t = clock()
            try:
                ok = (await get(url)).status_code == 200
            except httpx.TransportError:
                ok = False
            t1 = clock()
            lat.append(t1 - t)
            completed += t1 <= end_ns
            errors += not ok

    cpu0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(workers)))
    cpu = time.process_time() - cpu0
    wall = seconds if seconds is not None else time.perf_counter() - t0
    return Block(lat, completed, wall, cpu, errors)


async def async_blocks(
    clients: dict[str, httpx.AsyncClient], urls: dict[str, str], args: argparse.Namespace, workers: int
) -> dict:
    for side in SIDES:
        warm = args.warmup if workers == 1 else 2 * workers  # opens every connection
        await _ablock(clients[side], urls[side], workers, None, warm)
    out: dict[str, list[Block]] = {side: [] for side in SIDES}
    gc.collect()
    if workers == 1:
        orders, seconds, count = _orders(max(1, args.requests // args.block)), None, args.block
    else:
        orders, seconds, count = (
            _orders(max(1, round(args.duration / args.block_seconds))),
            args.block_seconds,
            None,
        )
    for order in orders:
        for side in order:
            out[side].append(await _ablock(clients[side], urls[side], workers, seconds, count))
    return out


# -- the transport study: what sends the async client's bytes -----------------------------

STUDY_LEVELS = (1, 10, 50)
STUDY_BASE = "httpx"
STUDY_MESH = "meshlib (default: h1)"


class _Status:
    __slots__ = ("status_code",)

    def __init__(self, status: int) -> None:
        self.status_code = status


class AiohttpGet:
    """aiohttp itself behind the `get(url)` the blocks call: the ceiling for asyncio HTTP here
    (its C parser, no httpx objects)."""

    def __init__(self) -> None:
        import aiohttp

        self._errors = aiohttp.ClientError
        connector = aiohttp.TCPConnector(limit=100, keepalive_timeout=300)
        self._session = aiohttp.ClientSession(connector=connector)

    async def get(self, url: str) -> _Status:
        try:
            async with self._session.get(url) as response:
                await response.read()
                return _Status(response.status)
        except self._errors:
            return _Status(0)

    async def aclose(self) -> None:
        await self._session.close()


def study_sides(address: str, mesh: Mesh, fallback: Mesh) -> dict[str, tuple[Any, str]]:
    """Each side: a client with `get(url)` and `aclose()`, and the URL it calls. Made in the
    running loop (aiohttp's session wants one)."""
    from meshlib.http.h1 import AsyncH1Transport

    direct, meshed = f"http://{address}{PATH}", f"http://{SERVICE}{PATH}"
    sides: dict[str, tuple[Any, str]] = {
        STUDY_BASE: (httpx.AsyncClient(limits=LIMITS), direct),
        STUDY_MESH: (mesh.client(limits=LIMITS), meshed),
        "meshlib (httpcore)": (fallback.client(limits=LIMITS), meshed),
        "httpx + h1 transport": (httpx.AsyncClient(transport=AsyncH1Transport(limits=LIMITS)), direct),
    }
    try:
        from httpx_aiohttp import AiohttpTransport
    except ImportError:
        print("  (httpx-aiohttp not installed: its row is left out)", file=sys.stderr)
    else:
        transport = AiohttpTransport(limits=LIMITS)
        sides["httpx + httpx-aiohttp"] = (httpx.AsyncClient(transport=transport), direct)
    try:
        sides["aiohttp (ceiling)"] = (AiohttpGet(), direct)
    except ImportError:
        print("  (aiohttp not installed: the ceiling row is left out)", file=sys.stderr)
    return sides


def _rotations(names: list[str], rounds: int) -> list[list[str]]:
    """Round i starts with side i (mod n), every other round runs backwards: each side goes
    first and last as often as the others, and each pair of sides swaps order."""
    out = []
    for i in range(rounds):
        k = i % len(names)
        order = names[k:] + names[:k]
        out.append(order[::-1] if i % 2 else order)
    return out


async def transport_study(address: str, mesh: Mesh, fallback: Mesh, args: argparse.Namespace) -> dict:
    """Every side at 1, 10 and 50 concurrent requests, in blocks of `--study-seconds`,
    interleaved by rounds (`_rotations`); ratios against plain httpx of the same run."""
    sides = study_sides(address, mesh, fallback)
    names = list(sides)
    results: dict[str, Any] = {}
    try:
        for workers in STUDY_LEVELS:
            for name in names:  # warm-up: opens every connection the level needs
                client, url = sides[name]
                await _ablock(client, url, workers, None, args.warmup if workers == 1 else 4 * workers)
            blocks: dict[str, list[Block]] = {name: [] for name in names}
            gc.collect()
            for order in _rotations(names, args.study_rounds):
                for name in order:
                    client, url = sides[name]
                    blocks[name].append(await _ablock(client, url, workers, args.study_seconds, None))
            base = side_figures(blocks[STUDY_BASE])
            level: dict[str, Any] = {}
            for name in names:
                f = side_figures(blocks[name])
                pairs = list(zip(blocks[STUDY_BASE], blocks[name], strict=True))
                f["rps_ratio"] = f["rps"] / base["rps"]
                f["p50_ratio"] = f["p50_us"] / base["p50_us"]
                # steadier than req/s when other jobs take the CPU: req/s follows the share of a
                # core the client gets, CPU per request does not
                f["cpu_ratio"] = f["cpu_us_per_req"] / base["cpu_us_per_req"]
                f["rps_ratio_rounds"] = quartiles([m.rps / r.rps for r, m in pairs])
                level[name] = f
            results[str(workers)] = level
            print(f"  transports, {workers} concurrent:", flush=True)
            for name in names:
                f = level[name]
                q = f["rps_ratio_rounds"]
                rounds = f"(rounds {q[0]:.2f}-{q[2]:.2f})"
                print(
                    f"    {name:<24} {f['rps']:7.0f} req/s x{f['rps_ratio']:.2f} {rounds}  "
                    f"p50 {f['p50_us']:8.0f} us x{f['p50_ratio']:.2f}  CPU {f['cpu_us_per_req']:.0f} us/req",
                    flush=True,
                )
    finally:
        for client, _ in sides.values():
            await client.aclose()
    mesh_figures = {level: results[level][STUDY_MESH] for level in results}
    results["targets"] = {
        "throughput_x2.5_at_10": mesh_figures["10"]["rps_ratio"] >= 2.5,
        "throughput_x2.5_at_50": mesh_figures["50"]["rps_ratio"] >= 2.5,
        "sequential_p50_no_worse": mesh_figures["1"]["p50_ratio"] <= 1.0,
    }
    return results


class Urllib3Transport(httpx.BaseTransport):
    """A sync candidate of the study (not shipped): httpx over urllib3's pool, the body read
    whole. urllib3 takes a connection from a queue per host; httpcore scans its pool."""

    def __init__(self) -> None:
        import urllib3

        self._pool = urllib3.PoolManager(maxsize=LIMITS.max_connections or 100, retries=False)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self._pool.urlopen(
            request.method,
            str(request.url),
            body=request.content or None,
            headers=dict(request.headers),
            redirect=False,
            preload_content=False,
            decode_content=False,
        )
        content = r.read()
        r.release_conn()
        return httpx.Response(r.status, headers=list(r.headers.items()), content=content)

    def close(self) -> None:
        self._pool.clear()


class Urllib3Get:
    """urllib3 itself behind `get(url)`: the sync ceiling (http.client, no httpx objects)."""

    def __init__(self) -> None:
        import urllib3

        self._pool = urllib3.PoolManager(maxsize=LIMITS.max_connections or 100, retries=False)

    def get(self, url: str) -> _Status:
        return _Status(self._pool.request("GET", url).status)

    def __enter__(self) -> Urllib3Get:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.clear()


def sync_study(address: str, mesh: Mesh, fallback: Mesh, args: argparse.Namespace) -> dict[str, Any]:
    """The sync client at `--threads` threads and at one (sequential): plain httpx, meshlib's
    sync client over its default (h1_sync) and over httpcore, both candidate transports under
    a plain httpx client and under the mesh (h1_sync, urllib3), urllib3 itself; new clients for
    every block (see `sync_threads`), rounds as in `transport_study`."""
    from meshlib.http.h1_sync import H1Transport

    direct, meshed = f"http://{address}{PATH}", f"http://{SERVICE}{PATH}"
    sides: dict[str, tuple[Callable[[], Any], str]] = {
        "httpx": (lambda: httpx.Client(limits=LIMITS), direct),
        "meshlib sync (default, h1_sync)": (lambda: mesh.sync_client(limits=LIMITS), meshed),
        "meshlib sync (httpcore)": (lambda: fallback.sync_client(limits=LIMITS), meshed),
        "httpx + h1_sync transport": (lambda: httpx.Client(transport=H1Transport(limits=LIMITS)), direct),
    }
    try:
        import urllib3  # noqa: F401
    except ImportError:
        print("  (urllib3 not installed: its rows are left out)", file=sys.stderr)
    else:
        sides["meshlib sync over urllib3"] = (lambda: mesh.sync_client(transport=Urllib3Transport()), meshed)
        sides["httpx + urllib3 transport"] = (lambda: httpx.Client(transport=Urllib3Transport()), direct)
        sides["urllib3 (ceiling)"] = (Urllib3Get, direct)
    names = list(sides)

    def block(make: Callable[[], Any], url: str, threads: int) -> Block:
        lat: list[int] = []
        counts = [0, 0]  # completed, errors
        end = time.perf_counter() + args.study_seconds

        def worker(client: Any) -> None:
            clock, now, get = time.perf_counter_ns, time.perf_counter, client.get
            while now() < end:
                t = clock()
                try:
                    ok = get(url).status_code == 200
                except Exception:  # any client's failure is a failed request here
                    ok = False
                lat.append(clock() - t)
                counts[0] += 1
                counts[1] += not ok

        with make() as client:
            pool = [threading.Thread(target=worker, args=(client,)) for _ in range(threads)]
            cpu0 = time.process_time()
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            cpu = time.process_time() - cpu0
        return Block(lat, counts[0], args.study_seconds, cpu, counts[1])

    def level(threads: int) -> dict[str, Any]:
        blocks: dict[str, list[Block]] = {name: [] for name in names}
        gc.collect()
        for order in _rotations(names, args.study_rounds):
            for name in order:
                blocks[name].append(block(*sides[name], threads))
        base = side_figures(blocks["httpx"])
        out: dict[str, Any] = {}
        print(f"  sync transports, {threads} thread(s):", flush=True)
        for name in names:
            f = side_figures(blocks[name])
            pairs = list(zip(blocks["httpx"], blocks[name], strict=True))
            f["rps_ratio"] = f["rps"] / base["rps"]
            f["p50_ratio"] = f["p50_us"] / base["p50_us"]
            f["rps_ratio_rounds"] = quartiles([m.rps / r.rps for r, m in pairs])
            f["p50_ratio_rounds"] = quartiles([m.p50 / r.p50 for r, m in pairs])
            out[name] = f
            q = f["rps_ratio_rounds"]
            print(
                f"    {name:<32} {f['rps']:7.0f} req/s x{f['rps_ratio']:.2f} (rounds {q[0]:.2f}-{q[2]:.2f})  "
                f"p50 {f['p50_us']:.0f} us x{f['p50_ratio']:.2f}  CPU {f['cpu_us_per_req']:.0f} us/req",
                flush=True,
            )
        return out

    print(f"  load before the sync study: {os.getloadavg()[0]:.2f}", flush=True)
    out = level(args.threads)
    out["threads"] = args.threads
    out["sequential"] = level(1)
    out["load_after"] = os.getloadavg()[0]
    default = "meshlib sync (default, h1_sync)"
    out["target_x1.5_meshlib"] = out[default]["rps_ratio"] >= 1.5
    out["sequential_p50_no_worse"] = out["sequential"][default]["p50_ratio"] <= 1.0
    print(
        f"  load after: {out['load_after']:.2f}; targets: x1.5 at {args.threads} threads "
        f"{verdict(out['target_x1.5_meshlib'])}, sequential p50 {verdict(out['sequential_p50_no_worse'])}",
        flush=True,
    )
    return out


# -- scenarios -----------------------------------------------------------------------------


class TracedMesh:
    """A Mesh with tracing and metrics on: SDK providers given to it (the global ones untouched).
    `ratio`: None samples every trace (AlwaysOn), else that share of new traces, parent-based."""

    def __init__(self, address: str, ratio: float | None = None) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

        class Discard(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        sampler = ALWAYS_ON if ratio is None else ParentBased(TraceIdRatioBased(ratio))
        self.tracer_provider = TracerProvider(sampler=sampler)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(Discard()))
        self.meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        self.mesh = Mesh(service="bench-client", tracing=self.tracer_provider, metrics=self.meter_provider)
        self.mesh.apply_rules(rules_for(address), "bench")

    def close(self) -> None:
        self.mesh.close()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def run_scenario(kind: str, mesh: Mesh, server: Server, args: argparse.Namespace) -> dict[str, list[Block]]:
    urls = {"httpx": f"http://{server.address}{PATH}", "meshlib": f"http://{SERVICE}{PATH}"}
    if kind == "sync_sequential":
        with httpx.Client(limits=LIMITS) as raw, mesh.sync_client(limits=LIMITS) as meshed:
            return sync_sequential({"httpx": raw, "meshlib": meshed}, urls, args)
    if kind.startswith("sync"):
        makers = {
            "httpx": lambda: httpx.Client(limits=LIMITS),
            "meshlib": lambda: mesh.sync_client(limits=LIMITS),
        }
        return sync_threads(makers, urls, args)

    async def main() -> dict[str, list[Block]]:
        async with httpx.AsyncClient(limits=LIMITS) as raw, mesh.client(limits=LIMITS) as meshed:
            workers = 1 if kind == "async_sequential" else args.concurrency
            return await async_blocks({"httpx": raw, "meshlib": meshed}, urls, args, workers)

    return asyncio.run(main())


def side_figures(blocks: list[Block]) -> dict[str, float]:
    lat = sorted(x for b in blocks for x in b.latencies)
    n = len(lat)
    return {
        "requests": n,
        "p50_us": percentile(lat, 0.50) / 1e3,
        "p90_us": percentile(lat, 0.90) / 1e3,
        "p99_us": percentile(lat, 0.99) / 1e3,
        "mean_us": sum(lat) / n / 1e3,
        "rps": sum(b.completed for b in blocks) / sum(b.wall for b in blocks),
        "cpu_us_per_req": sum(b.cpu for b in blocks) / n * 1e6,
        "errors": sum(b.errors for b in blocks),
        "blocks": len(blocks),
    }


def quartiles(values: list[float]) -> list[float]:
    data = sorted(values)
    return [percentile(data, 0.25), median(data), percentile(data, 0.75)]


def summarize(title: str, blocks: dict[str, list[Block]]) -> dict[str, Any]:
    budget = P50_BUDGET_SAMPLED if title.endswith("telemetry 10%") else P50_BUDGET
    raw, mesh = side_figures(blocks["httpx"]), side_figures(blocks["meshlib"])
    ratio = {k: mesh[k] / raw[k] for k in ("p50_us", "p90_us", "p99_us", "mean_us", "rps", "cpu_us_per_req")}
    pairs = list(zip(blocks["httpx"], blocks["meshlib"], strict=True))
    return {
        "title": title,
        "httpx": raw,
        "meshlib": mesh,
        "ratio": ratio,
        "added": {
            "p50_us": mesh["p50_us"] - raw["p50_us"],
            "mean_us": mesh["mean_us"] - raw["mean_us"],
            "cpu_us_per_req": mesh["cpu_us_per_req"] - raw["cpu_us_per_req"],
        },
        "block_pair_ratio_quartiles": {
            "p50": quartiles([m.p50 / r.p50 for r, m in pairs]),
            "rps": quartiles([m.rps / r.rps for r, m in pairs]),
        },
        "targets": {
            "p50_within_10pct": ratio["p50_us"] <= P50_BUDGET,
            "p50_budget": budget,
            "p50_within_budget": ratio["p50_us"] <= budget,
            "throughput_at_least_90pct": ratio["rps"] >= RPS_FLOOR,
        },
        # every request's latency (us), for the plot; not written out
        "_latencies_us": {side: [x / 1e3 for b in blocks[side] for x in b.latencies] for side in SIDES},
    }


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def plot(results: dict[str, Any], args: argparse.Namespace, path: Path) -> bool:
    """Latency distributions of the sequential scenarios, sync and async: httpx against meshlib
    (and meshlib + telemetry, against the httpx side of its own run). False without matplotlib."""
    made = _plots.figure(
        1,
        2,
        size=(13.0, 5.0),
        title=f"Request latency, plain httpx vs meshlib, sequential: {args.requests:,} requests per side "
        f"in blocks of {args.block}, interleaved ABBA; loopback to uvicorn in another process",
    )
    if made is None:
        return False
    fig, axes = made
    for ax, kind in zip(axes, ("sync", "async"), strict=True):
        series: dict[str, list[float]] = {}
        styles: dict[str, dict[str, Any]] = {}
        plain, traced = results.get(f"{kind}_sequential"), results.get(f"{kind}_sequential_telemetry")
        for r, side, label, style in (
            (plain, "httpx", "httpx", {"color": "C0"}),
            (plain, "meshlib", "meshlib", {"color": "C1"}),
            (traced, "httpx", "httpx (in the + telemetry run)", {"color": "C0", "linestyle": ":"}),
            (traced, "meshlib", "meshlib + tracing + metrics", {"color": "C3", "linestyle": "--"}),
        ):
            if r is not None:
                series[label] = r["_latencies_us"][side]
                styles[label] = style
        client = (
            "httpx.Client / mesh.sync_client()" if kind == "sync" else "httpx.AsyncClient / mesh.client()"
        )
        _plots.distribution(ax, series, unit="µs", styles=styles, title=f"{kind}, sequential ({client})")
    return _plots.save(fig, path)


SERVER_RPS_FLOOR = 0.95  # the middleware keeps at least 95% of raw uvicorn's throughput at 10 concurrent


def server_side(seconds: float) -> dict[str, Any]:
    """The ASGI middleware against raw uvicorn (`inbound.live`): `seconds` measured per
    concurrency level, shared by its servers; pinned where there are two CPUs."""
    import inbound

    pin = len(os.sched_getaffinity(0)) >= 2
    cpus = os.sched_getaffinity(0)
    levels = {
        "10 concurrent": (10, ("raw", "mesh")),
        "one at a time": (1, (*inbound.LIVE, inbound.RAW_UNSAMPLED, inbound.LIVE_UNSAMPLED)),
    }
    out: dict[str, Any] = {"pinned": pin, "seconds_per_level": seconds}
    try:
        for level, (concurrency, kinds) in levels.items():
            out[level] = inbound.live(seconds / len(kinds), 0.5, concurrency, pin, kinds)
            os.sched_setaffinity(0, cpus)  # `live` pins this process to one CPU
    finally:
        os.sched_setaffinity(0, cpus)
    c10, c1 = out["10 concurrent"], out["one at a time"]
    budgets = {
        "mesh + sdk always-on": P50_BUDGET,
        "mesh + sdk 10%": P50_BUDGET_SAMPLED,
        inbound.LIVE_UNSAMPLED: P50_BUDGET_SAMPLED,
    }
    out["p50_budgets"] = budgets
    out["targets"] = {
        "throughput_at_least_95pct": c10["ratio_to_raw"]["mesh"] >= SERVER_RPS_FLOOR,
        **{
            f"p50 {kind}": max(c1["p50_to_raw"][kind], c1["p50_to_raw_of_rounds"][kind]) <= budget
            for kind, budget in budgets.items()
        },
    }
    return out


def print_server_side(side: dict[str, Any]) -> None:
    c10, c1 = side["10 concurrent"], side["one at a time"]
    rows = [["10 concurrent: mesh/raw, req/s", f"x{c10['ratio_to_raw']['mesh']:.3f}", ">= x0.95",
             verdict(side["targets"]["throughput_at_least_95pct"])]]  # fmt: skip
    for kind in c1["p50_to_raw"]:
        if kind.startswith("raw"):
            continue
        check = side["targets"].get(f"p50 {kind}")
        budget = f"<= x{side['p50_budgets'][kind]:.2f}" if kind in side["p50_budgets"] else ""
        rows.append(
            [
                f"one at a time: {kind}, p50 (pooled / rounds' median)",
                f"x{c1['p50_to_raw'][kind]:.3f} / x{c1['p50_to_raw_of_rounds'][kind]:.3f}",
                budget,
                "" if check is None else verdict(check),
            ]
        )
    how = f"{'pinned' if side['pinned'] else 'not pinned'}, {side['seconds_per_level']:g} s per level"
    print(f"\nserver side: the ASGI middleware against raw uvicorn (bench/inbound.py --live; {how})")
    print(table(["server", "over raw uvicorn", "target", "met"], rows))
    print("(the caller-unsampled row is set against raw uvicorn sent the same traceparent)")


def print_study(study: dict[str, Any]) -> None:
    rows = []
    for level in (str(n) for n in STUDY_LEVELS if str(n) in study):
        for name, f in study[level].items():
            q = f["rps_ratio_rounds"]
            rows.append(
                [
                    f"{'sequential' if level == '1' else level + ' concurrent'}: {name}",
                    f"{f['p50_us']:.0f}",
                    f"x{f['p50_ratio']:.2f}",
                    f"{f['rps']:.0f}",
                    f"x{f['rps_ratio']:.2f}",
                    f"{q[0]:.2f}-{q[2]:.2f}",
                    f"{f['cpu_us_per_req']:.0f}",
                    f"x{f['cpu_ratio']:.2f}",
                ]
            )
    if rows:
        print()
        print(
            table(
                [
                    "transport study",
                    "p50 us",
                    "p50/httpx",
                    "req/s",
                    "req/s/httpx",
                    "rounds IQR",
                    "CPU us/req",
                    "CPU/httpx",
                ],
                rows,
            )
        )
    sync = study.get("sync")
    if sync is not None:
        for label, figures in ((f"{sync['threads']} threads", sync), ("sequential", sync["sequential"])):
            for name, f in figures.items():
                if isinstance(f, dict) and "rps_ratio_rounds" in f:
                    q = f["rps_ratio_rounds"]
                    print(
                        f"sync, {label}: {name}: {f['rps']:.0f} req/s x{f['rps_ratio']:.2f} "
                        f"(rounds {q[0]:.2f}-{q[2]:.2f}), p50 x{f['p50_ratio']:.2f}, "
                        f"CPU {f['cpu_us_per_req']:.0f} us/req"
                    )
    if "targets" in study:
        print(
            "targets for meshlib's default: "
            + ", ".join(f"{k} {verdict(v)}" for k, v in study["targets"].items())
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="measured requests per side, sequential")
    parser.add_argument("--block", type=int, default=100, help="requests per block, sequential")
    parser.add_argument("--duration", type=float, default=16.0, help="measured seconds per side, concurrent")
    parser.add_argument("--block-seconds", type=float, default=4.0, help="seconds per block, concurrent")
    parser.add_argument("--warmup", type=int, default=300, help="unmeasured requests per client first")
    parser.add_argument("--concurrency", type=int, default=50, help="async tasks in the concurrent scenario")
    parser.add_argument(
        "--threads", type=int, default=50, help="threads in the sync concurrent scenario (0: skip it)"
    )
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument(
        "--no-telemetry",
        dest="telemetry",
        action="store_false",
        help="skip the runs with tracing and metrics on",
    )
    parser.add_argument(
        "--no-study",
        dest="study",
        action="store_false",
        help="skip the transport study (async, every candidate)",
    )
    parser.add_argument("--study-only", action="store_true", help="only the transport study")
    parser.add_argument(
        "--sync-study-only", action="store_true", help="only the sync part of the transport study"
    )
    parser.add_argument("--study-seconds", type=float, default=2.0, help="seconds per block, transport study")
    parser.add_argument(
        "--study-rounds", type=int, default=6, help="rounds of blocks per level, transport study"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write results (default: overhead.json in bench/results)",
    )
    parser.add_argument("--only", help="comma-separated scenario keys to run (default: all)")
    parser.add_argument("--png", type=Path, default=RESULTS / "overhead.png", help="plot file")
    parser.add_argument(
        "--no-server",
        dest="server_side",
        action="store_false",
        help="skip the server side (the ASGI middleware against raw uvicorn)",
    )
    parser.add_argument("--server-only", action="store_true", help="only the server side")
    parser.add_argument(
        "--server-seconds", type=float, default=120.0, help="server side: measured seconds per level"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.warmup, args.duration, args.block_seconds = min(args.requests, 1000), 50, 4.0, 2.0
        args.study_seconds, args.study_rounds = 1.0, 2
        args.server_seconds = min(args.server_seconds, 12.0)
    if args.json is None:
        name = "overhead-sync.json" if args.sync_study_only else "overhead.json"
        args.json = RESULTS / ("overhead-transports.json" if args.study_only else name)
        if args.server_only:
            args.json = RESULTS / "overhead-server.json"

    info = machine_info()
    print(
        f"python {info['python']} on {info['cpu_count']} CPUs ({info['cpu_model']}), "
        f"httpx {info['packages']['httpx']}, uvicorn {info['packages']['uvicorn']}, "
        f"load {info['load_average']}"
    )
    print(
        f"sequential: {args.requests} requests per side in blocks of {args.block}; "
        f"concurrent: {args.duration:g} s per side in blocks of {args.block_seconds:g} s; "
        f"{args.warmup} warm-up requests per client"
    )

    scenarios = [
        ("sync_sequential", "sync, sequential"),
        ("async_sequential", "async, sequential"),
        (f"async_concurrent_{args.concurrency}", f"async, {args.concurrency} concurrent"),
    ]
    if args.threads:
        scenarios.append((f"sync_threads_{args.threads}", f"sync, {args.threads} threads"))
    if args.study_only or args.sync_study_only or args.server_only:
        scenarios, args.telemetry = [], False
    if args.server_only:
        args.study = False
    elif args.study_only or args.sync_study_only:
        args.server_side = False
    if args.only:
        wanted = set(args.only.split(","))
        scenarios = [(key, title) for key, title in scenarios if key in wanted]

    server = Server()
    mesh = Mesh(service="bench-client")
    mesh.apply_rules(rules_for(server.address), "bench")
    fallback = Mesh(service="bench-client", http_transport="httpcore")  # the study's httpcore row
    fallback.apply_rules(rules_for(server.address), "bench")
    study: dict[str, Any] | None = None
    traced = TracedMesh(server.address) if args.telemetry else None
    sampled = TracedMesh(server.address, 0.1) if args.telemetry else None
    runs = [(key, title, key, mesh) for key, title in scenarios]
    if traced is not None and sampled is not None:
        for suffix, label, m in (("_telemetry", "", traced.mesh), ("_telemetry_10", " 10%", sampled.mesh)):
            runs += [(key + suffix, f"{title} + telemetry{label}", key, m) for key, title in scenarios]
    results: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        for key, title, base, meshed in runs:
            kind = base.rsplit("_", 1)[0] if base[-1].isdigit() else base
            r = results[key] = summarize(title, run_scenario(kind, meshed, server, args))
            for side in SIDES:
                if r[side]["errors"]:
                    print(f"  {title}, {side}: {r[side]['errors']} non-200 responses", file=sys.stderr)
            q = r["block_pair_ratio_quartiles"]
            p50q = f"{q['p50'][0]:.2f}-{q['p50'][2]:.2f}"
            print(
                f"  {title:<22} p50 x{r['ratio']['p50_us']:.3f} (blocks {p50q})  "
                f"req/s x{r['ratio']['rps']:.3f} (blocks {q['rps'][0]:.2f}-{q['rps'][2]:.2f})  "
                f"CPU {r['added']['cpu_us_per_req']:+.0f} us/req",
                flush=True,
            )
        if args.sync_study_only:
            study = {"sync": sync_study(server.address, mesh, fallback, args)}
        elif args.study or args.study_only:
            study = asyncio.run(transport_study(server.address, mesh, fallback, args))
            if args.threads:
                study["sync"] = sync_study(server.address, mesh, fallback, args)
    finally:
        mesh.close()
        fallback.close()
        for t in (traced, sampled):
            if t is not None:
                t.close()
        server.stop()
    server_results = server_side(args.server_seconds) if args.server_side else None
    elapsed = time.perf_counter() - started

    rows = []
    for r in results.values():
        for side in SIDES:
            f = r[side]
            rows.append(
                [
                    f"{r['title']}: {side}",
                    f"{f['p50_us']:.0f}",
                    f"{f['p99_us']:.0f}",
                    f"{f['rps']:.0f}",
                    f"{f['cpu_us_per_req']:.0f}",
                    "",
                    "",
                ]
            )
        rt = r["ratio"]
        rows.append(
            [
                f"{r['title']}: meshlib/httpx",
                f"x{rt['p50_us']:.3f}",
                f"x{rt['p99_us']:.3f}",
                f"x{rt['rps']:.3f}",
                f"{r['added']['cpu_us_per_req']:+.0f}",
                verdict(r["targets"]["p50_within_budget"]),
                verdict(r["targets"]["throughput_at_least_90pct"]),
            ]
        )
    if rows:
        print()
        print(
            table(
                ["scenario", "p50 us", "p99 us", "req/s", "CPU us/req", "p50 <=+10% (5%)", "req/s >=90%"],
                rows,
            )
        )
        print(
            f"\n(blocks interleaved ABBA; CPU is the client process's CPU time per request; {elapsed:.0f} s)"
        )
        if plot(results, args, args.png):
            print(f"wrote {args.png}")
    if study is not None:
        print_study(study)
    if server_results is not None:
        print_server_side(server_results)
    for r in results.values():
        del r["_latencies_us"]

    info["load_average_end"] = load_average()
    write_json(
        args.json,
        {
            "benchmark": "overhead",
            "machine": info,
            "config": {
                "requests_per_side": args.requests,
                "block_requests": args.block,
                "concurrent_seconds_per_side": args.duration,
                "block_seconds": args.block_seconds,
                "warmup": args.warmup,
                "concurrency": args.concurrency,
                "threads": args.threads,
                "quick": args.quick,
                "telemetry": (
                    "scenarios ending in _telemetry: SDK TracerProvider (AlwaysOn, BatchSpanProcessor, "
                    "spans dropped) and MeterProvider (in-memory reader) given to the Mesh; ending in "
                    "_telemetry_10: the same with ParentBased(TraceIdRatioBased(0.1))"
                    if args.telemetry
                    else None
                ),
                "server": "uvicorn (h11, asyncio loop), pure ASGI app, separate process",
                "targets": {
                    "p50_ratio_max": P50_BUDGET,
                    "p50_ratio_max_sampled_10pct": P50_BUDGET_SAMPLED,
                    "throughput_ratio_min": RPS_FLOOR,
                },
                "study": {
                    "levels": STUDY_LEVELS,
                    "block_seconds": args.study_seconds,
                    "rounds": args.study_rounds,
                    "targets": "meshlib's default at least x2.5 plain httpx's req/s at 10 and 50 "
                    "concurrent; its sequential p50 at most x1.0",
                },
                "elapsed_s": round(elapsed, 1),
            },
            "scenarios": results,
            "transport_study": study,
            "server_side": server_results,
        },
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
