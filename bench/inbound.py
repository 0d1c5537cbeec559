"""Server-side cost per request, without a socket: the ASGI and WSGI middleware, in process.

Each middleware is called in a loop with a hand-made request (an ASGI scope with an httpx
client's usual headers plus `x-mesh-source` and `x-mesh-timeout`, or the WSGI environ of the
same request), in front of an app that answers 200 at once; the same loop calling the app alone
is subtracted. Six meshes: `plain` (no rules, no telemetry), `rules` (an Authorization document
the request passes and a local RateLimit it never hits), `metrics` (`metrics_path` set, so the
in-flight gauge and durations are kept), `tracing` (an SDK TracerProvider whose spans are
dropped), `sdk always-on` and `sdk 10%` (SDK TracerProvider with a BatchSpanProcessor to an
exporter that drops the spans, sampling every trace or 10% parent-based, and an SDK
MeterProvider with a reader); and a seventh row, `sdk 10%, caller unsampled`: the 10% mesh, its
requests carrying a caller's unsampled `traceparent`. Figures are nanoseconds per request: the
least thread CPU time of many repeats, so other work on the machine (which wall-clock times
would include) does not count.

`--live`: the same app under uvicorn, raw and behind the middleware (without telemetry, with the
SDK always-on, with 10% sampling), each server in a process of its own; an aiohttp client keeps
10 requests in flight against one server at a time, in interleaved blocks (raw, then each meshed
one, the order turning every round), and the throughput of each is set against raw uvicorn's,
and so is each request's latency as the client saw it (p50, p99; with `--concurrency 1` that
p50 is the sequential p50 issue 16 budgets), also as the median over rounds of each block's p50
against the same round's raw block (unmoved by a drift of the machine's speed), and each
server's CPU time per request (its process's, over its blocks). `--pin` puts the client on one
CPU and the servers on another, so the client's work does not land on the server's core (closer to
a server on its own machine). `--pass-through` adds a middleware that only passes each request on, in
a process that made a `Mesh`: the least any middleware costs, beside what this one does.
`--slowed-tenth US` (repeatable) adds raw uvicorn with a random tenth of its requests slowed by
US µs of busy CPU: what a sampled tenth, dearer than the rest, does by itself to the p50 of all
requests, read beside the 10% row. `--caller-unsampled` adds the 10% server once more, its
requests carrying a caller's unsampled `traceparent` (what most requests between services that
trace at 10% are), set against raw uvicorn sent the same header. `--middleware-only` measures
raw uvicorn and the middleware without telemetry alone (issue 16's goal 3: at least 95% of raw
uvicorn's throughput at 10 concurrent), all the seconds on those two; `--runs N` makes N runs in
a row and prints the median of their ratios (JSON: `inbound_live_runs.json`): one run moves by
more than what is left to measure. On a shared machine read the ratios, not the rates.

    python bench/inbound.py            # full run (about 20 s)
    python bench/inbound.py --quick    # smoke run
    python bench/inbound.py --live     # throughput through uvicorn (about 50 s)
    python bench/inbound.py --live --pin --concurrency 1 --seconds 120   # the sequential p50
    python bench/inbound.py --live --pin --middleware-only --runs 3 --seconds 220 --block 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
import timeit
from pathlib import Path
from typing import Any

from _common import RESULTS, cpu_seconds, load_average, machine_info, run_server, table, write_json
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import meshlib
from meshlib.asgi import MeshMiddleware as AsgiMesh
from meshlib.rules import parse_documents
from meshlib.wsgi import MeshMiddleware as WsgiMesh

DOCS = [
    {"kind": "Authorization", "service": "orders", "allow": [{"from": ["checkout"], "paths": ["/api/*"]}]},
    {"kind": "RateLimit", "service": "orders", "requests_per_second": 1000000, "burst": 1000000},
]
HEADERS = [
    (b"host", b"orders"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"user-agent", b"python-httpx/0.27"),
    (b"x-mesh-source", b"checkout"),
    (b"x-mesh-timeout", b"1500"),
]
ENVIRON = {
    "REQUEST_METHOD": "GET",
    "SCRIPT_NAME": "",
    "PATH_INFO": "/api/x",
    "wsgi.url_scheme": "http",
} | {"HTTP_" + k.decode().upper().replace("-", "_"): v.decode() for k, v in HEADERS}


class _Drop(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b"ok"]


async def _receive() -> dict[str, Any]:
    return {"type": "http.request"}


async def _send(message: dict[str, Any]) -> None:
    pass


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    pass


def sdk(ratio: float | None) -> dict[str, Any]:
    """SDK providers as an app that traces would give them: sampling every trace (None) or that
    share of new traces, parent-based; spans batched to an exporter that drops them."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

    provider = TracerProvider(sampler=ALWAYS_ON if ratio is None else ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(BatchSpanProcessor(_Drop()))
    return {"tracing": provider, "metrics": MeterProvider(metric_readers=[InMemoryMetricReader()])}


UNSAMPLED = "sdk 10%, caller unsampled"
"""The `sdk 10%` mesh, each request from a caller whose mesh did not sample its trace (what nine
requests in ten are, between services that trace at 10%)."""
UNSAMPLED_CALLER = ((b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),)
CALLER_HEADERS = {name.decode(): value.decode() for name, value in UNSAMPLED_CALLER}


def mesh_for(name: str) -> meshlib.Mesh:
    if name == "sdk always-on":
        return meshlib.Mesh("orders", **sdk(None))
    if name in ("sdk 10%", UNSAMPLED):
        return meshlib.Mesh("orders", **sdk(0.1))
    if name == "metrics":
        return meshlib.Mesh("orders", tracing=False, metrics_path="/metrics")
    if name == "tracing":
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_Drop()))
        return meshlib.Mesh("orders", tracing=provider, metrics=False)
    mesh = meshlib.Mesh("orders", tracing=False, metrics=False)
    if name == "rules":
        mesh.apply_rules(parse_documents(DOCS), "1")
    return mesh


def measure(
    mesh: meshlib.Mesh, n: int, repeats: int, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> tuple[float, float]:
    """(ASGI, WSGI) nanoseconds per request, the app's own cost subtracted; `extra`: headers the
    request carries besides `HEADERS`."""
    loop = asyncio.new_event_loop()
    headers = [*HEADERS, *extra]
    environ = ENVIRON | {"HTTP_" + k.decode().upper().replace("-", "_"): v.decode() for k, v in extra}

    async def asgi_loop(app: Any) -> None:
        for _ in range(n):
            scope = {"type": "http", "method": "GET", "path": "/api/x", "scheme": "http"}
            await app(scope | {"headers": list(headers)}, _receive, _send)

    def wsgi_loop(app: Any) -> None:
        for _ in range(n):
            body = app(dict(environ), _start_response)
            close = getattr(body, "close", None)
            if close is not None:
                close()

    def best(run: Any) -> float:
        return min(timeit.repeat(run, number=1, repeat=repeats, timer=time.thread_time)) / n * 1e9

    asgi = best(lambda: loop.run_until_complete(asgi_loop(AsgiMesh(asgi_app, mesh=mesh))))
    asgi -= best(lambda: loop.run_until_complete(asgi_loop(asgi_app)))
    wsgi = best(lambda: wsgi_loop(WsgiMesh(wsgi_app, mesh=mesh))) - best(lambda: wsgi_loop(wsgi_app))
    loop.close()
    return asgi, wsgi


# -- live: through uvicorn ------------------------------------------------------------------

LIVE = ("raw", "mesh", "mesh + sdk always-on", "mesh + sdk 10%")
PASS_THROUGH = "pass-through"
LIVE_UNSAMPLED = "mesh + sdk 10%, caller unsampled"
RAW_UNSAMPLED = "raw, caller unsampled"
"""`--caller-unsampled`'s rows: the 10% server, its requests carrying a caller's unsampled
`traceparent` (as a meshed caller's do), set against raw uvicorn sent the same header; the other
rows' requests carry none."""


_ALL_CPUS = os.sched_getaffinity(0)
"""The CPUs this process may run on when started: each `--runs` run starts from them again."""


def _baseline(kind: str) -> str:
    return RAW_UNSAMPLED if kind == LIVE_UNSAMPLED else "raw"


"""`--pass-through`'s row: a middleware that only passes each request on, in a process that made
a `Mesh`: the least any middleware adds (a frame per request, a bigger process)."""


class PassThrough:
    """The `--pass-through` row's middleware: holds a `Mesh` (a process as big as the mesh's) and
    only awaits the app."""

    def __init__(self, app: Any, mesh: meshlib.Mesh) -> None:
        self.app = app
        self.mesh = mesh

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        app = self.app
        await app(scope, receive, send)


SLOWED_TENTH = "raw, a tenth slowed by "
"""`--slowed-tenth US`'s row (its name ends in the µs): raw uvicorn whose app spins that long on a
random tenth of its requests, as a sampled tenth costs a traced server more; a 10% row's p50 is
read beside it (what the sampled tenth alone does to the p50 of all requests)."""


class SlowedTenth:
    """The `--slowed-tenth` row's app: `asgi_app`, after a busy wait on one request in ten."""

    def __init__(self, app: Any, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and random.random() < 0.1:
            end = time.perf_counter() + self.seconds
            while time.perf_counter() < end:
                pass
        await self.app(scope, receive, send)


def _live_app(kind: str) -> Any:
    if kind in ("raw", RAW_UNSAMPLED):
        return asgi_app
    if kind.startswith(SLOWED_TENTH):
        return SlowedTenth(asgi_app, float(kind[len(SLOWED_TENTH) :].split()[0]) / 1e6)
    if kind == PASS_THROUGH:
        return PassThrough(asgi_app, mesh_for("plain"))
    mesh = mesh_for({"mesh": "plain", "mesh + sdk always-on": "sdk always-on"}.get(kind, "sdk 10%"))
    return AsgiMesh(asgi_app, mesh=mesh)


def _live_serve(kind: str, port_queue: Any, cpus: set[int] | None = None) -> None:
    from meshlib.testing import bind

    if cpus is not None:
        os.sched_setaffinity(0, cpus)

    sock = bind()
    port_queue.put(sock.getsockname()[1])
    run_server(_live_app(kind), [sock])


def live(
    seconds: float, block: float, concurrency: int, pin: bool = False, kinds: tuple[str, ...] = LIVE
) -> dict[str, Any]:
    """Requests per second of each server, and each meshed one's ratio to raw uvicorn's."""
    import multiprocessing

    import aiohttp

    ctx = multiprocessing.get_context("spawn")
    processes, urls, pids = [], {}, {}
    for kind in kinds:
        queue = ctx.Queue()
        server_cpus = {sorted(os.sched_getaffinity(0))[1]} if pin else None
        process = ctx.Process(target=_live_serve, args=(kind, queue, server_cpus), daemon=True)
        process.start()
        processes.append(process)
        urls[kind] = f"http://127.0.0.1:{queue.get(timeout=30)}/api/x"
        pids[kind] = process.pid
    cpu = dict.fromkeys(kinds, 0.0)  # each server's CPU seconds over its measured blocks

    if pin:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    latencies: dict[str, list[float]] = {kind: [] for kind in kinds}  # seconds, every request measured
    round_p50: dict[str, list[float]] = {kind: [] for kind in kinds}  # each block's p50

    async def run() -> dict[str, list[tuple[int, float]]]:
        out: dict[str, list[tuple[int, float]]] = {kind: [] for kind in kinds}
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def block_of(
                url: str, duration: float, into: list[float] | None = None, headers: Any = None
            ) -> tuple[int, float]:
                done = 0
                clock = time.perf_counter
                end = clock() + duration

                async def worker() -> None:
                    nonlocal done
                    while (start := clock()) < end:
                        async with session.get(url, headers=headers) as r:
                            await r.read()
                            done += r.status == 200
                        if into is not None:
                            into.append(clock() - start)

                t0 = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                return done, time.perf_counter() - t0

            for url in urls.values():  # connections open, servers warm
                deadline = time.monotonic() + 30
                while True:
                    try:
                        await block_of(url, 0.5)
                        break
                    except aiohttp.ClientConnectionError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.1)
            rounds = max(1, round(seconds / block))
            for i in range(rounds):
                order = kinds[i % len(kinds) :] + kinds[: i % len(kinds)]
                for kind in order:
                    before = cpu_seconds(pids[kind])
                    seen: list[float] = []
                    headers = CALLER_HEADERS if kind in (LIVE_UNSAMPLED, RAW_UNSAMPLED) else None
                    out[kind].append(await block_of(urls[kind], block, seen, headers))
                    cpu[kind] += cpu_seconds(pids[kind]) - before
                    latencies[kind] += seen
                    round_p50[kind].append(_percentile(sorted(seen), 0.5))
        return out

    try:
        blocks = asyncio.run(run())
    finally:
        for process in processes:
            process.terminate()
            process.join(10)
    rps = {kind: sum(n for n, _ in b) / sum(t for _, t in b) for kind, b in blocks.items()}
    ratios = {kind: rps[kind] / rps[_baseline(kind)] for kind in kinds}
    per_round = {
        kind: sorted(
            m[0] / m[1] / (r[0] / r[1]) for r, m in zip(blocks[_baseline(kind)], blocks[kind], strict=True)
        )
        for kind in kinds
    }
    # each request's latency as the client saw it: with one in flight, the sequential p50 issue 16
    # budgets (goal 2's +10% always-on, +5% at 10%, set against raw uvicorn's)
    p50 = {kind: _percentile(sorted(v), 0.5) for kind, v in latencies.items()}
    p99 = {kind: _percentile(sorted(v), 0.99) for kind, v in latencies.items()}
    return {
        "rps": rps,
        "ratio_to_raw": ratios,
        "round_ratios": per_round,
        "p50_s": p50,
        "p99_s": p99,
        "p50_to_raw": {kind: p50[kind] / p50[_baseline(kind)] for kind in kinds},
        # each block's p50 over the same round's raw block's: the median of those ratios does not
        # move with a drift of the machine's speed over the run
        "p50_to_raw_of_rounds": {
            kind: statistics.median(
                m / r for r, m in zip(round_p50[_baseline(kind)], round_p50[kind], strict=True)
            )
            for kind in kinds
        },
        "server_cpu_us_per_request": {
            kind: cpu[kind] / max(1, sum(n for n, _ in blocks[kind])) * 1e6 for kind in kinds
        },
    }


def _percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--live", action="store_true", help="throughput through uvicorn, against raw uvicorn")
    parser.add_argument("--seconds", type=float, default=40.0, help="--live: measured seconds per server")
    parser.add_argument("--block", type=float, default=2.0, help="--live: seconds per block")
    parser.add_argument("--concurrency", type=int, default=10, help="--live: requests in flight")
    parser.add_argument("--pin", action="store_true", help="--live: client and servers on two CPUs")
    parser.add_argument(
        "--pass-through", action="store_true", help="--live: also a middleware that only passes requests on"
    )
    parser.add_argument(
        "--caller-unsampled", action="store_true", help="--live: also the 10%% server, callers unsampled"
    )
    parser.add_argument(
        "--middleware-only",
        action="store_true",
        help="--live: raw uvicorn and the middleware without telemetry only (goal 3's throughput)",
    )
    parser.add_argument("--runs", type=int, default=1, help="--live: runs in a row, and their median")
    parser.add_argument(
        "--slowed-tenth",
        type=float,
        action="append",
        default=[],
        metavar="US",
        help="--live: also raw uvicorn with a tenth of its requests slowed by US µs (repeatable)",
    )
    parser.add_argument("--json", type=Path, default=None, help="where to write results")
    args = parser.parse_args()
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("--pin needs two CPUs (the client on one, the servers on another)")
    if args.live:
        kinds = LIVE[:2] if args.middleware_only else LIVE
        kinds = (*kinds, *((PASS_THROUGH,) if args.pass_through else ()))
        kinds += (RAW_UNSAMPLED, LIVE_UNSAMPLED) if args.caller_unsampled else ()
        kinds += tuple(f"{SLOWED_TENTH}{us:g} µs" for us in args.slowed_tenth)
        seconds = 4.0 if args.quick else args.seconds / len(kinds)
        runs = [_live_run(args, kinds, seconds, n) for n in range(max(1, args.runs))]
        info = {"machine": machine_info(), "concurrency": args.concurrency, "seconds_per_server": seconds}
        if len(runs) == 1:
            write_json(args.json or RESULTS / "inbound_live.json", info | runs[0])
            return

        def median_of(key: str) -> dict[str, float]:
            return {kind: statistics.median(r[key][kind] for r in runs) for kind in kinds}

        medians, p50s, p50s_of_rounds = (
            median_of(key) for key in ("ratio_to_raw", "p50_to_raw", "p50_to_raw_of_rounds")
        )
        print(f"median of {len(runs)} runs, over raw (throughput / p50 / p50 by the rounds' median): "
              + ", ".join(f"{kind} x{medians[kind]:.3f} / x{p50s[kind]:.3f} / x{p50s_of_rounds[kind]:.3f}"
                          for kind in kinds))  # fmt: skip
        summary = {
            "runs": runs,
            "median_ratio_to_raw": medians,
            "median_p50_to_raw": p50s,
            "median_p50_to_raw_of_rounds": p50s_of_rounds,
        }
        write_json(args.json or RESULTS / "inbound_live_runs.json", info | summary)
        return
    _main_inprocess(args)


def _live_run(args: argparse.Namespace, kinds: tuple[str, ...], seconds: float, n: int) -> dict[str, Any]:
    """One `--live` run: measured, printed as a table, returned."""
    if args.pin:  # `live` pins this process (the client) to one CPU: the next run starts from both
        os.sched_setaffinity(0, _ALL_CPUS)
    load = load_average()
    r = live(seconds, min(args.block, seconds), args.concurrency, args.pin, kinds)
    rows = [
        (kind, f"{r['rps'][kind]:.0f}", f"x{r['ratio_to_raw'][kind]:.3f}",
         "-".join(f"{x:.2f}" for x in (r["round_ratios"][kind][0], r["round_ratios"][kind][-1])),
         f"{r['p50_s'][kind] * 1e6:.0f}", f"x{r['p50_to_raw'][kind]:.3f}",
         f"x{r['p50_to_raw_of_rounds'][kind]:.3f}",
         f"{r['p99_s'][kind] * 1e6:.0f}", f"{r['server_cpu_us_per_request'][kind]:.1f}")
        for kind in kinds
    ]  # fmt: skip
    run = f", run {n + 1} of {args.runs}" if args.runs > 1 else ""
    print(f"uvicorn, {args.concurrency} concurrent (aiohttp client){run}, load before {load}")
    heads = ("server", "req/s", "vs raw", "per-round range", "p50 µs", "p50 vs raw", "rounds' median",
             "p99 µs", "server CPU µs/req")  # fmt: skip
    print(table(heads, rows))
    if args.caller_unsampled:
        print(f"({LIVE_UNSAMPLED!r} is set against {RAW_UNSAMPLED!r}, the others against 'raw')")
    return r


def _main_inprocess(args: argparse.Namespace) -> None:
    n, repeats = (200, 5) if args.quick else (2000, 40)
    results: dict[str, dict[str, float]] = {}
    for name in ("plain", "rules", "metrics", "tracing", "sdk always-on", "sdk 10%", UNSAMPLED):
        mesh = mesh_for(name)
        try:
            asgi, wsgi = measure(mesh, n, repeats, UNSAMPLED_CALLER if name == UNSAMPLED else ())
        finally:
            mesh.close()
        results[name] = {"asgi_ns": round(asgi), "wsgi_ns": round(wsgi)}
    rows = [(name, f"{r['asgi_ns'] / 1000:.2f}", f"{r['wsgi_ns'] / 1000:.2f}") for name, r in results.items()]
    print(table(("mesh", "ASGI µs/request", "WSGI µs/request"), rows))
    write_json(
        args.json or RESULTS / "inbound.json",
        {"machine": machine_info(), "requests": n, "repeats": repeats, "results": results},
    )


if __name__ == "__main__":
    main()
