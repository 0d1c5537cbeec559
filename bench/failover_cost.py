"""What one subscriber's move to another replica costs: CPU of the replica that takes it over,
and of the subscriber's own process.

Two control replicas (`meshlib control --store etcd://...`) on a one-member etcd cluster of the
benchmark's own (the test harness: tests/control/etcd_cluster.py, tests/control/replicas.py);
`--subscribers` real `meshlib.control.subscriber.Subscriber`s in this process, each with its own
HTTP client as a Mesh has, all preferring the first replica. Once they are connected (and this
process's heap is frozen out of garbage collection, as bench/convergence.py's workers do), the
first replica is SIGKILLed: every stream breaks, and every subscriber resumes its watch on the
second replica with its Last-Event-ID. With `--apply`, a version is applied there at once, so
each move also takes that push and its ack (on a new connection: the old one died with the
replica).

The figures are CPU milliseconds per moved subscriber, from /proc, from the kill until every
subscriber watches the second replica (and, with `--apply`, has the version and its ack window
has passed): they move less with the machine's load than wall-clock times do. Wall time is
printed too.

    python bench/failover_cost.py                        # 1,000 subscribers, resume only
    python bench/failover_cost.py --apply                # and a push and its ack on the way
    python bench/failover_cost.py --repeat 3 --apply     # three rounds, each figure printed
    python bench/failover_cost.py --stay                 # a push alone, no move (for comparison)
    python bench/failover_cost.py --apply --profile /tmp/client.prof --py-spy /tmp/spy
                                                         # where the CPU goes, client and replica
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test harness (tests/control) and this meshlib

from convergence import GC_THRESHOLDS, cpu_seconds, documents, raise_nofile  # noqa: E402
from convergence_replicas import py_spy  # noqa: E402

from meshlib.control.endpoints import ControlEndpoints  # noqa: E402
from meshlib.control.subscriber import Subscriber  # noqa: E402
from tests.control.etcd_cluster import EtcdCluster  # noqa: E402
from tests.control.replicas import Replicas  # noqa: E402

SERVICES = 20  # the rule set's size: bench/convergence.py's default (an event of about 12 KB)


async def one_round(replicas: Replicas, args: argparse.Namespace, generation: int) -> dict[str, Any]:
    firsts = [asyncio.Event() for _ in range(args.subscribers)]
    later = [asyncio.Event() for _ in range(args.subscribers)]

    def sink(i: int) -> Any:
        def apply(state: Any) -> None:
            (later if firsts[i].is_set() else firsts)[i].set()

        return apply

    subscribers = [
        Subscriber(
            ControlEndpoints(replicas.control(*((1, 0) if args.stay else (0, 1))), return_after=None),
            service="bench",
            client_id=f"mover-{generation}-{i}",
            sink=sink(i),
        )
        for i in range(args.subscribers)
    ]
    tasks = [asyncio.create_task(s.run()) for s in subscribers]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 60)
        await asyncio.sleep(1.0)  # every snapshot ack landed
        gc.collect()
        gc.freeze()
        taker = replicas.processes[1].proc.pid  # type: ignore[union-attr]
        spies = py_spy(args.py_spy, {f"replica-{generation}": taker, f"clients-{generation}": os.getpid()})
        profile = cProfile.Profile() if args.profile else None
        if profile is not None:
            profile.enable()
        cpu_replica, cpu_clients, t0 = cpu_seconds(taker), cpu_seconds(os.getpid()), time.monotonic()
        if not args.stay:
            await asyncio.to_thread(replicas.kill, 0)
        if args.apply or args.stay:
            reply = await asyncio.to_thread(replicas.apply, 1, documents(SERVICES, generation))
            reply.raise_for_status()
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in later)), 60)
        target = replicas.url(1)
        while sum(s.watching == target for s in subscribers) < args.subscribers:
            if time.monotonic() - t0 > 60:
                raise RuntimeError("the subscribers did not all move within 60 s")
            await asyncio.sleep(0.02)
        moved_s = time.monotonic() - t0
        # the acks: each waits up to the replica's ack window (1 ms per stream) before it leaves
        await asyncio.sleep(0.3 + (args.subscribers * 0.001 + 0.5 if args.apply or args.stay else 0))
        n = args.subscribers
        if profile is not None:
            profile.disable()
            profile.dump_stats(f"{args.profile}.{generation}")
        for spy in spies:
            spy.send_signal(2)  # SIGINT: py-spy writes its profile and exits
            await asyncio.to_thread(spy.wait, 30)
        return {
            "moved_s": round(moved_s, 3),
            "replica_ms_per_move": round(1000 * (cpu_seconds(taker) - cpu_replica) / n, 3),
            "client_ms_per_move": round(1000 * (cpu_seconds(os.getpid()) - cpu_clients) / n, 3),
        }
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        gc.unfreeze()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--apply", action="store_true", help="a version applied at once after the kill")
    parser.add_argument("--repeat", type=int, default=1, help="rounds (the killed replica restarted between)")
    parser.add_argument(
        "--stay", action="store_true", help="no kill: a version pushed to subscribers of the second replica"
    )
    parser.add_argument(
        "--profile", default=None, metavar="FILE", help="cProfile this process over each move (FILE.N)"
    )
    parser.add_argument(
        "--py-spy", type=Path, default=None, metavar="DIR", help="py-spy the replica taking over the moves"
    )
    args = parser.parse_args(argv)
    raise_nofile()
    gc.set_threshold(*GC_THRESHOLDS)
    with (
        tempfile.TemporaryDirectory(prefix="failover-cost-") as tmp,
        EtcdCluster(Path(tmp) / "etcd", 1) as etcd,
        Replicas(Path(tmp) / "replicas", etcd, 2, args=("--log-level", "warning")) as replicas,
    ):
        replicas.apply(0, documents(SERVICES, 0)).raise_for_status()
        for k in range(args.repeat):
            if k:
                replicas.start(0)
            load = os.getloadavg()[0]
            result = asyncio.run(one_round(replicas, args, k + 1))
            what = "pushes, no move" if args.stay else f"moves{' with a push' if args.apply else ''}"
            print(
                f"{args.subscribers} {what}: all moved in "
                f"{result['moved_s']:.2f} s; replica {result['replica_ms_per_move']:.2f} ms CPU per move, "
                f"client {result['client_ms_per_move']:.2f} ms (load average {load:.1f})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
