"""Overload: a server with a known capacity offered up to twice it, with and without adaptive
concurrency.

The server is uvicorn in a child process running an app that does `--capacity` requests at a
time, `--service-ms` each (an asyncio semaphore: the others wait their turn, as a worker pool's
queue makes them), behind the ASGI middleware of a Mesh. Its capacity is `capacity /
service time` requests a second. The load is the open loop of `bench/load_balancing.py`
(requests start at a fixed rate, whatever the answers do) stepping through 0.25x (the unloaded
reference), 0.5x, 1x, 1.5x and 2x the capacity, each step `--step` seconds, against one server
that keeps its state from step to step. Scenarios:

- `none`: no limit. Past 1x the queue grows by the excess every second, and so does latency.
- `server`: a ConcurrencyLimit document (`--algorithm`, gradient by default, its interval at
  five service times); the excess is answered 503 at once.
- `client`: the client's Destination has `adaptive_concurrency` instead; the excess fails fast
  in the client with ConcurrencyLimitedError and never reaches the server.

Per step, over its second half (the limit has had time to move): admitted requests' p50 and
p99, goodput (answers 200 a second) against the capacity, refusals a second; and the limit
over the whole run (sampled every 100 ms, in the server's process or the client's). Targets at
2x: admitted p99 within 2x the unloaded p99, goodput at least 90% of capacity.

    python bench/overload.py               # full run (~2 minutes)
    python bench/overload.py --quick       # smoke run (~50 s)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _plots
from _common import RESULTS, machine_info, percentile, table, write_json
from load_balancing import LIMITS, Outcome, open_loop

from meshlib import Mesh
from meshlib.rules import load_yaml

STEPS = (0.25, 0.5, 1.0, 1.5, 2.0)
SAMPLE_S = 0.1
TARGET_P99 = 2.0  # admitted p99 at 2x, in multiples of the unloaded p99
TARGET_GOODPUT = 0.9  # goodput at 2x, as a share of the capacity


def limit_rules(args: argparse.Namespace, kind: str) -> str:
    """The algorithm's options, as a ConcurrencyLimit document or a Destination field."""
    interval_ms = 5 * args.service_ms
    options = {
        "gradient": f"gradient: {{interval: {interval_ms}ms, min_rtt: {{requests: 25, concurrency: 4}}}}",
        "gradient2": f"gradient2: {{window: {interval_ms}ms}}",
        "vegas": "vegas: {}",
    }[args.algorithm]
    body = f"algorithm: {args.algorithm}\nmin_limit: 2\nmax_limit: 1000\n{options}\n"
    if kind == "server":
        return f"kind: ConcurrencyLimit\nservice: orders\n{body}"
    return "adaptive_concurrency:\n" + "".join(f"  {line}\n" for line in body.splitlines())


# -- the server, in a child process ----------------------------------------------------------


def _serve(queue: Any, capacity: int, service_s: float, rules: str, limit: Any) -> None:
    import uvicorn

    from meshlib.asgi import MeshMiddleware

    mesh = Mesh("orders")
    if rules:
        mesh.apply_rules(load_yaml(rules, source="orders.yaml"), "1")
    slots: list[asyncio.Semaphore] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if not slots:
            slots.append(asyncio.Semaphore(capacity))
        async with slots[0]:
            await asyncio.sleep(service_s)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    def watch() -> None:  # the current limit, for the parent to sample
        while True:
            found = mesh.resilience.concurrency_limits()
            limit.value = found[0][2].current if found else 0
            time.sleep(SAMPLE_S / 2)

    threading.Thread(target=watch, daemon=True).start()
    config = uvicorn.Config(MeshMiddleware(app, mesh=mesh), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        queue.put(server.servers[0].sockets[0].getsockname()[1])
        await task

    asyncio.run(main())


class Server:
    def __init__(self, capacity: int, service_s: float, rules: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.limit = ctx.Value("i", 0, lock=False)
        queue = ctx.Queue()
        self.process = ctx.Process(
            target=_serve, args=(queue, capacity, service_s, rules, self.limit), daemon=True
        )
        self.process.start()
        self.address = f"127.0.0.1:{queue.get(timeout=30)}"

    def close(self) -> None:
        self.process.terminate()
        self.process.join(5)


# -- a run -------------------------------------------------------------------------------------


def step_figures(outcomes: list[Outcome], seconds: float, capacity_rps: float) -> dict[str, Any]:
    """Over the second half of a step: latencies of the requests sent then, and answers a second
    (goodput: answers 200 that came back in that half, whenever they were sent)."""
    late = [o for o in outcomes if o.due >= seconds / 2]
    ok = sorted(o.latency for o in late if o.ok)
    span = seconds / 2
    done = sum(1 for o in outcomes if o.ok and span <= o.due + o.lag + o.latency < seconds)
    refused = sum(1 for o in late if o.status == 503 or o.error == "ConcurrencyLimitedError")
    return {
        "requests": len(late),
        "admitted_p50_ms": percentile(ok, 0.5) * 1e3 if ok else None,
        "admitted_p99_ms": percentile(ok, 0.99) * 1e3 if ok else None,
        "goodput_rps": done / span,
        "goodput_share": done / span / capacity_rps,
        "refused_rps": refused / span,
        "other_failures": len(late) - len(ok) - refused,
    }


def run(scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    capacity_rps = args.capacity / (args.service_ms / 1000)
    server = Server(
        args.capacity, args.service_ms / 1000, limit_rules(args, "server") if scenario == "server" else ""
    )
    limits: list[tuple[float, int]] = []
    try:
        destination = limit_rules(args, "client") if scenario == "client" else ""
        rules = load_yaml(
            f"kind: Endpoints\nservice: orders\nendpoints: [{{address: '{server.address}'}}]\n---\n"
            f"kind: Destination\nservice: orders\n{destination}",
            source="load.yaml",
        )

        async def main() -> list[dict[str, Any]]:
            steps = []
            mesh = Mesh("load")
            mesh.apply_rules(rules, "1")
            async with mesh, mesh.client(limits=LIMITS, timeout=30) as client:
                sampler_on = True

                def current() -> int:
                    if scenario == "client":
                        found = mesh.resilience.concurrency_limits()
                        return found[0][2].current if found else 0
                    return int(server.limit.value)

                async def sample() -> None:
                    t0 = time.monotonic()
                    while sampler_on:
                        limits.append((time.monotonic() - t0, current()))
                        await asyncio.sleep(SAMPLE_S)

                sampler = asyncio.create_task(sample())
                send: Callable[[], Any] = lambda: client.get("http://orders/")  # noqa: E731
                for factor in STEPS:
                    rate = factor * capacity_rps
                    outcomes = await open_loop(send, rate, args.step, max_in_flight=5000, drain=15)
                    figures = step_figures(outcomes, args.step, capacity_rps)
                    steps.append({"load": factor, "rate": rate, **figures})
                    print(f"  {scenario}: {factor}x done, limit {current()}", file=sys.stderr)
                sampler_on = False
                await sampler
            return steps

        steps = asyncio.run(main())
    finally:
        server.close()
    return {"steps": steps, "limit": limits if scenario != "none" else []}


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    steps = result["steps"]
    unloaded, top = steps[0], steps[-1]
    p99_ratio = (top["admitted_p99_ms"] or float("inf")) / unloaded["admitted_p99_ms"]
    return {
        "p99_vs_unloaded": p99_ratio,
        "goodput_share": top["goodput_share"],
        "meets_targets": p99_ratio <= TARGET_P99 and top["goodput_share"] >= TARGET_GOODPUT,
    }


def plot(results: dict[str, dict[str, Any]], args: argparse.Namespace, path: Path) -> bool:
    made = _plots.figure(1, 2, size=(13.0, 5.0))
    if made is None:
        return False
    fig, (left, right) = made
    _plots.curves(
        left,
        {
            name: ([s["load"] for s in r["steps"]], [s["admitted_p99_ms"] or 0 for s in r["steps"]])
            for name, r in results.items()
        },
        title="admitted p99 by offered load",
        xlabel="offered load (x capacity)",
        ylabel="p99 of answers 200 (ms)",
        log_y=True,
    )
    _plots.curves(
        right,
        {
            name: ([t for t, _ in r["limit"]], [n for _, n in r["limit"]])
            for name, r in results.items()
            if r["limit"]
        },
        title=f"the limit over time (capacity {args.capacity}; steps of {args.step:g} s)",
        xlabel="s",
        ylabel="concurrency limit",
        step=True,
    )
    _plots.suptitle(fig, f"Overload: {args.algorithm}, {args.capacity} x {args.service_ms:g} ms")
    return _plots.save(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capacity", type=int, default=8, help="requests the server does at a time")
    parser.add_argument("--service-ms", type=float, default=100.0, help="time each request takes")
    parser.add_argument("--step", type=float, default=10.0, help="seconds per load step")
    parser.add_argument("--algorithm", choices=("gradient", "gradient2", "vegas"), default="gradient")
    parser.add_argument("--scenarios", default="none,server,client")
    parser.add_argument("--quick", action="store_true", help="short steps, for a smoke test")
    parser.add_argument("--output", type=Path, default=RESULTS / "overload.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.step = min(args.step, 2.0)
        if args.output == RESULTS / "overload.json":
            args.output = RESULTS / "overload_quick.json"
    results = {name: run(name, args) for name in args.scenarios.split(",")}
    rows = []
    for name, result in results.items():
        for s in result["steps"]:
            rows.append(
                [
                    name,
                    f"{s['load']:g}x",
                    f"{s['admitted_p50_ms']:.0f}" if s["admitted_p50_ms"] else "-",
                    f"{s['admitted_p99_ms']:.0f}" if s["admitted_p99_ms"] else "-",
                    f"{s['goodput_rps']:.0f} ({s['goodput_share']:.0%})",
                    f"{s['refused_rps']:.0f}",
                    s["other_failures"],
                ]
            )
        result["verdict"] = verdict(result)
    print(table(["scenario", "load", "p50 ms", "p99 ms", "goodput/s", "refused/s", "other"], rows))
    for name, result in results.items():
        v = result["verdict"]
        print(
            f"{name}: at 2x, admitted p99 {v['p99_vs_unloaded']:.2f}x unloaded (target <= {TARGET_P99:g}), "
            f"goodput {v['goodput_share']:.0%} of capacity (target >= {TARGET_GOODPUT:.0%})"
        )
    write_json(
        args.output,
        {
            "machine": machine_info(),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "capacity_rps": args.capacity / (args.service_ms / 1000),
            "results": results,
        },
    )
    if plot(results, args, args.output.with_suffix(".png")):
        print(f"plot: {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
