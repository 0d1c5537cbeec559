"""The control service as its own process (`python -m meshlib control`), for tests that measure
what it holds (its resident memory, from /proc) or that restart it on the same data dir."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_STORE_TOKENS: dict[str, str] = {}
"""The admin token of each `--store` URL, as the first replica on it wrote it to its data dir."""


class ControlProcess:
    """`python -m meshlib control` on 127.0.0.1, started and ready (its /healthz answers)."""

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        port: int | None = None,
        timeout: float = 30.0,
        token: str | None = None,
    ) -> None:
        """`token`: the admin token, when the data dir has none. A replica on etcd that did not
        start first has none: the store's token is the first replica's, which is taken from
        the first ControlProcess started in this process with the same `--store`."""
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"control-{self.port}.log"
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "meshlib",
                    "control",
                    "--port",
                    str(self.port),
                    "--data",
                    str(data_dir),
                    *args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the control service exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the control service did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        store = args[args.index("--store") + 1] if "--store" in args[:-1] else None
        path = data_dir / "admin.token"
        if token is None and not path.exists() and store in _STORE_TOKENS:
            token = _STORE_TOKENS[store]
        self.token = token or path.read_text().strip()
        if store is not None:
            _STORE_TOKENS.setdefault(store, self.token)

    def rss(self) -> int:
        """Resident memory in bytes (VmRSS)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")

    def stop(self) -> None:
        """Stop it as an operator would (SIGTERM: uvicorn shuts down and the registry is saved)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
