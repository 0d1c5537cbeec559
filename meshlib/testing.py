"""Running real servers in-process for tests, benchmarks and demos.

`serve(app)` starts uvicorn on a thread on 127.0.0.1 with a port the OS picks and returns when
the server accepts connections, so a test talks to a real HTTP server without sleeping.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from meshlib.listening import bind


@dataclass
class RunningServer:
    """A uvicorn server on a background thread; `stop()` shuts it down and waits."""

    host: str
    port: int
    server: uvicorn.Server
    thread: threading.Thread
    sock: socket.socket = field(repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def kill(self) -> None:
        """Stop at once, dropping open connections (a crashed instance, not a graceful one)."""
        self.server.force_exit = True
        self.stop()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 10.0,
    sock: socket.socket | None = None,
    **config: Any,
) -> RunningServer:
    """Start `app` under uvicorn on a daemon thread; return once it is accepting connections.

    `sock`: a socket from `bind()`, when the address must be known before the server starts."""
    sock = sock or bind(host, port)
    config.setdefault("log_level", "warning")
    config.setdefault("lifespan", "off")
    config.setdefault("timeout_graceful_shutdown", 2)
    server = uvicorn.Server(uvicorn.Config(app, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"server on {host}:{sock.getsockname()[1]} did not start")
        time.sleep(0.005)
    bound = sock.getsockname()
    return RunningServer(host, bound[1], server, thread, sock)
