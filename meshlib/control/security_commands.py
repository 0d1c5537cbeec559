"""The `token` and `ca` subcommands of `meshlib`: join tokens and CA rotation, through the
control service's admin endpoints (docs/control-api.md, docs/security.md).

A new token is printed to stdout alone (so `TOKEN=$(meshlib token create --service orders)`
works) and never anywhere else; its id and expiry go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from meshlib.cli import CommandError, command, print_table
from meshlib.control.commands import _client_arguments, _path, _request


def _duration(text: str) -> float:
    from meshlib.rules import parse_duration

    try:
        value = parse_duration(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{exc} (a duration such as 30m, 1h or 24h)") from None
    return value


def _overlap(text: str) -> float:
    """A duration, or a bare 0: no overlap (docs/security.md: the old root out at once)."""
    return 0.0 if text.strip() == "0" else _duration(text)


def _when(unix: float | None) -> str:
    return "never" if unix is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


# -- token ---------------------------------------------------------------------------------


def _token_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a join token for one service (printed once)")
    create.add_argument("--service", required=True, help="the service the token lets a process join as")
    create.add_argument(
        "--ttl", type=_duration, default=None, help="lifetime, e.g. 1h (default: until revoked)"
    )
    _client_arguments(create, admin=True)
    listing = actions.add_parser("list", help="list join tokens (ids, services, expiry; never secrets)")
    listing.add_argument("-o", "--output", choices=["table", "json"], default="table")
    _client_arguments(listing, admin=True)
    revoke = actions.add_parser("revoke", help="revoke a join token by id")
    revoke.add_argument("id", help="the token's id (see 'meshlib token list')")
    _client_arguments(revoke, admin=True)


@command("token", "create, list and revoke join tokens", _token_arguments)
def token(args: argparse.Namespace) -> int:
    """Join tokens let a new process get its first certificate from the control service's CA.
    Each is bound to one service; the secret is shown once, at creation (stdout only)."""
    if args.action == "create":
        body = {"service": args.service, "ttl": args.ttl}
        created = _request(args, "POST", "/v1/tokens", admin=True, json=body).json()
        print(created["token"])
        print(
            f"token {created['id']} for {created['service']}, expires {_when(created.get('expires'))}",
            file=sys.stderr,
        )
        return 0
    if args.action == "list":
        rows = _request(args, "GET", "/v1/tokens", admin=True).json()
        if args.output == "json":
            print(json.dumps(rows, indent=2))
            return 0
        print_table(
            ("ID", "SERVICE", "CREATED", "EXPIRES"),
            ((r["id"], r["service"], _when(r["created"]), _when(r.get("expires"))) for r in rows),
        )
        return 0
    if args.action == "revoke":
        _request(args, "DELETE", _path("v1", "tokens", args.id), admin=True)
        print(f"revoked {args.id}", file=sys.stderr)
        return 0
    raise CommandError(f"unknown action {args.action!r}")


# -- ca ------------------------------------------------------------------------------------


def _ca_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    rotate = actions.add_parser(
        "rotate", help="replace the root CA; the old root stays trusted for --overlap"
    )
    rotate.add_argument(
        "--overlap",
        type=_overlap,
        default=3600.0,
        help="how long the old root stays in the bundle (default 1h; at least the leaf lifetime)",
    )
    _client_arguments(rotate, admin=True)
    bundle = actions.add_parser("bundle", help="print the CA bundle (the roots to trust)")
    _client_arguments(bundle)


@command("ca", "rotate the control service's CA, or print its bundle", _ca_arguments)
def ca(args: argparse.Namespace) -> int:
    """The control service's certificate authority: `rotate` makes a new root (processes get
    the new bundle on their watch stream and renew onto it), `bundle` prints the roots."""
    if args.action == "rotate":
        body = _request(args, "POST", "/v1/ca/rotate", admin=True, json={"overlap": args.overlap}).json()
        print(f"rotated: the previous root stays trusted for {body['overlap']:g}s", file=sys.stderr)
        return 0
    if args.action == "bundle":
        print(_request(args, "GET", "/v1/ca/bundle").json()["bundle"], end="")
        return 0
    raise CommandError(f"unknown action {args.action!r}")
