"""The control service's subcommands of `meshlib`: control, apply, get, delete, history,
rollback, status. Each talks to the HTTP API of docs/control-api.md.

`--control` (or $MESH_CONTROL) may list several replicas, comma-separated: a request goes to
the first, and to the next only when it never reached the one before (refused, or no
connection in time); a change that got an answer, even a 5xx, is not sent again, so an apply
lands at most once. A read (GET) answered with a 5xx goes on to the next replica too.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import yaml

from meshlib.cli import CommandError, command, print_table
from meshlib.control.tls_probe import tls_hint
from meshlib.settings import MeshSettings

DEFAULT_URL = "http://127.0.0.1:7070"
DEFAULT_DATA = ".mesh"


def _environment() -> MeshSettings:
    """The MESH_* defaults; a bad one is a one-line error, as a bad argument is."""
    try:
        return MeshSettings.resolve()
    except ValueError as exc:
        sys.exit(f"meshlib: error: {exc}")


def _client_arguments(parser: argparse.ArgumentParser, admin: bool = False) -> None:
    env = _environment()
    parser.add_argument(
        "--control",
        default=env.control or DEFAULT_URL,
        metavar="URL[,URL...]",
        help=f"the control service, or its replicas comma-separated, tried in order "
        f"(default $MESH_CONTROL or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--ca",
        default=env.ca,
        metavar="FILE",
        help="CA bundle to verify an https control service (default $MESH_CA, else DATA/ca-bundle.crt)",
    )
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        metavar="DIR",
        help=f"DATA: the data dir of a local control service (default {DEFAULT_DATA})",
    )
    if admin:
        parser.add_argument(
            "--token",
            default=env.admin_token,
            help="the admin token (default $MESH_ADMIN_TOKEN, else DATA/admin.token)",
        )


def _admin_token(args: argparse.Namespace) -> str:
    if args.token:
        return str(args.token)
    path = Path(args.data) / "admin.token"
    try:
        return path.read_text().strip()
    except OSError:
        raise CommandError(
            f"no admin token: pass --token, set MESH_ADMIN_TOKEN, or run beside {path}"
        ) from None


def _request(
    args: argparse.Namespace, method: str, path: str, *, admin: bool = False, **kw: Any
) -> httpx.Response:
    _check_path(path)
    headers = kw.pop("headers", {})
    if admin:
        headers["authorization"] = f"Bearer {_admin_token(args)}"
    urls = _control_urls(args)
    if urls[0].startswith("https:"):
        kw["verify"] = _verify(args)
    # with replicas to fall back on, a dead host is given up on sooner
    timeout = httpx.Timeout(10.0, connect=3.0 if len(urls) > 1 else 10.0)
    failures: list[str] = []
    for url in urls:
        try:
            response = httpx.request(method, url + path, headers=headers, timeout=timeout, **kw)
            if method == "GET" and response.status_code >= 500 and url != urls[-1]:
                # a read changes nothing: a replica that cannot answer it (its store out of
                # reach: 503) is passed over like an unreachable one
                print(
                    f"meshlib: control service at {url} answered {response.status_code}; trying the next",
                    file=sys.stderr,
                )
                failures.append(f"{url}: {response.status_code}")
                continue
            break
        except httpx.HTTPError as exc:
            hint = tls_hint(url, exc)  # an http:// URL for a --secure control service
            if hint:
                raise CommandError(hint) from None
            if len(urls) == 1:
                raise CommandError(f"cannot reach the control service at {url}: {exc}") from None
            if not _never_sent(exc) and method != "GET":  # it may have landed: not sent twice
                raise CommandError(
                    f"{method} {path} to the control service at {url} failed after it was sent ({exc}); "
                    "not retried on another replica: check with `meshlib history` or `meshlib get`"
                ) from None
            failures.append(f"{url}: {exc}")
            if url != urls[-1]:
                print(
                    f"meshlib: control service at {url} unreachable ({exc}); trying the next", file=sys.stderr
                )
    else:
        raise CommandError(f"cannot reach any control service replica ({'; '.join(failures)})")
    if response.status_code == 401:
        raise CommandError("the control service refused the admin token (401)")
    if response.status_code >= 400:
        raise CommandError(_refusal(response, url, method, path))
    if response.content:
        try:
            response.json()  # every answer of the API with a body is JSON
        except ValueError:
            raise CommandError(_not_control(response, url, method, path)) from None
    return response


def _refusal(response: httpx.Response, url: str, method: str, path: str) -> str:
    """The one line that says why the control service refused a request (any `problems` of
    rules documents printed to stderr first, one per line, as `meshlib check` prints them)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return f"{response.status_code} {response.reason_phrase}: {_not_control(response, url, method, path)}"
    message = printable(body["error"], 500)
    fields = []
    problems = body.get("problems")
    for p in problems if isinstance(problems, list) else []:
        if not isinstance(p, dict):
            continue
        field, reason = printable(p.get("field") or "", 200), printable(p.get("reason", "?"), 500)
        if "document" in p:  # a rules document's problem (422 invalid rules)
            print(f"{printable(p['document'], 200)}: {field or '(document)'}: {reason}", file=sys.stderr)
        else:  # a request field's (token, CA, registry): {"field", "reason"}
            fields.append(f"{field}: {reason}" if field else reason)
    if fields:
        message += f": {'; '.join(fields)}"
    return message if response.status_code == 422 else f"{response.status_code}: {message}"


def _not_control(response: httpx.Response, url: str, method: str, path: str) -> str:
    """What to say of an answer that is not the control API's (another server on that port, a
    proxy's error page): the URL, the request, and the start of the body (its status too, for
    a success: an error's is said first)."""
    text = " ".join(response.text.split())
    try:
        response.json()
        shown = f"not the control API's JSON: {printable(text, 120)}"
    except ValueError:
        shown = f"not JSON: {printable(text, 120)}" if text else "an empty body"
    status = f": {response.status_code} {response.reason_phrase}" if response.status_code < 400 else ""
    return f"{url} does not answer as a meshlib control service ({method} {path}{status}, {shown})"


def printable(value: object, limit: int | None = None) -> str:
    """Text from the control service (or anyone who sent it there: an ack's error, a history
    message) as one line safe to print: control characters (newlines, terminal escapes) and
    other unprintable ones escaped as in Python (`\\n`, `\\x1b`), cut after `limit` characters."""
    text = value if isinstance(value, str) else str(value)
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _path(*parts: str) -> str:
    """An API path from fixed parts and names the user gave: each name percent-encoded whole
    (a '?', '#' or '/' in it stays in it), '.' and '..' refused (a client would resolve them)."""
    out = []
    for part in parts:
        if part in ("", ".", ".."):
            raise CommandError(f"not a valid name: {part!r}")
        out.append(quote(part, safe=""))
    return "/" + "/".join(out)


def _check_path(path: str) -> None:
    """A path built without `_path` from a name with '?', '#' or a dot segment would send the
    request to another resource (httpx resolves '..'): refused before anything is sent."""
    if "?" in path or "#" in path or any(seg in (".", "..") for seg in path.split("/")):
        raise CommandError(
            f"refused: {printable(path, 200)} would reach another resource "
            "(a name holds '?' or '#', or is '.' or '..')"
        )


def _control_urls(args: argparse.Namespace) -> tuple[str, ...]:
    """The replicas of `--control`, in order."""
    from meshlib.control.endpoints import parse_control_urls

    try:
        return parse_control_urls(args.control)
    except ValueError as exc:
        raise CommandError(f"--control: {exc}") from None


def _never_sent(exc: httpx.HTTPError) -> bool:
    """The request did not reach the control service: no connection, or none in time."""
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))


def _verify(args: argparse.Namespace) -> ssl.SSLContext:
    """Trust for an https control service: --ca / $MESH_CA, else DATA/ca-bundle.crt (as --help says)."""
    from meshlib.security.ca import BUNDLE_FILE

    path = Path(args.ca) if args.ca else Path(args.data) / BUNDLE_FILE
    try:
        ctx = ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        raise CommandError(
            f"cannot load the CA bundle {path} to verify {args.control}: {exc}; pass --ca or set MESH_CA"
        ) from None
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # an operator's intermediate as the anchor
    return ctx


# -- control -------------------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (0: any free one), not {value}")
    return value


def _control_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=7070, help="port (default 7070)")
    parser.add_argument(
        "--data", default=DEFAULT_DATA, metavar="DIR", help=f"data dir (default {DEFAULT_DATA})"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--xds-port",
        type=_port,
        default=None,
        metavar="N",
        help="also serve xDS (ADS) on this port, for proxyless gRPC clients (docs/xds.md); off by default",
    )
    parser.add_argument(
        "--secure",
        action="store_true",
        help="turn on the CA and join tokens, and serve over TLS with a certificate from the CA",
    )
    parser.add_argument(
        "--trust-domain", default=None, metavar="NAME", help="SPIFFE trust domain (default mesh.local)"
    )
    parser.add_argument(
        "--ca-cert", default=None, metavar="FILE", help="use this CA certificate (and its chain) instead"
    )
    parser.add_argument("--ca-key", default=None, metavar="FILE", help="the key of --ca-cert")
    parser.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="keep the rules and the registry in etcd: etcd://host:2379[,host:2379...][/prefix] "
        "(etcds:// for TLS); default: DATA/rules.db and DATA/registry.json",
    )
    parser.add_argument("--etcd-ca", default=None, metavar="FILE", help="CA that signs the etcd members")
    parser.add_argument("--etcd-cert", default=None, metavar="FILE", help="client certificate for etcd")
    parser.add_argument("--etcd-key", default=None, metavar="FILE", help="the key of --etcd-cert")
    parser.add_argument("--etcd-user", default=None, metavar="NAME", help="etcd user")
    parser.add_argument(
        "--etcd-password-file", default=None, metavar="FILE", help="file holding the etcd user's password"
    )


@command("control", "run the control service (rules, registry, push to every process)", _control_arguments)
def control(args: argparse.Namespace) -> int:
    """Run the control service: it keeps the rules (SQLite in the data dir, or etcd) and a registry, and
    pushes every change to every connected process. The admin token is created in the data dir on
    first start and printed once."""
    import logging

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level != "debug":  # httpx logs every request at INFO: each etcd call, a line
        logging.getLogger("httpx").setLevel(logging.WARNING)
    if not args.secure and (args.trust_domain or args.ca_cert or args.ca_key):
        raise CommandError("--trust-domain, --ca-cert and --ca-key need --secure")
    if bool(args.ca_cert) != bool(args.ca_key):
        raise CommandError("--ca-cert and --ca-key go together")
    if args.secure and args.xds_port is not None:  # it would hand rules and endpoints to anyone
        raise CommandError("--xds-port serves plaintext without join tokens: not with --secure (yet)")
    etcd = _etcd_options(args)
    data = Path(args.data)
    if data.exists() and not data.is_dir():
        raise CommandError(f"--data {data}: not a directory")
    sock = _listen(args.host, args.port)  # a busy port fails here, before anything is created
    if args.xds_port is not None:
        _listen(args.host, args.xds_port).close()  # so does a busy xDS port
    try:
        return _run_control(args, sock, etcd)
    finally:
        sock.close()


def _etcd_options(args: argparse.Namespace) -> Any:
    """EtcdOptions from --store and the --etcd-* options (None without --store)."""
    given = [
        o for o in ("etcd_ca", "etcd_cert", "etcd_key", "etcd_user", "etcd_password_file") if getattr(args, o)
    ]
    if args.store is None:
        if given:
            raise CommandError(f"--{given[0].replace('_', '-')} needs --store")
        return None
    from meshlib.control.etcd_client import parse_etcd_url

    password = None
    if args.etcd_password_file:
        try:
            password = Path(args.etcd_password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CommandError(f"cannot read {args.etcd_password_file}: {exc.strerror or exc}") from None
    try:
        return parse_etcd_url(
            args.store,
            ca=args.etcd_ca,
            cert=args.etcd_cert,
            key=args.etcd_key,
            user=args.etcd_user,
            password=password,
        )
    except ValueError as exc:
        raise CommandError(f"--store: {exc}") from None


def _listen(host: str, port: int) -> socket.socket:
    from meshlib.listening import bind

    try:
        return bind(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise CommandError(
                f"{host}:{port} is already in use (is another control service running?)"
            ) from None
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _run_control(args: argparse.Namespace, sock: socket.socket, etcd: Any) -> int:
    import uvicorn

    from meshlib.control.app import ControlSettings, create_app
    from meshlib.control.etcd_client import EtcdError
    from meshlib.control.store import StoreUnavailable

    try:
        settings = ControlSettings(
            args.data,
            security=args.secure,
            trust_domain=args.trust_domain or "mesh.local",
            ca_cert=args.ca_cert,
            ca_key=args.ca_key,
            etcd=etcd,
            xds_port=args.xds_port,
            xds_host=args.host,
        )
        app = create_app(settings)
    except ValueError as exc:  # CAError included: a bad operator CA, an odd trust domain
        raise CommandError(str(exc)) from None
    except EtcdError as exc:
        raise CommandError(f"--store: {exc}") from None
    except StoreUnavailable as exc:  # a rules.db that is not a database, or locked
        raise CommandError(f"the rules store {exc}") from None
    except OSError as exc:  # the data dir or a file in it: not writable, a directory, ...
        where = f"{exc.filename}: " if exc.filename else ""
        raise CommandError(f"cannot start: {where}{exc.strerror or exc}") from None
    plane = app.state.control
    if plane.new_admin_token:
        print(f"admin token (shown once; also in {Path(args.data) / 'admin.token'}):", file=sys.stderr)
        print(plane.new_admin_token, file=sys.stderr)
    elif etcd is not None and not (Path(args.data) / "admin.token").exists():
        print(
            "admin token: the one the first replica on this store printed (give it to the CLI with "
            "--token or $MESH_ADMIN_TOKEN)",
            file=sys.stderr,
        )
    options: dict[str, Any] = {}
    scheme = "http"
    if args.secure:
        from meshlib.control.server_tls import uvicorn_tls_options

        options = uvicorn_tls_options(plane, hosts=[args.host])
        scheme = "https"
        print(f"CA bundle for clients: {Path(args.data) / 'ca-bundle.crt'}", file=sys.stderr)
    port = sock.getsockname()[1]  # the real one for --port 0
    where = f"data: {args.data}" + (f", rules: {', '.join(etcd.endpoints)}" if etcd else "")
    print(f"control service on {scheme}://{args.host}:{port} ({where})", file=sys.stderr)
    if args.xds_port is not None:
        print(f"xDS (ADS, plaintext) on {args.host}:{args.xds_port}", file=sys.stderr)
    from meshlib.control.ack_route import KEEP_ALIVE
    from meshlib.control.gc_tuning import tune_for_service

    tune_for_service()  # this process serves the control API and nothing else
    # uvicorn's access log stays at WARNING here, so it never prints: access_log=False spares every
    # request the formatting of its arguments (a tenth of a watch's or an ack's CPU in uvicorn);
    # no `server` header either (one header less for h11 to check on every answer)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        server_header=False,
        timeout_keep_alive=int(KEEP_ALIVE),
        **options,
    )
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: uvicorn stopped gracefully, then re-raised it
        server.run(sockets=[sock])
    return 0


# -- apply / get / delete ------------------------------------------------------------------


def _apply_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f", "--file", required=True, metavar="FILE", help="rules file (YAML), '-' for stdin"
    )
    parser.add_argument("--dry-run", action="store_true", help="validate on the service, change nothing")
    _client_arguments(parser, admin=True)


@command("apply", "apply a rules file to the control service", _apply_arguments)
def apply(args: argparse.Namespace) -> int:
    """Apply every document of a rules file as one new version (all or nothing). Documents are
    matched by kind and service; documents not in the file are left as they are."""
    try:
        if args.file == "-":  # the bytes as sent: UTF-8 is checked below, as `check` checks it
            stdin = getattr(sys.stdin, "buffer", None)
            data = stdin.read() if stdin is not None else sys.stdin.read().encode()
        else:
            data = Path(args.file).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    _check_rules_file(data, "stdin" if args.file == "-" else args.file)
    # Sent as written: the service validates it against the rules already in force (a Route may
    # use the subsets of a Destination applied earlier) and names every problem in its 422.
    params = {"dry_run": "1"} if args.dry_run else {}
    headers = {"content-type": "application/yaml"}
    body = _request(args, "PUT", "/v1/config", admin=True, content=data, params=params, headers=headers)
    body = body.json()
    if args.dry_run:
        print(f"valid (version {body.get('version')} unchanged)")
    elif body.get("changed", True):
        print(f"applied: version {body['version']}")
    else:
        print(f"unchanged: version {body['version']}")
    return 0


def _check_rules_file(data: bytes, name: str) -> None:
    """Refuse what `meshlib check` refuses before the documents are looked at: text that is not
    UTF-8, and a file with no document at all (empty, only comments or `---`: an emptied or
    half-written file; `[]` says "nothing" on purpose). The rest is the service's to judge."""
    from meshlib.rules.loading import RulesLoader

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    try:
        found = any(doc is not None for doc in yaml.load_all(text, Loader=RulesLoader))
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
        return  # not YAML: the service says where (400)
    if not found:
        raise CommandError(
            f"{name}: the file has no documents; nothing applied (write [] to apply none on purpose)"
        )


def _kind(text: str) -> str:
    """The kind as the rules spell it (any case accepted), or a usage error naming them all."""
    from meshlib.rules import KINDS

    for kind in KINDS:
        if kind.lower() == text.lower():
            return kind
    raise argparse.ArgumentTypeError(f"unknown kind {text!r}: one of {', '.join(KINDS)}")


def _get_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "kind", nargs="?", type=_kind, help="only documents of this kind (Route, Destination, ...)"
    )
    parser.add_argument("service", nargs="?", help="only documents of this service")
    parser.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    _client_arguments(parser)


@command("get", "show the rules in force", _get_arguments)
def get(args: argparse.Namespace) -> int:
    """Print the documents in force (all, one kind, or one kind of one service). Asking for one
    document that is not there is an error."""
    body = _request(args, "GET", "/v1/config").json()
    docs = [
        d
        for d in body["documents"]
        if (not args.kind or d["kind"] == args.kind) and (not args.service or d["service"] == args.service)
    ]
    if args.kind and args.service and not docs:
        raise CommandError(f"no {args.kind} for {args.service!r} in version {body['version']}")
    if args.output == "json":
        print(json.dumps({"version": body["version"], "documents": docs}, indent=2))
    else:
        print(f"# version {body['version']}")
        print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    return 0


def _service(text: str) -> str:
    """A service name, or a usage error saying why not (no document has another name)."""
    from meshlib.names import service_name_error

    error = service_name_error(text)
    if error is not None:
        raise argparse.ArgumentTypeError(printable(error, 300))
    return text


def _delete_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", type=_kind)
    parser.add_argument("service", type=_service)
    _client_arguments(parser, admin=True)


@command("delete", "remove one document", _delete_arguments)
def delete(args: argparse.Namespace) -> int:
    """Remove the document of KIND for SERVICE, as a new version."""
    path = _path("v1", "config", args.kind, args.service)
    body = _request(args, "DELETE", path, admin=True).json()
    print(f"deleted {args.kind}/{args.service}: version {body['version']}")
    return 0


# -- history / rollback --------------------------------------------------------------------


def _history_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=20)
    _client_arguments(parser)


@command("history", "list the versions of the rules", _history_arguments)
def history(args: argparse.Namespace) -> int:
    """List the versions kept by the control service, newest first."""
    rows = _request(args, "GET", "/v1/history", params={"limit": str(args.limit)}).json()
    print_table(
        ("VERSION", "CREATED", "DOCS", "MESSAGE"),
        (
            (
                row["version"],
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created"])),
                row["documents"],
                printable(row.get("message") or ""),
            )
            for row in rows
        ),
        right=("VERSION", "DOCS"),
    )
    return 0


def _rollback_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", type=int)
    _client_arguments(parser, admin=True)


@command("rollback", "make an old version of the rules current again", _rollback_arguments)
def rollback(args: argparse.Namespace) -> int:
    """Commit, as a new version, the documents of an earlier VERSION."""
    body = _request(args, "POST", f"/v1/rollback/{args.version}", admin=True).json()
    print(f"rolled back to version {args.version}: now version {body['version']}")
    return 0


# -- status --------------------------------------------------------------------------------


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")
    _client_arguments(parser)


@command("status", "show connected processes and the version each applied", _status_arguments)
def status(args: argparse.Namespace) -> int:
    """Show every process watching the control service: its service, address, the version and
    revision it acked, and whether it is stale (has not applied the latest change in time)."""
    health = _request(args, "GET", "/healthz").json()
    clients = _request(args, "GET", "/v1/clients").json()
    replicas = _replicas(args)
    if args.output == "json":
        out = {"control": health, "clients": clients}
        if replicas:
            out["replicas"] = replicas
        print(json.dumps(out, indent=2))
        return 0
    print(f"control: version {health.get('version')}, revision {health.get('revision')}")
    if replicas:
        replica_rows = [
            (r["url"], "up" if r["up"] else "down", str(r.get("version", "-")), str(r.get("revision", "-")))
            for r in replicas
        ]
        print_table(("REPLICA", "STATE", "VERSION", "REV"), replica_rows, right=("VERSION", "REV"))
        print()
    rows = []
    several = len({c.get("replica") for c in clients}) > 1  # on etcd: the replica each client is on
    for c in clients:
        # what any client acked or reported (an ack's error, ids) is shown escaped: a newline
        # would forge a row, a terminal escape would reach the terminal
        state = _client_state(c)
        version = "-" if c.get("version") is None else printable(c["version"])
        revision = "-" if c.get("revision") is None else printable(c["revision"])
        row = tuple(
            printable(cell, 300)
            for cell in (c["client"], c.get("service") or "-", c.get("peer") or "-", version, revision)
        )
        row = (*row, state)
        rows.append((*row, printable(c.get("replica") or "-", 100)) if several else row)
    header = ("CLIENT", "SERVICE", "PEER", "VERSION", "REV", "STATE")
    print_table((*header, "REPLICA") if several else header, rows, right=("VERSION", "REV"))
    return 0


def _client_state(c: dict[str, Any]) -> str:
    """A client's STATE: `stale` (connected, has not acked the latest change in time), `gone`
    (disconnected), `rejected: ERROR` (acked the latest change as refused: it keeps its
    previous rules), else `ok`; a stale or gone client's last refusal is added in brackets."""
    error = printable(c.get("error") or "?", 500)
    if c.get("stale") or not c.get("connected"):
        state = "stale" if c.get("stale") else "gone"
        if c.get("ok") is False:
            state += f" (rejected: {error})"
    else:
        state = f"rejected: {error}" if c.get("ok") is False else "ok"
    if c.get("left_out"):
        state += f" (left out: {printable('; '.join(map(str, c['left_out'])), 500)})"
    return state


def _replicas(args: argparse.Namespace) -> list[dict[str, Any]]:
    """With several `--control` URLs, each replica's /healthz (down: no answer, or not a 200):
    which replicas are up, and whether they serve the same version (an upgrade, an outage)."""
    urls = _control_urls(args)
    if len(urls) < 2:
        return []
    verify: ssl.SSLContext | bool = _verify(args) if urls[0].startswith("https:") else True
    out: list[dict[str, Any]] = []
    for url in urls:
        try:
            reply = httpx.get(f"{url}/healthz", timeout=httpx.Timeout(5.0, connect=3.0), verify=verify)
            body = reply.json() if reply.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            body = None
        if isinstance(body, dict):
            out.append(
                {"url": url, "up": True, "version": body.get("version"), "revision": body.get("revision")}
            )
        else:
            out.append({"url": url, "up": False})
    return out


# The CA and join token commands (token, ca).
from meshlib.control import security_commands  # noqa: E402, F401

# -- xds-bootstrap -----------------------------------------------------------------------------


def _xds_bootstrap_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", required=True, metavar="NAME", help="the gRPC client's own service")
    parser.add_argument(
        "--server",
        default="127.0.0.1:7071",
        metavar="HOST:PORT",
        help="the control service's xDS address (its --xds-port; default 127.0.0.1:7071)",
    )
    parser.add_argument("--node-id", default=None, metavar="ID", help="node id (default: SERVICE-<random>)")


@command("xds-bootstrap", "print the bootstrap JSON of a proxyless gRPC xDS client", _xds_bootstrap_arguments)
def xds_bootstrap(args: argparse.Namespace) -> int:
    """Print the JSON a gRPC client reads from the file GRPC_XDS_BOOTSTRAP names, so that
    channels to `xds:///SERVICE` follow the mesh's rules (docs/xds.md)."""
    from meshlib.addresses import check_address
    from meshlib.control.xds.bootstrap import bootstrap
    from meshlib.names import service_name_error

    # a file gRPC reads without saying what is wrong with it: refused here, where one can say
    problem = service_name_error(args.service)
    if problem is not None:  # the node's cluster, which a Route's `match.source` names
        raise CommandError(f"--service: {problem}")
    try:
        check_address(args.server)
    except ValueError as exc:
        raise CommandError(f"--server: {exc}") from None
    print(json.dumps(bootstrap(args.service, args.server, args.node_id), indent=2))
    return 0
