"""The control subcommands of `meshlib`, against a real control service."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meshlib.cli import main
from meshlib.control.app import create_app
from meshlib.testing import RunningServer, serve
from tests.conftest import wait_until

RULES = """\
kind: Destination
service: orders
subsets: {v1: {version: v1}, v2: {version: v2}}
---
kind: Route
service: orders
routes:
  - to: [{subset: v1, weight: 90}, {subset: v2, weight: 10}]
"""


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[RunningServer, list[str]]]:
    data = tmp_path / "data"
    server = serve(create_app(data, ping=0.2, stale_after=0.3), lifespan="on")
    token = (data / "admin.token").read_text().strip()
    yield server, ["--control", server.url]
    server.stop()
    assert token  # the service made one on first start


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_apply_get_history_rollback_delete(control, tmp_path: Path, capsys) -> None:
    _, where = control
    admin = [*where, "--data", str(tmp_path / "data")]
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)

    assert run(capsys, "apply", "-f", str(rules), "--dry-run", *admin)[:2] == (
        0,
        "valid (version 0 unchanged)\n",
    )
    assert run(capsys, "apply", "-f", str(rules), *admin)[:2] == (0, "applied: version 1\n")
    assert run(capsys, "apply", "-f", str(rules), *admin)[:2] == (0, "unchanged: version 1\n")

    code, out, _ = run(capsys, "get", "route", "orders", *where)
    assert code == 0 and out.startswith("# version 1\n") and "weight: 90" in out and "Destination" not in out
    code, out, _ = run(capsys, "get", "-o", "json", *where)
    assert code == 0 and '"version": 1' in out

    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Route\nservice: orders\nroutes:\n  - to: [{subset: v7}]\n")
    code, _, err = run(capsys, "apply", "-f", str(bad), *admin)
    assert code == 1 and "routes[0].to[0].subset" in err and "v7" in err

    code, out, _ = run(capsys, "history", *where)
    assert code == 0 and out.splitlines()[1].split()[0] == "1"
    assert run(capsys, "rollback", "0", *admin)[:2] == (0, "rolled back to version 0: now version 2\n")
    assert run(capsys, "apply", "-f", str(rules), *admin)[0] == 0
    assert run(capsys, "delete", "Route", "orders", *admin)[:2] == (0, "deleted Route/orders: version 4\n")
    code, _, err = run(capsys, "delete", "Route", "orders", *admin)
    assert code == 1 and "404" in err


def test_wrong_token_and_unreachable_service_are_one_line_errors(control, tmp_path: Path, capsys) -> None:
    _, where = control
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    code, _, err = run(capsys, "apply", "-f", str(rules), *where, "--token", "wrong")
    assert (
        code == 1 and err.strip() == "meshlib apply: error: the control service refused the admin token (401)"
    )
    code, _, err = run(capsys, "get", "--control", "http://127.0.0.1:9")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "cannot reach the control service" in err


def test_status_flags_a_client_that_did_not_apply_the_latest_version(control, tmp_path: Path, capsys) -> None:
    server, where = control
    admin = [*where, "--data", str(tmp_path / "data")]
    connected = threading.Event()
    stop = threading.Event()

    def silent_watcher() -> None:  # reads the stream and never acks: a stuck process
        url = f"{server.url}/v1/watch?service=checkout&client=stuck-1"
        with httpx.stream("GET", url, timeout=10) as r:
            connected.set()
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    t = threading.Thread(target=silent_watcher, daemon=True)
    t.start()
    assert connected.wait(5)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    assert run(capsys, "apply", "-f", str(rules), *admin)[0] == 0

    def stale_line() -> str | None:
        code, out, _ = run(capsys, "status", *where)
        assert code == 0
        return next((line for line in out.splitlines() if line.startswith("stuck-1")), None)

    wait_until(lambda: (line := stale_line()) is not None and line.endswith("stale"), 5.0, "the stale flag")
    stop.set()
