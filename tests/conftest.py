from __future__ import annotations

import collections
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from meshlib.testing import RunningServer, serve
from tests.backend import Backend


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """One node id per test, as pytest-xdist needs: it hands tests to workers by node id, so of
    items sharing one it runs only one. pytest 9.2 builds a function's id from its name and its
    parametrize ids, and schemathesis names each API operation's item `test[GET /path]` with no
    ids (tests/control/test_fuzz_api.py): its operations would share the function's id. They get
    the operation as their id's params, as before; any other clash stops the run."""
    for item in items:
        label = getattr(item, "operation_label", None)
        node_id = getattr(item, "_id", None)
        if label and node_id is not None and getattr(node_id, "params", "") is None:
            item._id = node_id.with_params(label)  # type: ignore[attr-defined]
    clashes = [n for n, count in collections.Counter(i.nodeid for i in items).items() if count > 1]
    if clashes:
        raise pytest.UsageError(f"tests sharing a node id (xdist would run only one of each): {clashes[:5]}")


@pytest.fixture(autouse=True)
def own_control_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last control state a test's Meshes keep goes to a directory of the test's own, not
    ~/.cache/meshlib: a cache left there by another test (or run) whose control service had the
    same port would be served at startup, and a test waiting for rules would go on with its
    stale endpoints. $XDG_CACHE_HOME, not $MESH_CACHE_DIR: a Mesh still sees no MESH_* variable."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


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


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Children started inside take Ctrl-C (SIGINT) as a Python program does.

    A test run started in the background (`cmd &` in a script) ignores SIGINT, and a child
    inherits that: Python then installs no KeyboardInterrupt handler at all. The disposition is
    set to the default around the start instead of in a `preexec_fn`: that runs Python in the
    forked child before exec, where the fork handlers of libraries the worker loaded (grpc's
    event engine) have aborted the child now and then.
    """
    ignored = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    )
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
