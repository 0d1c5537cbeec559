"""Convergence: how long one rules change takes to reach N real subscribers.

The control service runs as `python -m meshlib control` in its own process, so its CPU time and
memory are read apart from the clients' (from /proc). N subscribers, each the real
`meshlib.control.subscriber.Subscriber` that every Mesh uses to apply pushed state (real SSE
over loopback, real acks), are spread over `--workers` processes; each worker runs one asyncio
loop. By default each subscriber has its own `httpx.AsyncClient`, as in a Mesh (`--pool shared`
gives each worker one client with no connection limit instead: httpcore's pool then scans all
its connections for every request, which is quadratic with a thousand streams in one pool and
measures httpcore rather than the control service).

For each size N, on a fresh control service and data dir:

1. apply a rule set, then the same apply three times with no stream open (the commit alone);
2. open `--probes` raw watch streams: bare sockets that read the SSE bytes and note when a
   `rules` event arrives, without parsing, JSON or acks. They show when the service's write
   reached a client, whatever the load of the subscribers' processes;
3. connect the N subscribers (at most `--connect-concurrency` connecting at once per worker),
   time until every one has applied the first snapshot, wait `--settle` seconds (longer than
   the 5 s keep-alive, so the snapshot acks' connections are closed) and read the service's
   RSS (VmRSS in /proc/PID/status) and open files, before and after;
4. `--applies` times: wait `--gap` seconds, `PUT /v1/config` a changed rule set (admin token
   from DATA/admin.token), and time each subscriber's sink being called with the new version
   (or a later one); then wait until every ack has been answered (httpx response hook on
   `POST /v1/ack`: the service records an ack before it answers 204), so that no apply's acks
   overlap the next apply.

Latencies are from the PUT's response, as asked of the benchmark, and also from the moment the
PUT was sent: the service writes the event to every stream before it answers the PUT, so the
response already comes after the fan-out. Percentiles are over the pooled distribution (every
subscriber in every apply of a size: N x applies values); the range of the per-apply p99s is
printed beside them. Not converged within `--converge-timeout`, reconnects (watch requests
beyond one per subscriber, counted with an httpx request hook) and streams the service dropped
as slow (`meshlib_control_subscribers_dropped_total`) are counted.

The workers' own garbage collector is tuned like the control service's (meshlib.control.gc_tuning):
thresholds raised, and their heap frozen once every subscriber is connected (`--worker-gc-default`
leaves CPython's settings). That is the benchmark's, not the mesh's: hundreds of subscribers with
their clients share one heap here, and every full collection walked all of them (a Mesh process
holds one subscriber).
The subscribers' HTTP clients keep idle connections as the Subscriber's own client does
(`subscriber.KEEPALIVE_EXPIRY`), so acks reuse a connection as they would in a Mesh.

Timestamps are `time.monotonic()` in every process: on Linux it is CLOCK_MONOTONIC, one clock
for the whole machine, so values taken in different processes compare directly.

Every process raises its open-file limit to the hard limit (the control service inherits the
benchmark's); everything listens on 127.0.0.1; child processes are stopped on error, Ctrl-C
and SIGTERM, the control service also if this process is killed (PR_SET_PDEATHSIG); `--timeout`
bounds the whole run.

    python bench/convergence.py                      # sizes 100, 1000, 5000 (5 to 7 min on 2 cores)
    python bench/convergence.py --quick              # sizes 50, 200 (under a minute)
    python bench/convergence.py --sizes 1000 --applies 10 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import gc
import json
import math
import multiprocessing
import multiprocessing.connection as mpc
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import _plots
import httpx
from _common import RESULTS, cpu_seconds, machine_info, median, percentile, table, write_json

TARGET_N = 1000
TARGET_P99 = 1.0  # seconds, at TARGET_N subscribers
CLIENT_SERVICE = "bench-client"
GC_THRESHOLDS = (20_000, 20, 20)  # the workers' collector, as meshlib.control.gc_tuning sets the service's
PROBE_SERVICE = "bench-probe"


class BenchError(Exception):
    pass


class OverallTimeout(BaseException):
    """Raised from SIGALRM when the whole run exceeds --timeout."""


# -- processes and /proc ----------------------------------------------------------------------


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


_TCP_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPSynRetrans", "TCPReqQFullDrop")


def tcp_counters() -> dict[str, int]:
    """Machine-wide TCP counters that show a connection storm (listen queue overflows, SYN retries)."""
    try:
        with open("/proc/net/netstat", encoding="ascii") as f:
            lines = [line.split() for line in f if line.startswith("TcpExt:")]
    except OSError:
        return {}
    if len(lines) < 2:
        return {}
    values = dict(zip(lines[0][1:], lines[1][1:], strict=False))
    return {k: int(values[k]) for k in _TCP_COUNTERS if k in values}


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limit(pid: int) -> int | None:
    with open(f"/proc/{pid}/limits", encoding="ascii") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return None


def _die_with_parent() -> None:
    """In the control service's child: get SIGTERM if the benchmark process dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ControlService:
    """`python -m meshlib control` on a free port with a fresh data dir."""

    def __init__(self, root: Path) -> None:
        self.data = root / "data"
        self.log_path = root / "control.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshlib",
                "control",
                "--port",
                str(self.port),
                "--data",
                str(self.data),
                "--log-level",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            process_group=0,  # Ctrl-C reaches only us; stop() ends it in order
            preexec_fn=_die_with_parent,
        )
        self.pid = self.process.pid
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"the control service did not start; see {self.log_path}: {self.log_tail()}")
            time.sleep(0.05)
        self.token = (self.data / "admin.token").read_text().strip()

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


# -- the rules applied ------------------------------------------------------------------------


def documents(services: int, generation: int) -> list[dict[str, Any]]:
    """Endpoints, Destination and Route for each service; `generation` changes the weights."""
    docs: list[dict[str, Any]] = []
    for i in range(services):
        name = f"svc{i}"
        weight = (generation * 7 + i) % 99 + 1
        docs += [
            {
                "kind": "Endpoints",
                "service": name,
                "endpoints": [
                    {"address": f"127.0.0.1:{9000 + 2 * i}", "labels": {"version": "v1"}},
                    {"address": f"127.0.0.1:{9001 + 2 * i}", "labels": {"version": "v2"}},
                ],
            },
            {
                "kind": "Destination",
                "service": name,
                "load_balancer": "round_robin",
                "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
            },
            {
                "kind": "Route",
                "service": name,
                "routes": [
                    {
                        "match": {"path": {"prefix": "/api"}},
                        "to": [{"subset": "v1", "weight": 100 - weight}, {"subset": "v2", "weight": weight}],
                        "timeout": "2s",
                        "retries": {"attempts": 3, "per_try_timeout": "500ms"},
                    }
                ],
            },
        ]
    return docs


# -- worker processes (subscribers) -----------------------------------------------------------


class Tracker:
    """When each version reached each of a worker's subscribers (or each ack was answered);
    tells the benchmark process once all of them have it."""

    def __init__(self, count: int, conn: mpc.Connection, kind: str = "done") -> None:
        self.count = count
        self.conn = conn
        self.kind = kind
        self.arrivals: dict[int, list[float | None]] = {}
        self.arrived: dict[int, int] = {}

    def record(self, index: int, version: int, now: float) -> None:
        times = self.arrivals.get(version)
        if times is None:
            times = self.arrivals[version] = [None] * self.count
            self.arrived[version] = 0
        if times[index] is None:
            times[index] = now
            self.arrived[version] += 1
            if self.arrived[version] == self.count:
                self.conn.send((self.kind, version, now))


class Probe:
    """The sink of one subscriber: notes when each version first reaches it."""

    __slots__ = ("first", "index", "tracker", "version")

    def __init__(self, index: int, tracker: Tracker) -> None:
        self.index = index
        self.tracker = tracker
        self.version: int | None = None
        self.first = asyncio.Event()

    def sink(self, state: Any) -> None:
        self.saw(state.version)
        return None

    def saw(self, version: int) -> None:
        if self.version is None:
            self.version = version
            self.first.set()
        elif version > self.version:
            now = time.monotonic()
            # A subscriber that reconnected may get a later snapshot without the versions between.
            for v in range(self.version + 1, version + 1):
                self.tracker.record(self.index, v, now)
            self.version = version


class Recorder:
    """Sits under the subscribers' httpx clients: counts watch requests (reconnects) and notes
    when each ack was settled: answered (the service records an ack before it answers 204) or
    failed (an ack lost is repaired by the next one, says the Subscriber; it must not be
    waited for)."""

    def __init__(self, prefix: str, acks: Tracker) -> None:
        self.prefix = prefix
        self.acks = acks
        self.watch_requests = 0
        self.failures: collections.Counter[str] = collections.Counter()
        # when each subscriber's latest watch was answered 200 (its stream open), by index
        self.opened: list[float | None] = [None] * acks.count

    def wrap(self, inner: httpx.AsyncBaseTransport) -> httpx.AsyncBaseTransport:
        recorder = self

        class Transport(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                path = request.url.path
                if path == "/v1/watch":
                    recorder.watch_requests += 1
                    response = await inner.handle_async_request(request)
                    if response.status_code == 200:
                        client = request.url.params.get("client", "")
                        recorder.opened[int(client.removeprefix(recorder.prefix))] = time.monotonic()
                    return response
                if path != "/v1/ack":
                    return await inner.handle_async_request(request)
                body = json.loads(request.content)
                index = int(body["client"].removeprefix(recorder.prefix))
                try:
                    response = await inner.handle_async_request(request)
                except BaseException as exc:
                    recorder.failures[type(exc).__name__] += 1
                    recorder.acks.record(index, body["version"], time.monotonic())
                    raise
                if response.status_code != 204:
                    recorder.failures[f"HTTP {response.status_code}"] += 1
                recorder.acks.record(index, body["version"], time.monotonic())
                return response

            async def aclose(self) -> None:
                await inner.aclose()

        return Transport()


def worker_main(index: int, url: str, count: int, opts: dict[str, Any], conn: mpc.Connection) -> None:
    raise_nofile()
    run = _raw_probes if opts.get("raw") else _subscribers
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(index, url, count, opts, conn))


async def _serve_commands(
    conn: mpc.Connection,
    tracker: Tracker,
    acks: Tracker | None,
    connect: Callable[[], Awaitable[None]],
    status: Callable[[], dict[str, Any]],
    tasks: list[asyncio.Task[Any]],
    opened: Callable[[], list[float | None]] | None = None,
) -> None:
    """Answer the benchmark process until it says stop (or goes away)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    async def connect_and_report() -> None:
        started = time.monotonic()
        await connect()
        conn.send(("connected", started, time.monotonic()))

    def on_command() -> None:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the benchmark process is gone
            stop.set()
            return
        kind = message[0]
        if kind == "connect":
            tasks.append(asyncio.create_task(connect_and_report()))
        elif kind == "collect":
            version = message[1]
            times = tracker.arrivals.get(version, [None] * tracker.count)
            acked = acks.arrivals.get(version, [None] * acks.count) if acks else []
            conn.send(("times", version, times, acked, status()))
        elif kind == "status":
            conn.send(("status", status()))
        elif kind == "opened":
            conn.send(("opened", opened() if opened is not None else []))
        elif kind == "stop":
            stop.set()

    loop.add_reader(conn.fileno(), on_command)
    conn.send(("ready", os.getpid()))
    try:
        await stop.wait()
    finally:
        loop.remove_reader(conn.fileno())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _subscribers(index: int, url: str, count: int, opts: dict[str, Any], conn: mpc.Connection) -> None:
    """`count` real Subscribers, each applying into a Probe."""
    from meshlib.control.subscriber import KEEPALIVE_EXPIRY, Subscriber, control_client

    if opts.get("freeze", True):
        gc.set_threshold(*GC_THRESHOLDS)
    tracker = Tracker(count, conn)
    acks = Tracker(count, conn, "acked")
    # client ids unique over every group of workers (bench/convergence_replicas.py has one per replica)
    prefix = f"{opts.get('prefix', '')}w{index}-"
    record = Recorder(prefix, acks)
    tls = ssl.create_default_context()  # unused on http://; shared so each client does not build one
    clients: list[httpx.AsyncClient] = []

    def new_client() -> httpx.AsyncClient:
        # the Subscriber's own client's transport (`--subscriber-transport httpcore`: httpx's),
        # keeping its ack connection as that does (KEEPALIVE_EXPIRY)
        limits = httpx.Limits(
            max_connections=None, max_keepalive_connections=None, keepalive_expiry=KEEPALIVE_EXPIRY
        )
        if opts.get("transport") == "httpcore":
            inner = httpx.AsyncHTTPTransport(limits=limits, verify=tls)
            client = httpx.AsyncClient(timeout=httpx.Timeout(10.0), transport=record.wrap(inner))
        else:
            client = control_client(httpx.Timeout(10.0), {"verify": tls, "limits": limits}, record.wrap)
        clients.append(client)
        return client

    shared = new_client() if opts["pool"] == "shared" else None
    probes = [Probe(i, tracker) for i in range(count)]
    subscribers: list[Any] = []
    tasks: list[asyncio.Task[Any]] = []

    async def connect() -> None:
        gate = asyncio.Semaphore(opts["concurrency"])

        async def one(i: int) -> None:
            async with gate:
                sub = Subscriber(
                    url,
                    service=CLIENT_SERVICE,
                    client_id=f"{prefix}{i}",
                    sink=probes[i].sink,
                    http=shared or new_client(),
                )
                subscribers.append(sub)
                tasks.append(asyncio.create_task(sub.run()))
                await probes[i].first.wait()

        await asyncio.gather(*(one(i) for i in range(count)))
        if opts.get("freeze", True):
            # The bench's own heap, not the mesh's: hundreds of subscribers with their clients in
            # one process make every full collection walk all of them (a Mesh process holds one).
            gc.collect()
            gc.freeze()

    def status() -> dict[str, Any]:
        return {
            "first_state": sum(p.first.is_set() for p in probes),
            "streams_open": sum(s.connected.is_set() for s in subscribers),
            "watch_requests": record.watch_requests,
            "ack_failures": dict(record.failures),
            "applied": sum(s.applied for s in subscribers),
        }

    try:
        await _serve_commands(conn, tracker, acks, connect, status, tasks, lambda: record.opened)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
        with contextlib.suppress(OSError):
            conn.send(("stopped",))


async def _raw_probes(index: int, url: str, count: int, opts: dict[str, Any], conn: mpc.Connection) -> None:
    """`count` bare watch streams on raw sockets: no SSE or JSON parsing, no acks. They note
    when the bytes of each `rules` event arrive, which is as close to the moment the control
    service wrote them as a client can see."""
    port = int(url.rsplit(":", 1)[1])
    tracker = Tracker(count, conn)
    probes = [Probe(i, tracker) for i in range(count)]
    writers: list[asyncio.StreamWriter] = []
    tasks: list[asyncio.Task[Any]] = []
    marker = b"event: rules"

    async def watch(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        writer.write(
            f"GET /v1/watch?client=probe-{index}-{i}&service={PROBE_SERVICE} HTTP/1.1\r\n"
            "Host: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        version = opts["base_version"]
        tail = b""
        while True:
            data = await reader.read(1 << 16)
            if not data:
                return
            if probes[i].version is None and b"event: snapshot" in tail + data:
                probes[i].saw(version)
            window = tail + data
            for _ in range(window.count(marker) - tail.count(marker)):
                version += 1
                probes[i].saw(version)
            tail = data[-len(marker) :]

    async def connect() -> None:
        for i in range(count):
            tasks.append(asyncio.create_task(watch(i)))
        await asyncio.gather(*(p.first.wait() for p in probes))

    def status() -> dict[str, Any]:
        return {"first_state": sum(p.first.is_set() for p in probes), "streams_open": len(writers)}

    try:
        await _serve_commands(conn, tracker, None, connect, status, tasks)
    finally:
        for writer in writers:
            writer.close()
        with contextlib.suppress(OSError):
            conn.send(("stopped",))


class Workers:
    """Worker processes and the pipes to them."""

    def __init__(self, url: str, n: int, workers: int, opts: dict[str, Any], name: str = "worker") -> None:
        ctx = multiprocessing.get_context("spawn")
        self.counts = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
        self.counts = [c for c in self.counts if c]
        self.conns: list[mpc.Connection] = []
        self.procs: list[Any] = []
        for i, count in enumerate(self.counts):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main,
                args=(i, url, count, opts, theirs),
                daemon=True,
                name=f"convergence-{name}-{i}",
            )
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)
        self.pids = [p.pid for p in self.procs]
        self.pending: list[list[tuple[Any, ...]]] = [[] for _ in self.procs]
        self.expect("ready", 60)

    def send(self, message: tuple[Any, ...]) -> None:
        for conn in self.conns:
            conn.send(message)

    def expect(self, kind: str, timeout: float, match: Any = None) -> list[tuple[Any, ...] | None]:
        """One message of `kind` from each worker (None where none came in time)."""
        got: list[tuple[Any, ...] | None] = [None] * len(self.conns)

        def wanted(message: tuple[Any, ...]) -> bool:
            return message[0] == kind and (match is None or message[1] == match)

        for i, pending in enumerate(self.pending):  # arrived while something else was awaited
            for message in pending:
                if wanted(message):
                    got[i] = message
                    pending.remove(message)
                    break
        deadline = time.monotonic() + timeout
        while any(g is None for g in got):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            waiting = [c for c, g in zip(self.conns, got, strict=True) if g is None]
            for conn in mpc.wait(waiting, left):
                i = self.conns.index(conn)  # type: ignore[arg-type]
                try:
                    message = conn.recv()  # type: ignore[union-attr]
                except EOFError:
                    raise BenchError(f"worker {i} exited (exit code {self.procs[i].exitcode})") from None
                if wanted(message) and got[i] is None:
                    got[i] = message
                elif message[0] in ("done", "acked"):
                    self.pending[i].append(message)
        return got

    def ask(self, message: tuple[Any, ...], kind: str, timeout: float = 30) -> list[tuple[Any, ...]]:
        self.send(message)
        replies = self.expect(kind, timeout, message[1] if len(message) > 1 else None)
        if any(r is None for r in replies):
            raise BenchError(f"a worker did not answer {message[0]!r} in {timeout} s")
        return replies  # type: ignore[return-value]

    def connect(self, timeout: float, what: str) -> float:
        """Connect every worker's streams; the monotonic time the last one finished."""
        self.send(("connect",))
        got = self.expect("connected", timeout)
        if any(g is None for g in got):
            states = self.ask(("status",), "status")
            have = sum(s[1]["first_state"] for s in states)
            raise BenchError(f"only {have} of {sum(self.counts)} {what} connected within {timeout:.0f} s")
        return max(g[2] for g in got if g)

    def stop(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        deadline = time.monotonic() + 15
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()


def metric(http: httpx.Client, url: str, name: str) -> float | None:
    for line in http.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"meshlib_control_{name} "):
            return float(line.split()[1])
    return None


def run_size(n: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"n{n}-", dir=root))
    load = os.getloadavg()
    control = ControlService(workdir)
    workers: Workers | None = None
    probes: Workers | None = None
    http = httpx.Client(timeout=60)
    try:
        pid = control.pid
        auth = {"authorization": f"Bearer {control.token}"}
        generation = 0
        r = http.put(f"{control.url}/v1/config", json=documents(args.services, generation), headers=auth)
        r.raise_for_status()
        version = r.json()["version"]
        config_bytes = len(http.get(f"{control.url}/v1/config").content)
        # The same apply with no stream open: the commit's own time and CPU, to set the fan-out apart.
        baseline = []
        for _ in range(3):
            generation += 1
            cpu, t = cpu_seconds(pid), time.monotonic()
            r = http.put(f"{control.url}/v1/config", json=documents(args.services, generation), headers=auth)
            baseline.append((time.monotonic() - t, cpu_seconds(pid) - cpu))
            r.raise_for_status()
            version = r.json()["version"]
        put_alone_s = median([b[0] for b in baseline])
        put_alone_cpu_s = median([b[1] for b in baseline])

        workers = Workers(
            control.url,
            n,
            args.workers,
            {
                "concurrency": args.connect_concurrency,
                "pool": args.pool,
                "freeze": not args.worker_gc_default,
            },
        )
        if args.probes:
            probes = Workers(control.url, args.probes, 1, {"raw": True, "base_version": version}, "probe")
            probes.connect(30, "raw probes")
        time.sleep(1.0)
        rss_before = proc_status(pid)
        fds_before = open_fds(pid)
        cpu0 = cpu_seconds(pid)

        t0 = time.monotonic()
        connected_at = workers.connect(30 + n * 0.03, "subscribers")
        connect_s = connected_at - t0
        connect_cpu = cpu_seconds(pid) - cpu0
        # Let the snapshot acks settle and their idle connections expire (uvicorn closes
        # keep-alive connections after 5 s), so what is measured is N open watch streams.
        snapshot_acks = workers.expect("acked", args.ack_timeout, version)
        snapshot_acked_s = max((m[2] for m in snapshot_acks if m), default=math.nan) - t0
        connect_acked_cpu = cpu_seconds(pid) - cpu0
        time.sleep(args.settle)
        rss_after = proc_status(pid)
        fds_after = open_fds(pid)
        subscribers_seen = metric(http, control.url, "subscribers")
        print(
            f"  N={n:,}: connected in {connect_s:.1f} s; control service RSS "
            f"{rss_before['VmRSS'] / 1024:.1f} -> {rss_after['VmRSS'] / 1024:.1f} MiB, "
            f"{fds_after} open fds; load average {load[0]:.1f}",
            flush=True,
        )

        applies = []
        idle_share: float | None = None
        for k in range(args.applies):
            idle_cpu, idle_t = cpu_seconds(pid), time.monotonic()
            time.sleep(args.gap)
            generation += 1
            body = documents(args.services, generation)
            cpu_before = {p: cpu_seconds(p) for p in [pid, *workers.pids]}
            if k == 0:  # the streams are open and nothing else is going on (acks of later applies are not)
                idle_share = (cpu_before[pid] - idle_cpu) / (time.monotonic() - idle_t)
            tcp_before = tcp_counters()
            t_req = time.monotonic()
            r = http.put(f"{control.url}/v1/config", json=body, headers=auth)
            t_resp = time.monotonic()
            cpu_put = cpu_seconds(pid) - cpu_before[pid]
            r.raise_for_status()
            if r.json()["version"] != version + 1:
                raise BenchError(f"expected version {version + 1}, got {r.json()['version']}")
            version += 1
            workers.expect("done", args.converge_timeout, version)
            cpu_conv = {p: cpu_seconds(p) for p in cpu_before}
            workers.expect("acked", args.ack_timeout, version)
            tcp_after = tcp_counters()
            cpu_acked = {p: cpu_seconds(p) for p in cpu_before}
            replies = workers.ask(("collect", version), "times")
            arrived = [t for reply in replies for t in reply[2] if t is not None]
            acked = [t for reply in replies for t in reply[3] if t is not None]
            raw: list[float] = []
            if probes is not None:
                raw = [
                    t
                    for reply in probes.ask(("collect", version), "times")
                    for t in reply[2]
                    if t is not None
                ]
            a = {
                "version": version,
                "response_s": t_resp - t_req,
                "converged": len(arrived),
                "not_converged": n - len(arrived),
                "from_response_s": sorted(t - t_resp for t in arrived),
                "from_request_s": sorted(t - t_req for t in arrived),
                "probes_from_response_s": sorted(t - t_resp for t in raw),
                "probes_from_request_s": sorted(t - t_req for t in raw),
                "acked": len(acked),
                "all_acked_from_response_s": max(acked) - t_resp if len(acked) == n else None,
                "server_cpu_during_put_s": cpu_put,
                "server_cpu_fanout_per_stream_s": max(0.0, cpu_put - put_alone_cpu_s) / n,
                "server_cpu_to_converge_s": cpu_conv[pid] - cpu_before[pid],
                "clients_cpu_to_converge_s": sum(cpu_conv[p] - cpu_before[p] for p in workers.pids),
                "server_cpu_to_acked_s": cpu_acked[pid] - cpu_before[pid],
                "clients_cpu_to_acked_s": sum(cpu_acked[p] - cpu_before[p] for p in workers.pids),
                "wall_to_converge_s": max(arrived) - t_req if arrived else None,
                "tcp": {k: tcp_after[k] - tcp_before.get(k, 0) for k in tcp_after},
            }
            applies.append(a)
            fr = a["from_response_s"]
            print(
                f"    apply {k + 1}: PUT {ms(a['response_s'])} ms; to sinks p50 {ms(percentile(fr, 0.5))}"
                f" p99 {ms(percentile(fr, 0.99))} max {ms(fr[-1] if fr else None)} ms; raw probes max "
                f"{ms(a['probes_from_response_s'][-1] if raw else None)} ms; all acked "
                f"{ms(a['all_acked_from_response_s'])} ms; missed {a['not_converged']}; CPU to converge: "
                f"service {ms(a['server_cpu_to_converge_s'])} ms, "
                f"clients {ms(a['clients_cpu_to_converge_s'])} ms",
                flush=True,
            )

        states = workers.ask(("status",), "status")
        watch_requests = sum(s[1]["watch_requests"] for s in states)
        ack_failures: collections.Counter[str] = collections.Counter()
        for state in states:
            ack_failures.update(state[1]["ack_failures"])
        rss_end = proc_status(pid)
        return summarize(
            n,
            applies,
            {
                "load_average_at_start": [round(x, 2) for x in load],
                "workers": len(workers.counts),
                "per_worker": workers.counts,
                "raw_probes": args.probes,
                "connect_s": connect_s,
                "connect_server_cpu_s": connect_cpu,
                "connect_acks_settled_s": snapshot_acked_s if all(snapshot_acks) else None,
                "connect_server_cpu_with_acks_s": connect_acked_cpu,
                "rss_before_kib": rss_before["VmRSS"],
                "rss_after_connect_kib": rss_after["VmRSS"],
                "rss_end_kib": rss_end["VmRSS"],
                "rss_peak_kib": rss_end["VmHWM"],
                "per_connection_kib": (rss_after["VmRSS"] - rss_before["VmRSS"]) / n,
                "fds_before": fds_before,
                "fds_after_connect": fds_after,
                "service_nofile_limit": nofile_limit(pid),
                "subscribers_seen_by_service": subscribers_seen,
                "watch_requests": watch_requests,
                "reconnects": watch_requests - n,
                "ack_failures": dict(ack_failures),
                "streams_open_at_end": sum(s[1]["streams_open"] for s in states),
                "dropped_by_service": metric(http, control.url, "subscribers_dropped_total"),
                "server_idle_cpu_share": idle_share,
                "rules_json_bytes": config_bytes,
                "put_without_streams_s": put_alone_s,
                "put_without_streams_cpu_s": put_alone_cpu_s,
            },
        )
    except BenchError as exc:
        raise BenchError(f"N={n}: {exc} (control service log: {control.log_tail()})") from None
    finally:
        http.close()
        for group in (workers, probes):
            if group is not None:
                group.stop()
        control.stop()


_DISTRIBUTIONS = ("from_response_s", "from_request_s", "probes_from_response_s", "probes_from_request_s")
CURVE_POINTS = 101  # quantiles 0, 1%, ..., 100% of each pooled distribution kept in the JSON


def summarize(n: int, applies: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    def pooled(key: str) -> list[float]:
        return sorted(x for a in applies for x in a[key])

    def stats(values: list[float]) -> dict[str, float | None]:
        if not values:
            return dict.fromkeys(("min_s", "p50_s", "p90_s", "p99_s", "max_s"))
        return {
            "min_s": values[0],
            "p50_s": percentile(values, 0.5),
            "p90_s": percentile(values, 0.9),
            "p99_s": percentile(values, 0.99),
            "max_s": values[-1],
        }

    def med(key: str) -> float | None:
        values = [a[key] for a in applies if a[key] is not None]
        return median(values) if values else None

    return {
        "n": n,
        **info,
        "applies": len(applies),
        "samples": sum(len(a["from_response_s"]) for a in applies),
        "not_converged": sum(a["not_converged"] for a in applies),
        "not_acked": sum(n - a["acked"] for a in applies),
        "from_response": stats(pooled("from_response_s")),
        "from_request": stats(pooled("from_request_s")),
        "raw_probes_from_response": stats(pooled("probes_from_response_s")),
        "raw_probes_from_request": stats(pooled("probes_from_request_s")),
        "per_apply_p99_s": [stats(a["from_response_s"])["p99_s"] for a in applies],
        "per_apply_raw_probe_max_s": [max(a["probes_from_response_s"], default=None) for a in applies],
        "apply_response_median_s": med("response_s"),
        "all_acked_median_s": med("all_acked_from_response_s"),
        "server_cpu_during_put_median_s": med("server_cpu_during_put_s"),
        "server_cpu_fanout_per_stream_median_s": med("server_cpu_fanout_per_stream_s"),
        "server_cpu_to_converge_median_s": med("server_cpu_to_converge_s"),
        "server_cpu_per_ack_median_s": median(
            [
                (a["server_cpu_to_acked_s"] - a["server_cpu_during_put_s"]) / max(1, a["acked"])
                for a in applies
            ]
        ),
        "tcp": {k: sum(a["tcp"].get(k, 0) for a in applies) for k in _TCP_COUNTERS},
        "clients_cpu_to_converge_median_s": med("clients_cpu_to_converge_s"),
        "server_cpu_to_acked_median_s": med("server_cpu_to_acked_s"),
        "clients_cpu_to_acked_median_s": med("clients_cpu_to_acked_s"),
        # the arrival curves, downsampled: value at quantile i / (CURVE_POINTS - 1), pooled over the applies
        "arrival_quantiles_s": {
            key.removesuffix("_s"): [
                quantile(pooled(key), i / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)
            ]
            for key in _DISTRIBUTIONS
        },
        # every subscriber's arrival in every apply, for the plot (not written out)
        "_arrivals": {key: pooled(key) for key in ("from_request_s", "probes_from_request_s")},
        "apply_details": [
            {k: v for k, v in a.items() if k not in _DISTRIBUTIONS}
            | {
                "p50_s": stats(a["from_response_s"])["p50_s"],
                "p99_s": stats(a["from_response_s"])["p99_s"],
                "max_s": max(a["from_response_s"], default=None),
                "raw_probe_max_s": max(a["probes_from_response_s"], default=None),
            }
            for a in applies
        ],
    }


def quantile(sorted_values: list[float], q: float) -> float | None:
    """Value at quantile q of sorted values, interpolated between ranks (q 0: the minimum, 1: the
    maximum); None when there are none."""
    if not sorted_values:
        return None
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def plot(results: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> bool:
    """Convergence curves: the share of the N subscribers whose sink has the new version, against
    the time since the PUT was sent (every apply of a size pooled), one curve per N; the raw
    probes' bytes and the PUT's (median) response for comparison. False without matplotlib."""
    made = _plots.figure()
    if made is None:
        return False
    fig, (ax,) = made
    series: dict[str, list[float]] = {}
    styles: dict[str, dict[str, Any]] = {}
    puts = []
    for k, r in enumerate(results):
        arrivals = r.get("_arrivals", {})
        color = f"C{k % 10}"
        label = f"N={r['n']:,}: subscribers applied"
        series[label] = [1e3 * x for x in arrivals.get("from_request_s", [])]
        styles[label] = {"color": color, "linewidth": 1.6}
        if arrivals.get("probes_from_request_s"):
            label = f"N={r['n']:,}: raw probes got the bytes"
            series[label] = [1e3 * x for x in arrivals["probes_from_request_s"]]
            styles[label] = {"color": color, "linewidth": 0.9, "linestyle": "--"}
        if r.get("apply_response_median_s") is not None:
            puts.append((1e3 * r["apply_response_median_s"], color, r["n"]))
    sizes = ", ".join(f"{r['n']:,}" for r in results)
    _plots.distribution(
        ax,
        series,
        kind="cdf",
        styles=styles,
        title=f"A rules change reaching N subscribers (N = {sizes}; {args.applies} applies each, pooled; "
        f"{args.workers} client processes)",
        xlabel="time since the PUT /v1/config was sent, ms (log)",
        ylabel="share of subscribers with the change",
        legend=False,
    )
    for x, color, n in puts:
        ax.axvline(x, color=color, linestyle=":", linewidth=1.2, label=f"N={n:,}: PUT answered (median)")
    ax.legend(fontsize=_plots.LEGEND_SIZE, loc="best")
    return _plots.save(fig, path)


# -- main -------------------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return "-" if seconds is None or seconds != seconds else f"{1000 * seconds:.0f}"


def print_table(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        fr, req, raw = r["from_response"], r["from_request"], r["raw_probes_from_request"]
        p99s = [x for x in r["per_apply_p99_s"] if x is not None] or [None]
        rows.append(
            [
                f"{r['n']:,}",
                ms(fr["p50_s"]),
                ms(fr["p99_s"]),
                ms(fr["max_s"]),
                f"{ms(min(p99s))} to {ms(max(p99s))}" if p99s[0] is not None else "-",
                ms(req["p99_s"]),
                ms(r["apply_response_median_s"]),
                ms(raw["max_s"]),
                ms(r["all_acked_median_s"]),
                f"{r['not_converged']}",
                f"{r['reconnects']}/{r['dropped_by_service'] or 0:.0f}",
                str(sum(r["ack_failures"].values())),
            ]
        )
    print("Convergence, ms (sinks: pooled over all applies; PUT, acked: median of the applies)")
    print(
        table(
            [
                "N",
                "p50",
                "p99",
                "max",
                "p99 each apply",
                "p99 from PUT sent",
                "PUT",
                "probes max",
                "all acked",
                "missed",
                "reconn/drop",
                "acks failed",
            ],
            rows,
        )
    )
    print(
        "p50/p99/max: from the PUT response to each sink; PUT: the apply's own response time (the\n"
        "service writes the event to every stream before it answers); probes max: latest arrival of\n"
        "the raw bytes at the raw probes, from the PUT sent; all acked: from the PUT response until\n"
        "every ack was answered (or failed); missed: subscriber-applies not converged within the\n"
        "timeout; reconn/drop: watch reconnects / streams dropped as slow; acks failed: ack requests\n"
        "that raised (the Subscriber drops them; the next ack repairs)."
    )
    rows = []
    for r in results:
        n = r["n"]
        rows.append(
            [
                f"{n:,}",
                f"{r['connect_s']:.1f}",
                f"{r['rss_before_kib'] / 1024:.0f} -> {r['rss_after_connect_kib'] / 1024:.0f}",
                f"{r['per_connection_kib']:.0f}",
                f"{r['fds_after_connect']:,}",
                ms(r["put_without_streams_s"]),
                f"{1e6 * r['server_cpu_fanout_per_stream_median_s']:.0f}",
                f"{1e6 * r['server_cpu_per_ack_median_s']:.0f}",
                f"{1e6 * r['clients_cpu_to_converge_median_s'] / n:.0f}",
                "-" if r["server_idle_cpu_share"] is None else f"{100 * r['server_idle_cpu_share']:.1f}",
                " ".join(f"{x:.1f}" for x in r["load_average_at_start"]),
            ]
        )
    print()
    print("Resources (CPU: median of the applies, per subscriber)")
    print(
        table(
            [
                "N",
                "connect s",
                "service RSS MiB",
                "KiB/stream",
                "service fds",
                "PUT alone ms",
                "service us/stream",
                "service us/ack",
                "clients us/sub",
                "service idle CPU %",
                "load avg",
            ],
            rows,
        )
    )
    print(
        "PUT alone: the same apply with no stream open; service us/stream: the service's CPU\n"
        "during the PUT, less that of the PUT alone, / N (the fan-out);\n"
        "service us/ack: its CPU from the PUT response until every ack was answered / acks;\n"
        "clients us/sub: the workers' CPU from the PUT until the last sink / N (SSE parse, JSON,\n"
        "sink, and the acks started meanwhile); idle CPU: the service with N streams open and nothing else\n"
        "to do, in % of one core (its SSE heartbeats, every 15 s per stream)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,5000", help="subscriber counts (default 100,1000,5000)")
    parser.add_argument("--quick", action="store_true", help="sizes 50,200 and 3 applies")
    parser.add_argument("--workers", type=int, default=4, help="client processes (default 4)")
    parser.add_argument(
        "--pool",
        choices=["shared", "own"],
        default="own",
        help="an httpx.AsyncClient per subscriber, as in a Mesh (own, the default), or one per worker "
        "(shared: httpcore's pool scans all its connections for each request, quadratic at this scale)",
    )
    parser.add_argument(
        "--worker-gc-default",
        action="store_true",
        help="leave the client processes' garbage collector as CPython sets it (by default their heap is "
        "frozen once connected and their thresholds raised: hundreds of subscribers share one heap there)",
    )
    parser.add_argument("--applies", type=int, default=5, help="measured applies per size (default 5)")
    parser.add_argument(
        "--gap",
        type=float,
        default=6.0,
        help="seconds before each apply (default 6: longer than the 5 s keep-alive, so acks reconnect "
        "as they would when applies are rare)",
    )
    parser.add_argument("--settle", type=float, default=6.0, help="seconds after connecting (default 6)")
    parser.add_argument(
        "--probes", type=int, default=16, help="raw watch streams timing the bytes' arrival (default 16)"
    )
    parser.add_argument("--services", type=int, default=10, help="services in the rule set (default 10)")
    parser.add_argument(
        "--connect-concurrency", type=int, default=50, help="connects in flight per worker (default 50)"
    )
    parser.add_argument("--converge-timeout", type=float, default=20.0, help="per apply (default 20 s)")
    parser.add_argument(
        "--ack-timeout", type=float, default=60.0, help="wait for every ack after converging (default 60 s)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="overall limit (default 900 s)")
    parser.add_argument("--json", type=Path, default=RESULTS / "convergence.json")
    parser.add_argument("--png", type=Path, default=RESULTS / "convergence.png", help="plot file")
    args = parser.parse_args(argv)
    sizes = [50, 200] if args.quick else [int(s.replace("_", "")) for s in args.sizes.split(",") if s]
    if args.quick:
        args.applies = min(args.applies, 3)
    if args.workers < 1 or args.applies < 1 or not sizes or min(sizes) < 1:
        parser.error("--workers, --applies and every size must be at least 1")

    nofile = raise_nofile()  # the control service inherits it
    need = max(sizes) * 2 + 100
    if nofile < need:
        print(f"warning: open-file limit {nofile} < {need}; large sizes may fail", file=sys.stderr)

    def on_alarm(signum: int, frame: Any) -> None:
        raise OverallTimeout(f"overall timeout of {args.timeout:.0f} s")

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(max(1, int(args.timeout)))

    root = Path(tempfile.mkdtemp(prefix="meshlib-convergence-"))
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    print(
        f"convergence: sizes {sizes}, {args.workers} worker processes, {args.applies} applies per size, "
        f"{os.cpu_count()} CPUs, open-file limit {nofile}",
        flush=True,
    )
    try:
        for n in sizes:
            results.append(run_size(n, args, root))
    except (BenchError, OverallTimeout) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.alarm(0)
        shutil.rmtree(root, ignore_errors=True)
        if results:
            print()
            print_table(results)
            target = next((r for r in results if r["n"] == TARGET_N), None)
            if target is not None:
                p99 = target["from_response"]["p99_s"]
                verdict = "PASS" if p99 < TARGET_P99 and target["not_converged"] == 0 else "FAIL"
                print(f"target p99 < {TARGET_P99:.0f} s at N={TARGET_N:,}: {ms(p99)} ms -> {verdict}")
            if plot(results, args, args.png):
                print(f"wrote {args.png}")
            for r in results:
                r.pop("_arrivals", None)
            write_json(
                args.json,
                {
                    "benchmark": "convergence",
                    "complete": len(results) == len(sizes),
                    "machine": machine_info(),
                    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
                    | {"sizes": sizes, "statistics": "pooled over all subscribers of all applies"},
                    "clock": "time.monotonic() (CLOCK_MONOTONIC, shared by all processes on the machine)",
                    "target": {"n": TARGET_N, "p99_s": TARGET_P99},
                    "elapsed_s": time.monotonic() - started,
                    "results": results,
                },
            )
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
