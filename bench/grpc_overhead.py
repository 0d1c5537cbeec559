"""gRPC through the mesh: the mesh's channels against plain grpcio channels, same servers.

Servers: grpc.aio servers of the Echo test service (tests/grpc/echo.proto) in one separate
process on 127.0.0.1: one for the overhead runs, four for the balancing run. Each server's
service time lives in shared memory (`multiprocessing.RawArray`), the side channel the
benchmark uses to slow one down.

Overhead: a unary RPC through `mesh.grpc_channel("echo")` / `mesh.grpc_aio_channel("echo")`
(route match, weighted subset draw, round-robin pick, load bookkeeping, stats, a pooled
channel per endpoint) against `grpc.insecure_channel(address)` / `grpc.aio.insecure_channel`,
sync and aio, sequential and 50 concurrent. The two sides take turns in short blocks (ABBA
...), so drift in the machine's speed hits both alike. Targets: p50 within +10% and throughput
at least 90% of plain grpcio.

Balancing: four servers at 2 ms each; halfway through, one becomes 10x slower. Open-loop load
(a fixed rate of RPCs, each with a 250 ms deadline) through the mesh's aio channel with
`peak_ewma`, and through one grpcio channel over the four addresses with grpc's own
`round_robin` policy, run at the same time so both see the same machine. Figures are over the
RPCs started after the slowdown; the all-healthy p99 is each side's own before it. Target: the
mesh's p99 at most 1.5x the all-healthy p99, round_robin's not.

    python bench/grpc_overhead.py            # full run (about three minutes)
    python bench/grpc_overhead.py --quick    # smoke run
    python bench/grpc_overhead.py --plot-only    # the PNG again, from the JSON (needs matplotlib)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import _plots
import grpc
from _common import RESULTS, machine_info, median, percentile, table, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from meshlib import Mesh
from meshlib.rules import RuleSet, parse_documents
from tests.grpc import echo_pb2, echo_pb2_grpc

SERVICE = "echo"
SERVERS = 5  # 0: the overhead runs; 1-4: the balancing run
P50_BUDGET = 1.10
RPS_FLOOR = 0.90
LB_BUDGET = 1.5
SIDES = ("grpcio", "meshlib")
PING = echo_pb2.Ping(text="x")


# -- the servers (their own process) -------------------------------------------------------


def _serve(ports: Any, service_ms: Any, ready: Any) -> None:
    class Echo(echo_pb2_grpc.EchoServicer):
        def __init__(self, index: int) -> None:
            self.index = index

        async def Unary(self, request: Any, context: Any) -> Any:
            ms = service_ms[self.index]
            if ms > 0:
                await asyncio.sleep(ms / 1000)
            return echo_pb2.Pong(text=request.text, server=str(self.index))

    async def main() -> None:
        servers = []
        for i in range(SERVERS):
            server = grpc.aio.server()
            echo_pb2_grpc.add_EchoServicer_to_server(Echo(i), server)
            ports[i] = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


class Servers:
    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.ports = ctx.RawArray("i", SERVERS)
        self.service_ms = ctx.RawArray("d", SERVERS)
        ready = ctx.Event()
        self.process = ctx.Process(target=_serve, args=(self.ports, self.service_ms, ready), daemon=True)
        self.process.start()
        if not ready.wait(30):
            self.stop()
            raise RuntimeError("benchmark servers did not start")
        self.addresses = [f"127.0.0.1:{port}" for port in self.ports]

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(10)


def rules_for(addresses: list[str], balancer: str) -> RuleSet:
    """The endpoints (gRPC), a Destination naming the balancer, a route split 90/10 by weight
    between a subset and the whole service (both hold the same endpoints): the overhead runs
    pay for the whole route step."""
    endpoints = [
        {"address": a, "labels": {"version": "v1", "meshlib.io/protocol": "grpc"}} for a in addresses
    ]
    return parse_documents(
        [
            {"kind": "Endpoints", "service": SERVICE, "endpoints": endpoints},
            {
                "kind": "Destination",
                "service": SERVICE,
                "load_balancer": balancer,
                "subsets": {"v1": {"version": "v1"}},
            },
            {
                "kind": "Route",
                "service": SERVICE,
                "routes": [{"name": "split", "to": [{"subset": "v1", "weight": 90}, {"weight": 10}]}],
            },
        ],
        source="bench",
    )


# -- overhead ------------------------------------------------------------------------------


class Block:
    __slots__ = ("completed", "errors", "latencies", "wall")

    def __init__(self, latencies: list[int], completed: int, wall: float, errors: int) -> None:
        self.latencies, self.completed, self.wall, self.errors = latencies, completed, wall, errors


def _orders(blocks: int) -> list[tuple[str, ...]]:
    return [SIDES if i % 2 == 0 else SIDES[::-1] for i in range(blocks)]


def sync_block(call: Callable[[Any], Any], threads: int, seconds: float | None, count: int | None) -> Block:
    lat: list[int] = []
    done = [0, 0]
    left = [count if count is not None else sys.maxsize]
    window = [0.0, 0.0]
    start = threading.Barrier(threads)

    def worker() -> None:
        clock, now = time.perf_counter_ns, time.perf_counter
        if start.wait() == 0:
            window[0] = now()
            window[1] = window[0] + seconds if seconds is not None else float("inf")
        start.wait()
        end = window[1]
        while left[0] > 0 and now() < end:
            left[0] -= 1
            t = clock()
            try:
                call(PING)
                ok = True
            except grpc.RpcError:
                ok = False
            t1 = clock()
            lat.append(t1 - t)
            done[0] += t1 / 1e9 <= end
            done[1] += not ok

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = seconds if seconds is not None else time.perf_counter() - window[0]
    return Block(lat, done[0], wall, done[1])


async def async_block(
    call: Callable[[Any], Awaitable[Any]], workers: int, seconds: float | None, count: int | None
) -> Block:
    left = count if count is not None else sys.maxsize
    lat: list[int] = []
    completed = errors = 0
    t0 = time.perf_counter()
    end = t0 + seconds if seconds is not None else float("inf")

    async def worker() -> None:
        nonlocal left, completed, errors
        clock, now = time.perf_counter_ns, time.perf_counter
        while left > 0 and now() < end:
            left -= 1
            t = clock()
            try:
                await call(PING)
            except grpc.RpcError:
                errors += 1
            t1 = clock()
            lat.append(t1 - t)
            completed += t1 / 1e9 <= end

    await asyncio.gather(*(worker() for _ in range(workers)))
    wall = seconds if seconds is not None else time.perf_counter() - t0
    return Block(lat, completed, wall, errors)


def _plan(
    args: argparse.Namespace, concurrent: bool
) -> tuple[list[tuple[str, ...]], float | None, int | None]:
    if concurrent:
        return _orders(max(1, round(args.duration / args.block_seconds))), args.block_seconds, None
    return _orders(max(1, args.requests // args.block)), None, args.block


def overhead(mesh: Mesh, address: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    plain = grpc.insecure_channel(address)
    meshed = mesh.grpc_channel(SERVICE)
    calls = {
        "grpcio": echo_pb2_grpc.EchoStub(plain).Unary,
        "meshlib": echo_pb2_grpc.EchoStub(meshed).Unary,
    }
    for threads in (1, args.concurrency):
        for side in SIDES:
            sync_block(calls[side], threads, None, max(args.warmup, 2 * threads))
        out: dict[str, list[Block]] = {side: [] for side in SIDES}
        orders, seconds, count = _plan(args, threads > 1)
        gc.collect()
        for order in orders:
            for side in order:
                out[side].append(sync_block(calls[side], threads, seconds, count))
        kind = "sequential" if threads == 1 else f"{threads} threads"
        results.append(summarize(f"sync, {kind}", out))
    plain.close()
    meshed.close()

    async def aio() -> None:
        plain = grpc.aio.insecure_channel(address)
        meshed = mesh.grpc_aio_channel(SERVICE)
        calls = {
            "grpcio": echo_pb2_grpc.EchoStub(plain).Unary,
            "meshlib": echo_pb2_grpc.EchoStub(meshed).Unary,
        }
        for workers in (1, args.concurrency):
            for side in SIDES:
                await async_block(calls[side], workers, None, max(args.warmup, 2 * workers))
            out: dict[str, list[Block]] = {side: [] for side in SIDES}
            orders, seconds, count = _plan(args, workers > 1)
            gc.collect()
            for order in orders:
                for side in order:
                    out[side].append(await async_block(calls[side], workers, seconds, count))
            kind = "sequential" if workers == 1 else f"{workers} concurrent"
            results.append(summarize(f"aio, {kind}", out))
        await plain.close()
        await meshed.close()

    asyncio.run(aio())
    return results


def figures(blocks: list[Block]) -> dict[str, float]:
    lat = sorted(x for b in blocks for x in b.latencies)
    return {
        "requests": len(lat),
        "p50_us": percentile(lat, 0.50) / 1e3,
        "p99_us": percentile(lat, 0.99) / 1e3,
        "rps": sum(b.completed for b in blocks) / sum(b.wall for b in blocks),
        "errors": sum(b.errors for b in blocks),
    }


def summarize(title: str, blocks: dict[str, list[Block]]) -> dict[str, Any]:
    raw, mesh = figures(blocks["grpcio"]), figures(blocks["meshlib"])
    ratio = {k: mesh[k] / raw[k] for k in ("p50_us", "p99_us", "rps")}
    pairs = list(zip(blocks["grpcio"], blocks["meshlib"], strict=True))
    rps_pairs = sorted((m.completed / m.wall) / (r.completed / r.wall) for r, m in pairs)
    return {
        "title": title,
        "grpcio": raw,
        "meshlib": mesh,
        "ratio": ratio,
        "block_pair_rps_ratio_median": median(rps_pairs),
        "targets": {
            "p50_within_10pct": ratio["p50_us"] <= P50_BUDGET,
            "throughput_at_least_90pct": ratio["rps"] >= RPS_FLOOR,
        },
    }


# -- balancing -----------------------------------------------------------------------------


async def balancing(servers: Servers, args: argparse.Namespace) -> dict[str, Any]:
    addresses = servers.addresses[1:]
    for i in range(1, SERVERS):
        servers.service_ms[i] = args.service_ms
    mesh = Mesh(service="bench-client")
    mesh.apply_rules(rules_for(addresses, "peak_ewma"), "bench")
    meshed = mesh.grpc_aio_channel(SERVICE)
    target = "ipv4:" + ",".join(addresses)
    plain = grpc.aio.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])
    calls = {"meshlib peak_ewma": echo_pb2_grpc.EchoStub(meshed).Unary}
    calls["grpcio round_robin"] = echo_pb2_grpc.EchoStub(plain).Unary
    samples: dict[str, list[tuple[float, float, bool]]] = {name: [] for name in calls}
    to_slow: dict[str, list[float]] = {name: [] for name in calls}  # start times of the slow one's answers
    deadline = args.deadline_ms / 1000

    async def one(name: str, started: float) -> None:
        ok = True
        try:
            pong = await calls[name](PING, timeout=deadline)
            if pong.server == "1":
                to_slow[name].append(started)
        except grpc.RpcError:
            ok = False
        samples[name].append((started, time.perf_counter() - started, ok))

    for name in calls:  # warm: every side has its connections
        await asyncio.gather(*(one(name, time.perf_counter()) for _ in range(20)))
        samples[name].clear()
        to_slow[name].clear()
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter()
    half = t0 + args.seconds / 2
    interval = 1 / args.rate
    slowed = False
    n = 0
    while (now := time.perf_counter()) < t0 + args.seconds:
        if not slowed and now >= half:
            servers.service_ms[1] = args.service_ms * 10
            slowed = True
        for name in calls:
            task = asyncio.create_task(one(name, now))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        n += 1
        await asyncio.sleep(max(0.0, t0 + n * interval - time.perf_counter()))
    await asyncio.gather(*tasks)
    await plain.close()
    await meshed.close()
    stalls = mesh.loads.stalls.count  # common stalls peak_ewma took out of the answers (meshlib.stalls)
    mesh.close()
    out: dict[str, Any] = {}
    seconds = int(args.seconds)
    for name, rows in samples.items():
        windows: list[list[float]] = [[] for _ in range(seconds)]
        for start, lat, _ in rows:
            k = int(start - t0)
            if 0 <= k < seconds:
                windows[k].append(lat)
        by_second = [percentile(sorted(w), 0.99) * 1e3 if w else None for w in windows]
        before = sorted(lat for start, lat, ok in rows if start < half)
        after_rows = [(lat, ok) for start, lat, ok in rows if start >= half + 1.0]  # after the switch
        after = sorted(lat for lat, _ in after_rows)
        healthy_p99 = percentile(before, 0.99)
        out[name] = {
            "healthy_p99_ms": healthy_p99 * 1e3,
            "slow_p50_ms": percentile(after, 0.5) * 1e3,
            "slow_p99_ms": percentile(after, 0.99) * 1e3,
            "p99_ratio": percentile(after, 0.99) / healthy_p99,
            "success": sum(ok for _, ok in after_rows) / max(1, len(after_rows)),
            "rpcs": len(after_rows),
            "to_slow": sum(start >= half + 1.0 for start in to_slow[name]) / max(1, len(after_rows)),
            "to_slow_by_second": [sum(int(t - t0) == k for t in to_slow[name]) for k in range(seconds)],
            "p99_ms_by_second": by_second,  # of the RPCs started in each second of the run
        }
    out["slowdown_at_s"] = half - t0
    out["common_stalls"] = stalls
    out["targets"] = {
        "mesh_p99_within_1_5x": out["meshlib peak_ewma"]["p99_ratio"] <= LB_BUDGET,
        "round_robin_not": out["grpcio round_robin"]["p99_ratio"] > LB_BUDGET,
    }
    return out


def _shown(path: Path) -> str:
    """A path as the JSON records it: from the repository's root when it lies inside it."""
    root = Path(__file__).resolve().parent.parent
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def plot(lb: dict[str, Any], args: dict[str, Any], path: Path) -> bool:
    """p99 of each second of the balancing run, per balancer, with the slowdown marked and each
    side's all-healthy p99 x 1.5 (the target) dotted; False without matplotlib."""
    made = _plots.figure()
    if made is None:
        return False
    fig, (ax,) = made
    names = [name for name in lb if name not in ("targets", "slowdown_at_s", "common_stalls")]
    series = {}
    for name in names:
        by_second = lb[name]["p99_ms_by_second"]
        points = [(k, v) for k, v in enumerate(by_second) if v is not None]
        if points:  # each second's value held to its end
            points.append((len(by_second), points[-1][1]))
        f = lb[name]
        label = (
            f"{name}: p99 {f['healthy_p99_ms']:.1f} ms healthy, "
            f"{f['slow_p99_ms']:.1f} ms after (x{f['p99_ratio']:.2f})"
        )
        series[label] = ([x for x, _ in points], [y for _, y in points])
    _plots.curves(
        ax,
        series,
        xlabel="seconds into the run (RPCs started in each second)",
        ylabel="p99 latency, ms (log)",
        step=True,
        log_y=True,
        legend=False,
    )
    for name, line in zip(names, ax.get_lines(), strict=False):
        ax.axhline(lb[name]["healthy_p99_ms"] * LB_BUDGET, color=line.get_color(), linestyle=":", linewidth=1)
    ax.axvline(lb["slowdown_at_s"], color="grey", linestyle="--", label="one server 10x slower")
    ax.set_title(
        f"gRPC, four servers at {args['service_ms']:g} ms, one 10x slower halfway; "
        f"{args['rate']:g} RPC/s per side, deadline {args['deadline_ms']:g} ms "
        f"(dotted: 1.5 x each side's all-healthy p99)"
    )
    ax.legend(fontsize=_plots.LEGEND_SIZE, loc="upper left")
    return _plots.save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--requests", type=int, default=4000, help="sequential RPCs per side")
    parser.add_argument("--block", type=int, default=200, help="sequential RPCs per block")
    parser.add_argument("--duration", type=float, default=24.0, help="seconds per concurrent scenario")
    parser.add_argument("--block-seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=40.0, help="balancing run length")
    parser.add_argument("--rate", type=float, default=200.0, help="balancing RPCs per second per side")
    parser.add_argument("--service-ms", type=float, default=2.0)
    parser.add_argument("--deadline-ms", type=float, default=250.0)
    parser.add_argument("--json", type=Path, default=RESULTS / "grpc_overhead.json")
    parser.add_argument("--png", type=Path, default=RESULTS / "grpc_overhead.png")
    parser.add_argument("--plot-only", action="store_true", help="the PNG from the JSON, no run")
    parser.add_argument("--balancing-only", action="store_true", help="the balancing run alone")
    args = parser.parse_args()
    if args.plot_only:
        data = json.loads(args.json.read_text())
        print("wrote" if plot(data["balancing"], data["args"], args.png) else "no matplotlib: no", args.png)
        return
    if args.quick:
        args.requests, args.block, args.duration, args.block_seconds = 400, 100, 4.0, 1.0
        args.warmup, args.seconds = 50, 8.0
    servers = Servers()
    try:
        scenarios: list[dict[str, Any]] = []
        if not args.balancing_only:
            mesh = Mesh(service="bench-client")
            mesh.apply_rules(rules_for(servers.addresses[:1], "round_robin"), "bench")
            try:
                scenarios = overhead(mesh, servers.addresses[0], args)
            finally:
                mesh.close()
        lb = asyncio.run(balancing(servers, args))
    finally:
        servers.stop()
    rows = [
        [
            s["title"],
            f"{s['grpcio']['p50_us']:.0f}",
            f"{s['meshlib']['p50_us']:.0f}",
            f"x{s['ratio']['p50_us']:.2f}",
            f"{s['grpcio']['rps']:.0f}",
            f"{s['meshlib']['rps']:.0f}",
            f"x{s['ratio']['rps']:.2f}",
            "yes" if all(s["targets"].values()) else "NO",
        ]
        for s in scenarios
    ]
    print("unary RPC, one server: plain grpcio channel against the mesh's channel (same run)")
    print(
        table(
            ["scenario", "grpcio p50 us", "mesh p50 us", "p50", "grpcio rps", "mesh rps", "rps", "met"], rows
        )
    )
    print()
    print(
        f"four servers, one 10x slower halfway ({args.rate:.0f} RPC/s each side, "
        f"{args.deadline_ms:.0f} ms deadline)"
    )
    lb_rows = [
        [
            name,
            f"{f['healthy_p99_ms']:.1f}",
            f"{f['slow_p50_ms']:.1f}",
            f"{f['slow_p99_ms']:.1f}",
            f"x{f['p99_ratio']:.2f}",
            f"{f['success'] * 100:.2f}%",
            f"{f['to_slow'] * 100:.1f}%",
        ]
        for name, f in lb.items()
        if name not in ("targets", "slowdown_at_s", "common_stalls")
    ]
    print(
        table(
            [
                "balancer",
                "healthy p99 ms",
                "slow p50 ms",
                "slow p99 ms",
                "p99 / healthy",
                "success",
                "to slow",
            ],
            lb_rows,
        )
    )
    print("common stalls taken out of peak_ewma's answers:", lb["common_stalls"])
    print("targets:", lb["targets"])
    write_json(
        args.json,
        {
            "machine": machine_info(),
            "args": vars(args) | {"json": _shown(args.json), "png": _shown(args.png)},
            "overhead": scenarios,
            "balancing": lb,
        },
    )
    print(f"\nwrote {args.json}")
    if plot(lb, vars(args), args.png):
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
