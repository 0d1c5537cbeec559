"""Which etcd client the control service should use: aetcd (gRPC, asyncio) or etcd's v3 JSON
gateway over httpx (meshlib.control.etcd_client). Measured against a real 3-member etcd
cluster on loopback (Debian's etcd, started here in a temp dir):

- put and txn latency (the txn is a commit: compare the head's mod revision, put 3 keys),
- a range read of 1,000 keys (history, a replica's start),
- watch delivery: from the start of a put to the event in a watcher's hands,
- failover: the member the client talks to is killed (a follower, so no election is timed);
  how long until the next write succeeds, and how many failed meanwhile,
- what importing each client adds to a control service process, and what it pulls in.

    python bench/etcd_client.py [--n 300]

Prints a table and writes bench/results/etcd_client.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import RESULTS, machine_info, percentile, table, write_json  # noqa: E402

from meshlib.control.etcd_client import (  # noqa: E402
    EtcdClient,
    EtcdError,
    EtcdOptions,
    compare_mod,
    prefix_end,
    put_op,
)
from tests.control.etcd_cluster import EtcdCluster  # noqa: E402

VALUE = b"x" * 200
RANGE_KEYS = 1000


def ms(values: list[float]) -> dict[str, float]:
    data = sorted(values)
    return {"p50_ms": round(percentile(data, 0.5) * 1e3, 3), "p99_ms": round(percentile(data, 0.99) * 1e3, 3)}


# --------------------------------------------------------------------------------------------
# The JSON gateway (blocking calls, as the Store runs them; the watch on httpx's async client)


def gateway_kv(urls: list[str], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with EtcdClient(EtcdOptions(endpoints=tuple(urls))) as c:
        c.put(b"/bench/warm", VALUE)
        times = []
        for i in range(n):
            t = time.perf_counter()
            c.put(b"/bench/put/%d" % (i % 50), VALUE)
            times.append(time.perf_counter() - t)
        out["put"] = ms(times)
        times = []
        head = c.get(b"/bench/head")
        rev = head.mod_revision if head else 0
        for i in range(n):
            t = time.perf_counter()
            r = c.txn(
                [compare_mod(b"/bench/head", rev)],
                [
                    put_op(b"/bench/v/%08d" % i, VALUE),
                    put_op(b"/bench/i/%08d" % i, b"{}"),
                    put_op(b"/bench/head", b"%d" % i),
                ],
            )
            times.append(time.perf_counter() - t)
            assert r.succeeded
            rev = r.revision
        out["txn"] = ms(times)
        for i in range(RANGE_KEYS):
            c.put(b"/bench/range/%06d" % i, VALUE)
        times = []
        for _ in range(max(10, n // 15)):
            t = time.perf_counter()
            kvs = c.range(b"/bench/range/", prefix_end(b"/bench/range/"))
            times.append(time.perf_counter() - t)
            assert len(kvs) == RANGE_KEYS
        out["range_1000"] = ms(times)
    return out


async def gateway_watch(urls: list[str], n: int) -> dict[str, Any]:
    import base64

    prefix = b"/bench/watch/"
    body = {
        "create_request": {
            "key": base64.b64encode(prefix).decode(),
            "range_end": base64.b64encode(prefix_end(prefix)).decode(),
        }
    }
    got: asyncio.Queue[float] = asyncio.Queue()
    created = asyncio.Event()

    async def watch(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", f"{urls[0]}/v3/watch", json=body) as reply:
            async for line in reply.aiter_lines():
                if not line.strip():
                    continue
                result = json.loads(line).get("result", {})
                if result.get("created"):
                    created.set()
                for _ in result.get("events", []):
                    got.put_nowait(time.perf_counter())

    writer = EtcdClient(EtcdOptions(endpoints=tuple(urls)))
    async with httpx.AsyncClient(timeout=None) as http:
        task = asyncio.create_task(watch(http))
        await asyncio.wait_for(created.wait(), 5)
        times = []
        for i in range(n):
            t = time.perf_counter()
            await asyncio.to_thread(writer.put, prefix + b"%d" % i, VALUE)
            times.append(await asyncio.wait_for(got.get(), 5) - t)
        task.cancel()
    writer.close()
    return {"watch": ms(times)}


def gateway_failover(cluster: EtcdCluster) -> dict[str, Any]:
    victim = _follower(cluster)
    urls = [victim.url] + [m.url for m in cluster.members if m is not victim]
    with EtcdClient(EtcdOptions(endpoints=tuple(urls), timeout=2.0)) as c:
        c.put(b"/bench/fo", VALUE)  # talks to the victim
        return _failover(cluster, victim, lambda: c.put(b"/bench/fo", VALUE), EtcdError)


# --------------------------------------------------------------------------------------------
# aetcd (gRPC over grpc.aio)


async def aetcd_kv(cluster: EtcdCluster, n: int) -> dict[str, Any]:
    import aetcd

    out: dict[str, Any] = {}
    m = cluster.members[0]
    async with aetcd.Client(host="127.0.0.1", port=m.client_port, timeout=5) as c:
        await c.put(b"/bench/warm", VALUE)
        times = []
        for i in range(n):
            t = time.perf_counter()
            await c.put(b"/bench/aput/%d" % (i % 50), VALUE)
            times.append(time.perf_counter() - t)
        out["put"] = ms(times)
        head = await c.get(b"/bench/ahead")
        rev = head.mod_revision if head else 0
        times = []
        for i in range(n):
            t = time.perf_counter()
            ok, _ = await c.transaction(
                compare=[c.transactions.mod(b"/bench/ahead") == rev],
                success=[
                    c.transactions.put(b"/bench/av/%08d" % i, VALUE),
                    c.transactions.put(b"/bench/ai/%08d" % i, b"{}"),
                    c.transactions.put(b"/bench/ahead", b"%d" % i),
                ],
                failure=[],
            )
            times.append(time.perf_counter() - t)
            assert ok
            got = await c.get(b"/bench/ahead")  # aetcd's txn does not return the header's revision
            assert got is not None
            rev = got.mod_revision
        out["txn"] = ms(times)
        times = []
        for _ in range(max(10, n // 15)):  # the gateway run wrote the same 1,000 keys
            t = time.perf_counter()
            kvs = await c.get_prefix(b"/bench/range/")
            times.append(time.perf_counter() - t)
            assert len(list(kvs)) == RANGE_KEYS
        out["range_1000"] = ms(times)

        prefix = b"/bench/awatch/"
        watch = await c.watch_prefix(prefix)
        got_at: asyncio.Queue[float] = asyncio.Queue()

        async def consume() -> None:
            async for _ in watch:
                got_at.put_nowait(time.perf_counter())

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)  # aetcd gives no "created" signal to wait on
        times = []
        for i in range(n):
            t = time.perf_counter()
            await c.put(prefix + b"%d" % i, VALUE)
            times.append(await asyncio.wait_for(got_at.get(), 5) - t)
        out["watch"] = ms(times)
        await watch.cancel()
        task.cancel()
    return out


def aetcd_failover(cluster: EtcdCluster) -> dict[str, Any]:
    """aetcd takes one host and port; gRPC's `ipv4:` target with every member is the only way
    to give it more (pick_first moves to the next address when the connection breaks)."""
    import aetcd

    victim = _follower(cluster)
    others = [m for m in cluster.members if m is not victim]
    host = "ipv4:" + ",".join(f"127.0.0.1:{m.client_port}" for m in [victim, *others[:-1]]) + ",127.0.0.1"
    loop = asyncio.new_event_loop()
    try:
        client = aetcd.Client(host=host, port=others[-1].client_port, timeout=2)
        loop.run_until_complete(client.put(b"/bench/afo", VALUE))
        result = _failover(
            cluster,
            victim,
            lambda: loop.run_until_complete(client.put(b"/bench/afo", VALUE)),
            aetcd.ClientError,
        )
        loop.run_until_complete(client.close())
        return result
    finally:
        loop.close()


# --------------------------------------------------------------------------------------------
# Shared parts


def _follower(cluster: EtcdCluster) -> Any:
    leader = cluster.leader()
    return next(m for m in cluster.members if m is not leader)


def _failover(
    cluster: EtcdCluster, victim: Any, write: Callable[[], object], error: type[Exception]
) -> dict[str, Any]:
    cluster.kill(victim)
    t0 = time.perf_counter()
    failed = 0
    try:
        while True:
            try:
                write()
                break
            except error:
                failed += 1
                if time.perf_counter() - t0 > 15:
                    return {"recovered_ms": None, "failed_writes": failed}
                time.sleep(0.01)
        return {"recovered_ms": round((time.perf_counter() - t0) * 1e3, 1), "failed_writes": failed}
    finally:
        cluster.restart(victim)


def import_cost(module: str, runs: int = 5) -> dict[str, Any]:
    """What importing `module` adds to a control service process (which has imported
    meshlib.control.app already): its cumulative time from `python -X importtime` (the least of
    `runs` fresh interpreters: the machine's load only ever adds) and the modules it brings."""
    code = (
        f"import sys, meshlib.control.app; n = len(sys.modules); import {module}; print(len(sys.modules) - n)"
    )
    best, added = float("inf"), 0
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        added = int(done.stdout.strip())
        for line in done.stderr.splitlines():
            parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
            if len(parts) == 3 and parts[2] == module:
                best = min(best, int(parts[1]) / 1e3)
    return {"import_ms": round(best, 1), "modules": added}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=300, help="operations per latency figure")
    args = parser.parse_args()

    with_aetcd = _version("aetcd") is not None
    if not with_aetcd:
        print("aetcd is not installed (pip install aetcd): measuring the JSON gateway only")
    results: dict[str, dict[str, Any]] = {"gateway": {}, **({"aetcd": {}} if with_aetcd else {})}
    with tempfile.TemporaryDirectory() as tmp, EtcdCluster(Path(tmp) / "etcd", 3) as cluster:
        urls = cluster.urls
        results["gateway"].update(gateway_kv(urls, args.n))
        results["gateway"].update(asyncio.run(gateway_watch(urls, args.n)))
        if with_aetcd:
            results["aetcd"].update(asyncio.run(aetcd_kv(cluster, args.n)))
        results["gateway"]["failover"] = gateway_failover(cluster)
        if with_aetcd:
            results["aetcd"]["failover"] = aetcd_failover(cluster)
    results["gateway"]["import"] = import_cost("meshlib.control.etcd_client")
    results["gateway"]["needs"] = "httpx (a meshlib dependency already)"
    if with_aetcd:
        results["aetcd"]["import"] = import_cost("aetcd")
        results["aetcd"]["needs"] = "grpcio, protobuf (meshlib's optional grpc extra)"

    rows = []
    labels = {"gateway": "JSON gateway (httpx)", "aetcd": f"aetcd {_version('aetcd')}"}
    for name in results:
        label = labels[name]
        r = results[name]
        rows.append(
            [
                label,
                f"{r['put']['p50_ms']:.2f} / {r['put']['p99_ms']:.2f}",
                f"{r['txn']['p50_ms']:.2f} / {r['txn']['p99_ms']:.2f}",
                f"{r['range_1000']['p50_ms']:.1f} / {r['range_1000']['p99_ms']:.1f}",
                f"{r['watch']['p50_ms']:.2f} / {r['watch']['p99_ms']:.2f}",
                f"{r['failover']['recovered_ms']} ms, {r['failover']['failed_writes']} failed",
                f"+{r['import']['import_ms']:.0f} ms, +{r['import']['modules']} modules",
            ]
        )
    print(f"etcd {_etcd_version()}, 3 members on loopback, {args.n} operations per figure (p50 / p99 ms)")
    print(
        table(
            ["client", "put", "txn (3 puts)", "range 1,000", "watch delivery", "member killed", "import"],
            rows,
        )
    )
    info = machine_info()
    info["packages"].update({k: _version(k) for k in ("aetcd", "grpcio", "protobuf")})
    out = RESULTS / "etcd_client.json"
    write_json(out, {"machine": info, "etcd": _etcd_version(), "n": args.n, "results": results})
    print(f"wrote {out.relative_to(ROOT)}")


def _etcd_version() -> str:
    from tests.control.etcd_cluster import ETCD

    done = subprocess.run([ETCD, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.split("\n", 1)[0].replace("etcd Version: ", "")


if __name__ == "__main__":
    main()
