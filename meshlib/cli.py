"""The `meshlib` command line.

Each subcommand is two small functions: one adding its arguments to its parser, one running it
and returning the exit code, tied together by the `@command` decorator:

    def _get_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("kind")

    @command("get", "show rules from the control service", _get_arguments)
    def get(args: argparse.Namespace) -> int:
        ...
        return 0

A command reports a failure it expects by raising `CommandError("one clear line")`: the line is
printed to stderr as `meshlib NAME: error: ...` and the exit code is 1. Usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import meshlib

log = logging.getLogger("meshlib.cli")

PROG = "meshlib"

Run = Callable[[argparse.Namespace], int]
Arguments = Callable[[argparse.ArgumentParser], None]


class CommandError(Exception):
    """An expected failure of a command: its message is the one line the user sees."""


def print_table(columns: Sequence[str], rows: Iterable[Sequence[str]], *, right: Sequence[str] = ()) -> None:
    """Print a table with rich: styled on a terminal; otherwise plain text, one row per line
    however long, with no trailing blanks, so it can be grepped and parsed."""
    import io

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for name in columns:
        table.add_column(name, justify="right" if name in right else "left")
    for row in rows:
        table.add_row(*(Text(str(cell)) for cell in row))  # Text: no markup or emoji in the data
    if sys.stdout.isatty():
        Console(highlight=False).print(table)
        return
    buffer = io.StringIO()
    Console(file=buffer, width=100_000, highlight=False, color_system=None).print(table)
    for line in buffer.getvalue().splitlines():
        print(line.rstrip())


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line instead of a usage block and a message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


@dataclass(frozen=True)
class _Command:
    name: str
    help: str
    arguments: Arguments | None
    run: Run


_COMMANDS: list[_Command] = []


def command(name: str, help: str, arguments: Arguments | None = None) -> Callable[[Run], Run]:
    """Register a subcommand; the function's docstring is its `--help` description."""

    def register(run: Run) -> Run:
        _COMMANDS.append(_Command(name, help, arguments, run))
        return run

    return register


# --------------------------------------------------------------------------------------------
# Commands


@command("version", "print the meshlib version")
def version(args: argparse.Namespace) -> int:
    """Print the version of meshlib."""
    print(f"meshlib {meshlib.__version__}")
    return 0


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", required=True, metavar="FILE", help="the rules file (YAML)")


@command("check", "validate a rules file", _check_arguments)
def check(args: argparse.Namespace) -> int:
    """Validate a rules file without applying it: every problem is printed, one per line,
    naming the document, the field and the reason. Exit code 1 if there is any problem."""
    from meshlib.rules import RulesError, load_file

    try:
        rules = load_file(args.file)
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    except RulesError as exc:
        for problem in exc.problems:
            print(problem)
        count = len(exc.problems)
        raise CommandError(f"{args.file}: {count} problem{'s' if count != 1 else ''}") from None
    count = len(rules)
    print(f"ok: {count} document{'s' if count != 1 else ''}")
    return 0


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--phase-seconds",
        type=_positive_number,
        default=4.0,
        metavar="N",
        help="how long each phase lasts (default 4)",
    )
    parser.add_argument(
        "--no-live",
        dest="live",
        action="store_false",
        default=None,
        help="print plain lines instead of the live table (the default when stdout is not a terminal)",
    )
    parser.add_argument(
        "--rate", type=_positive_number, default=200.0, metavar="R", help="requests per second (default 200)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the mesh does")


@command("demo", "watch a canary release through the control service, on this machine alone", _demo_arguments)
def demo(args: argparse.Namespace) -> int:
    """Start, in this process on 127.0.0.1, a control service, three orders instances (v1, v1, v2)
    that register themselves with its registry, and a checkout client sending live traffic; then
    move checkout's traffic from v1 to v2 with one PUT /v1/config per phase: 100/0, 90/10, 50/50,
    0/100, then a header route (x-canary: true -> v2). Shows how fast each rules version reaches
    checkout, and per subset the request rate, success rate and p99. Everything is stopped and
    removed at the end or on Ctrl-C."""
    from meshlib import demo

    return demo.run(args.phase_seconds, live=args.live, rate=args.rate, verbose=args.verbose)


# The control service's commands (control, apply, get, delete, history, rollback, status).
import meshlib.control.commands  # noqa: E402

# The ingress gateway (gateway).
import meshlib.gateway.command  # noqa: E402

# --------------------------------------------------------------------------------------------
# Entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="meshlib: an in-process service mesh for Python.",
    )
    parser.add_argument("--version", action="version", version=f"meshlib {meshlib.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of unexpected errors")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    for cmd in _COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.run.__doc__ or cmd.help)
        if cmd.arguments is not None:
            cmd.arguments(p)
        p.set_defaults(command=cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (`--help` and usage errors included)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 1
    cmd: _Command | None = getattr(args, "command", None)
    if cmd is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return cmd.run(args)
    except CommandError as exc:
        print(f"{PROG} {cmd.name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"{PROG} {cmd.name}: error: {exc!r} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
