"""What mTLS costs: plain HTTP against mutual TLS, both through meshlib's httpx clients.

Two uvicorn servers run the same minimal ASGI app (200, body "ok"), each in its own process on
127.0.0.1: one plain, one behind meshlib's mTLS protocol in STRICT mode (certificate from a
throwaway CA, client certificate required, SPIFFE id checked by the client). Two meshes call
service "bench": one without identity (http), one with an identity (https + mTLS).

- Reused connections: sync and async, sequential; the two sides take turns in blocks (ABBA...)
  as in overhead.py, so that drift in the machine's speed hits both alike.
- Handshake cost, measured apart: the same requests with `Connection: close`, so that every
  request opens a new TCP connection (and, for mTLS, a full handshake: ECDHE P-256, two
  certificate verifications, the SPIFFE check and the wait for the session ticket).

    python bench/tls.py             # full run (about a minute on 2 cores)
    python bench/tls.py --quick     # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import _plots
import httpx
from _common import RESULTS, load_average, machine_info, percentile, table, write_json

from meshlib import Mesh
from meshlib.rules import RuleSet, parse_documents
from meshlib.security import certificates as certs
from meshlib.security.identity import Identity
from meshlib.testing import bind

SERVICE = "bench"
PATH = "/ping"
SIDES = ("plain", "mtls")
LIMITS = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=300)


# -- servers (their own processes) ---------------------------------------------------------


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


def _serve(port_queue: Any, pems: tuple[bytes, bytes, bytes] | None) -> None:
    import uvicorn

    from meshlib.security.uvicorn_tls import mtls_protocol

    sock = bind()
    http: Any = "h11"
    if pems is not None:
        identity = Identity.from_pem(*pems)
        http = mtls_protocol(identity.server_context, "STRICT", certs.DEFAULT_TRUST_DOMAIN)
    port_queue.put(sock.getsockname()[1])
    config = uvicorn.Config(
        _app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        http=http,
        loop="asyncio",
        timeout_keep_alive=300,
    )
    uvicorn.Server(config).run(sockets=[sock])


class Server:
    def __init__(self, pems: tuple[bytes, bytes, bytes] | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        self.process = ctx.Process(target=_serve, args=(queue, pems), daemon=True, name="bench-tls-server")
        self.process.start()
        self.port: int = queue.get(timeout=30)
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(10)


def rules_for(address: str) -> RuleSet:
    return parse_documents(
        [{"kind": "Endpoints", "service": SERVICE, "endpoints": [{"address": address}]}], source="bench"
    )


def identities() -> tuple[Identity, tuple[bytes, bytes, bytes]]:
    """A client identity, and the server's (certificate, key, bundle) PEMs."""
    td = certs.DEFAULT_TRUST_DOMAIN
    ca_cert, ca_key = certs.create_ca(td)

    def issue(service: str) -> tuple[bytes, bytes]:
        key = certs.generate_key()
        csr = certs.make_csr(key, service)
        chain = certs.issue(
            ca_cert, ca_key, csr, spiffe_id=certs.spiffe_id(td, service), lifetime=dt.timedelta(hours=1)
        )
        return chain, certs.key_pem(key)

    client_chain, client_key = issue("bench-client")
    server_chain, server_key = issue(SERVICE)
    return Identity.from_pem(client_chain, client_key, ca_cert), (server_chain, server_key, ca_cert)


# -- measuring ------------------------------------------------------------------------------


def _orders(blocks: int) -> list[tuple[str, str]]:
    return [SIDES if i % 2 == 0 else SIDES[::-1] for i in range(blocks)]


def sync_blocks(clients: dict[str, httpx.Client], blocks: int, block: int, headers: dict[str, str]) -> dict:
    lat: dict[str, list[int]] = {s: [] for s in SIDES}
    wall = dict.fromkeys(SIDES, 0.0)
    cpu = dict.fromkeys(SIDES, 0.0)
    errors = dict.fromkeys(SIDES, 0)
    clock = time.perf_counter_ns
    url = f"http://{SERVICE}{PATH}"
    gc.collect()
    for order in _orders(blocks):
        for side in order:
            get = clients[side].get
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(block):
                t = clock()
                try:
                    ok = get(url, headers=headers).status_code == 200
                except httpx.TransportError:
                    ok = False
                lat[side].append(clock() - t)
                errors[side] += not ok
            wall[side] += time.perf_counter() - t0
            cpu[side] += time.process_time() - c0
    return {s: figures(lat[s], wall[s], cpu[s], errors[s]) for s in SIDES}


async def async_blocks(
    clients: dict[str, httpx.AsyncClient], blocks: int, block: int, headers: dict[str, str]
) -> dict:
    lat: dict[str, list[int]] = {s: [] for s in SIDES}
    wall = dict.fromkeys(SIDES, 0.0)
    cpu = dict.fromkeys(SIDES, 0.0)
    errors = dict.fromkeys(SIDES, 0)
    clock = time.perf_counter_ns
    url = f"http://{SERVICE}{PATH}"
    gc.collect()
    for order in _orders(blocks):
        for side in order:
            get = clients[side].get
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(block):
                t = clock()
                try:
                    ok = (await get(url, headers=headers)).status_code == 200
                except httpx.TransportError:
                    ok = False
                lat[side].append(clock() - t)
                errors[side] += not ok
            wall[side] += time.perf_counter() - t0
            cpu[side] += time.process_time() - c0
    return {s: figures(lat[s], wall[s], cpu[s], errors[s]) for s in SIDES}


def figures(lat_ns: list[int], wall: float, cpu: float, errors: int) -> dict[str, float]:
    lat = sorted(lat_ns)
    n = len(lat)
    return {
        "requests": n,
        "p50_us": percentile(lat, 0.50) / 1e3,
        "p99_us": percentile(lat, 0.99) / 1e3,
        "mean_us": sum(lat) / n / 1e3,
        "rps": n / wall,
        "cpu_us_per_req": cpu / n * 1e6,
        "errors": errors,
        "_latencies_us": [x / 1e3 for x in lat],  # every request, for the plot; not written out
    }


def run(meshes: dict[str, Mesh], args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    reuse = {}
    close = {"connection": "close"}
    with meshes["plain"].sync_client(limits=LIMITS) as a, meshes["mtls"].sync_client(limits=LIMITS) as b:
        clients = {"plain": a, "mtls": b}
        sync_blocks(clients, 2, args.warmup // 2, reuse)
        results["sync_reused"] = sync_blocks(clients, args.requests // args.block, args.block, reuse)
        print("  sync, reused connection", _brief(results["sync_reused"]), flush=True)
        results["sync_new_connection"] = sync_blocks(
            clients, args.handshakes // args.block, args.block, close
        )
        print("  sync, new connection   ", _brief(results["sync_new_connection"]), flush=True)

    async def main() -> None:
        async with (
            meshes["plain"].client(limits=LIMITS) as a,
            meshes["mtls"].client(limits=LIMITS) as b,
        ):
            clients = {"plain": a, "mtls": b}
            await async_blocks(clients, 2, args.warmup // 2, reuse)
            results["async_reused"] = await async_blocks(
                clients, args.requests // args.block, args.block, reuse
            )
            print("  async, reused connection", _brief(results["async_reused"]), flush=True)
            results["async_new_connection"] = await async_blocks(
                clients, args.handshakes // args.block, args.block, close
            )
            print("  async, new connection   ", _brief(results["async_new_connection"]), flush=True)

    asyncio.run(main())
    return results


TITLES = {
    "sync_reused": "sync, reused connection",
    "async_reused": "async, reused connection",
    "sync_new_connection": "sync, new connection each",
    "async_new_connection": "async, new connection each",
}
SIDE_NAMES = {"plain": "plain HTTP", "mtls": "mTLS"}


def plot(results: dict[str, Any], args: argparse.Namespace, path: Path) -> bool:
    """Latency distributions, plain against mTLS, on reused and on new connections: one panel for
    the sync client, one for the async one. False without matplotlib."""
    made = _plots.figure(
        1,
        2,
        size=(13.0, 5.0),
        title=f"Request latency through meshlib, plain HTTP vs mTLS (STRICT, TLS 1.3, P-256): "
        f"{args.requests:,} requests per side on reused connections, {args.handshakes:,} per side "
        f"with a new connection each; sequential, blocks interleaved",
    )
    if made is None:
        return False
    fig, axes = made
    for ax, flavour in zip(axes, ("sync", "async"), strict=True):
        series: dict[str, list[float]] = {}
        styles: dict[str, dict[str, Any]] = {}
        for conn, linestyle, what in (
            ("reused", "-", "reused connection"),
            ("new_connection", "--", "new connection each"),
        ):
            key = f"{flavour}_{conn}"
            if key not in results:
                continue
            for side, color in (("plain", "C0"), ("mtls", "C3")):
                label = f"{SIDE_NAMES[side]}, {what}"
                series[label] = results[key][side].get("_latencies_us", [])
                styles[label] = {"color": color, "linestyle": linestyle}
        client = "httpx.Client" if flavour == "sync" else "httpx.AsyncClient"
        _plots.distribution(ax, series, unit="µs", styles=styles, title=f"{flavour} ({client} of a Mesh)")
    return _plots.save(fig, path)


def _brief(r: dict[str, Any]) -> str:
    return "  ".join(f"{s}: p50 {r[s]['p50_us']:.0f} us" for s in SIDES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000, help="measured requests per side, reused")
    parser.add_argument("--handshakes", type=int, default=1000, help="measured requests per side, new conn")
    parser.add_argument("--block", type=int, default=100, help="requests per block")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests per side first")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--json", type=Path, default=RESULTS / "tls.json", help="where to write results")
    parser.add_argument("--png", type=Path, default=RESULTS / "tls.png", help="plot file")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.handshakes, args.warmup = 600, 200, 100

    info = machine_info()
    print(
        f"python {info['python']} on {info['cpu_count']} CPUs ({info['cpu_model']}), "
        f"httpx {info['packages']['httpx']}, uvicorn {info['packages']['uvicorn']}, "
        f"load {info['load_average']}"
    )
    client_identity, server_pems = identities()
    servers = {"plain": Server(None), "mtls": Server(server_pems)}
    meshes = {"plain": Mesh("bench-client"), "mtls": Mesh("bench-client", credentials=client_identity)}
    for side in SIDES:
        meshes[side].apply_rules(rules_for(servers[side].address), "bench")
    started = time.perf_counter()
    try:
        results = run(meshes, args)
    finally:
        for side in SIDES:
            meshes[side].close()
            servers[side].stop()
    elapsed = time.perf_counter() - started

    rows = []
    for key in ("sync_reused", "async_reused", "sync_new_connection", "async_new_connection"):
        r = results[key]
        for side in SIDES:
            f = r[side]
            rows.append(
                [
                    f"{TITLES[key]}: {side}",
                    f"{f['p50_us']:.0f}",
                    f"{f['p99_us']:.0f}",
                    f"{f['rps']:.0f}",
                    f"{f['cpu_us_per_req']:.0f}",
                ]
            )
        p, m = r["plain"], r["mtls"]
        r["ratio"] = {k: m[k] / p[k] for k in ("p50_us", "p99_us", "rps", "cpu_us_per_req")}
        r["added"] = {k: m[k] - p[k] for k in ("p50_us", "cpu_us_per_req")}
        rows.append(
            [
                f"{TITLES[key]}: mtls/plain",
                f"x{r['ratio']['p50_us']:.2f}",
                f"x{r['ratio']['p99_us']:.2f}",
                f"x{r['ratio']['rps']:.2f}",
                f"{r['added']['cpu_us_per_req']:+.0f}",
            ]
        )
    handshake = {
        flavour: {
            "p50_us": results[f"{flavour}_new_connection"]["mtls"]["p50_us"]
            - results[f"{flavour}_reused"]["mtls"]["p50_us"],
            "p50_us_over_plain_new_connection": results[f"{flavour}_new_connection"]["added"]["p50_us"],
            "client_cpu_us": results[f"{flavour}_new_connection"]["mtls"]["cpu_us_per_req"]
            - results[f"{flavour}_reused"]["mtls"]["cpu_us_per_req"],
        }
        for flavour in ("sync", "async")
    }
    print()
    print(table(["scenario", "p50 us", "p99 us", "req/s", "CPU us/req"], rows))
    for flavour, h in handshake.items():
        print(
            f"{flavour}: a new mTLS connection adds {h['p50_us']:.0f} us at p50 over a reused one "
            f"({h['p50_us_over_plain_new_connection']:.0f} us over a new plain one), "
            f"{h['client_cpu_us']:.0f} us of client CPU"
        )
    errors = sum(r[s]["errors"] for r in results.values() for s in SIDES)
    print(f"(blocks interleaved ABBA; CPU is the client process's; {errors} errors; {elapsed:.0f} s)")
    png = plot(results, args, args.png)
    if png:
        print(f"wrote {args.png}")
    for r in results.values():
        for side in SIDES:
            r[side].pop("_latencies_us", None)

    info["load_average_end"] = load_average()
    write_json(
        args.json,
        {
            "benchmark": "tls",
            "machine": info,
            "config": {
                "requests_per_side": args.requests,
                "new_connection_requests_per_side": args.handshakes,
                "block_requests": args.block,
                "warmup": args.warmup,
                "quick": args.quick,
                "server": "uvicorn (h11, asyncio loop), pure ASGI app, one process per side; "
                "mtls side: meshlib.security.uvicorn_tls STRICT, TLS 1.3, P-256 certificates",
                "elapsed_s": round(elapsed, 1),
                "plot": str(args.png) if png else None,
            },
            "scenarios": results,
            "handshake": handshake,
        },
    )
    print(f"wrote {args.json}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
