"""Where the mesh's time goes per request: the client path profiled without IO.

The same requests run through a plain httpx client and a meshlib client, both over an inner
transport that answers at once (no socket), timed in alternation: the difference is what the
mesh adds. The meshlib client is then run under cProfile, and every meshlib function is charged
with its own time plus the time of the non-meshlib code it calls directly (httpx URL parsing,
header access, the standard library), but not the inner transport's or its body's (the plain
client pays those too). The shares of that total, applied to the measured difference, estimate
what each function costs per request.

cProfile inflates small functions (each call pays the profiler's overhead), so the shares
somewhat overstate the mesh's many small functions against the few large httpx ones.

    python bench/profile_path.py              # sync and async, 20,000 requests each
    python bench/profile_path.py --top 30 --requests 50000
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from _common import median, table
from overhead import rules_for
from pick import AsyncCanned, Canned

from meshlib import Mesh

ADDRESS = "127.0.0.1:9"
RAW_URL = f"http://{ADDRESS}/ping"
MESH_URL = "http://bench/ping"

Key = tuple[str, int, str]


def _short(key: Key) -> str:
    filename, line, name = key
    i = filename.find("/meshlib/")
    if i >= 0:
        filename = filename[i + 1 :]
    elif filename == "~":
        return name
    return f"{filename}:{line}({name})"


def _is_mesh(key: Key) -> bool:
    return "/meshlib/" in key[0]


def _is_baseline(key: Key) -> bool:
    """The canned inner transport and its body: the plain client pays for them as much."""
    return key[0].endswith(("pick.py", "profile_path.py"))


def attribute(prof: cProfile.Profile, n: int) -> list[tuple[str, float, float]]:
    """(meshlib function, profiled us/req charged to it, calls/req), most expensive first."""
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    charged: dict[Key, float] = {}
    calls: dict[Key, float] = {}
    for key, (_, nc, tt, _, callers) in stats.items():
        if _is_mesh(key):
            charged[key] = charged.get(key, 0.0) + tt
            calls[key] = nc
            continue
        if _is_baseline(key):
            continue
        for caller, (_, _, _, ct) in callers.items():
            if _is_mesh(caller):
                charged[caller] = charged.get(caller, 0.0) + ct
    rows = [(_short(k), t / n * 1e6, calls.get(k, 0) / n) for k, t in charged.items()]
    rows.sort(key=lambda r: r[1], reverse=True)
    return rows


async def _alternate(fns: dict[str, Callable[[], Awaitable[object]]], n: int, repeats: int) -> dict:
    for fn in fns.values():
        for _ in range(1000):
            await fn()
    timed: dict[str, list[float]] = {side: [] for side in fns}
    for _ in range(repeats):  # alternating, so drift in the machine's speed hits both
        for side, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            for _ in range(n // repeats):
                await fn()
            timed[side].append((time.perf_counter() - t0) / (n // repeats) * 1e6)
    return {side: median(v) for side, v in timed.items()}


def profile_sync(mesh: Mesh, n: int, repeats: int) -> dict[str, Any]:
    with httpx.Client(transport=Canned()) as raw, mesh.sync_client(transport=Canned()) as meshed:

        def sync(fn: Callable[[], object]) -> Callable[[], Awaitable[object]]:
            async def call() -> object:
                return fn()

            return call

        fns = {"httpx": lambda: raw.get(RAW_URL), "meshlib": lambda: meshed.get(MESH_URL)}
        us = asyncio.run(_alternate({k: sync(f) for k, f in fns.items()}, n, repeats))
        prof = cProfile.Profile()
        get = fns["meshlib"]
        prof.enable()
        for _ in range(n):
            get()
        prof.disable()
    return {"us": us, "rows": attribute(prof, n)}


def profile_async(mesh: Mesh, n: int, repeats: int) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async with (
            httpx.AsyncClient(transport=AsyncCanned()) as raw,
            mesh.client(transport=AsyncCanned()) as meshed,
        ):
            us = await _alternate(
                {"httpx": lambda: raw.get(RAW_URL), "meshlib": lambda: meshed.get(MESH_URL)}, n, repeats
            )
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                await meshed.get(MESH_URL)
            prof.disable()
        return {"us": us, "rows": attribute(prof, n)}

    return asyncio.run(run())


def report(title: str, result: dict[str, Any], top: int) -> None:
    us = result["us"]
    added = us["meshlib"] - us["httpx"]
    print(
        f"\n{title}: httpx {us['httpx']:.1f} us, meshlib {us['meshlib']:.1f} us per request "
        f"(no IO): the mesh adds {added:.1f} us (x{us['meshlib'] / us['httpx']:.2f})"
    )
    rows = result["rows"]
    total = sum(r[1] for r in rows)
    print(
        table(
            ["meshlib function (with the non-meshlib code it calls)", "share", "~us/req", "calls/req"],
            [[name, f"{t / total:.1%}", f"{added * t / total:.1f}", f"{c:.0f}"] for name, t, c in rows[:top]],
        )
    )
    rest = sum(r[1] for r in rows[top:])
    print(f"(other meshlib functions: {rest / total:.1%}; profiled total {total:.1f} us/req)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests per side")
    parser.add_argument("--repeats", type=int, default=10, help="alternating timed repeats")
    parser.add_argument("--top", type=int, default=20, help="functions to show")
    args = parser.parse_args(argv)
    mesh = Mesh(service="bench-client")
    mesh.apply_rules(rules_for(ADDRESS), "bench")
    try:
        report("sync (httpx.Client.get)", profile_sync(mesh, args.requests, args.repeats), args.top)
        report("async (httpx.AsyncClient.get)", profile_async(mesh, args.requests, args.repeats), args.top)
    finally:
        mesh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
