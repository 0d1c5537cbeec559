"""The `meshlib` command line: check, version, help, usage errors, and the demo."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

import meshlib
from meshlib import demo
from meshlib.cli import main
from tests.conftest import interruptible

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
kind: Endpoints
service: orders
endpoints:
  - {address: 127.0.0.1:8001, labels: {version: v1}}
---
kind: Destination
service: orders
subsets: {v1: {version: v1}}
---
kind: Route
service: orders
routes:
  - to: [{subset: v1}]
"""

BAD = """\
kind: Endpoints
service: orders
endpoints:
  - {address: 127.0.0.1:99999}
---
kind: Destination
service: orders
subsets: {v1: {version: v1}}
---
kind: Route
service: orders
routes:
  - to: [{subset: v1, weight: 90}, {subset: v3, weight: 10}]
"""


def run_cli(*args: str, timeout: float = 30, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshlib", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )


# -- check ---------------------------------------------------------------------------------


def test_check_accepts_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(GOOD)
    assert main(["check", "-f", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "ok: 3 documents"
    assert err == ""


def test_check_lists_every_problem_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    assert main(["check", "--file", str(path)]) == 1
    out, err = capsys.readouterr()
    problems = out.strip().splitlines()
    assert len(problems) == 2, out
    # each line names the document, the field and the reason
    assert any(
        "Route/orders (document 3 of bad.yaml)" in p and "routes[0].to[1].subset" in p and "'v3'" in p
        for p in problems
    ), out
    assert any(
        "Endpoints/orders (document 1 of bad.yaml)" in p and "endpoints[0].address" in p and "port" in p
        for p in problems
    ), out
    assert err.strip().splitlines() == [f"meshlib check: error: {path}: 2 problems"]


def test_check_reports_a_missing_file_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-f", str(tmp_path / "nope.yaml")]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "cannot read" in err and "nope.yaml" in err


def test_check_reports_yaml_syntax_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("kind: Route\nservice: [orders\n")
    assert main(["check", "-f", str(path)]) == 1
    out, _ = capsys.readouterr()
    assert "YAML error at line" in out


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("kind: [Route]\nservice: orders\n", "document 1 of mesh.yaml: kind: unknown kind ['Route']"),
        (
            "kind: Route\nservice: orders\nroutes: [{timeout: 1" + "0" * 400 + "s}]\n",
            "Route/orders (document 1 of mesh.yaml): routes[0].timeout: duration text is longer",
        ),
        (
            "kind: Destination\nservice: orders\nmax_concurrent_requests: true\n",
            "Destination/orders (document 1 of mesh.yaml): max_concurrent_requests: expected a number",
        ),
        ("# every rule removed\n", "mesh.yaml: the file has no documents"),
    ],
)
def test_check_names_document_and_field_of_hostile_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: str
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    assert main(["check", "-f", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out.startswith(line), out
    assert err.strip() == f"meshlib check: error: {path}: 1 problem"  # not an exception's repr


def test_check_accepts_an_explicitly_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("[]\n")
    assert main(["check", "-f", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "ok: 0 documents"


# -- help, version, usage errors -----------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"meshlib {meshlib.__version__}"


@pytest.mark.parametrize("args", [["--help"], ["check", "--help"], ["demo", "--help"], ["version", "--help"]])
def test_help(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: meshlib")
    if args == ["--help"]:
        for name in ("check", "demo", "version"):
            assert name in out
    if args[0] == "demo":
        assert "--phase-seconds" in out and "--no-live" in out


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "meshlib check: error: the following arguments are required: -f/--file (see 'meshlib check --help')"
    ]
    assert main(["demo", "--phase-seconds", "0"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: meshlib" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli() -> None:
    result = run_cli("version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"meshlib {meshlib.__version__}"


# -- demo ----------------------------------------------------------------------------------

DONE = re.compile(
    r"^phase (?P<n>\d)/5 done: (?P<name>.+?): requests=(?P<requests>\d+) "
    r"v1=(?P<v1>[\d.]+)% v2=(?P<v2>[\d.]+)% success=(?P<success>[\d.]+)% rules=(?P<rules>\d+) "
    r"converged=(?P<converged>[\d.]+)ms since_request=(?P<since_request>[\d.]+)ms$"
)
DATA_DIR = re.compile(r"data dir (?P<tmp>\S+)/control\)")


def near(share: float, expected: float, requests: int) -> bool:
    """A weighted split's share within four standard deviations of its binomial draw (+1 point)."""
    p = expected / 100
    return abs(share - expected) <= 400 * math.sqrt(p * (1 - p) / requests) + 1


def test_demo_rolls_v2_out_through_the_control_service() -> None:
    started = time.monotonic()
    result = run_cli("demo", "--phase-seconds", "1", "--no-live", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 45
    out = result.stdout
    assert "Traceback" not in result.stderr, result.stderr

    # the orders instances registered themselves: three in the registry, by address and version
    registry = next(line for line in out.splitlines() if "registry (GET /v1/registry/orders):" in line)
    assert registry.count("(v1)") == 2 and registry.count("(v2)") == 1, registry
    assert "checkout subscribed: sees 3 orders instances" in out

    phases = [m.groupdict() for m in map(DONE.match, out.splitlines()) if m]
    assert [int(p["n"]) for p in phases] == [1, 2, 3, 4, 5], out
    for p in phases:
        assert int(p["requests"]) >= 30, p  # ~200 req/s for a second; far fewer on a loaded machine
        assert float(p["success"]) == 100.0, p
        assert abs(float(p["v1"]) + float(p["v2"]) - 100.0) < 0.2, p
    n = [int(p["requests"]) for p in phases]
    v2 = [float(p["v2"]) for p in phases]
    assert v2[0] == 0.0  # 100/0
    assert near(v2[1], 10, n[1]) and v2[1] < 25 and (v2[1] > 0 or n[1] < 100), phases[1]  # 90/10
    assert near(v2[2], 50, n[2]), phases[2]  # 50/50
    assert v2[3] > 97.0, phases[3]  # 0/100
    # header route: every 4th request carries x-canary: true
    assert abs(v2[4] - 25) <= max(7.0, 400 / n[4]), phases[4]

    # each phase is one PUT /v1/config: its own rules version, in force at checkout within a second
    versions = [int(p["rules"]) for p in phases]
    assert versions == sorted(set(versions)), versions
    assert out.count("in force at checkout") == 5
    for p in phases:
        assert float(p["converged"]) < 1000.0, p
        assert float(p["since_request"]) < 1000.0, p

    # at the end: deregistered, stopped, temporary files removed
    assert "3 orders instances stopped and deregistered: the registry lists 0" in out
    assert "demo finished: 5 phases" in out
    data = DATA_DIR.search(out)
    assert data is not None, out
    assert not Path(data["tmp"]).exists()


def test_demo_stops_cleanly_on_ctrl_c() -> None:
    with interruptible():  # Ctrl-C reaches it as a KeyboardInterrupt
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshlib", "demo", "--phase-seconds", "5", "--no-live"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
    head = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            head.append(line)
            if line.startswith("phase 1/5"):
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"the demo did not stop within 20 s of Ctrl-C:\n{out}\n{err}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "interrupted" in out
    assert "3 orders instances stopped and deregistered: the registry lists 0" in out
    assert "Traceback" not in err
    data = DATA_DIR.search("".join(head))
    assert data is not None, head
    assert not Path(data["tmp"]).exists()


def test_demo_leaves_no_thread_behind(capsys: pytest.CaptureFixture[str]) -> None:
    before = set(threading.enumerate())
    temp_dirs = set(Path(tempfile.gettempdir()).glob("meshlib-demo-*"))
    assert demo.run(0.2, live=False) == 0
    out = capsys.readouterr().out
    assert "demo finished: 5 phases" in out
    assert set(threading.enumerate()) - before == set()  # servers and the meshes' runtimes joined
    assert set(Path(tempfile.gettempdir()).glob("meshlib-demo-*")) <= temp_dirs


# -- Mesh.serve ----------------------------------------------------------------------------

SERVE = """\
import logging, sys
from meshlib import Mesh

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})

mesh = Mesh("orders", control=sys.argv[1], labels={"version": "v1"})
mesh.serve(app, port=0)
print("serve returned", flush=True)
mesh.close()
"""
READY = re.compile(r"^INFO meshlib: orders ready on 127\.0\.0\.1:(?P<port>\d+): (?P<rest>.*)$")


def test_serve_logs_one_ready_line_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    from meshlib.control.app import ControlSettings, create_app
    from meshlib.testing import serve
    from tests.conftest import wait_until

    control = serve(create_app(ControlSettings(tmp_path / "data")), lifespan="on")
    registry = f"{control.url}/v1/registry/orders"
    with interruptible():  # Ctrl-C reaches it as a KeyboardInterrupt
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, control.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
    lines: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        wait_until(lambda: any(READY.match(line) for line in lines) or proc.poll() is not None, 20, "ready")
        ready = [m for m in map(READY.match, lines) if m]
        assert len(ready) == 1, lines
        port, rest = int(ready[0]["port"]), ready[0]["rest"]
        assert port > 0  # the port it really listens on, not the 0 it was given
        assert rest == f"labels version=v1; registered with {control.url}; mTLS off", rest
        assert httpx.get(f"http://127.0.0.1:{port}/").text == "hello"
        (instance,) = httpx.get(registry).json()["orders"]
        assert instance["address"] == f"127.0.0.1:{port}"
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"serve() did not stop within 20 s of Ctrl-C: {lines}") from None
        reader.join(5)
        err = "".join(lines)
        assert proc.returncode in (0, 130), err
        assert "Traceback" not in err, err
        assert out == "serve returned\n"
        assert httpx.get(registry).json().get("orders", []) == []  # deregistered on the way out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        control.stop()
