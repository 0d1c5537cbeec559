"""The ingress gateway's cost: requests through `meshlib gateway` against direct calls to the
same backend, interleaved.

A minimal pure-ASGI backend (200, body "ok") runs under uvicorn in a child process on
127.0.0.1; `meshlib gateway --name edge` runs in another, with a rules file routing host
`bench.local` to the backend's service. The client (this process; aiohttp by default, a load
generator much faster than what it measures, or httpx with `--client httpx`) calls the backend
by address ("direct") and the gateway with `Host: bench.local` ("gateway"), both open for the
whole run, taking turns in blocks (ABBA...: N requests per block at concurrency 1, T seconds
per block at 50), so drift in the machine's speed hits both sides alike. Reported: p50 and p99
latency and throughput per side, and the gateway/direct ratios.

    python bench/gateway.py            # the default: a short run (about 30 s)
    python bench/gateway.py --blocks 8 --requests 500 --duration 4   # longer, steadier
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from _common import RESULTS, machine_info, median, percentile, table, write_json

from meshlib.listening import bind

HOST = "bench.local"
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100, keepalive_expiry=300)


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


def _serve(port_queue: Any) -> None:
    import uvicorn

    sock = bind()
    port_queue.put(sock.getsockname()[1])
    config = uvicorn.Config(
        _app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=300
    )
    uvicorn.Server(config).run(sockets=[sock])


def _wait(url: str, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def _rules(backend: str) -> list[dict[str, Any]]:
    return [
        {"kind": "Endpoints", "service": "bench", "endpoints": [{"address": backend}]},
        {"kind": "Gateway", "service": "edge", "listeners": [{"port": 8080}]},
        {
            "kind": "Route",
            "service": "edge",
            "routes": [{"match": {"hosts": [HOST]}, "to": [{"service": "bench"}]}],
        },
    ]


class _Client:
    """The load generator: aiohttp by default (about ten times httpx's async client's ceiling on
    this machine, so the client is not what is measured), httpx with `--client httpx`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._session: Any = None

    async def __aenter__(self) -> _Client:
        if self.kind == "aiohttp":
            import aiohttp

            connector = aiohttp.TCPConnector(limit=100, keepalive_timeout=300)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        else:
            self._session = httpx.AsyncClient(limits=LIMITS, trust_env=False, timeout=30.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close() if self.kind == "aiohttp" else await self._session.aclose()

    async def get(self, url: str, headers: dict[str, str]) -> int:
        if self.kind == "aiohttp":
            async with self._session.get(url, headers=headers) as r:
                await r.read()
                return int(r.status)
        return int((await self._session.get(url, headers=headers)).status_code)


async def _sequential(
    client: _Client, url: str, headers: dict[str, str], n: int
) -> tuple[list[float], float]:
    latencies = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        status = await client.get(url, headers)
        latencies.append(time.perf_counter() - t)
        assert status == 200, status
    return latencies, time.perf_counter() - start


async def _concurrent(
    client: _Client, url: str, headers: dict[str, str], workers: int, seconds: float
) -> tuple[list[float], float]:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            status = await client.get(url, headers)
            latencies.append(time.perf_counter() - t)
            assert status == 200, status

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return latencies, time.perf_counter() - start


async def _measure(direct: str, gateway: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    sides = {"direct": (f"http://{direct}/", {}), "gateway": (f"http://{gateway}/", {"host": HOST})}
    results = []
    async with _Client(args.client) as client:
        for concurrency in (1, 50):
            got: dict[str, dict[str, Any]] = {
                s: {"latencies": [], "requests": 0, "seconds": 0.0} for s in sides
            }
            for url, headers in sides.values():  # warm up: connections open, code paths hot
                await _concurrent(client, url, headers, concurrency, 0.5)
            for block in range(args.blocks):
                order = list(sides) if block % 2 == 0 else list(reversed(sides))  # ABBA
                for side in order:
                    url, headers = sides[side]
                    if concurrency == 1:
                        lat, took = await _sequential(client, url, headers, args.requests)
                    else:
                        lat, took = await _concurrent(client, url, headers, concurrency, args.duration)
                    got[side]["latencies"] += lat
                    got[side]["requests"] += len(lat)
                    got[side]["seconds"] += took
            row: dict[str, Any] = {"concurrency": concurrency}
            for side, g in got.items():
                lat = sorted(g["latencies"])
                row[side] = {
                    "requests": g["requests"],
                    "p50_ms": round(median(lat) * 1000, 3),
                    "p99_ms": round(percentile(lat, 0.99) * 1000, 3),
                    "throughput_rps": round(g["requests"] / g["seconds"], 1),
                }
            row["p50_ratio"] = round(row["gateway"]["p50_ms"] / row["direct"]["p50_ms"], 2)
            row["throughput_ratio"] = round(
                row["gateway"]["throughput_rps"] / row["direct"]["throughput_rps"], 2
            )
            results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4, help="blocks per side and concurrency (default 4)")
    parser.add_argument("--requests", type=int, default=200, help="requests per block at concurrency 1")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per block at concurrency 50")
    parser.add_argument("--json", type=Path, default=RESULTS / "gateway.json", help="where to write results")
    parser.add_argument(
        "--client",
        choices=("aiohttp", "httpx"),
        default="aiohttp",
        help="the load generator (default aiohttp)",
    )
    args = parser.parse_args()

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    backend = ctx.Process(target=_serve, args=(queue,), daemon=True, name="bench-backend")
    backend.start()
    direct = f"127.0.0.1:{queue.get(timeout=30)}"
    _wait(f"http://{direct}/")
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "mesh.yaml"
        rules.write_text(yaml.safe_dump_all(_rules(direct)))
        argv = [sys.executable, "-m", "meshlib", "gateway", "--name", "edge", "--config", str(rules)]
        proc = subprocess.Popen(
            [*argv, "--port", "8080=0", "--log-level", "warning"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            found = re.match(r"gateway edge: 8080 on (\S+)", proc.stdout.readline())
            if found is None:
                raise RuntimeError("the gateway did not start")
            gateway = found.group(1)
            _wait(f"http://{gateway}/", {"host": HOST})
            results = asyncio.run(_measure(direct, gateway, args))
        finally:
            proc.terminate()
            proc.wait(20)
            backend.terminate()
            backend.join(10)
    rows = []
    for r in results:
        for side in ("direct", "gateway"):
            s = r[side]
            rows.append(
                [f"{side} @{r['concurrency']}", s["requests"], s["p50_ms"], s["p99_ms"], s["throughput_rps"]]
            )
        rows.append([f"ratio @{r['concurrency']}", "", r["p50_ratio"], "", r["throughput_ratio"]])
    print(table(["side", "requests", "p50 ms", "p99 ms", "req/s"], rows))
    settings = {
        "blocks": args.blocks,
        "requests": args.requests,
        "duration": args.duration,
        "client": args.client,
    }
    write_json(args.json, {"machine": machine_info(), "settings": settings, "results": results})
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
