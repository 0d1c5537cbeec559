"""Instructions per request, counted by valgrind's callgrind: the mesh's cost without the noise
of a shared machine (a count does not change with the load; a wall-clock figure does).

Each scenario runs in its own process under callgrind with instrumentation off; after a warm-up
a tiny C helper (compiled here with the system's C compiler, valgrind's `callgrind.h`) turns it
on for the measured loop only, so imports and setup count for nothing. Every thread of the
process counts (grpc's included). Figures are instructions per request, the mean of the loop.

- grpc, no IO: a unary RPC through a stub over `MeshChannel` / `AioMeshChannel` whose endpoint
  channels answer at once (a canned grpc channel), against the same stub over the canned channel
  itself. The difference is the mesh's own path.
- grpc, loopback: the same through real grpc channels to a grpc.aio Echo server in another
  process (`grpc_overhead.Servers`, the rules of `grpc_overhead.py`), against plain grpcio.
- telemetry, no IO: the sync client over the canned transport (overhead.py's rules) and the ASGI
  middleware called in process (inbound.py's request), each without telemetry, with an SDK
  TracerProvider sampling every trace (AlwaysOn, BatchSpanProcessor to an exporter that drops
  the spans; for the server, a new trace and a caller's sampled one) and a MeterProvider with a
  reader, and with 10% parent-based sampling (a new trace, and a trace whose caller did not
  sample it); against the plain client, the app alone.
  Collection is not in the loop (the reader collects on demand). Each server row is counted a
  second time only until the response's body is handed to the server (", until sent"): what a
  request waits for, the part that a one-at-a-time p50 reads.
- server, loopback (`server-io`): uvicorn (h11, asyncio) serving inbound.py's app, raw and behind
  the ASGI middleware without telemetry, with the SDK always-on and at 10%, each server alone
  under callgrind while this process sends it requests one at a time over loopback (http.client,
  one kept-alive connection; with `--concurrency N`, N at once over N connections); counting is
  switched on and off by signals, so nothing is added to a request. The whole server process's
  instructions per request: what issue 16's server budget ("+10% over raw uvicorn") reads as a
  count. Kernel work (the socket calls) is not counted.
- http, no IO: `httpx.Client.get` / `AsyncClient.get` over `MeshTransport` with `pick.py`'s
  canned inner transport and rules (100 endpoints, GET /api/... on the weighted rule), and
  with `overhead.py`'s rules (one endpoint, 90/10 split), against the client over the canned
  transport alone.

    python bench/instructions.py                    # everything (~8 min, server-io ~6 of them)
    python bench/instructions.py --only grpc-noio   # one group: grpc-noio, grpc-io, http, telemetry,
                                                    # server-io (--requests 3000 there: at 200 a run moves
                                                    # by up to 16,000 per request, ~10 min)
    python bench/instructions.py --requests 500
    python bench/instructions.py --only server-io --requests 3000 --concurrency 10
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WARMUP = 200
HELPER = """
#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_ZERO_STATS; }
void cg_stop(const char *label) { CALLGRIND_DUMP_STATS_AT(label); CALLGRIND_STOP_INSTRUMENTATION; }
void cg_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
"""
SENT = ", until sent"
"""The suffix of a server row that counts each request only until its response's body is sent:
what stands between a request and its answer. The rest (ending the span, counting, the next
traces decided ahead) runs while the caller reads the response, and a request made one at a
time waits for it only where it outlasts the caller's own turn."""
GROUPS = {
    "grpc-noio": ("plain", "mesh", "plain-aio", "mesh-aio"),
    "grpc-io": ("plain", "mesh", "plain-aio", "mesh-aio"),
    "http": ("sync", "async"),
    "telemetry": ("client", "server"),
    "server-io": ("plain", "mesh", "sdk always-on", "sdk 10%"),
}


# -- inside valgrind -------------------------------------------------------------------------


class Counter:
    """Counts the instructions of `loop` (callgrind's client requests via the helper)."""

    def __init__(self, helper: str, n: int) -> None:
        self._lib = ctypes.CDLL(helper)
        self.n = n

    def measure(self, label: str, call: Callable[[], Any]) -> None:
        for _ in range(WARMUP):
            call()
        self._lib.cg_start()
        for _ in range(self.n):
            call()
        self._lib.cg_stop(label.encode())

    async def measure_async(self, label: str, call: Callable[[], Any]) -> None:
        for _ in range(WARMUP):
            await call()
        self._lib.cg_start()
        for _ in range(self.n):
            await call()
        self._lib.cg_stop(label.encode())

    async def measure_until_sent(self, label: str, call: Callable[[Any], Any]) -> None:
        """`call(send)` counted until it hands `send` its response's last body message (`SENT`)."""
        toggle = self._lib.cg_toggle

        async def sent(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                toggle()  # off: the rest of the request is not counted

        for _ in range(WARMUP):
            await call(sent)
            toggle()
        for provider in PROVIDERS:  # spans queued so far exported now, not in the counted window
            provider.force_flush()
        self._lib.cg_start()  # counting on; each request turns it off when sent, the loop on again
        for _ in range(self.n):
            await call(sent)
            toggle()
        self._lib.cg_stop(label.encode())


def canned_grpc() -> tuple[Any, Any]:
    """A grpc channel (sync, aio) whose unary methods answer at once with an empty Pong."""
    from tests.grpc import echo_pb2

    pong = echo_pb2.Pong().SerializeToString()

    class Answer:
        __slots__ = ("value",)

        def __init__(self, value: Any) -> None:
            self.value = value

        def __await__(self) -> Any:
            return self.value
            yield  # a generator: awaitable, done at once

    class Method:
        def __init__(self, serialize: Any, deserialize: Any, aio: bool) -> None:
            self.serialize, self.deserialize, self.aio = serialize, deserialize, aio

        def __call__(self, request: Any, *args: Any, **kw: Any) -> Any:
            if self.serialize is not None:
                request = self.serialize(request)
            value = self.deserialize(pong) if self.deserialize is not None else pong
            return Answer(value) if self.aio else value

        def with_call(self, request: Any, *args: Any, **kw: Any) -> Any:
            return self(request), None

    class Channel:
        def __init__(self, aio: bool) -> None:
            self.aio = aio

        def unary_unary(self, name: str, request_serializer: Any = None, response_deserializer: Any = None,
                        _registered_method: Any = False) -> Method:  # fmt: skip
            return Method(request_serializer, response_deserializer, self.aio)

        unary_stream = stream_unary = stream_stream = unary_unary

        def close(self) -> None:
            pass

    return Channel(False), Channel(True)


def run_grpc(mode: str, counter: Counter, io: bool) -> None:
    import grpc
    import grpc.aio
    import grpc_overhead as g

    import meshlib.grpc.clients as clients
    from meshlib import Mesh
    from tests.grpc import echo_pb2, echo_pb2_grpc

    if io:
        address = os.environ["INSTRUCTIONS_ADDRESS"]
        sync_channel, aio_channel = grpc.insecure_channel, grpc.aio.insecure_channel
    else:
        address = "127.0.0.1:9"
        canned, canned_aio = canned_grpc()
        clients._open_sync = lambda a, s: canned  # type: ignore[assignment]
        clients._aio_opener = lambda a, s: canned_aio  # type: ignore[assignment]
        sync_channel, aio_channel = (lambda a: canned), (lambda a: canned_aio)
    ping = echo_pb2.Ping(text="x")

    def mesh() -> Mesh:
        m = Mesh(service="bench-client")
        m.apply_rules(g.rules_for([address], "round_robin"), "bench")
        return m

    if mode.endswith("aio"):

        async def main() -> None:
            channel = aio_channel(address) if mode == "plain-aio" else mesh().grpc_aio_channel("echo")
            unary = echo_pb2_grpc.EchoStub(channel).Unary
            await counter.measure_async(mode, lambda: unary(ping))

        asyncio.run(main())
    else:
        channel = sync_channel(address) if mode == "plain" else mesh().grpc_channel("echo")
        unary = echo_pb2_grpc.EchoStub(channel).Unary
        counter.measure(mode, lambda: unary(ping))


def run_http(mode: str, counter: Counter) -> None:
    import httpx
    import overhead
    import pick

    from meshlib import Mesh
    from meshlib.http.transport import AsyncMeshTransport, MeshTransport

    picked = Mesh(service=pick.SOURCE)
    picked.apply_rules(pick.rules(("round_robin",)), "bench")
    url = "http://round-robin/api/items/42"
    single = Mesh(service="bench-client")
    single.apply_rules(overhead.rules_for("127.0.0.1:9"), "bench")
    url2 = f"http://{overhead.SERVICE}/ping"
    if mode == "sync":
        plain = httpx.Client(transport=pick.Canned())
        meshed = httpx.Client(transport=MeshTransport(picked, pick.Canned()))
        meshed2 = httpx.Client(transport=MeshTransport(single, pick.Canned()))
        counter.measure("sync plain", lambda: plain.get(url))
        counter.measure("sync mesh, pick.py rules", lambda: meshed.get(url))
        counter.measure("sync mesh, overhead.py rules", lambda: meshed2.get(url2))
        return

    async def main() -> None:
        plain = httpx.AsyncClient(transport=pick.AsyncCanned())
        meshed = httpx.AsyncClient(transport=AsyncMeshTransport(picked, pick.AsyncCanned()))
        meshed2 = httpx.AsyncClient(transport=AsyncMeshTransport(single, pick.AsyncCanned()))
        await counter.measure_async("async plain", lambda: plain.get(url))
        await counter.measure_async("async mesh, pick.py rules", lambda: meshed.get(url))
        await counter.measure_async("async mesh, overhead.py rules", lambda: meshed2.get(url2))

    asyncio.run(main())


PROVIDERS: list[Any] = []
"""The tracer providers `sdk` made: flushed before an until-sent window, so that at the default
300 requests no batch of 512 spans is exported inside it (an export is ~1.3 million instructions
on the processor's thread, off the request's path; one more or less moved a sampled row by
~4,400 a request)."""


def sdk(ratio: float | None) -> dict[str, Any]:
    """`Mesh(tracing=, metrics=)` with SDK providers: every trace sampled (ratio None), or that
    share of new traces, parent-based; spans go through a BatchSpanProcessor to nowhere."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    sampler = ALWAYS_ON if ratio is None else ParentBased(TraceIdRatioBased(ratio))
    tracer_provider = TracerProvider(sampler=sampler)
    tracer_provider.add_span_processor(BatchSpanProcessor(Drop()))
    PROVIDERS.append(tracer_provider)
    return {"tracing": tracer_provider, "metrics": MeterProvider(metric_readers=[InMemoryMetricReader()])}


TELEMETRY = (
    ("no telemetry", {"tracing": False, "metrics": False}),
    ("sdk always-on", None),
    ("sdk 10%", 0.1),
)


UNSAMPLED = "sdk 10%, caller unsampled"
SAMPLED = "sdk always-on, caller sampled"
UNSAMPLED_TRACE, UNSAMPLED_SPAN = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331


def run_telemetry(mode: str, counter: Counter) -> None:
    import httpx
    import inbound
    import overhead
    import pick

    from meshlib import Mesh
    from meshlib.asgi import MeshMiddleware
    from meshlib.http.transport import MeshTransport

    def mesh(name: str, options: Any) -> Mesh:
        if not isinstance(options, dict):
            options = sdk(options)
        return Mesh(service=name, **options)

    if mode == "client":
        url = f"http://{overhead.SERVICE}/ping"
        plain = httpx.Client(transport=pick.Canned())
        counter.measure("client plain", lambda: plain.get(url))
        for label, options in TELEMETRY:
            meshed = mesh("bench-client", options)
            meshed.apply_rules(overhead.rules_for("127.0.0.1:9"), "bench")
            client = httpx.Client(transport=MeshTransport(meshed, pick.Canned()))
            counter.measure(f"client mesh, {label}", lambda client=client: client.get(url))
        # a call made while handling a request whose caller did not sample the trace (nine in ten
        # at 10%): the parent-based sampler's answer is known
        from opentelemetry import context, trace

        parent = trace.NonRecordingSpan(trace.SpanContext(UNSAMPLED_TRACE, UNSAMPLED_SPAN, is_remote=True))
        token = context.attach(trace.set_span_in_context(parent))
        try:
            counter.measure(f"client mesh, {UNSAMPLED}", lambda client=client: client.get(url))
        finally:
            context.detach(token)
        return

    async def request(app: Any, extra: list[tuple[bytes, bytes]] = [], send: Any = inbound._send) -> None:  # noqa: B006
        scope = {"type": "http", "method": "GET", "path": "/api/x", "scheme": "http"}
        await app(scope | {"headers": [*inbound.HEADERS, *extra]}, inbound._receive, send)

    async def main() -> None:
        app = inbound.asgi_app
        traceparent = f"00-{UNSAMPLED_TRACE:032x}-{UNSAMPLED_SPAN:016x}-00".encode()
        servers: list[tuple[str, Any, list[tuple[bytes, bytes]]]] = [("server plain", app, [])]
        for label, options in TELEMETRY:
            servers.append((f"server mesh, {label}", MeshMiddleware(app, mesh=mesh("orders", options)), []))
        servers.append((f"server mesh, {UNSAMPLED}", servers[-1][1], [(b"traceparent", traceparent)]))
        always_on = dict((label, served) for label, served, _ in servers)["server mesh, sdk always-on"]
        sampled_parent = traceparent[:-2] + b"01"  # every request between services that trace always
        servers.append((f"server mesh, {SAMPLED}", always_on, [(b"traceparent", sampled_parent)]))
        for label, served, extra in servers:
            await counter.measure_async(label, lambda s=served, e=extra: request(s, e))
        for label, served, extra in servers:
            await counter.measure_until_sent(
                label + SENT, lambda send, s=served, e=extra: request(s, e, send)
            )

    asyncio.run(main())


def serve_counted(mode: str, helper: str) -> None:
    """A uvicorn server counted between SIGUSR1 and SIGUSR2 (its port written to the file named
    by INSTRUCTIONS_PORT_FILE)."""
    import signal

    import inbound

    from meshlib import Mesh
    from meshlib.asgi import MeshMiddleware
    from meshlib.testing import bind

    lib = ctypes.CDLL(helper)
    label = (
        f"uvicorn {mode}"
        if mode == "plain"
        else f"uvicorn mesh, {mode if mode != 'mesh' else 'no telemetry'}"
    )
    signal.signal(signal.SIGUSR1, lambda *_: lib.cg_start())
    signal.signal(signal.SIGUSR2, lambda *_: lib.cg_stop(label.encode()))
    app: Any = inbound.asgi_app
    if mode != "plain":
        options = dict(TELEMETRY)[{"mesh": "no telemetry"}.get(mode, mode)]
        app = MeshMiddleware(
            app, mesh=Mesh("orders", **(options if isinstance(options, dict) else sdk(options)))
        )
    sock = bind()
    Path(os.environ["INSTRUCTIONS_PORT_FILE"]).write_text(str(sock.getsockname()[1]))
    from _common import run_server

    run_server(app, [sock])


def count_server(
    mode: str, helper: Path, n: int, directory: Path, env: dict[str, str], concurrency: int = 1
) -> dict[str, int]:
    """Runs `serve_counted` under callgrind and sends it WARMUP, then `n` counted requests, over
    `concurrency` kept-alive connections at once (a thread each)."""
    import http.client
    import signal
    import threading
    import time

    port_file = directory / f"port.{mode.replace(' ', '_').replace('%', 'pct')}"
    out = directory / f"cg.server-io.{mode.replace(' ', '_').replace('%', 'pct')}"
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, __file__, "--inside", "server-io", mode, str(helper), str(n),
    ]  # fmt: skip
    log = (directory / f"{out.name}.log").open("w")
    server = subprocess.Popen(
        command, env=env | {"INSTRUCTIONS_PORT_FILE": str(port_file)}, stdout=log, stderr=log
    )
    headers = {"x-mesh-source": "checkout"}
    try:
        deadline = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text()):
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = Path(log.name).read_text(errors="replace")[-3000:]
                raise SystemExit(f"server-io {mode}: the server did not start:\n{tail}")
            time.sleep(0.2)
        port = int(port_file.read_text())
        connections = []
        while len(connections) < concurrency:  # the socket is bound before uvicorn listens on it
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                connection.request("GET", "/api/x", headers=headers)
                connection.getresponse().read()
                connections.append(connection)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

        def send(connection: http.client.HTTPConnection, count: int) -> None:
            for _ in range(count):
                connection.request("GET", "/api/x", headers=headers)
                connection.getresponse().read()

        for counted in (False, True):
            if counted:
                server.send_signal(signal.SIGUSR1)
                time.sleep(1.0)  # the handler runs between two bytecodes of the server's loop
            each = (n if counted else WARMUP) // concurrency
            threads = [threading.Thread(target=send, args=(c, each)) for c in connections]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        server.send_signal(signal.SIGUSR2)
        for connection in connections:
            connection.close()
        while not list(directory.glob(f"{out.name}.*[0-9]")) and time.monotonic() < deadline + 60:
            time.sleep(0.5)
        time.sleep(1.0)  # the dump is written whole before the file is read
    finally:
        server.kill()
        server.wait(60)
        log.close()
    return _figures(out, n // concurrency * concurrency)


def inside(group: str, mode: str, helper: str, n: int) -> None:
    sys.path[:0] = [str(HERE), str(ROOT)]
    if group == "server-io":
        serve_counted(mode, helper)
        return
    counter = Counter(helper, n)
    if group == "telemetry":
        run_telemetry(mode, counter)
    elif group == "http":
        run_http(mode, counter)
    else:
        run_grpc(mode, counter, io=group == "grpc-io")


# -- the driver ------------------------------------------------------------------------------


def build_helper(directory: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (with its headers) and a C compiler")
    source = directory / "cg.c"
    source.write_text(HELPER)
    helper = directory / "cg.so"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(helper), str(source)], check=True)
    return helper


def count(
    group: str, mode: str, helper: Path, n: int, directory: Path, env: dict[str, str]
) -> dict[str, int]:
    out = directory / f"cg.{group}.{mode}"
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, __file__, "--inside", group, mode, str(helper), str(n),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{group} {mode} failed:\n{done.stderr[-3000:]}")
    return _figures(out, n)


def _figures(out: Path, n: int) -> dict[str, int]:
    """Each dump's label and its instructions per request."""
    figures: dict[str, int] = {}
    dumps = [p for p in out.parent.glob(f"{out.name}.*") if p.suffix[1:].isdigit()]
    for dump in sorted(dumps, key=lambda p: int(p.suffix[1:])):
        text = dump.read_text(errors="replace")
        label = re.search(r"^desc: Trigger: Client Request: (.*)$", text, re.M)
        total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if label and total:
            figures[label.group(1)] = int(total.group(1)) // n
    return figures


def _write(results: dict[str, Any], requests: int, concurrency: int) -> None:
    """The figures as JSON: `instructions.json`, or `instructions_<group>[_c<N>].json` for one
    group (a run of one group does not overwrite another's)."""
    from _common import RESULTS, machine_info, write_json

    name = "instructions" if len(results) > 1 else f"instructions_{next(iter(results))}"
    name += f"_c{concurrency}" if concurrency > 1 else ""
    info = {"machine": machine_info(), "requests": requests, "concurrency": concurrency}
    write_json(RESULTS / f"{name}.json", info | {"groups": results})


def baseline(label: str) -> str:
    """The plain figure a mesh figure is set against: `mesh-aio` -> `plain-aio`, `async mesh, ...`
    -> `async plain`."""
    if label.endswith(SENT):
        return baseline(label[: -len(SENT)]) + SENT
    if label.startswith("mesh"):
        return label.replace("mesh", "plain", 1)
    return f"{label.split()[0]} plain"


def added(figures: dict[str, int]) -> list[tuple[str, int]]:
    """What each mesh figure adds to its plain baseline."""
    out = []
    for label, value in figures.items():
        base = figures.get(baseline(label))
        if "mesh" in label and base is not None:
            out.append((f"{label}, the mesh adds", value - base))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(GROUPS))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1, help="server-io: requests in flight at once")
    parser.add_argument("--inside", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        group, mode, helper, n = args.inside
        inside(group, mode, helper, int(n))
        return
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    groups = [args.only] if args.only else list(GROUPS)
    servers = None
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        helper = build_helper(directory)
        try:
            if "grpc-io" in groups:
                sys.path[:0] = [str(HERE), str(ROOT)]
                import grpc_overhead

                servers = grpc_overhead.Servers()
                env["INSTRUCTIONS_ADDRESS"] = servers.addresses[0]
            results: dict[str, Any] = {}
            for group in groups:
                figures: dict[str, int] = {}
                for mode in GROUPS[group]:
                    if group == "server-io":
                        figures.update(
                            count_server(mode, helper, args.requests, directory, env, args.concurrency)
                        )
                    else:
                        figures.update(count(group, mode, helper, args.requests, directory, env))
                print(f"\n{group}: instructions per request ({args.requests} requests after {WARMUP})")
                for label, value in figures.items():
                    print(f"  {label:<32} {value:>10,}")
                for label, value in added(figures):
                    print(f"  {label:<32} {value:>10,}")
                results[group] = {"figures": figures, "added": dict(added(figures))}
            _write(results, args.requests, args.concurrency)
        finally:
            if servers is not None:
                servers.stop()


if __name__ == "__main__":
    main()
