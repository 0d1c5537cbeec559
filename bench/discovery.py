"""Discovery: how long a change of endpoints at the source takes to reach a Mesh's balancer.

For each provider (Kubernetes, Consul, DNS) the source is the project's emulator, run in its own
process (multiprocessing, spawn) so that the client's CPU time is its own:

- Kubernetes: tests/discovery/kube_apiserver.py (list + chunked watch of EndpointSlices over real
  HTTP), 10 slices of 100 endpoints; a change replaces every endpoint of one slice (one
  MODIFIED event, 10% of the service);
- Consul: tests/discovery/consul_agent.py (blocking queries on /v1/health/service), 1,000
  instances; a change deregisters 100 and registers 100 new ones inside one `batch()`, so a
  query sees them together. The provider's `min_interval` is left at its default (1 s, a token
  bucket of two);
- DNS: tests/discovery/dns_server.py, 1,000 A records (the answer is truncated over UDP and
  fetched again over TCP); a change replaces 100 of them. DNS has no push: the provider
  re-resolves when the TTL runs out, so the records carry a 1 s TTL and the service's
  `min_refresh` is 1 s. Its figures measure that refresh, not a watch.

The client is a real `meshlib.Mesh` in another process, given the provider's URL
(`Mesh(discovery=...)`) and an `Endpoints` document with a `discovery:` block, so the set goes
through the discovery runner and a Snapshot swap like any other. A `mesh.on_update` listener
notes the time and the plan's address set (`snapshot.plans[service].addresses`, the set the
balancer picks from) of each swap. After the initial set has arrived, the source replaces 10%
of the endpoints every `--period` seconds for `--duration` seconds. For each change, the
latency is from the moment the source's state changed (after the emulator's call returned) to
the first swap that holds that set or a later one (a later set that arrives first also ends the
wait of an earlier change). Timestamps are `time.monotonic()` (CLOCK_MONOTONIC: one clock for
every process of the machine).

CPU per update: the client process's CPU time (`time.process_time`, every thread: the Mesh's
runtime loop, the client library's threads) from the first change to the end of the run,
divided by the changes made at the source. Fingerprints of the recorded sets are computed after
that window closes.

Target: p99 under 1 s for Consul and Kubernetes. Route match + pick are not touched by
discovery (the plans are built at the swap); `bench/pick.py` measures them.

    python bench/discovery.py              # 30 s of changes per provider (about 2 min)
    python bench/discovery.py --quick      # 8 s per provider (about 40 s)
    python bench/discovery.py --providers kubernetes,consul --duration 30
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import multiprocessing.connection as mpc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import RESULTS, machine_info, percentile, table, write_json  # noqa: E402

SERVICE = "bench-svc"
PORT = 8080
SIZE = 1000
SHARE = 0.10
TARGET_P99 = 1.0  # seconds, Consul and Kubernetes
TARGETED = ("kubernetes", "consul")
PROVIDERS = ("kubernetes", "consul", "dns")


def fingerprint(addresses: Iterable[str]) -> str:
    """A stable digest of a set of addresses (str hashes differ between processes)."""
    return hashlib.blake2b("\n".join(sorted(addresses)).encode(), digest_size=12).hexdigest()


class Addresses:
    """Fresh IPv4 addresses in 10.0.0.0/8, never reused within a run."""

    def __init__(self) -> None:
        self.n = 0

    def next(self) -> str:
        self.n += 1
        return f"10.{(self.n >> 16) & 255}.{(self.n >> 8) & 255}.{self.n & 255}"


# -- the sources (each in its own process) ----------------------------------------------------


class KubeSource:
    SLICES = 10

    def __init__(self) -> None:
        from tests.discovery.kube_apiserver import KubeApiServer

        self.ips = Addresses()
        self.server = KubeApiServer().start()
        self.slices: list[list[str]] = [
            [self.ips.next() for _ in range(SIZE // self.SLICES)] for _ in range(self.SLICES)
        ]
        for i in range(self.SLICES):
            self._apply(i)
        self.turn = 0
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-discovery-"))
        self.kubeconfig = self.tmp / "kubeconfig.yaml"
        import yaml

        self.kubeconfig.write_text(yaml.safe_dump(self.server.kubeconfig()))

    def _apply(self, i: int) -> None:
        from tests.discovery.kube_apiserver import endpoint, endpoint_slice, port

        eps = [endpoint(ip) for ip in self.slices[i]]
        self.server.apply(endpoint_slice(f"{SERVICE}-{i:05d}", SERVICE, eps, [port(PORT, "http")]))

    def client(self) -> dict[str, Any]:
        return {
            "url": f"kubernetes://{self.kubeconfig}",
            "provider": "kubernetes",
            "options": {"port": "http"},
        }

    def addresses(self) -> set[str]:
        return {f"{ip}:{PORT}" for s in self.slices for ip in s}

    def change(self) -> None:
        i = self.turn % self.SLICES
        self.turn += 1
        self.slices[i] = [self.ips.next() for _ in self.slices[i]]
        self._apply(i)

    def stop(self) -> None:
        self.server.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


class ConsulSource:
    def __init__(self) -> None:
        from tests.discovery.consul_agent import ConsulAgentEmulator

        self.ips = Addresses()
        self.agent = ConsulAgentEmulator().start()
        self.ids: list[str] = []
        with self.agent.batch():
            for _ in range(SIZE):
                self._add()

    def _add(self) -> None:
        ip = self.ips.next()
        self.agent.add(SERVICE, f"{SERVICE}-{ip}", PORT, address=ip)
        self.ids.append(f"{SERVICE}-{ip}")

    def client(self) -> dict[str, Any]:
        return {"url": self.agent.url, "provider": "consul", "options": {}}

    def addresses(self) -> set[str]:
        return {f"{i.removeprefix(SERVICE + '-')}:{PORT}" for i in self.ids}

    def change(self) -> None:
        n = int(SIZE * SHARE)
        with self.agent.batch():
            gone, self.ids = self.ids[:n], self.ids[n:]
            for id in gone:
                self.agent.remove(id)
            for _ in range(n):
                self._add()

    def stop(self) -> None:
        self.agent.stop()


class DnsSource:
    TTL = 1
    NAME = "bench-svc.mesh.test"

    def __init__(self) -> None:
        from tests.discovery.dns_server import DnsServer

        self.ips = Addresses()
        self.server = DnsServer()
        self.current = [self.ips.next() for _ in range(SIZE)]
        self.server.a(self.NAME, self.current, ttl=self.TTL)

    def client(self) -> dict[str, Any]:
        options = {"record": "A", "port": PORT, "min_refresh": "1s"}
        return {"url": self.server.url, "provider": "dns", "name": self.NAME, "options": options}

    def addresses(self) -> set[str]:
        return {f"{ip}:{PORT}" for ip in self.current}

    def change(self) -> None:
        n = int(SIZE * SHARE)
        self.current = self.current[n:] + [self.ips.next() for _ in range(n)]
        self.server.a(self.NAME, self.current, ttl=self.TTL)

    def stop(self) -> None:
        self.server.close()


SOURCES = {"kubernetes": KubeSource, "consul": ConsulSource, "dns": DnsSource}


def source_main(kind: str, conn: mpc.Connection) -> None:
    """The emulator's process: set up, then on ("churn", period, duration) change the source
    every period and send back [(time, fingerprint)] of each change."""
    try:
        src = SOURCES[kind]()
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", src.client(), fingerprint(src.addresses())))
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            _, period, duration = msg
            changes: list[tuple[float, str]] = []
            start = time.monotonic()
            k = 0
            while True:
                due = start + k * period
                if due - start >= duration:
                    break
                time.sleep(max(0.0, due - time.monotonic()))
                src.change()
                changes.append((time.monotonic(), fingerprint(src.addresses())))
                k += 1
            conn.send(changes)
    finally:
        src.stop()


# -- the client ---------------------------------------------------------------------------------


def client_main(config: dict[str, Any], initial: str, conn: mpc.Connection) -> None:
    """A Mesh watching the service through the runner; on "start" it opens the CPU window, on
    "stop" it closes it and sends back its swaps [(time, fingerprint)] and the CPU time."""
    import logging

    import meshlib
    from meshlib.rules import parse_documents

    logging.basicConfig(level=logging.WARNING)
    discovery: dict[str, Any] = {"provider": config["provider"], "options": config["options"]}
    if "name" in config:
        discovery["name"] = config["name"]
    mesh = meshlib.Mesh("bench-client", discovery=config["url"])
    seen: list[tuple[float, frozenset[str]]] = []
    last: list[frozenset[str] | None] = [None]

    def listener(snapshot: Any) -> None:
        plan = snapshot.plans.get(SERVICE)
        if plan is not None and plan.addresses is not last[0]:
            seen.append((time.monotonic(), plan.addresses))
            last[0] = plan.addresses

    mesh.on_update(listener)
    try:
        rules = parse_documents([{"kind": "Endpoints", "service": SERVICE, "discovery": discovery}])
    except ValueError as e:
        conn.send(("error", str(e)))
        return
    mesh.apply_rules(rules, "b")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        plan = mesh.snapshot.plans.get(SERVICE)
        if plan is not None and len(plan.addresses) == SIZE and fingerprint(plan.addresses) == initial:
            break
        time.sleep(0.05)
    else:
        conn.send(("error", "the initial set did not arrive within 60 s"))
        return
    conn.send(("ready",))
    assert conn.recv() == "start"
    cpu0 = time.process_time()
    mark = len(seen)
    assert conn.recv() == "stop"
    cpu = time.process_time() - cpu0
    swaps = [(t, fingerprint(a)) for t, a in seen[mark:]]
    conn.send({"cpu": cpu, "swaps": swaps})
    mesh.close()


# -- the run -------------------------------------------------------------------------------------


def latencies(changes: list[tuple[float, str]], swaps: list[tuple[float, str]]) -> list[float | None]:
    """For each change: seconds until the first swap holding it or a later change's set."""
    gen = {fp: i for i, (_, fp) in enumerate(changes)}
    out: list[float | None] = []
    for i, (t, _) in enumerate(changes):
        hit = next((ts for ts, fp in swaps if gen.get(fp, -1) >= i and ts >= t), None)
        out.append(None if hit is None else hit - t)
    return out


def run_provider(kind: str, period: float, duration: float, settle: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    s_conn, s_child = ctx.Pipe()
    source = ctx.Process(target=source_main, args=(kind, s_child), daemon=True)
    source.start()
    client = None
    try:
        if not s_conn.poll(60):
            raise RuntimeError(f"{kind}: the emulator did not start")
        msg = s_conn.recv()
        if msg[0] == "error":
            return {"provider": kind, "error": msg[1]}
        _, config, initial = msg
        c_conn, c_child = ctx.Pipe()
        client = ctx.Process(target=client_main, args=(config, initial, c_child), daemon=True)
        client.start()
        if not c_conn.poll(90):
            raise RuntimeError(f"{kind}: the client did not get the initial set")
        msg = c_conn.recv()
        if msg[0] == "error":
            return {"provider": kind, "error": msg[1]}
        c_conn.send("start")
        s_conn.send(("churn", period, duration))
        changes = s_conn.recv()
        time.sleep(settle)
        c_conn.send("stop")
        result = c_conn.recv()
        s_conn.send(("stop",))
    finally:
        for p in (client, source):
            if p is not None:
                p.join(timeout=10)
                if p.is_alive():
                    p.terminate()
    lat = latencies(changes, result["swaps"])
    done = sorted(x for x in lat if x is not None)
    return {
        "provider": kind,
        "changes": len(changes),
        "converged": len(done),
        "missed": len(lat) - len(done),
        "swaps": len(result["swaps"]),
        "p50_ms": round(percentile(done, 0.50) * 1000, 1) if done else None,
        "p90_ms": round(percentile(done, 0.90) * 1000, 1) if done else None,
        "p99_ms": round(percentile(done, 0.99) * 1000, 1) if done else None,
        "max_ms": round(done[-1] * 1000, 1) if done else None,
        "cpu_s": round(result["cpu"], 3),
        "cpu_per_update_ms": round(result["cpu"] / len(changes) * 1000, 2) if changes else None,
        "latencies_ms": [None if x is None else round(x * 1000, 1) for x in lat],
        "config": {k: v for k, v in config.items() if k != "url"},
        "target_p99_ms": TARGET_P99 * 1000 if kind in TARGETED else None,
    }


def verdict(r: dict[str, Any]) -> str:
    if "error" in r:
        return "error"
    if r["target_p99_ms"] is None:
        return "(TTL-bound)"
    ok = r["missed"] == 0 and r["p99_ms"] is not None and r["p99_ms"] < r["target_p99_ms"]
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--duration", type=float, default=None, help="seconds of changes per provider")
    parser.add_argument("--period", type=float, default=1.0, help="seconds between changes")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds waited after the last change")
    parser.add_argument("--quick", action="store_true", help="8 s of changes per provider")
    parser.add_argument("--json", type=Path, default=RESULTS / "discovery.json")
    args = parser.parse_args()
    duration = args.duration if args.duration is not None else (8.0 if args.quick else 30.0)
    kinds = [k.strip() for k in args.providers.split(",") if k.strip()]
    os.environ.setdefault("PYTHONPATH", str(ROOT))

    results = []
    for kind in kinds:
        if kind not in SOURCES:
            parser.error(f"unknown provider {kind!r}; one of {', '.join(PROVIDERS)}")
        print(f"{kind}: {duration:.0f} s of changes ...", flush=True)
        results.append(run_provider(kind, args.period, duration, args.settle))

    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["provider"], "-", "-", "-", "-", "-", "-", "-", "-", "error: " + r["error"][:60]])
            continue
        rows.append(
            [
                r["provider"],
                r["changes"],
                r["missed"],
                r["swaps"],
                r["p50_ms"],
                r["p90_ms"],
                r["p99_ms"],
                r["max_ms"],
                r["cpu_per_update_ms"],
                verdict(r),
            ]
        )
    print()
    print(f"{SIZE} endpoints, {SHARE:.0%} replaced every {args.period:g} s for {duration:g} s")
    headers = [
        "provider",
        "changes",
        "missed",
        "swaps",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "CPU/update ms",
        "p99<1s",
    ]
    print(table(headers, rows))
    write_json(
        args.json,
        {
            "benchmark": "discovery",
            "machine": machine_info(),
            "settings": {
                "endpoints": SIZE,
                "replaced_share": SHARE,
                "period_s": args.period,
                "duration_s": duration,
                "settle_s": args.settle,
                "quick": args.quick,
                "dns_ttl_s": DnsSource.TTL,
            },
            "results": results,
        },
    )
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
