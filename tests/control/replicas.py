"""Control service replicas as real processes over one etcd cluster: `meshlib control --store
etcd://...` N times on loopback ports, each with a data dir of its own, all on one key prefix.

A replica keeps its port and data dir across `kill`/`start`, so the URL a client was given
stays right (a restarted replica is the same replica to its clients). Replicas start in
parallel (each is a Python process that imports meshlib: about a second of CPU), and `up`
says which answer now. Used by tests/control/test_replicas.py and bench/convergence_replicas.py.
"""

from __future__ import annotations

import signal
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.control.etcd_cluster import EtcdCluster, free_ports
from tests.control.process import ControlProcess


class Replicas:
    """`size` control service processes sharing the rules in `etcd` under a prefix of their own.

    `store` is the `--store` URL they were given (a fresh prefix unless `prefix` names one, so
    tests sharing a cluster do not see each other's versions). Use as a context manager, or
    call `stop()`: every process is stopped, also when a test fails."""

    def __init__(
        self,
        directory: Path,
        etcd: EtcdCluster,
        size: int = 3,
        *,
        prefix: str | None = None,
        args: tuple[str, ...] = (),
        timeout: float = 30.0,
    ) -> None:
        self.directory = directory
        self.etcd = etcd
        self.store = f"{etcd.endpoints}/{prefix or 'replicas-' + uuid.uuid4().hex[:10]}"
        self.args = args
        self.timeout = timeout
        self.ports = free_ports(size)
        self.processes: list[ControlProcess | None] = [None] * size
        self.tokens: list[str] = [""] * size
        try:
            self.start(*range(size))
        except BaseException:
            self.stop()
            raise

    # -- which replica, where -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ports)

    @property
    def urls(self) -> list[str]:
        return [self.url(i) for i in range(len(self))]

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def control(self, *order: int) -> str:
        """The replicas' URLs comma-separated, in the order given (all, in order, by default):
        what a client gets as `Mesh(control=...)` or MESH_CONTROL."""
        return ",".join(self.url(i) for i in (order or range(len(self))))

    def index(self, url: str) -> int:
        return self.urls.index(url.rstrip("/"))

    def data_dir(self, i: int) -> Path:
        return self.directory / f"replica-{i}"

    def log(self, i: int) -> str:
        """The tail of replica `i`'s log (for an assertion's message)."""
        try:
            return (self.directory / f"control-{self.ports[i]}.log").read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    # -- up and down ----------------------------------------------------------------------------

    def running(self, i: int) -> bool:
        p = self.processes[i]
        return p is not None and p.proc.poll() is None

    def up(self) -> list[int]:
        """The replicas whose process runs and whose /healthz answers now."""
        return [i for i in range(len(self)) if self.running(i) and self.healthy(i)]

    def healthy(self, i: int) -> bool:
        try:
            return httpx.get(f"{self.url(i)}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, *which: int) -> None:
        """Start the given replicas (not running) in parallel, each ready when this returns."""

        def one(i: int) -> ControlProcess:
            return ControlProcess(
                self.data_dir(i), "--store", self.store, *self.args, port=self.ports[i], timeout=self.timeout
            )

        todo = [i for i in which if not self.running(i)]
        with ThreadPoolExecutor(max(1, len(todo))) as pool:
            futures = {i: pool.submit(one, i) for i in todo}
        errors = []
        for i, future in futures.items():
            try:
                self.processes[i] = future.result()
                self.tokens[i] = self.processes[i].token  # type: ignore[union-attr]
            except AssertionError as exc:
                errors.append(f"replica {i}: {exc}")
        if errors:
            raise AssertionError("; ".join(errors))

    def freeze(self, i: int) -> None:
        """SIGSTOP: the replica goes silent as a machine that is gone does (its connections stay
        open and nothing answers on them, no stream ends); `thaw` resumes it."""
        p = self.processes[i]
        if p is not None and p.proc.poll() is None:
            p.proc.send_signal(signal.SIGSTOP)

    def thaw(self, i: int) -> None:
        p = self.processes[i]
        if p is not None and p.proc.poll() is None:
            p.proc.send_signal(signal.SIGCONT)

    def kill(self, i: int) -> None:
        """SIGKILL: the replica dies as a crashed machine's would; its streams break off at once
        (the kernel closes its sockets), and it saves nothing on the way out."""
        p = self.processes[i]
        if p is not None:
            if p.proc.poll() is None:
                p.proc.kill()
            p.proc.wait(10)
        self.processes[i] = None

    def terminate(self, i: int) -> None:
        """SIGTERM: the replica shuts down as an operator stops it (an upgrade)."""
        p = self.processes[i]
        if p is not None:
            self.thaw(i)
            p.stop()
        self.processes[i] = None

    def restart(self, i: int) -> None:
        self.kill(i)
        self.start(i)

    def stop(self) -> None:
        for i in range(len(self)):
            p = self.processes[i]
            if p is not None and p.proc.poll() is None:
                self.thaw(i)  # a frozen one would not act on SIGTERM
                p.proc.terminate()  # signal every one first: the shutdowns overlap
        for i in range(len(self)):
            p = self.processes[i]
            if p is not None:
                try:
                    p.proc.wait(15)
                except subprocess.TimeoutExpired:
                    p.proc.kill()
                    p.proc.wait(5)
            self.processes[i] = None

    def __enter__(self) -> Replicas:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- the control API, as an operator uses it ---------------------------------------------------

    def admin(self, i: int) -> dict[str, str]:
        """The admin header of replica `i` (each data dir has its own token here)."""
        return {"Authorization": f"Bearer {self.tokens[i]}"}

    def apply(
        self, i: int, docs: list[dict[str, Any]], message: str | None = None, timeout: float = 30.0
    ) -> httpx.Response:
        body: Any = {"documents": docs, "message": message} if message is not None else docs
        return httpx.put(f"{self.url(i)}/v1/config", json=body, headers=self.admin(i), timeout=timeout)

    def version(self, i: int) -> int:
        """The rules version replica `i` serves."""
        return int(httpx.get(f"{self.url(i)}/v1/config", timeout=5.0).json()["version"])

    def history(self, i: int, limit: int = 100) -> list[dict[str, Any]]:
        reply = httpx.get(f"{self.url(i)}/v1/history", params={"limit": limit}, timeout=10.0)
        reply.raise_for_status()
        return list(reply.json())

    def config(self, i: int) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url(i)}/v1/config", timeout=5.0).json())
