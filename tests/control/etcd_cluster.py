"""A real etcd cluster of the test's own: N members on free loopback ports in a temp dir.

Debian's `etcd` binary (package etcd-server), never the system service: every member listens on
ports picked here, keeps its data in the given directory, and is killed by `stop()` (also when
a test fails). Elections are tuned short (50 ms heartbeats, 500 ms election timeout) so a test
that kills the leader waits well under a second for the next one.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
AVAILABLE = Path(ETCD).exists()


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports (all held open at once while they are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class MemberExited(RuntimeError):
    """An etcd member process ended while it was expected to run."""


@dataclass(frozen=True)
class EtcdTls:
    """TLS on the members' client URLs: their certificate, the CA that signs clients' (etcd then
    requires one: --client-cert-auth), and a client certificate for the helper's own checks."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


class Member:
    """One etcd member process; `start` and `kill` may be called again on the same data dir."""

    def __init__(
        self,
        name: str,
        data_dir: Path,
        client_port: int,
        peer_port: int,
        cluster: str,
        tls: EtcdTls | None = None,
    ) -> None:
        self.name = name
        self.data_dir = data_dir
        self.client_port, self.peer_port = client_port, peer_port
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{client_port}"
        self.verify: ssl.SSLContext | bool = tls.context() if tls else True
        self.peer_url = f"http://127.0.0.1:{peer_port}"
        self.log = data_dir.with_suffix(".log")
        self._cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.running:
            return
        args = [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self._cluster,
            "--initial-cluster-state", "new",  # ignored once the data dir holds a member
            "--initial-cluster-token", "meshlib-tests",
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip
        if self.tls is not None:
            args += [
                "--cert-file", str(self.tls.server_cert),
                "--key-file", str(self.tls.server_key),
                "--trusted-ca-file", str(self.tls.ca),
                "--client-cert-auth",
            ]  # fmt: skip
        # The system service's settings (/etc/default/etcd) reach etcd through ETCD_* variables:
        # none of them may leak into a test's member.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([*args], stdout=out, stderr=subprocess.STDOUT, env=env)

    def kill(self) -> None:
        """SIGKILL: the member dies as a crashed machine would, without a goodbye to its peers."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """The member answers and its cluster has a leader (etcd's /health needs both)."""
        try:
            reply = httpx.get(f"{self.url}/health", timeout=0.5, verify=self.verify)
            return reply.status_code == 200 and reply.json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def status(self) -> dict[str, str]:
        reply = httpx.post(f"{self.url}/v3/maintenance/status", json={}, timeout=1.0, verify=self.verify)
        reply.raise_for_status()
        return {"member": reply.json()["header"]["member_id"], "leader": reply.json().get("leader", "0")}


class EtcdCluster:
    """`size` members on 127.0.0.1, started and healthy once the constructor returns.

    Use as a context manager (or call `stop()`): every member is killed and its data removed."""

    def __init__(
        self, directory: Path, size: int = 3, *, tls: EtcdTls | None = None, timeout: float = 20.0
    ) -> None:
        if not AVAILABLE:
            raise RuntimeError("etcd is not installed (apt-get install etcd-server)")
        self.directory = directory
        self.tls = tls
        self.members: list[Member] = []
        for attempt in (1, 2):
            self._create(size, attempt)
            try:
                for m in self.members:
                    m.start()
                self.wait_healthy(timeout)
                return
            except MemberExited:
                self.stop()
                if attempt == 2:
                    raise
                # a free port taken by another process between our check and etcd's bind:
                # once more, on new ports
            except BaseException:
                self.stop()
                raise

    def _create(self, size: int, attempt: int) -> None:
        base = self.directory / f"try{attempt}"
        base.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 * size)
        pairs = list(zip(ports[::2], ports[1::2], strict=True))
        cluster = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(pairs))
        self.members = [
            Member(f"m{i}", base / f"m{i}", client, peer, cluster, self.tls)
            for i, (client, peer) in enumerate(pairs)
        ]

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    @property
    def endpoints(self) -> str:
        """The cluster as an `etcd://` URL naming every member."""
        return ("etcds://" if self.tls else "etcd://") + ",".join(
            f"127.0.0.1:{m.client_port}" for m in self.members
        )

    def wait_healthy(self, timeout: float = 20.0, members: list[Member] | None = None) -> None:
        """Poll until every running member (or those given) reports a leader; RuntimeError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = [m for m in (members or self.members) if m.running and not m.healthy()]
            dead = [m for m in (members or self.members) if m.proc is not None and not m.running]
            if dead:
                raise MemberExited(f"etcd member {dead[0].name} exited: {_tail(dead[0].log)}")
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd member {waiting[0].name} is not healthy: {_tail(waiting[0].log)}")
            time.sleep(0.05)

    def leader(self, timeout: float = 10.0) -> Member:
        """The member that leads now, once the running members agree on one."""
        deadline = time.monotonic() + timeout
        while True:
            ids: dict[str, Member] = {}
            leaders: set[str] = set()
            for m in self.members:
                if not m.running:
                    continue
                try:
                    status = m.status()
                except (httpx.HTTPError, KeyError, ValueError):
                    continue
                ids[status["member"]] = m
                leaders.add(status["leader"])
            if len(leaders) == 1 and (lead := leaders.pop()) in ids:
                return ids[lead]
            if time.monotonic() > deadline:
                raise RuntimeError("the etcd cluster has no leader")
            time.sleep(0.05)

    def kill(self, member: Member) -> None:
        member.kill()

    def restart(self, member: Member, timeout: float = 20.0) -> None:
        member.kill()
        member.start()
        self.wait_healthy(timeout, [member])

    def call(self, path: str, body: dict[str, object], token: str | None = None) -> dict[str, object]:
        """One v3 gateway request to a running member, as an administrator would make it."""
        member = next(m for m in self.members if m.running)
        headers = {"Authorization": token} if token else {}
        reply = httpx.post(f"{member.url}{path}", json=body, headers=headers, verify=member.verify)
        reply.raise_for_status()
        return dict(reply.json())

    def stop(self) -> None:
        for m in self.members:
            m.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-1500:]
    except OSError:
        return "(no log)"
