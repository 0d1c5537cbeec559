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
    if response.status_code == 422:
        body = response.json()
        for p in body.get("problems", []):
            print(f"{p['document']}: {p['field'] or '(document)'}: {p['reason']}", file=sys.stderr)
        raise CommandError(body.get("error", "invalid request"))
    if response.status_code >= 400:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        raise CommandError(f"{response.status_code}: {message}")
    return response


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


def _control_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7070, help="port (default 7070)")
    parser.add_argument(
        "--data", default=DEFAULT_DATA, metavar="DIR", help=f"data dir (default {DEFAULT_DATA})"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--xds-port",
        type=int,
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
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    # Sent as written: the service validates it against the rules already in force (a Route may
    # use the subsets of a Destination applied earlier) and names every problem in its 422.
    params = {"dry_run": "1"} if args.dry_run else {}
    headers = {"content-type": "application/yaml"}
    body = _request(
        args, "PUT", "/v1/config", admin=True, content=text.encode(), params=params, headers=headers
    )
    body = body.json()
    if args.dry_run:
        print(f"valid (version {body.get('version')} unchanged)")
    elif body.get("changed", True):
        print(f"applied: version {body['version']}")
    else:
        print(f"unchanged: version {body['version']}")
    return 0


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


def _delete_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", type=_kind)
    parser.add_argument("service")
    _client_arguments(parser, admin=True)


@command("delete", "remove one document", _delete_arguments)
def delete(args: argparse.Namespace) -> int:
    """Remove the document of KIND for SERVICE, as a new version."""
    body = _request(args, "DELETE", f"/v1/config/{args.kind}/{args.service}", admin=True).json()
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
                row.get("message") or "",
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
        state = "stale" if c.get("stale") else ("ok" if c.get("connected") else "gone")
        if c.get("ok") is False:
            state += f" (rejected: {c.get('error')})"
        if c.get("left_out"):
            state += f" (left out: {'; '.join(c['left_out'])})"
        version = "-" if c.get("version") is None else str(c["version"])
        revision = "-" if c.get("revision") is None else str(c["revision"])
        row = (c["client"], c.get("service") or "-", c.get("peer") or "-", version, revision, state)
        rows.append((*row, c.get("replica") or "-") if several else row)
    header = ("CLIENT", "SERVICE", "PEER", "VERSION", "REV", "STATE")
    print_table((*header, "REPLICA") if several else header, rows, right=("VERSION", "REV"))
    return 0


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
    from meshlib.control.xds.bootstrap import bootstrap

    print(json.dumps(bootstrap(args.service, args.server, args.node_id), indent=2))
    return 0
