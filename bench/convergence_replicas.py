"""Convergence over replicas: the control service as 3 processes on a 3-member etcd cluster.

Everything is real and on 127.0.0.1: an etcd cluster of the benchmark's own and the control
replicas as `meshlib control --store etcd://...` processes (the test harness:
tests/control/etcd_cluster.py, tests/control/replicas.py), and subscribers that are the real
`meshlib.control.subscriber.Subscriber` of every Mesh, in worker processes (bench/convergence.py's
workers, imported as they are). Each subscriber is given every replica, its own first: that is
how a fleet spreads over replicas (docs/operations.md).

Four measurements:

1. **spread**: `--subscribers` spread evenly over the replicas; `--applies` applies, each on
   the next replica in turn; for each, the time from the PUT's response until each subscriber's
   sink has the version (the apply reaches the other replicas through etcd's watch), and every
   ack answered. Each apply's p99 from the moment the PUT was sent is printed and saved too,
   and the CPU the replicas and the subscribers' processes spent until every sink had it.
   Failed acks are counted (an ack that fails is retried; it must not fail).
2. **one replica**: `--single` subscribers all on the first replica, the same applies.
3. **failover**: with the spread fleet, the first replica is SIGKILLed: the failover time of a
   subscriber of the killed replica is from the kill until another replica has answered its
   resumed watch (with its Last-Event-ID: nothing to send, and the replica lists it as current).
   Checked after: no state was sent to any subscriber meanwhile, and every moved subscriber is
   listed connected and current by its new replica.
4. **failover with an apply**: the same with a fresh fleet, and at once a version applied on
   another replica: in sync is then when the moved subscriber's sink has that version, which it
   can only get from another replica. On one machine this also holds the push of that version to
   every other subscriber, and every client's CPU shares the cores with the replicas.
   Acks that fail in the moves are counted apart.

Percentiles are over every subscriber of every apply. Timestamps are time.monotonic() in every
process (one clock on Linux). The load average is printed and saved: on a shared machine the
figures are the machine's as much as the service's.

    python bench/convergence_replicas.py             # 10,000 over 3 replicas, 5,000 on one
    python bench/convergence_replicas.py --quick     # 300 over 3, 150 on one (under a minute)
    python bench/convergence_replicas.py --failover-only --subscribers 1500 --applies 0
                                                     # the failover alone, and what it costs

The failover's CPU is read twice: when every stream is open again ("reconnect": the moved
subscribers' new connections and watch requests, and the apply made meanwhile) and when every
ack of the version applied after the kill is in ("until in sync"). `--py-spy DIR` records
py-spy profiles (speedscope JSON) of a surviving replica and of the moved subscribers' worker
processes over the failover.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test harness (tests/control) and this meshlib

import httpx  # noqa: E402
from _common import RESULTS, machine_info, percentile, table, write_json  # noqa: E402
from convergence import BenchError, Workers, cpu_seconds, documents, raise_nofile  # noqa: E402

from tests.control.etcd_cluster import EtcdCluster  # noqa: E402
from tests.control.replicas import Replicas  # noqa: E402

TARGET_P99 = 1.0  # seconds from apply to in force, spread and one replica
TARGET_FAILOVER_P99 = 3.0  # seconds from a replica killed to its subscribers in sync elsewhere


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f}"


class Fleet:
    """Groups of subscriber workers, each group preferring one replica."""

    def __init__(
        self, replicas: Replicas, counts: list[int], workers: int, concurrency: int, transport: str = "h1"
    ) -> None:
        self.counts = counts
        self.groups: list[Workers | None] = [None] * len(counts)
        try:
            for i, n in enumerate(counts):
                if n:
                    order = [i, *(j for j in range(len(replicas)) if j != i)]
                    # client ids r{i}-w{k}-{n}: unique over the fleet, the group's replica first
                    opts = {
                        "concurrency": concurrency,
                        "pool": "own",
                        "transport": transport,
                        "prefix": f"r{i}-",
                    }
                    self.groups[i] = Workers(
                        replicas.control(*order), n, max(1, min(workers, n)), opts, f"replica{i}"
                    )
        except BaseException:
            self.stop()
            raise

    @property
    def active(self) -> list[Workers]:
        return [g for g in self.groups if g is not None]

    def connect(self, timeout: float) -> float:
        started = time.monotonic()
        for g in self.active:
            g.send(("connect",))
        for g in self.active:
            if any(m is None for m in g.expect("connected", timeout)):
                raise BenchError(f"subscribers did not connect within {timeout:.0f} s")
        return time.monotonic() - started

    def wait(self, kind: str, version: int, timeout: float, groups: list[Workers] | None = None) -> bool:
        deadline = time.monotonic() + timeout
        ok = True
        for g in groups or self.active:
            got = g.expect(kind, max(0.1, deadline - time.monotonic()), version)
            ok = ok and all(m is not None for m in got)
        return ok

    def times(
        self, version: int, groups: list[Workers] | None = None
    ) -> tuple[list[float], list[float], int]:
        """Arrival and ack times of `version` at every subscriber of `groups`; how many lack it."""
        arrived: list[float] = []
        acked: list[float] = []
        missing = 0
        for g in groups or self.active:
            for reply in g.ask(("collect", version), "times"):
                arrived += [t for t in reply[2] if t is not None]
                acked += [t for t in reply[3] if t is not None]
                missing += sum(t is None for t in reply[2])
        return arrived, acked, missing

    def status(self) -> dict[str, Any]:
        failures: collections.Counter[str] = collections.Counter()
        watch_requests = streams = applied = 0
        for g in self.active:
            for reply in g.ask(("status",), "status"):
                failures.update(reply[1]["ack_failures"])
                watch_requests += reply[1]["watch_requests"]
                streams += reply[1]["streams_open"]
                applied += reply[1]["applied"]
        return {
            "ack_failures": dict(failures),
            "watch_requests": watch_requests,
            "streams_open": streams,
            "applied": applied,
        }

    def stop(self) -> None:
        for g in self.active:
            g.stop()


def process_ids(replicas: Replicas, fleet: Fleet, but: int | None = None) -> dict[str, int]:
    """The running replicas' processes (all but replica `but`) and the fleet's worker processes,
    by name (`replica1`, `worker0-1`): whose CPU the benchmark reads."""
    return {
        **{
            f"replica{i}": p.proc.pid
            for i, p in enumerate(replicas.processes)
            if i != but and p is not None and p.proc is not None
        },
        **{f"worker{g}-{k}": pid for g, w in enumerate(fleet.groups) if w for k, pid in enumerate(w.pids)},
    }


def applies(
    replicas: Replicas, fleet: Fleet, args: argparse.Namespace, generation: int, on: list[int]
) -> tuple[list[dict[str, Any]], int]:
    """`args.applies` applies, on the replicas `on` in turn; the arrival of each everywhere."""
    out = []
    n = sum(fleet.counts)
    for k in range(args.applies):
        time.sleep(args.gap)
        generation += 1
        target = on[k % len(on)]
        pids = process_ids(replicas, fleet)
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        t_req = time.monotonic()
        reply = replicas.apply(target, documents(args.services, generation))
        t_resp = time.monotonic()
        reply.raise_for_status()
        version = reply.json()["version"]
        fleet.wait("done", version, args.converge_timeout)
        # CPU until every sink had it: the replicas', and the subscribers' worker processes'
        # (in a fleet each subscriber's share runs in its own process, on its own machine)
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        fleet.wait("acked", version, args.converge_timeout)
        arrived, acked, missing, by_group = [], [], 0, []
        for g in fleet.active:  # each group prefers one replica: the p99 of each replica's own
            g_arrived, g_acked, g_missing = fleet.times(version, [g])
            arrived, acked, missing = arrived + g_arrived, acked + g_acked, missing + g_missing
            by_group.append(percentile(sorted(t - t_resp for t in g_arrived), 0.99) if g_arrived else None)
        a = {
            "version": version,
            "on_replica": target,
            "put_s": t_resp - t_req,
            "from_response_s": sorted(t - t_resp for t in arrived),
            # from the moment the PUT was sent (bench/convergence.py reports both the same way)
            "p99_from_request_s": percentile(sorted(t - t_req for t in arrived), 0.99) if arrived else None,
            "not_converged": missing,
            "p99_by_replica_s": by_group,
            "acked": len(acked),
            "all_acked_from_response_s": max(acked) - t_resp if len(acked) == n else None,
            "cpu_s_until_in_force": {
                "replicas": round(sum(v for k2, v in cpu.items() if k2.startswith("replica")), 2),
                "subscribers": round(sum(v for k2, v in cpu.items() if k2.startswith("worker")), 2),
            },
        }
        out.append(a)
        fr = a["from_response_s"]
        print(
            f"    apply {k + 1} on replica {target}: PUT {ms(a['put_s'])} ms; in force p50 "
            f"{ms(percentile(fr, 0.5) if fr else None)} p99 {ms(percentile(fr, 0.99) if fr else None)} "
            f"max {ms(fr[-1] if fr else None)} ms (from the request: p99 {ms(a['p99_from_request_s'])} ms); "
            f"missed {missing}; acked {len(acked)}/{n}; CPU s until in force {a['cpu_s_until_in_force']}; "
            f"p99 of each replica's subscribers {[ms(x) for x in by_group]} ms",
            flush=True,
        )
    return out, generation


def summary(name: str, runs: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    pooled = sorted(t for a in runs for t in a["from_response_s"])
    return {
        "case": name,
        "applies": len(runs),
        "samples": len(pooled),
        "p50_s": percentile(pooled, 0.5) if pooled else None,
        "p99_s": percentile(pooled, 0.99) if pooled else None,
        "max_s": pooled[-1] if pooled else None,
        "per_apply_p99_from_request_s": [a["p99_from_request_s"] for a in runs],
        "not_converged": sum(a["not_converged"] for a in runs),
        "per_apply": [
            {k: v for k, v in a.items() if k != "from_response_s"}
            | {"p99_s": percentile(a["from_response_s"], 0.99) if a["from_response_s"] else None}
            for a in runs
        ],
        **extra,
    }


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    per = [
        args.subscribers // args.replicas + (i < args.subscribers % args.replicas)
        for i in range(args.replicas)
    ]
    results: dict[str, Any] = {"load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    with (
        EtcdCluster(root / "etcd", 3) as etcd,
        Replicas(root / "replicas", etcd, args.replicas, args=("--log-level", "warning")) as replicas,
    ):
        generation = 0
        replicas.apply(0, documents(args.services, generation)).raise_for_status()

        # 1 and 3: spread over every replica, then a replica killed
        print(f"  {args.subscribers:,} subscribers over {args.replicas} replicas ({per})", flush=True)
        fleet = Fleet(replicas, per, args.workers, args.connect_concurrency, args.subscriber_transport)
        try:
            connect_s = fleet.connect(60 + args.subscribers * 0.02)
            print(f"    connected in {connect_s:.1f} s", flush=True)
            time.sleep(args.settle)
            before = fleet.status()
            runs, generation = applies(replicas, fleet, args, generation, list(range(args.replicas)))
            after = fleet.status()
            results["spread"] = summary(
                f"{args.subscribers} over {args.replicas} replicas",
                runs,
                {
                    "per_replica": per,
                    "connect_s": connect_s,
                    "ack_failures": _diff(after["ack_failures"], before["ack_failures"]),
                    "reconnects": after["watch_requests"] - before["watch_requests"],
                },
            )

            results["failover"], generation = failover(replicas, fleet, args, per, generation, change=False)
        finally:
            fleet.stop()

        # 3b: the same move, with a version applied on another replica at the kill (a fresh fleet)
        print(f"  {args.subscribers:,} subscribers over {args.replicas} replicas, again", flush=True)
        replicas.start(0)
        fleet = Fleet(replicas, per, args.workers, args.connect_concurrency, args.subscriber_transport)
        try:
            connect_s = fleet.connect(60 + args.subscribers * 0.02)
            print(f"    connected in {connect_s:.1f} s", flush=True)
            time.sleep(args.settle)
            results["failover_apply"], generation = failover(
                replicas, fleet, args, per, generation, change=True
            )
        finally:
            fleet.stop()
        if args.failover_only:
            results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
            return results
        replicas.start(0)

        # 2: every subscriber on one replica
        print(f"  {args.single:,} subscribers on one replica", flush=True)
        single = Fleet(
            replicas,
            [args.single] + [0] * (args.replicas - 1),
            args.workers,
            args.connect_concurrency,
            args.subscriber_transport,
        )
        try:
            connect_s = single.connect(60 + args.single * 0.02)
            print(f"    connected in {connect_s:.1f} s", flush=True)
            time.sleep(args.settle)
            before = single.status()
            runs, generation = applies(replicas, single, args, generation, [0])
            after = single.status()
            results["single"] = summary(
                f"{args.single} on one replica",
                runs,
                {
                    "connect_s": connect_s,
                    "ack_failures": _diff(after["ack_failures"], before["ack_failures"]),
                    "reconnects": after["watch_requests"] - before["watch_requests"],
                },
            )
        finally:
            single.stop()
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def failover(
    replicas: Replicas,
    fleet: Fleet,
    args: argparse.Namespace,
    per: list[int],
    generation: int,
    *,
    change: bool,
) -> tuple[dict[str, Any], int]:
    """SIGKILL replica 0 under the spread fleet; how long its subscribers take to be in sync on
    another replica.

    Without `change`, nothing is applied meanwhile: a moved subscriber is in sync once another
    replica has answered its resumed watch (its Last-Event-ID is that replica's position, so
    nothing is sent; the replica records it as current, `?applied=1`), and the figure is from
    the kill until then. Checked after: no subscriber was sent a state (no snapshot, no replay),
    and every moved one is listed connected and current by the replica it moved to. With
    `change`, a version is applied on replica 1 at once: in sync is when the moved subscriber's
    sink has it, which it can only get from another replica."""
    victim, other = 0, 1
    moved = [fleet.groups[victim]] if fleet.groups[victim] is not None else []
    load = os.getloadavg()
    pids = process_ids(replicas, fleet, but=victim)
    profilers = py_spy(
        args.py_spy / ("apply" if change else "resume") if args.py_spy else None,
        {k: v for k, v in pids.items() if k in ("replica1", *_workers(pids, victim))},
    )
    before = fleet.status()
    victim_id = None if change else replica_id(replicas, victim)
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    cpu_reconnected: dict[str, float] = {}
    t_kill = time.monotonic()
    replicas.kill(victim)
    t_killed = time.monotonic()
    t_applied = version = None
    if change:
        generation += 1
        reply = replicas.apply(other, documents(args.services, generation))
        t_applied = time.monotonic()
        reply.raise_for_status()
        version = reply.json()["version"]
    reconnected = None
    checks: dict[str, Any] = {}
    if change:
        while time.monotonic() - t_kill < args.converge_timeout:
            if fleet.status()["streams_open"] >= args.subscribers:
                reconnected = time.monotonic() - t_kill
                cpu_reconnected = {
                    name: round(cpu_seconds(pid) - cpu_before[name], 2) for name, pid in pids.items()
                }
                break
            time.sleep(0.05)
        fleet.wait("done", version, args.converge_timeout)  # type: ignore[arg-type]
        arrived, _, missing = fleet.times(version, moved)  # type: ignore[arg-type]
        fleet.wait("acked", version, args.converge_timeout)  # type: ignore[arg-type]
    else:
        # every moved subscriber's watch answered again (a stream still counted open may be one
        # whose break its client has not read yet: the answers' times say when each resumed)
        while True:
            opened = [t for g in moved for reply in g.ask(("opened",), "opened") for t in reply[1]]
            arrived = [t for t in opened if t is not None and t > t_kill]
            if len(arrived) == len(opened) or time.monotonic() - t_kill > args.converge_timeout:
                break
            time.sleep(0.05)
        missing = len(opened) - len(arrived)
        reconnected = max(arrived) - t_kill if arrived and not missing else None
        cpu_reconnected = {name: round(cpu_seconds(pid) - cpu_before[name], 2) for name, pid in pids.items()}
        checks = in_sync(replicas, victim, victim_id, fleet, before)
    cpu_used = {name: round(cpu_seconds(pid) - cpu_before[name], 2) for name, pid in pids.items()}
    for profiler in profilers:
        profiler.send_signal(2)  # SIGINT: py-spy writes its profile and exits
    for profiler in profilers:
        profiler.wait(30)
    end = fleet.status()
    spread_after = [subscribers(replicas, i) for i in range(args.replicas)]
    times = sorted(t - t_kill for t in arrived)
    what = "and a version applied at once" if change else "nothing changed meanwhile"
    result = {
        "case": f"replica {victim} killed, {per[victim]} subscribers move ({what})",
        "change": change,
        "samples": len(times),
        "p50_s": percentile(times, 0.5) if times else None,
        "p99_s": percentile(times, 0.99) if times else None,
        "deciles_s": [round(percentile(times, q / 10), 3) for q in range(1, 10)] if times else [],
        "max_s": times[-1] if times else None,
        "not_converged": missing,
        "kill_s": t_killed - t_kill,
        "apply_after_kill_s": None if t_applied is None else t_applied - t_killed,
        "every_stream_open_again_s": reconnected,
        "ack_failures": _diff(end["ack_failures"], before["ack_failures"]),
        "reconnects": end["watch_requests"] - before["watch_requests"],
        "streams_open_after": end["streams_open"],
        "streams_per_replica_after": spread_after,
        **checks,
        "cpu_s_until_in_sync": cpu_used,
        "cpu_s_until_reconnected": cpu_reconnected,
        # where a move costs: the replicas that took the subscribers over, and the
        # benchmark's own processes that held them (one Mesh each in a real fleet)
        "cpu_ms_per_moved_subscriber": per_moved(cpu_used, victim, per[victim]),
        "cpu_ms_per_moved_subscriber_until_reconnected": per_moved(cpu_reconnected, victim, per[victim]),
        "load_average": [round(x, 2) for x in load],
    }
    print(
        f"    failover ({what}): p50 {ms(result['p50_s'])} p99 {ms(result['p99_s'])} max "
        f"{ms(result['max_s'])} ms; missed {missing}; kill {ms(result['kill_s'])} ms, apply "
        f"{ms(result['apply_after_kill_s'])} ms, every stream open again {ms(reconnected)} ms after the "
        f"kill; watch requests {result['reconnects']}; streams per replica now {spread_after}; {checks}; "
        f"CPU s meanwhile {cpu_used}; CPU ms per moved subscriber {result['cpu_ms_per_moved_subscriber']} "
        f"(until every stream was open again: {result['cpu_ms_per_moved_subscriber_until_reconnected']})",
        flush=True,
    )
    return result, generation


def replica_id(replicas: Replicas, i: int) -> str | None:
    """The id replica `i` tags its own `/v1/clients` rows with (the `replica` of the rows of the
    clients connected to it, which it lists as they are now)."""
    ids = collections.Counter(
        rec["replica"]
        for rec in httpx.get(f"{replicas.url(i)}/v1/clients", timeout=30.0).json()
        if rec["client"].startswith(f"r{i}-") and rec["connected"]
    )
    return ids.most_common(1)[0][0] if ids else None


def in_sync(
    replicas: Replicas, victim: int, victim_id: str | None, fleet: Fleet, before: dict[str, Any]
) -> dict[str, Any]:
    """After a move with nothing changed: states sent to subscribers meanwhile (a snapshot or a
    replay would be one each; none is due), and how many of the moved subscribers the surviving
    replicas list as connected to one of them (not the killed one's last rows, which etcd still
    holds), and as having acked their version there (`/v1/clients`; the resume is the ack)."""
    sent = fleet.status()["applied"] - before["applied"]
    prefix = f"r{victim}-"
    connected: set[str] = set()
    current: set[str] = set()
    for i in range(len(replicas)):
        if i == victim:
            continue
        version = httpx.get(f"{replicas.url(i)}/healthz", timeout=30.0).json()["version"]
        for rec in httpx.get(f"{replicas.url(i)}/v1/clients", timeout=30.0).json():
            if rec["client"].startswith(prefix) and rec["connected"] and rec.get("replica") != victim_id:
                connected.add(rec["client"])
                if rec["ok"] and rec["version"] == version:
                    current.add(rec["client"])
    return {
        "states_sent_meanwhile": sent,
        "killed_replica_id": victim_id,  # its rows left out
        "moved_listed_connected": len(connected),
        "moved_listed_current": len(current),
    }


def _workers(pids: dict[str, int], victim: int) -> list[str]:
    return [k for k in pids if k.startswith(f"worker{victim}-")]


def per_moved(cpu: dict[str, float], victim: int, moved: int) -> dict[str, float]:
    """CPU ms per moved subscriber: of the replicas left, and of the moved ones' worker processes."""
    if not cpu:
        return {}
    replicas = sum(v for k, v in cpu.items() if k.startswith("replica"))
    workers = sum(v for k, v in cpu.items() if k.startswith(f"worker{victim}-"))
    return {
        "replicas": round(1000 * replicas / max(1, moved), 2),
        "their_worker_processes": round(1000 * workers / max(1, moved), 2),
    }


def py_spy(directory: Path | None, pids: dict[str, int]) -> list[subprocess.Popen[bytes]]:
    """py-spy recording each of `pids` into `directory` (nothing without a directory)."""
    if directory is None:
        return []
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, pid in pids.items():
        out.append(
            subprocess.Popen(
                [
                    exe,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    "500",
                    "--format",
                    "speedscope",
                    "--output",
                    str(directory / f"{name}.json"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    time.sleep(1.0)  # attached before the kill
    return out


def subscribers(replicas: Replicas, i: int) -> int | None:
    """Open watch streams on replica `i` (its /metrics), None if it is down."""
    try:
        text = httpx.get(f"{replicas.url(i)}/metrics", timeout=5.0).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("meshlib_control_subscribers "):
            return int(float(line.split()[1]))
    return None


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def print_table(results: dict[str, Any]) -> None:
    rows = []
    for key, target in (
        ("spread", TARGET_P99),
        ("single", TARGET_P99),
        ("failover", TARGET_FAILOVER_P99),
        ("failover_apply", TARGET_FAILOVER_P99),
    ):
        r = results.get(key)
        if r is None:
            continue
        failed = sum(r["ack_failures"].values())
        rows.append(
            [
                r["case"],
                f"{r['samples']:,}",
                ms(r["p50_s"]),
                ms(r["p99_s"]),
                ms(r["max_s"]),
                f"{target * 1000:,.0f}",
                str(r["not_converged"]),
                str(failed),
            ]
        )
    print(
        table(["case", "samples", "p50 ms", "p99 ms", "max ms", "target p99", "missed", "acks failed"], rows)
    )
    print(f"load average: start {results['load_average_at_start']}, end {results['load_average_at_end']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 over 3 replicas, 150 on one")
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--single", type=int, default=5_000, help="subscribers on one replica")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="subscriber processes per replica")
    parser.add_argument("--applies", type=int, default=5)
    parser.add_argument("--services", type=int, default=20, help="services in the rule set")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between applies")
    parser.add_argument("--settle", type=float, default=6.0, help="seconds after connecting")
    parser.add_argument("--connect-concurrency", type=int, default=50)
    parser.add_argument("--converge-timeout", type=float, default=60.0)
    parser.add_argument(
        "--subscriber-transport",
        choices=("h1", "httpcore"),
        default="h1",
        help="the subscribers' HTTP transport: the Subscriber's own (h1), or httpx's (before)",
    )
    parser.add_argument(
        "--failover-only",
        action="store_true",
        help="the spread fleet and the failover, not the one-replica case",
    )
    parser.add_argument(
        "--py-spy", type=Path, default=None, metavar="DIR", help="profile the failover (py-spy)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default under bench/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.subscribers, args.single, args.workers, args.applies, args.settle = 300, 150, 1, 3, 1.0
    raise_nofile()
    out = args.out or RESULTS / (
        "convergence_replicas_quick.json" if args.quick else "convergence_replicas.json"
    )
    with tempfile.TemporaryDirectory(prefix="convergence-replicas-") as tmp:
        try:
            results = run(args, Path(tmp))
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print_table(results)
    write_json(
        out,
        {
            "benchmark": "convergence_replicas",
            "quick": args.quick,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": machine_info(),
            "targets": {"p99_s": TARGET_P99, "failover_p99_s": TARGET_FAILOVER_P99, "failed_acks": 0},
            **results,
        },
    )
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
