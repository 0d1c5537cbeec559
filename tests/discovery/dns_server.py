"""A small authoritative DNS server on 127.0.0.1 for the DNS provider's tests.

It answers over UDP and TCP on one port, from records the test sets and changes while it runs:
A, AAAA and SRV with the TTLs the test gives, the targets' addresses of an SRV answer in the
additional section (unless `glue` is off), NODATA and NXDOMAIN with an SOA whose TTL is
`negative_ttl`. `mode` makes it answer SERVFAIL or stop answering; `failing` names answer
SERVFAIL alone. A UDP answer too big for the
asker's buffer goes out truncated (TC), so the resolver asks again over TCP, as real ones do.
Every question is recorded with its time and transport in `queries`.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Literal

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

ZONE = "mesh.test"  # .test is reserved (RFC 2606): never a real name
Mode = Literal["answer", "servfail", "silent"]


@dataclass(frozen=True, slots=True)
class Query:
    at: float  # time.monotonic()
    name: str
    rdtype: str
    transport: Literal["udp", "tcp"]


class DnsServer:
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], dns.rrset.RRset] = {}  # built when set, not per query
        self.mode: Mode = "answer"
        self.negative_ttl = 30
        self.glue = True
        self.failing: set[str] = set()  # names answered SERVFAIL whatever the mode
        self.queries: list[Query] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.udp, self.tcp = _bind_pair()
        self.port = self.udp.getsockname()[1]
        self.url = f"dns://127.0.0.1:{self.port}"
        self._threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- what it serves -------------------------------------------------------------------

    def set(self, name: str, rdtype: str, values: list[str], ttl: int = 60) -> None:
        """Serve `values` (text form, e.g. "127.0.0.1" or "10 5 8080 a.mesh.test.") for the name;
        an empty list removes the records (the name stays if it has others)."""
        with self._lock:
            if values:
                self.records[(_key(name), rdtype)] = dns.rrset.from_text_list(
                    f"{_key(name)}.", ttl, "IN", rdtype, values
                )
            else:
                self.records.pop((_key(name), rdtype), None)

    def a(self, name: str, addresses: list[str], ttl: int = 60) -> None:
        self.set(name, "A", addresses, ttl)

    def aaaa(self, name: str, addresses: list[str], ttl: int = 60) -> None:
        self.set(name, "AAAA", addresses, ttl)

    def srv(self, name: str, records: list[tuple[int, int, int, str]], ttl: int = 60) -> None:
        """(priority, weight, port, target) records."""
        self.set(name, "SRV", [f"{p} {w} {port} {_key(t)}." for p, w, port, t in records], ttl)

    def drop(self, name: str) -> None:
        """The name no longer exists: NXDOMAIN."""
        with self._lock:
            for key in [k for k in self.records if k[0] == _key(name)]:
                del self.records[key]

    def asked(self, name: str, rdtype: str) -> list[Query]:
        with self._lock:
            return [q for q in self.queries if q.name == _key(name) and q.rdtype == rdtype]

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self.udp.close()
        self.tcp.close()

    # -- answering ------------------------------------------------------------------------

    def answer(self, wire: bytes, transport: Literal["udp", "tcp"]) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        question = query.question[0]
        name = _key(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append(Query(time.monotonic(), name, rdtype, transport))
            mode = "servfail" if name in self.failing and self.mode == "answer" else self.mode
            found = self.records.get((name, rdtype))
            exists = any(k[0] == name for k in self.records)
            glue = self._glue(found) if rdtype == "SRV" and found and self.glue else []
        if mode == "silent":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif found is not None:
            response.answer.append(found)
            response.additional.extend(glue)
        else:
            if not exists:
                response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa())
        if transport == "tcp":
            return response.to_wire()
        limit = max(512, query.payload) if query.edns >= 0 else 512
        data = response.to_wire()
        if len(data) > limit:  # too big for UDP: header and question only, TC set
            cut = dns.message.make_response(query)
            cut.flags |= dns.flags.AA | dns.flags.TC
            data = cut.to_wire()
        return data

    def _glue(self, found: dns.rrset.RRset) -> list[dns.rrset.RRset]:
        targets = dict.fromkeys(_key(r.target.to_text()) for r in found)
        return [
            self.records[(t, rdtype)]
            for t in targets
            for rdtype in ("A", "AAAA")
            if (t, rdtype) in self.records
        ]

    def _soa(self) -> dns.rrset.RRset:
        n = self.negative_ttl
        soa = f"ns.{ZONE}. admin.{ZONE}. 1 3600 600 86400 {n}"
        return dns.rrset.from_text(f"{ZONE}.", n, "IN", "SOA", soa)

    def _serve_udp(self) -> None:
        self.udp.settimeout(0.05)
        while not self._stop.is_set():
            try:
                wire, peer = self.udp.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            data = self.answer(wire, "udp")
            if data is not None:
                self.udp.sendto(data, peer)

    def _serve_tcp(self) -> None:
        self.tcp.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(2)
                try:
                    while (head := _read(conn, 2)) is not None:
                        wire = _read(conn, struct.unpack("!H", head)[0])
                        data = self.answer(wire, "tcp") if wire is not None else None
                        if data is None:
                            break
                        conn.sendall(struct.pack("!H", len(data)) + data)
                except OSError:
                    pass


def _key(name: str) -> str:
    return name.lower().rstrip(".")


def _read(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _bind_pair() -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same free port of 127.0.0.1."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind(("127.0.0.1", udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(16)
        return udp, tcp
    raise RuntimeError("no free port for both UDP and TCP")
