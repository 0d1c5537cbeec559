"""What a client-only process pays to use the mesh: time and resident memory of `import meshlib`,
a local `Mesh` and one client, over httpx's own import.

Every run is a fresh interpreter (`python -c`), so nothing is already imported; the cases take
turns (run 1 of every case, then run 2, ...) so that drift in the machine's speed hits them
alike, and the table shows medians. Each child imports httpx first and then runs its case: the
figures are the case's own wall and CPU time and RSS growth on top of httpx; "over the baseline"
figures are medians of each round's difference. Byte code is compiled once
before timing (into a private cache, `PYTHONPYCACHEPREFIX`), as it is in an installed package.

`--tree` prints, for the mesh case, the modules it imports beyond httpx with their own import
time (from `python -X importtime`, median of 5 runs), grouped by package: where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, median, table, write_json

ROOT = Path(__file__).resolve().parent.parent

# The child: httpx first (its own figures), then the case; wall and CPU (every thread of the
# process) times in ms, RSS in KiB. CPU time hardly moves with the load other processes put on
# the machine, wall time does.
CHILD = """
import time
t0 = time.perf_counter(); c0 = time.process_time()
import json, os, sys
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
r0 = rss()
import httpx
t1 = time.perf_counter(); c1 = time.process_time(); r1 = rss()
{case}
t2 = time.perf_counter(); c2 = time.process_time(); r2 = rss()
print(json.dumps({{"httpx_ms": (t1 - t0) * 1000, "httpx_cpu_ms": (c1 - c0) * 1000, "httpx_kib": r1 - r0,
                  "case_ms": (t2 - t1) * 1000, "case_cpu_ms": (c2 - c1) * 1000, "case_kib": r2 - r1}}))
"""

CALL = """
import asyncio
async def call(client):
    async with client:
        response = await client.get(os.environ["BENCH_URL"])
        assert response.status_code == 200, response.status_code
"""

CASES: dict[str, str] = {
    "httpx.AsyncClient()": "client = httpx.AsyncClient()",
    "import meshlib": "import meshlib",
    "meshlib + Mesh(local) + client": (
        "import meshlib\nmesh = meshlib.Mesh('checkout')\nclient = mesh.client()"
    ),
    "httpx.AsyncClient() + 1 call": CALL + "asyncio.run(call(httpx.AsyncClient()))",
    "meshlib + Mesh + client + 1 call": (
        CALL
        + "import meshlib\nmesh = meshlib.Mesh('checkout')\nasyncio.run(call(mesh.client()))\nmesh.close()"
    ),
}
MESH_CASE = "meshlib + Mesh(local) + client"
HTTPX_KEYS = ("httpx_ms", "httpx_cpu_ms", "httpx_kib")
CASE_KEYS = ("case_ms", "case_cpu_ms", "case_kib")
BEFORE = " [before]"  # the label of a case run with --before's tree
BASELINE = "httpx.AsyncClient()"

SERVER = """
import sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="off")
"""


def child_env(cache: str, url: str, source: Path = ROOT) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE" and not k.startswith("MESH_")
    }
    env["PYTHONPATH"] = str(source)
    env["PYTHONPYCACHEPREFIX"] = cache
    env["BENCH_URL"] = url
    return env


def run_case(name: str, env: dict[str, str]) -> dict[str, float]:
    code = CHILD.format(case=CASES[name.removesuffix(BEFORE)])
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=env["PYTHONPYCACHEPREFIX"],  # not the checkout: `-c` puts the working directory first on the path
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name}: {done.stderr.strip()[-2000:]}")
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    import time

    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the benchmark server did not start")


def import_tree(env: dict[str, str], top: int) -> list[tuple[str, float]]:
    """Own import time (ms) of every module the mesh case loads beyond httpx, by package."""

    def own_times(code: str) -> dict[str, int]:
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code],
            capture_output=True,
            text=True,
            cwd=env["PYTHONPYCACHEPREFIX"],
            env=env,
            timeout=60,
            check=True,
        )
        times: dict[str, int] = {}
        for line in done.stderr.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            own, _, name = line.split(":", 1)[1].split("|")
            times[name.strip()] = int(own)
        return times

    base = own_times("import httpx; httpx.AsyncClient()")
    runs: list[Counter[str]] = []
    for _ in range(5):
        by_package: Counter[str] = Counter()
        for name, own in own_times(CHILD.format(case=CASES[MESH_CASE])).items():
            if name not in base:
                parts = name.split(".")
                by_package[".".join(parts[:2]) if parts[0] == "meshlib" else parts[0]] += own
        runs.append(by_package)
    packages = {name for run in runs for name in run}
    medians = Counter({name: median([run[name] for run in runs]) for name in packages})
    return [(name, us / 1000) for name, us in medians.most_common(top)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="fresh interpreters per case (default 15)")
    parser.add_argument("--no-call", action="store_true", help="skip the cases that call a local server")
    parser.add_argument("--tree", type=int, default=0, metavar="N", help="print the N costliest packages")
    parser.add_argument("--json", type=Path, default=RESULTS / "import_cost.json")
    parser.add_argument(
        "--before",
        type=Path,
        metavar="DIR",
        help="also run the meshlib cases with the meshlib of DIR (a checkout)",
    )
    args = parser.parse_args()

    names = [n for n in CASES if not (args.no_call and "call" in n)]
    if args.before is not None:
        names += [n + BEFORE for n in names if "meshlib" in n]
    server = None
    url = ""
    if any("call" in n for n in names):
        server, url = start_server()
    try:
        with tempfile.TemporaryDirectory(prefix="meshlib-pyc-") as cache:
            env = child_env(cache, url)
            envs = {n: child_env(cache, url, args.before) if n.endswith(BEFORE) else env for n in names}
            for name in names:  # compiles the byte code into the cache; not counted
                run_case(name, envs[name])
            samples: dict[str, list[dict[str, float]]] = {n: [] for n in names}
            for _ in range(args.runs):
                for name in names:
                    samples[name].append(run_case(name, envs[name]))
            tree = import_tree(env, args.tree) if args.tree else []
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)

    def med(name: str, key: str) -> float:
        return median([s[key] for s in samples[name]])

    figures: dict[str, Any] = {}
    rows = []
    httpx_figures = {key: median([s[key] for n in names for s in samples[n]]) for key in HTTPX_KEYS}
    rows.append(
        [
            "import httpx (every child, first)",
            f"{httpx_figures['httpx_ms']:.0f}",
            f"{httpx_figures['httpx_cpu_ms']:.0f}",
            f"{httpx_figures['httpx_kib'] / 1024:.1f}",
        ]
    )
    for name in names:
        mine = {key: med(name, key) for key in CASE_KEYS}
        figures[name] = {
            "wall_ms": round(mine["case_ms"], 1),
            "cpu_ms": round(mine["case_cpu_ms"], 1),
            "mib": round(mine["case_kib"] / 1024, 2),
            "samples": [{k: round(v, 1) for k, v in sample.items()} for sample in samples[name]],
        }
        row = [name, f"{mine['case_ms']:.0f}", f"{mine['case_cpu_ms']:.0f}", f"{mine['case_kib'] / 1024:.1f}"]
        if name != BASELINE:
            # per round (the cases of a round ran back to back), then the median: drift cancels
            pairs = list(zip(samples[name], samples[BASELINE], strict=True))
            over = {key: median([s[key] - b[key] for s, b in pairs]) for key in CASE_KEYS}
            figures[name]["over_baseline"] = {
                "wall_ms": round(over["case_ms"], 1),
                "cpu_ms": round(over["case_cpu_ms"], 1),
                "mib": round(over["case_kib"] / 1024, 2),
            }
            row += [
                f"{over['case_ms']:+.0f}",
                f"{over['case_cpu_ms']:+.0f}",
                f"{over['case_kib'] / 1024:+.1f}",
            ]
        rows.append(row)
    headers = ["case: medians over `import httpx`", "wall ms", "CPU ms", "MiB", "wall +", "CPU +", "MiB +"]
    print(table(headers, [r + [""] * (len(headers) - len(r)) for r in rows]))
    print(f"+: over the {BASELINE} case, median of the rounds' differences (a round runs every case once)")
    print(f"{args.runs} fresh interpreters per case; load average {os.getloadavg()}")
    if tree:
        print(
            f"\nown import time beyond `import httpx; httpx.AsyncClient()`, {MESH_CASE} (median of 5 runs):"
        )
        print(table(["package", "ms"], [[name, f"{ms:.1f}"] for name, ms in tree]))
    write_json(
        args.json,
        {
            "machine": machine_info(),
            "settings": {"runs": args.runs, "before": str(args.before) if args.before else None},
            "import_httpx": {key: round(value, 1) for key, value in httpx_figures.items()},
            "cases": figures,
            "tree_ms": dict(tree),
        },
    )


if __name__ == "__main__":
    main()
