"""dnspython or the standard library for the DNS provider: what each costs per resolution.

Against the tests' authoritative server (tests/discovery/dns_server.py) on 127.0.0.1, in a
process of its own, one resolution at a time on one asyncio loop:

    dnspython A          DnsProvider.resolve of an A name (the provider's whole path)
    dnspython SRV        DnsProvider.resolve of an SRV name with 3 targets, glue in the answer
    dnspython SRV, no glue   the same, each target's A asked separately (3 more queries)
    raw UDP floor        a prebuilt A query sent and its answer read on a stdlib socket, no
                         parsing: no stdlib client written by hand could be faster than this
    dnspython parse      dns.message.from_wire of an A answer, and of the SRV answer with its
                         3 targets' A records: the part a hand-written parser would replace
    stdlib getaddrinfo   loop.getaddrinfo("localhost"), the only resolver the stdlib has (it
                         cannot be pointed at a nameserver, and gives no TTL and no SRV)

and the one-off costs of dnspython: importing dns.asyncresolver (a fresh interpreter) and its
size on disk. Figures are microseconds per resolution: wall clock (median, p99) and this
process's CPU time (median; the servers' is not counted).

    python bench/dns_resolve.py            # ~10 s
    python bench/dns_resolve.py --quick    # ~2 s
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS, machine_info, median, percentile, table, write_json

from meshlib.discovery.dns import DnsProvider, Options


async def timed(
    cases: dict[str, Callable[[], Awaitable[object]]], n: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Wall-clock and this process's CPU microseconds per call of each case, the cases
    interleaved (one call of each in turn), so a burst of load from elsewhere on the machine
    falls on all of them alike. CPU time is the figure load changes least."""
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in cases}
    for i in range(n + 50):  # 50 rounds of warm-up
        for name, fn in cases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            await fn()
            if i >= 50:
                out[name][0].append((time.perf_counter() - t0) * 1e6)
                out[name][1].append((time.process_time() - c0) * 1e6)
    return {name: (sorted(wall), sorted(cpu)) for name, (wall, cpu) in out.items()}


def import_cost() -> float:
    """Milliseconds to import dns.asyncresolver in a fresh interpreter (median of 5)."""
    code = "import time; t=time.perf_counter(); import dns.asyncresolver; print(time.perf_counter()-t)"
    runs = [float(subprocess.check_output([sys.executable, "-c", code], text=True)) * 1e3 for _ in range(5)]
    return median(runs)


def disk_size() -> float:
    """KiB of the installed `dns` package."""
    import dns

    root = Path(dns.__file__).parent
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1024


SERVERS = """
import sys
from tests.discovery.dns_server import DnsServer
servers = [DnsServer(), DnsServer()]
servers[1].glue = False
for s in servers:
    s.a("web.mesh.test", ["127.0.0.1"])
    for i in range(3):
        s.a(f"t{i}.mesh.test", ["127.0.0.1"])
    s.srv("_http._tcp.mesh.test", [(10, 1, 8000 + i, f"t{i}.mesh.test") for i in range(3)])
print(servers[0].port, servers[1].port, flush=True)
sys.stdin.read()
"""


async def measure(n: int) -> dict[str, tuple[list[float], list[float]]]:
    root = Path(__file__).resolve().parent.parent
    # the servers in their own process, so that their work is not on this one's GIL
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVERS], cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        glue_port, bare_port = (int(p) for p in proc.stdout.readline().split())
        glued = DnsProvider.from_url(f"dns://127.0.0.1:{glue_port}")
        bare = DnsProvider.from_url(f"dns://127.0.0.1:{bare_port}")
        a, srv = Options(port=80), Options(record="SRV")
        loop = asyncio.get_running_loop()

        import dns.message

        query = dns.message.make_query("web.mesh.test", "A").to_wire()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", glue_port))
        sock.setblocking(False)

        async def raw() -> None:
            await loop.sock_sendall(sock, query)
            await loop.sock_recv(sock, 4096)

        await raw()
        srv_query = dns.message.make_query("_http._tcp.mesh.test", "SRV").to_wire()
        await loop.sock_sendall(sock, srv_query)
        srv_wire = await loop.sock_recv(sock, 4096)
        await loop.sock_sendall(sock, query)
        a_wire = await loop.sock_recv(sock, 4096)

        async def parse(wire: bytes) -> None:
            dns.message.from_wire(wire)

        cases: dict[str, Callable[[], Awaitable[object]]] = {
            "dnspython A": lambda: glued.resolve("web.mesh.test", a),
            "dnspython SRV": lambda: glued.resolve("_http._tcp.mesh.test", srv),
            "dnspython SRV, no glue": lambda: bare.resolve("_http._tcp.mesh.test", srv),
            "raw UDP floor": raw,
            "stdlib getaddrinfo": lambda: loop.getaddrinfo("localhost", 80),
            "dnspython parse, A answer": lambda: parse(a_wire),
            "dnspython parse, SRV + glue": lambda: parse(srv_wire),
        }
        results = await timed(cases, n)
        sock.close()
        return results
    finally:
        proc.communicate("", timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 300 if args.quick else 2000
    results = asyncio.run(measure(n))
    figures = {
        name: {
            "median_us": round(median(wall), 1),
            "p99_us": round(percentile(wall, 0.99), 1),
            "cpu_median_us": round(median(cpu), 1),
        }
        for name, (wall, cpu) in results.items()
    }
    once = {"import_ms": round(import_cost(), 1), "disk_kib": round(disk_size())}
    rows = [(name, f["median_us"], f["p99_us"], f["cpu_median_us"]) for name, f in figures.items()]
    print(table(["per resolution", "median us", "p99 us", "CPU median us"], rows))
    print(f"\nimport dns.asyncresolver: {once['import_ms']} ms; installed size {once['disk_kib']} KiB")
    write_json(
        RESULTS / "dns_resolve.json",
        {"machine": machine_info(), "settings": {"n": n}, "figures": figures, "once": once},
    )


if __name__ == "__main__":
    main()
