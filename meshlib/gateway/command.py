"""`meshlib gateway --name NAME`: run an ingress gateway as a process of its own.

Its rules come as any Mesh's do: a `--config` file (watched), and/or the control service
(`--control`, default $MESH_CONTROL), whose rules replace the file's once it answers. The rest
of the Mesh's settings (join token, mTLS, CA, tracing) come from the MESH_* environment.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from meshlib.cli import CommandError, command


def _gateway_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="the gateway's service: its Gateway document's service")
    parser.add_argument("--config", "-f", default=None, metavar="FILE", help="a rules file (YAML), watched")
    parser.add_argument(
        "--control",
        default=None,
        metavar="URL[,URL...]",
        help="the control service, or its replicas comma-separated (default $MESH_CONTROL)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="DOC=BIND",
        help="bind a listener's document port elsewhere (8443=9443; 0: any free port); repeatable",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _ports(values: list[str]) -> dict[int, int]:
    ports: dict[int, int] = {}
    for value in values:
        doc, sep, bound = value.partition("=")
        if not sep or not doc.isdigit() or not bound.isdigit():
            raise CommandError(f"--port takes DOC=BIND, two port numbers: {value!r}")
        ports[int(doc)] = int(bound)
    return ports


@command("gateway", "run an ingress gateway (a Gateway document's listeners and routes)", _gateway_arguments)
def gateway(args: argparse.Namespace) -> int:
    """Run the ingress gateway NAME: the listeners of its Gateway document, routing incoming
    requests by its Route to mesh services (docs/gateway.md). Rules changes apply live. Stops on
    Ctrl-C or SIGTERM, finishing the requests under way."""
    import meshlib

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ports = _ports(args.port)
    try:
        mesh = meshlib.Mesh(args.name, config=args.config, control=args.control)
    except (OSError, ValueError) as exc:  # RulesError is a ValueError: every problem, one per line
        raise CommandError(str(exc)) from None
    try:
        if mesh.link is not None and not mesh.wait_for_control(10.0):
            logging.getLogger("meshlib.gateway").warning(
                "control service not reached yet; serving what is known"
            )
        serving = mesh.serve_gateway(args.host, ports=ports)
        stop = threading.Event()

        def on_signal(*_: Any) -> None:
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        print(
            f"gateway {args.name}: " + ", ".join(f"{p} on {a}" for p, a in sorted(serving.addresses.items())),
            flush=True,  # a supervisor (or a test) reading the pipe learns the addresses at once
        )
        while serving.running and not stop.wait(0.5):
            pass
        serving.stop()
    finally:
        mesh.close()
    return 0
