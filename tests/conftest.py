from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from meshlib.testing import RunningServer, serve
from tests.backend import Backend


class Fleet:
    """Real backends on 127.0.0.1, started on demand and stopped at the end of the test."""

    def __init__(self) -> None:
        self.servers: list[RunningServer] = []
        self.backends: dict[str, Backend] = {}

    def start(self, name: str, labels: dict[str, str] | None = None) -> tuple[Backend, RunningServer]:
        backend = Backend(name, labels)
        server = serve(backend)
        self.servers.append(server)
        self.backends[server.address] = backend
        return backend, server

    def stop(self) -> None:
        for s in self.servers:  # signal all first, then wait: shutdowns overlap
            s.server.should_exit = True
        for s in self.servers:
            s.stop()


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    f = Fleet()
    yield f
    f.stop()


def write_rules(path: Path, docs: list[dict]) -> Path:
    """Write documents as multi-document YAML, atomically (a watcher never reads half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    tmp.replace(path)
    return path


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll with a deadline: the way tests wait for something asynchronous to happen."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
