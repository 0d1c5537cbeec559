"""dnspython or the standard library for the DNS provider: what each costs per resolution.

Against the tests' authoritative server (tests/discovery/dns_server.py) on 127.0.0.1, one
resolution at a time on one asyncio loop:

    dnspython A          DnsProvider.resolve of an A name (the provider's whole path)
    dnspython SRV        DnsProvider.resolve of an SRV name with 3 targets, glue in the answer
    dnspython SRV, no glue   the same, each target's A asked separately (3 more queries)
    raw UDP floor        a prebuilt A query sent and its answer read on a stdlib socket, no
                         parsing: no stdlib client written by hand could be faster than this
    stdlib getaddrinfo   loop.getaddrinfo("localhost"), the only resolver the stdlib has (it
                         cannot be pointed at a nameserver, and gives no TTL and no SRV)

and the one-off costs of dnspython: importing dns.asyncresolver (a fresh interpreter) and its
size on disk. Figures are microseconds per resolution (median, p99).

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
from tests.discovery.dns_server import DnsServer


async def timed(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    for _ in range(min(50, n)):  # warm-up
        await fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return sorted(out)


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


async def measure(n: int) -> dict[str, list[float]]:
    server = DnsServer()
    try:
        server.a("web.mesh.test", ["127.0.0.1"])
        for i in range(3):
            server.a(f"t{i}.mesh.test", ["127.0.0.1"])
        server.srv("_http._tcp.mesh.test", [(10, 1, 8000 + i, f"t{i}.mesh.test") for i in range(3)])
        provider = DnsProvider.from_url(server.url)
        a, srv = Options(port=80), Options(record="SRV")
        loop = asyncio.get_running_loop()

        import dns.message

        query = dns.message.make_query("web.mesh.test", "A").to_wire()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", server.port))
        sock.setblocking(False)

        async def raw() -> None:
            await loop.sock_sendall(sock, query)
            await loop.sock_recv(sock, 4096)

        async def no_glue() -> None:
            server.glue = False
            await provider.resolve("_http._tcp.mesh.test", srv)
            server.glue = True

        results = {
            "dnspython A": await timed(lambda: provider.resolve("web.mesh.test", a), n),
            "dnspython SRV": await timed(lambda: provider.resolve("_http._tcp.mesh.test", srv), n),
            "dnspython SRV, no glue": await timed(no_glue, n),
            "raw UDP floor": await timed(raw, n),
            "stdlib getaddrinfo": await timed(lambda: loop.getaddrinfo("localhost", 80), n),
        }
        sock.close()
        return results
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 300 if args.quick else 2000
    results = asyncio.run(measure(n))
    figures = {
        name: {"median_us": round(median(v), 1), "p99_us": round(percentile(v, 0.99), 1)}
        for name, v in results.items()
    }
    once = {"import_ms": round(import_cost(), 1), "disk_kib": round(disk_size())}
    rows = [(name, f["median_us"], f["p99_us"]) for name, f in figures.items()]
    print(table(["per resolution", "median us", "p99 us"], rows))
    print(f"\nimport dns.asyncresolver: {once['import_ms']} ms; installed size {once['disk_kib']} KiB")
    write_json(
        RESULTS / "dns_resolve.json",
        {"machine": machine_info(), "settings": {"n": n}, "figures": figures, "once": once},
    )


if __name__ == "__main__":
    main()
