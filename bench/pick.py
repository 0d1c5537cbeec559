"""Per-request decision cost, without IO: route match, subset choice, balancer pick, whole stack.

A Snapshot is built from rules (`meshlib.rules.parse_documents`) for one service per balancer,
each with 100 endpoints (90 labelled v1, 10 labelled v2) and the same Route:

    rule 0  header x-canary: exact "true"        -> subset v2
    rule 1  GET, path prefix /api                 -> v1 90% / v2 10%
    (none)  anything else                         -> default route, every endpoint

and the real code is timed: `plan.routes.match(...)`, `route.choose(u)`, `plan.hash_key(...)`,
`plan.balancer(subset).pick(key)`, and all of these together as `RouteFilter` and `PickFilter`
do them. Then the client stack without a socket: the Call is made by `MeshTransport` itself and
`mesh.stack.build(terminal)` runs with a terminal that returns a canned `httpx.Response`;
and, for the whole per-request cost, `MeshTransport.handle_request` and `httpx.Client.get` over
a canned inner transport, each next to the same call without the mesh.

Figures are nanoseconds per operation (microseconds in the table), the median of several
repeats of a timed loop; the loop's own cost (~30-60 ns) is included.

    python bench/pick.py              # full run (about a minute)
    python bench/pick.py --quick      # smoke run
    python bench/pick.py --discovered # the endpoints arrive through discovery, not the rules
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from itertools import repeat
from pathlib import Path
from typing import Any

import httpx
from _common import RESULTS, machine_info, median, table, write_json

from meshlib import Mesh, balancing
from meshlib.http.transport import MeshTransport
from meshlib.pipeline import Call
from meshlib.rules import EndpointSpec, RuleSet, parse_documents

BALANCERS = tuple(balancing.BALANCERS)  # every registered balancer
ENDPOINTS = 100
TARGET_US = 10.0  # route match + pick
SOURCE = "bench-client"


def service_name(balancer: str) -> str:
    return balancer.replace("_", "-")


def endpoint_list(endpoints: int = ENDPOINTS) -> list[dict[str, Any]]:
    return [
        {
            "address": f"10.0.{i // 250}.{i % 250 + 1}:8080",
            "labels": {"version": "v2" if i % 10 == 9 else "v1"},
        }
        for i in range(endpoints)
    ]


def rules(
    balancers: tuple[str, ...] = BALANCERS, endpoints: int = ENDPOINTS, *, listed: bool = True
) -> RuleSet:
    """`listed=False` leaves the endpoints out of the rules (`discovered()` gives them)."""
    docs: list[dict[str, Any]] = []
    for name in balancers:
        service = service_name(name)
        eps = endpoint_list(endpoints)
        destination: dict[str, Any] = {
            "kind": "Destination",
            "service": service,
            "load_balancer": name,
            "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        }
        if name == "ring_hash":
            destination["hash_on"] = "header:x-user"
        if listed:
            docs.append({"kind": "Endpoints", "service": service, "endpoints": eps})
        docs += [
            destination,
            {
                "kind": "Route",
                "service": service,
                "routes": [
                    {
                        "name": "canary",
                        "match": {"headers": {"x-canary": {"exact": "true"}}},
                        "to": [{"subset": "v2"}],
                    },
                    {
                        "name": "api",
                        "match": {"methods": ["GET"], "path": {"prefix": "/api"}},
                        "to": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}],
                    },
                ],
            },
        ]
    return parse_documents(docs, source="bench")


def discovered(balancers: tuple[str, ...] = BALANCERS, endpoints: int = ENDPOINTS) -> dict[str, Any]:
    """The same endpoints as a discovery provider hands them to the Snapshot."""
    specs = [EndpointSpec(**e) for e in endpoint_list(endpoints)]
    return {service_name(name): specs for name in balancers}


# Requests as the transport sees them: (label, method, path, extra headers).
REQUESTS = (
    ("canary", "GET", "/api/items/42", {"x-canary": "true"}),
    ("api", "GET", "/api/items/42", {}),
    ("default", "POST", "/orders", {}),
)


def request_headers(client: httpx.Client, service: str, extra: dict[str, str]) -> httpx.Headers:
    """Headers as httpx builds them for a request, plus the source header the transport adds."""
    req = client.build_request("GET", f"http://{service}/", headers={"x-user": "user-1234", **extra})
    req.headers["x-mesh-source"] = SOURCE
    return req.headers


# -- timing --------------------------------------------------------------------------------


class Timer:
    def __init__(self, repeats: int, budget: float) -> None:
        self.repeats = repeats
        self.budget = budget  # seconds per repeat, roughly

    def per_op(self, fn: Callable[[], object]) -> dict[str, float]:
        """ns per call of `fn`: median and best of the repeats."""
        n = 1
        while True:  # calibrate: how many calls fill a tenth of the budget
            t = self._loop(fn, n)
            if t > self.budget / 10 or n >= 1 << 24:
                break
            n *= 4
        number = max(1, int(n * self.budget / max(t, 1e-9)))
        runs = [self._loop(fn, number) / number * 1e9 for _ in range(self.repeats)]
        return {"median_ns": median(runs), "min_ns": min(runs), "number": number}

    @staticmethod
    def _loop(fn: Callable[[], object], n: int) -> float:
        gc.collect()
        t0 = time.perf_counter()
        for _ in repeat(None, n):
            fn()
        return time.perf_counter() - t0


# -- route match and pick ------------------------------------------------------------------


def decide(plan: Any, method: str, path: str, headers: Any, rand: Callable[[], float], wire: Any) -> Any:
    """What RouteFilter.enter and PickFilter.enter decide, without the Call."""
    if plan.routes.reads_headers or plan.hashed:
        headers = wire.header_view(headers)
    route = plan.routes.match(method, path, headers, SOURCE)
    subset = route.choose(rand()) if route.split else route.only
    key = plan.hash_key(headers, SOURCE) if plan.hashed else None
    return plan.balancer(subset).pick(key)


def bench_decisions(mesh: Mesh, timer: Timer, client: httpx.Client) -> dict[str, Any]:
    snapshot = mesh.snapshot
    rng = random.Random(7)
    out: dict[str, Any] = {"match": {}, "choose": {}, "balancers": {}}

    plan0 = snapshot.plans[service_name(BALANCERS[0])]
    for label, method, path, extra in REQUESTS:
        headers = request_headers(client, plan0.name, extra)
        route = plan0.routes.match(method, path, headers, SOURCE)
        out["match"][label] = {
            "route": route.name,
            **timer.per_op(partial(plan0.routes.match, method, path, headers, SOURCE)),
        }
    api = plan0.routes.match("GET", "/api/x", request_headers(client, plan0.name, {}), SOURCE)
    out["choose"]["weighted 90/10"] = timer.per_op(lambda: api.choose(rng.random()))
    out["choose"]["single target"] = timer.per_op(lambda: plan0.routes.default.choose(rng.random()))
    out["choose"]["rng.random()"] = timer.per_op(rng.random)

    for name in BALANCERS:
        plan = snapshot.plans[service_name(name)]
        headers = request_headers(client, plan.name, {})
        key = plan.hash_key(headers, SOURCE)
        figures: dict[str, Any] = {}
        for subset in ("v1", None):
            balancer = plan.balancer(subset)
            label = f"pick {subset or 'all'} ({len(balancer.endpoints)})"
            figures[label] = timer.per_op(partial(balancer.pick, key))
        figures["hash_key"] = timer.per_op(partial(plan.hash_key, headers, SOURCE))
        for label, method, path, extra in REQUESTS:
            h = request_headers(client, plan.name, extra)
            figures[f"route+pick {label}"] = timer.per_op(
                partial(decide, plan, method, path, h, rng.random, mesh.http_wire)
            )
        out["balancers"][name] = figures
    return out


# -- the client stack without IO -----------------------------------------------------------


class _SyncBody(httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        yield b"ok"


class _AsyncBody(httpx.AsyncByteStream):
    async def __aiter__(self) -> Any:
        yield b"ok"


_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"2")]


class Canned(httpx.BaseTransport):
    """An inner transport that answers every request at once, without a socket."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=_HEADERS, stream=_SyncBody())


class AsyncCanned(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=_HEADERS, stream=_AsyncBody())


def _calls(mesh: Mesh, requests: list[httpx.Request]) -> list[Call]:
    """Calls made by MeshTransport's own `handle_request`, caught before the stack runs them."""
    caught: list[Call] = []
    transport = MeshTransport(mesh, Canned())
    transport._service = caught.append  # type: ignore[method-assign,assignment]
    for r in requests:
        transport.handle_request(r)
    return caught


def bench_stack(mesh: Mesh, timer: Timer, client: httpx.Client, service: str, batch: int) -> dict[str, Any]:
    """Every figure here is measured in the same repeats, in rotating order, so drift in the
    machine's speed hits the with- and without-mesh figures alike."""
    url = f"http://{service}/api/items/42"
    raw_url = "http://10.0.0.1:8080/api/items/42"

    def requests(n: int) -> list[httpx.Request]:
        return [client.build_request("GET", url) for _ in range(n)]

    def calls(n: int) -> list[Call]:
        return _calls(mesh, requests(n))

    canned = Canned()

    def terminal(call: Call) -> httpx.Response:
        return canned.handle_request(call.request)

    service_fn = mesh.stack.build(terminal)
    mesh_transport = MeshTransport(mesh, canned)
    raw_client = httpx.Client(transport=Canned())
    mesh_client = mesh.sync_client(transport=Canned())
    runner = asyncio.Runner()
    raw_async = httpx.AsyncClient(transport=AsyncCanned())
    mesh_async = mesh.client(transport=AsyncCanned())

    def prepared(make: Callable[[int], list[Any]], run: Callable[[Any], object]) -> Callable[[], tuple]:
        def job() -> tuple[float, int]:
            spent, count = 0.0, 0
            deadline = time.perf_counter() + timer.budget
            while time.perf_counter() < deadline:
                items = make(batch)
                t0 = time.perf_counter()
                for item in items:
                    run(item)
                spent += time.perf_counter() - t0
                count += len(items)
            return spent, count

        return job

    def repeated(fn: Callable[[], object]) -> Callable[[], tuple]:
        def job() -> tuple[float, int]:
            count = 0
            t0 = time.perf_counter()
            deadline = t0 + timer.budget
            while time.perf_counter() < deadline:
                for _ in repeat(None, 100):
                    fn()
                count += 100
            return time.perf_counter() - t0, count

        return job

    def arepeated(get: Callable[[str], Any], u: str) -> Callable[[], tuple]:
        async def loop() -> tuple[float, int]:
            count = 0
            t0 = time.perf_counter()
            deadline = t0 + timer.budget
            while time.perf_counter() < deadline:
                for _ in repeat(None, 100):
                    await get(u)
                count += 100
            return time.perf_counter() - t0, count

        return lambda: runner.run(loop())

    jobs: dict[str, Callable[[], tuple[float, int]]] = {
        "make Call (transport)": _make_call_job(mesh, requests, timer, batch),
        "terminal alone": prepared(calls, lambda c: terminal(c).close()),
        "stack + terminal": prepared(calls, lambda c: service_fn(c).close()),
        "inner transport alone": prepared(requests, lambda r: canned.handle_request(r).close()),
        "MeshTransport.handle_request": prepared(
            requests, lambda r: mesh_transport.handle_request(r).close()
        ),
        "httpx.Client.get, no mesh": repeated(partial(raw_client.get, raw_url)),
        "httpx.Client.get, mesh": repeated(partial(mesh_client.get, url)),
        "httpx.AsyncClient.get, no mesh": arepeated(raw_async.get, raw_url),
        "httpx.AsyncClient.get, mesh": arepeated(mesh_async.get, url),
    }
    runs: dict[str, list[float]] = {name: [] for name in jobs}
    names = list(jobs)
    try:
        for name in names:  # warm-up
            jobs[name]()
        for i in range(timer.repeats):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                gc.collect()
                spent, count = jobs[name]()
                runs[name].append(spent / count * 1e9)
    finally:
        raw_client.close()
        mesh_client.close()
        runner.run(raw_async.aclose())
        runner.run(mesh_async.aclose())
        runner.close()
    return {name: {"median_ns": median(r), "min_ns": min(r), "repeats": len(r)} for name, r in runs.items()}


def _make_call_job(
    mesh: Mesh, requests: Callable[[int], list[httpx.Request]], timer: Timer, batch: int
) -> Callable[[], tuple[float, int]]:
    def job() -> tuple[float, int]:
        spent, count = 0.0, 0
        deadline = time.perf_counter() + timer.budget
        while time.perf_counter() < deadline:
            items = requests(batch)
            t0 = time.perf_counter()
            _calls(mesh, items)
            spent += time.perf_counter() - t0
            count += len(items)
        return spent, count

    return job


# -- report --------------------------------------------------------------------------------


def us(f: dict[str, float]) -> str:
    return f"{f['median_ns'] / 1e3:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per figure (median reported)")
    parser.add_argument("--budget", type=float, default=0.2, help="seconds per repeat, roughly")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--json", type=Path, default=RESULTS / "pick.json", help="where to write results")
    parser.add_argument(
        "--discovered",
        action="store_true",
        help="the endpoints come from discovery (Snapshot.with_discovered, as the runner swaps them in)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.budget = 3, 0.02
    timer = Timer(args.repeats, args.budget)

    info = machine_info()
    print(
        f"python {info['python']} on {info['cpu_count']} CPUs ({info['cpu_model']}), "
        f"load {info['load_average']}"
    )
    started = time.perf_counter()
    mesh = Mesh(service=SOURCE)
    mesh.apply_rules(rules(listed=not args.discovered), "bench")
    if args.discovered:
        mesh.update(lambda cur: cur.with_discovered(discovered(), cur.version))
    client = httpx.Client()
    try:
        decisions = bench_decisions(mesh, timer, client)
        stack = bench_stack(mesh, timer, client, service_name("round_robin"), batch=500)
    finally:
        client.close()
        mesh.close()
    elapsed = time.perf_counter() - started

    print("\nroute match (RouteTable.match), 3 rules, httpx.Headers")
    print(
        table(
            ["request", "matches", "us"],
            [[label, f["route"], us(f)] for label, f in decisions["match"].items()],
        )
    )
    print("\nsubset choice (CompiledRoute.choose)")
    print(table(["case", "us"], [[label, us(f)] for label, f in decisions["choose"].items()]))

    print(f"\nbalancer pick and route match + pick, {ENDPOINTS} endpoints (us per request)")
    names = list(next(iter(decisions["balancers"].values())))
    rows = [[name] + [us(decisions["balancers"][name][k]) for k in names] for name in BALANCERS]
    print(table(["balancer", *names], rows))

    combined = [
        (name, k, f)
        for name, b in decisions["balancers"].items()
        for k, f in b.items()
        if k.startswith("route+")
    ]
    worst_name, worst_case, worst_f = max(combined, key=lambda item: item[2]["median_ns"])
    worst = worst_f["median_ns"]
    worst_best = max(f["min_ns"] for _, _, f in combined)
    ok = worst / 1e3 < TARGET_US
    print(
        f"\ntarget: route match + pick under {TARGET_US:.0f} us: worst median {worst / 1e3:.2f} us "
        f"({worst_name}, {worst_case.removeprefix('route+pick ')}), worst best-of-repeats "
        f"{worst_best / 1e3:.2f} us -> {'PASS' if ok else 'FAIL'}"
    )

    print("\nclient path without IO (round_robin service, GET /api/..., us per request)")
    print(
        table(
            ["what", "median us", "best us"],
            [[label, us(f), f"{f['min_ns'] / 1e3:.2f}"] for label, f in stack.items()],
        )
    )
    net_stack = stack["stack + terminal"]["median_ns"] - stack["terminal alone"]["median_ns"]
    net_transport = (
        stack["MeshTransport.handle_request"]["median_ns"] - stack["inner transport alone"]["median_ns"]
    )
    net_sync = stack["httpx.Client.get, mesh"]["median_ns"] - stack["httpx.Client.get, no mesh"]["median_ns"]
    net_async = (
        stack["httpx.AsyncClient.get, mesh"]["median_ns"]
        - stack["httpx.AsyncClient.get, no mesh"]["median_ns"]
    )
    print(
        f"\nmesh cost per request: stack {net_stack / 1e3:.1f} us; transport (Call, stack, URL rewrite) "
        f"{net_transport / 1e3:.1f} us; sync client {net_sync / 1e3:.1f} us; "
        f"async client {net_async / 1e3:.1f} us"
    )
    print(f"({args.repeats} repeats of ~{args.budget:g} s each, medians; {elapsed:.0f} s)")

    write_json(
        args.json,
        {
            "benchmark": "pick",
            "machine": info,
            "config": {
                "endpoints": ENDPOINTS,
                "repeats": args.repeats,
                "budget_s": args.budget,
                "quick": args.quick,
                "endpoints_from": "discovery" if args.discovered else "rules",
                "target_us": TARGET_US,
                "elapsed_s": round(elapsed, 1),
            },
            "decisions": decisions,
            "stack": stack,
            "net_ns": {
                "stack": net_stack,
                "transport": net_transport,
                "sync_client": net_sync,
                "async_client": net_async,
            },
            "target": {
                "worst_route_and_pick_us": worst / 1e3,
                "worst_case": [worst_name, worst_case],
                "worst_best_of_repeats_us": worst_best / 1e3,
                "pass": ok,
            },
        },
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
