"""The control subcommands of `meshlib`, against a real control service."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from meshlib import Mesh
from meshlib.cli import main
from meshlib.control.app import ControlSettings, create_app
from meshlib.security.identity import IdentityError
from meshlib.testing import RunningServer, serve
from tests.conftest import interruptible, wait_until
from tests.control.test_security_api import SecureControl
from tests.test_cli import ROOT, run_cli

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
    server = serve(create_app(ControlSettings(data, ping=0.2, stale_after=0.3)), lifespan="on")
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


def test_history_and_status_tables_print_whole_values_one_row_per_line(
    control, tmp_path: Path, capsys
) -> None:
    server, where = control
    admin = [*where, "--data", str(tmp_path / "data")]
    client = "checkout-7d9f8b6c5d-x2x9q-with-a-long-pod-name-[bold]"  # longer than a fixed column
    body = {
        "documents": list(yaml.safe_load_all(RULES)),
        "message": "canary [red]not markup[/red] " + "x" * 99,
    }
    admin_header = {"authorization": f"Bearer {_admin(tmp_path)}"}
    r = httpx.put(f"{server.url}/v1/config", json=body, headers=admin_header)
    assert r.status_code == 200, r.text
    code, out, _ = run(capsys, "history", *where)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["VERSION", "CREATED", "DOCS", "MESSAGE"]
    assert rows[0].split()[0] == "1" and rows[0].endswith(body["message"]), out
    assert all(line == line.rstrip() for line in out.splitlines())

    connected = threading.Event()

    def watcher() -> None:
        with httpx.stream("GET", f"{server.url}/v1/watch?service=checkout&client={client}", timeout=10) as r:
            connected.set()
            for _ in r.iter_lines():
                return

    t = threading.Thread(target=watcher, daemon=True)
    t.start()
    assert connected.wait(5)

    def client_row() -> str | None:
        code, out, _ = run(capsys, "status", *admin)
        assert code == 0
        return next((line for line in out.splitlines() if line.startswith(client + " ")), None)

    wait_until(lambda: client_row() is not None, 5.0, "the client's row")
    assert client_row().split()[1] == "checkout"  # type: ignore[union-attr]
    t.join(5)


def _admin(tmp_path: Path) -> str:
    return (tmp_path / "data" / "admin.token").read_text().strip()


def test_get_names_the_valid_kinds_and_fails_on_a_missing_document(control, tmp_path: Path, capsys) -> None:
    _, where = control
    admin = [*where, "--data", str(tmp_path / "data")]
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    assert run(capsys, "apply", "-f", str(rules), *admin)[0] == 0

    code, out, err = run(capsys, "get", "rout", "orders", *where)
    assert code == 2 and out == ""
    assert "unknown kind 'rout': one of Endpoints, Destination, Route, Authorization, RateLimit" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "delete", "routes", "orders", *admin)
    assert code == 2 and "unknown kind 'routes'" in err

    code, out, err = run(capsys, "get", "route", "nosuch", *where)
    assert code == 1 and out == ""
    assert err.strip() == "meshlib get: error: no Route for 'nosuch' in version 1"
    code, out, _ = run(capsys, "get", "ROUTE", "orders", *where)  # any case
    assert code == 0 and "kind: Route" in out
    code, out, _ = run(capsys, "get", "ratelimit", *where)  # a kind with nothing in force: an empty list
    assert code == 0 and out == "# version 1\n"


def test_control_on_a_busy_port_fails_on_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("control", "--port", str(port), "--data", str(tmp_path / "data"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"meshlib control: error: 127.0.0.1:{port} is already in use (is another control service running?)"
    ]
    assert not (tmp_path / "data").exists()  # nothing created, no admin token printed


def test_control_prints_the_port_it_listens_on_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    with interruptible():  # Ctrl-C reaches it as a KeyboardInterrupt
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshlib", "control", "--port", "0", "--data", str(tmp_path / "data")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    try:
        url = re.compile(r"^control service on (http://127\.0\.0\.1:\d+) \(data: ")
        wait_until(lambda: any(map(url.match, lines)) or proc.poll() is not None, 20, "the control URL")
        (found,) = [m[1] for m in map(url.match, lines) if m]
        assert httpx.get(f"{found}/healthz").json()["status"] == "ok"
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, lines
    assert "Traceback" not in "".join(lines)


def test_an_http_url_for_a_tls_control_service_gets_an_https_hint(
    tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    secure = SecureControl(tmp_path / "secure")
    plain = secure.url.replace("https://", "http://")
    hint = f"the control service at {plain} speaks TLS: use {secure.url}"
    try:
        for argv in (["status"], ["get", "route"], ["token", "list"]):
            code, _, err = run(capsys, *argv, "--control", plain, "--data", str(secure.data_dir))
            assert code == 1 and err.splitlines() == [f"meshlib {argv[0]}: error: {hint}"], err
        with pytest.raises(IdentityError) as refused:  # a join token over http: enrollment says so at once
            Mesh("orders", control=plain, token=secure.token("orders"))
        assert str(refused.value) == hint
        caplog.set_level(logging.DEBUG, logger="meshlib")
        with Mesh("checkout", control=plain):  # no token: the watch stream warns, once
            wait_until(
                lambda: (
                    sum(r.getMessage() == hint for r in caplog.records) == 1
                    and sum("still unreachable" in r.getMessage() for r in caplog.records) >= 3
                ),
                10,
                "the hint and later retries",
            )
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage() == hint]
        assert len(warnings) == 1
    finally:
        secure.stop()
    _hanging_up_server_gets_no_hint(capsys)


def _hanging_up_server_gets_no_hint(capsys) -> None:
    """A server that speaks neither HTTP nor TLS (accepts and closes) is not taken for TLS."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def hang_up() -> None:
            with contextlib.suppress(OSError):  # until the listener is closed
                while True:
                    listener.accept()[0].close()

        threading.Thread(target=hang_up, daemon=True).start()
        code, _, err = run(capsys, "status", "--control", f"http://127.0.0.1:{listener.getsockname()[1]}")
    assert code == 1 and "cannot reach the control service" in err and "TLS" not in err, err


def test_every_client_command_takes_data_and_trusts_its_ca_bundle(tmp_path: Path, capsys) -> None:
    secure = SecureControl(tmp_path / "secure")
    data = ["--data", str(secure.data_dir)]
    try:
        token = ["--token", secure.admin_token]
        for argv in (["status"], ["get"], ["history"], ["ca", "bundle"], ["token", "list", *token]):
            code, _, err = run(capsys, *argv, "--control", secure.url, *data)
            assert code == 0, (argv, err)
            missing = tmp_path / "nowhere"
            code, _, err = run(capsys, *argv, "--control", secure.url, "--data", str(missing), "--ca", "")
            assert code == 1 and f"cannot load the CA bundle {missing / 'ca-bundle.crt'}" in err, (argv, err)
        assert main(["status", "--help"]) == 0
        help_text = " ".join(capsys.readouterr().out.split())
        assert "--data DIR" in help_text and "else DATA/ca-bundle.crt" in help_text
    finally:
        secure.stop()


def test_control_keeps_its_rules_in_etcd_with_store(etcd_cluster, tmp_path: Path) -> None:
    from meshlib.control.etcd_store import EtcdStore
    from tests.control.process import ControlProcess

    url = f"{etcd_cluster.endpoints}/cli-test"
    proc = ControlProcess(tmp_path / "data", "--store", url)
    try:
        docs = list(yaml.safe_load_all(RULES))
        reply = httpx.put(
            f"{proc.url}/v1/config", json=docs, headers={"Authorization": f"Bearer {proc.token}"}
        )
        assert reply.json()["version"] == 1, reply.text
    finally:
        proc.stop()
    assert not (tmp_path / "data" / "rules.db").exists()
    with EtcdStore(url) as store:
        version, rules = store.current()
        assert version == 1 and [d.kind for d in rules.documents] == ["Destination", "Route"]


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--etcd-ca", "ca.pem"], "--etcd-ca needs --store"),
        (
            ["--store", "etcd://user:pw@h:2379"],
            "--store: etcd: no credentials in the URL (it ends up in logs); "
            "give the user and password separately",
        ),
        (["--store", "etcd://h", "--etcd-cert", "c.pem"], "--store: etcd: TLS options need an etcds:// URL"),
        (
            ["--store", "etcds://h", "--etcd-user", "u"],
            "--store: etcd: a user needs a password and a password a user",
        ),
        (
            ["--store", "etcd://h", "--etcd-password-file", "/nonexistent"],
            "cannot read /nonexistent: No such file or directory",
        ),
    ],
)
def test_control_store_options_are_checked_before_anything_starts(
    tmp_path: Path, argv: list[str], error: str
) -> None:
    result = run_cli("control", "--port", "0", "--data", str(tmp_path / "data"), *argv)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"meshlib control: error: {error}"]
    assert not (tmp_path / "data").exists()


# -- several replicas ------------------------------------------------------------------------


@pytest.fixture
def two_controls(tmp_path: Path) -> Iterator[tuple[RunningServer, RunningServer]]:
    """Two control services with stores of their own (so whichever got a request shows it)."""
    servers = tuple(serve(create_app(ControlSettings(tmp_path / n)), lifespan="on") for n in ("a", "b"))
    yield servers  # type: ignore[misc]
    for server in servers:
        server.stop()


def test_a_command_moves_to_the_next_replica_when_one_is_unreachable(
    two_controls: tuple[RunningServer, RunningServer], tmp_path: Path, capsys
) -> None:
    _, b = two_controls
    dead = "http://127.0.0.1:9"
    code, out, err = run(capsys, "get", "--control", f"{dead},{b.url}")
    assert code == 0 and out.startswith("# version 0"), err
    assert f"control service at {dead} unreachable" in err and "trying the next" in err
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    token = (tmp_path / "b" / "admin.token").read_text().strip()
    code, out, _ = run(capsys, "apply", "-f", str(rules), "--control", f"{dead},{b.url}", "--token", token)
    assert (code, out) == (0, "applied: version 1\n")
    assert httpx.get(f"{b.url}/v1/config").json()["version"] == 1  # applied once
    code, _, err = run(capsys, "history", "--control", f"{dead},http://127.0.0.1:1")
    assert code == 1 and "cannot reach any control service replica" in err and len(err.splitlines()) == 2


def test_an_answer_from_the_first_replica_is_not_retried_on_the_next(
    two_controls: tuple[RunningServer, RunningServer], tmp_path: Path, capsys
) -> None:
    a, b = two_controls
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    token_b = (tmp_path / "b" / "admin.token").read_text().strip()  # A refuses it: 401
    code, _, err = run(capsys, "apply", "-f", str(rules), "--control", f"{a.url},{b.url}", "--token", token_b)
    assert code == 1 and "refused the admin token (401)" in err and "trying the next" not in err
    assert httpx.get(f"{b.url}/v1/config").json()["version"] == 0  # B never saw the apply
    code, _, err = run(
        capsys, "delete", "Route", "orders", "--control", f"{a.url},{b.url}", "--token", token_b
    )
    assert code == 1 and [row["version"] for row in httpx.get(f"{b.url}/v1/history").json()] == [0]


def test_a_read_answered_with_a_5xx_moves_on_and_a_change_does_not(
    two_controls: tuple[RunningServer, RunningServer], tmp_path: Path, capsys
) -> None:
    """A replica whose store is out of reach answers 503: `get` and `history` move on (a read
    changes nothing), `apply` does not (it may land on the first: never sent twice)."""
    from tests.backend import Backend

    _, b = two_controls
    broken = Backend("replica-without-its-store")
    broken.fail_status = 503
    server = serve(broken)
    try:
        first = f"http://{server.address}"
        code, out, err = run(capsys, "get", "--control", f"{first},{b.url}")
        assert code == 0 and out.startswith("# version 0"), err
        assert f"control service at {first} answered 503; trying the next" in err
        rules = tmp_path / "rules.yaml"
        rules.write_text(RULES)
        token = (tmp_path / "b" / "admin.token").read_text().strip()
        code, _, err = run(
            capsys, "apply", "-f", str(rules), "--control", f"{first},{b.url}", "--token", token
        )
        assert code == 1 and err.startswith("meshlib apply: error: 503") and "trying the next" not in err
        assert httpx.get(f"{b.url}/v1/config").json()["version"] == 0  # B never saw the apply
        assert [s["method"] for s in broken.seen] == ["GET", "PUT"]
    finally:
        server.stop()


def test_status_lists_every_replica_up_or_down(
    two_controls: tuple[RunningServer, RunningServer], tmp_path: Path, capsys
) -> None:
    a, b = two_controls
    dead = "http://127.0.0.1:9"
    assert (
        httpx.put(
            f"{b.url}/v1/config",
            content=RULES,
            headers={
                "content-type": "application/yaml",
                "authorization": f"Bearer {(tmp_path / 'b' / 'admin.token').read_text().strip()}",
            },
        ).json()["version"]
        == 1
    )
    code, out, _ = run(capsys, "status", "--control", f"{a.url},{dead},{b.url}")
    assert code == 0
    table = out.split("\n\n")[0].splitlines()[1:]  # after the "control:" line, before the clients
    assert [line.split() for line in table] == [
        ["REPLICA", "STATE", "VERSION", "REV"],
        [a.url, "up", "0", "0"],
        [dead, "down", "-", "-"],
        [b.url, "up", "1", "1"],
    ]
    code, out, _ = run(capsys, "status", "--control", f"{a.url},{dead}", "-o", "json")
    assert json.loads(out)["replicas"] == [
        {"url": a.url, "up": True, "version": 0, "revision": 0},
        {"url": dead, "up": False},
    ]
    code, out, _ = run(capsys, "status", "--control", a.url, "-o", "json")
    assert "replicas" not in json.loads(out)  # one URL: nothing to compare


def test_a_bad_control_list_is_a_usage_error(capsys) -> None:
    code, _, err = run(capsys, "get", "--control", "http://127.0.0.1:1,ftp://x")
    assert code == 1 and err.strip() == (
        "meshlib get: error: --control: URL 2 is not an http:// or https:// URL with a host"
    )


def test_xds_is_refused_with_security_on(capsys, tmp_path) -> None:
    """The ADS port has no TLS nor join tokens yet: with --secure it would hand the rules and
    every endpoint to anyone who asks."""
    code = main(["control", "--secure", "--xds-port", "0", "--port", "0", "--data", str(tmp_path)])
    assert code != 0
    assert "--xds-port" in capsys.readouterr().err


# -- refusals, and text others sent, as the CLI prints them -----------------------------------


def test_a_refused_request_field_is_named_with_the_servers_reason(tmp_path: Path, capsys) -> None:
    """Token and CA 422s carry `{"field", "reason"}` problems, not rules documents: the one error
    line names the field and says the reason, as the service gave them."""
    secure = SecureControl(tmp_path / "secure", tls=False)
    where = ["--control", secure.url, "--data", str(secure.data_dir)]
    try:
        for argv, problem in (
            (
                ["token", "create", "--service", "ORDERS"],
                "service: invalid service name 'ORDERS': use lowercase",
            ),
            (
                ["token", "create", "--service", "orders", "--ttl", "100000h"],
                "ttl: Input should be less than",
            ),
            (["ca", "rotate", "--overlap", "100000h"], "overlap: Input should be less than"),
        ):
            code, out, err = run(capsys, *argv, *where)
            assert code == 1 and out == "", err
            assert len(err.splitlines()) == 1, err
            assert err.startswith(f"meshlib {argv[0]}: error: invalid request: {problem}"), err
        assert secure.http.get("/v1/tokens", headers=secure.admin).json() == []
    finally:
        secure.stop()


def test_names_in_a_path_never_reach_another_resource(control, tmp_path: Path, capsys) -> None:
    """`delete` and `token revoke` put names the user typed into the URL: a '?' or '#' would cut
    it short (`b?oops` deleted `b`) and '..' would climb out of it (httpx resolves dot segments:
    a registry instance deregistered, a Route deleted by `token revoke`)."""
    server, where = control
    admin = [*where, "--data", str(tmp_path / "data")]
    rules = tmp_path / "b.yaml"
    rules.write_text(RULES + "---\nkind: Endpoints\nservice: b\nendpoints: []\n")
    assert run(capsys, "apply", "-f", str(rules), *admin)[:2] == (0, "applied: version 1\n")
    instance = httpx.post(
        f"{server.url}/v1/registry/orders", json={"address": "127.0.0.1:9001", "ttl": 600}
    ).json()["id"]
    for argv in (
        ["delete", "Endpoints", "b?oops"],
        ["delete", "Endpoints", "b#oops"],
        ["delete", "Endpoints", f"../../registry/orders/{instance}"],
        ["delete", "Endpoints", ".."],
        ["token", "revoke", "../config/Route/orders"],
        ["token", "revoke", f"../registry/orders/{instance}"],
        ["token", "revoke", "x?y"],
    ):
        code, out, err = run(capsys, *argv, *admin)
        assert code in (1, 2) and out == "", (argv, out, err)
        assert len(err.splitlines()) == 1 and "error:" in err, (argv, err)
    config = httpx.get(f"{server.url}/v1/config").json()
    assert config["version"] == 1 and len(config["documents"]) == 3  # Endpoints/b and Route/orders kept
    assert [i["id"] for i in httpx.get(f"{server.url}/v1/registry/orders").json()["orders"]] == [instance]

    from meshlib.control.commands import _path

    assert _path("v1", "config", "Route", "b?x/y#z %") == "/v1/config/Route/b%3Fx%2Fy%23z%20%25"
    assert run(capsys, "delete", "Endpoints", "b", *admin)[:2] == (0, "deleted Endpoints/b: version 2\n")


@contextlib.contextmanager
def _watching(url: str, client: str) -> Iterator[None]:
    """A process watching as `client` (and never acking by itself) while the block runs."""
    connected, stop = threading.Event(), threading.Event()

    def watch() -> None:
        with httpx.stream("GET", f"{url}/v1/watch?service=orders&client={client}", timeout=10) as r:
            connected.set()
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    assert connected.wait(5)
    try:
        yield
    finally:
        stop.set()


def test_status_escapes_what_a_client_acked_and_says_it_rejected(control, capsys) -> None:
    """An ack's error is any client's text (security off: anyone's): a newline would forge a row
    of the table, an escape sequence would reach the terminal. A client that refused the
    latest change is `rejected`, not `ok`."""
    server, where = control
    with _watching(server.url, "evil-1"):
        health = httpx.get(f"{server.url}/healthz").json()
        error = "bad\nFAKE-CLIENT  orders  1.2.3.4:1  99  99  ok\x1b[2J\x1b[31mRED\u202e"
        ack = {"client": "evil-1", "service": "orders", "ok": False, "error": error}
        ack |= {"version": health["version"], "revision": health["revision"]}
        assert httpx.post(f"{server.url}/v1/ack", json=ack).status_code == 204
        code, out, _ = run(capsys, "status", *where)
    assert code == 0
    assert "\x1b" not in out and "\u202e" not in out
    lines = out.splitlines()
    assert len(lines) == 3 and not any(line.startswith("FAKE-CLIENT") for line in lines), out
    state = lines[2].split(None, 5)[5]
    assert state == "rejected: bad\\nFAKE-CLIENT  orders  1.2.3.4:1  99  99  ok\\x1b[2J\\x1b[31mRED\\u202e"


def test_history_escapes_a_stored_message(tmp_path: Path, capsys) -> None:
    """A message stored before the API refused control characters (or written to the store by
    another tool) is printed escaped, on its row."""
    from meshlib.rules import RuleSet
    from tests.control import Control

    control = Control(tmp_path / "data")
    try:
        rules = RuleSet.EMPTY.apply([{"kind": "RateLimit", "service": "orders", "requests_per_second": 7}])
        control.plane.store.commit(rules, "hello\n2026 CRITICAL forged\x1b[31m")
        code, out, _ = run(capsys, "history", "--control", control.url)
    finally:
        control.stop()
    assert code == 0 and "\x1b" not in out
    lines = out.splitlines()
    assert len(lines) == 3 and lines[1].endswith("hello\\n2026 CRITICAL forged\\x1b[31m"), out


def test_apply_refuses_what_check_refuses_before_sending_it(control, tmp_path: Path, capsys) -> None:
    """Text that is not UTF-8 is named as `meshlib check` names it (not a UnicodeDecodeError
    with the file's bytes); a file with no document (empty, comments, `---`) is refused, not
    `unchanged`; `[]` applies nothing on purpose."""
    _, where = control
    admin = [*where, "--data", str(tmp_path / "data")]
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"kind: Endpoints\nservice: caf\xe9\nendpoints: []\n")
    code, out, err = run(capsys, "apply", "-f", str(latin1), *admin)
    assert (code, out) == (1, "") and err == f"meshlib apply: error: {latin1}: not UTF-8 text (byte 28)\n"
    assert run(capsys, "check", "-f", str(latin1))[1].startswith("latin1.yaml: not UTF-8 text (byte 28)")
    for text in ("", "\n\n", "# every rule removed\n", "---\n---\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        code, out, err = run(capsys, "apply", "-f", str(empty), *admin)
        assert (code, out) == (1, ""), (text, out)
        assert err.startswith(f"meshlib apply: error: {empty}: the file has no documents"), err
        assert run(capsys, "check", "-f", str(empty))[0] == 1  # as check says
    nothing = tmp_path / "nothing.yaml"
    nothing.write_text("[]\n")
    assert run(capsys, "apply", "-f", str(nothing), *admin)[:2] == (0, "unchanged: version 0\n")


@pytest.mark.parametrize(
    "case", ["data is a file", "rules.db is not a database", "admin.token is a directory"]
)
def test_control_start_up_errors_are_one_line_naming_the_path(tmp_path: Path, case: str, capsys) -> None:
    data = tmp_path / "data"
    if case == "data is a file":
        data.write_text("")
        where, what = data, "not a directory"
    elif case == "rules.db is not a database":
        data.mkdir()
        (data / "rules.db").write_text("junk\n")
        where, what = data / "rules.db", "file is not a database"
    else:
        (data / "admin.token").mkdir(parents=True)
        where, what = data / "admin.token", "Is a directory"
    assert main(["control", "--port", "0", "--data", str(data)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("meshlib control: error: ") and str(where) in err and what in err, err
    assert "Error(" not in err  # no exception's repr
    if case == "rules.db is not a database":  # no admin token made that no one would ever see printed
        assert not (data / "admin.token").exists()


def test_control_refuses_a_port_out_of_range_as_a_usage_error(tmp_path: Path, capsys) -> None:
    for option in ("--port", "--xds-port"):
        assert main(["control", option, "70000", "--data", str(tmp_path / "data")]) == 2
        err = capsys.readouterr().err
        assert err.splitlines() == [
            f"meshlib control: error: argument {option}: a port is 0 to 65535 (0: any free one), not 70000 "
            "(see 'meshlib control --help')"
        ]
    assert not (tmp_path / "data").exists()


def test_a_server_that_is_not_a_control_service_is_named_in_one_line(capsys) -> None:
    page = "<!DOCTYPE html>\n" + "".join(f"<p>line {i} of a web server's own page</p>\n" for i in range(14))

    async def web_server(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        status, body = (200, b"hello") if scope["path"] == "/healthz" else (404, page.encode())
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/html")]}
        )
        await send({"type": "http.response.body", "body": body})

    server = serve(web_server)
    try:
        for argv, request in ((["get"], "GET /v1/config"), (["status"], "GET /healthz: 200 OK")):
            code, out, err = run(capsys, *argv, "--control", server.url)
            assert code == 1 and out == "", err
            assert len(err.splitlines()) == 1 and len(err) < 400, err
            assert (
                f"{server.url} does not answer as a meshlib control service ({request}, not JSON: " in err
            ), err
            assert "Error(" not in err
    finally:
        server.stop()


def test_ca_rotate_takes_a_bare_zero_overlap(tmp_path: Path, capsys) -> None:
    """`--overlap 0` (docs/security.md: the old root out at once) needs no unit."""
    secure = SecureControl(tmp_path / "secure", tls=False)
    try:
        code, _, err = run(capsys, "ca", "rotate", "--overlap", "0", "--control", secure.url,
                           "--data", str(secure.data_dir))  # fmt: skip
        assert code == 0, err
        assert "trusted for 0s" in err
        assert secure.plane.ca is not None and secure.plane.ca.generation == 1
    finally:
        secure.stop()
