"""Hosts that are mesh services without rules, and why a mesh service has no endpoints.

A name given to `@mesh.call`, and a single-label host (no dot, not localhost, not an IP
literal) with no rules, is a mesh service: a request to it fails with a `NoEndpointsError`
that says why, instead of leaving for DNS and coming back as "Name or service not known".
The reason is worked out only when the error is raised, never on a request's way out.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

PASSTHROUGH_HINT = "Mesh(passthrough=True) or MESH_PASSTHROUGH=1 sends single-label hosts to DNS"


def single_label(host: str) -> bool:
    """True for a host that can only be a mesh service: no dot, not localhost, not an IP
    literal (IPv6 hosts hold a colon; an all-digit host is an IPv4 number).

    A few string tests, ~100 ns: cheaper than a cache lookup would be."""
    return bool(host) and "." not in host and ":" not in host and host != "localhost" and not host.isdigit()


def no_endpoints_reason(mesh: Mesh, service: str) -> str:
    """Why `service` has no endpoints in `mesh`, in words the user can act on."""
    snapshot = mesh.snapshot
    link = mesh.link
    doc = snapshot.rules.endpoints(service)
    listed_none = doc is not None and not doc.listed  # `endpoints: []`: none, on purpose
    discovered = _discovery_reason(mesh, service)
    if discovered is not None:
        why = discovered
    elif link is not None:
        state = link.state
        if state is None:
            why = (
                f"the control service at {link.url} not reached yet (no state from it and no cache); "
                "see Mesh.wait_for_control()"
            )
            if mesh.config is not None:
                why += f"; the bootstrap rules file {mesh.config} has no endpoints for it either"
            return why
        if listed_none:
            why = (
                f"the Endpoints document for {service!r} lists no instances and the registry has none "
                f"(control version {state.version})"
            )
        elif service in state.endpoints and doc is None:
            why = f"the registry has no live instances of {service!r} (control version {state.version})"
        else:
            why = (
                f"no Endpoints document and no registry instances for {service!r} "
                f"(control version {state.version})"
            )
        since = link.outage.since
        if since is not None:
            down = time.monotonic() - since
            why += f"; the control service at {link.url} has been unreachable for {down:.0f}s"
    elif mesh.config is not None and listed_none:
        why = f"the Endpoints document for {service!r} in the rules file {mesh.config} lists no instances"
    elif mesh.config is not None:
        why = f"the rules file {mesh.config} has no Endpoints for {service!r}"
    elif listed_none:
        why = f"the Endpoints document for {service!r} lists no instances"
    else:
        why = "this Mesh has no control service and no rules file (Mesh(control=...) or Mesh(config=...))"
    known = [name for name, plan in snapshot.plans.items() if plan.endpoints and name != service]
    import difflib  # on the error path only

    close = difflib.get_close_matches(service, known, n=1)
    if close:
        why += f"; did you mean {close[0]!r}?"
    return why


def _discovery_reason(mesh: Mesh, service: str) -> str | None:
    """What discovery says of `service`, if it watches it (or starts to, at the default)."""
    runner = mesh.discovery
    watch = runner.watches().get(service)
    if watch is None and runner.default is not None and mesh.snapshot.rules.endpoints(service) is None:
        runner.look_up(service)  # an unknown host: watched while it is asked for, bounded
        watch = runner.watches().get(service)
    if watch is None:
        return None
    where = f"{runner.where(watch.kind)} (as {watch.target.name!r})"
    if watch.failing_since is not None:
        down = time.monotonic() - watch.failing_since
        return f"discovery at {where} has been failing for {down:.0f}s: {watch.error}"
    if not watch.answered.is_set():
        return f"discovery at {where} has not answered yet; see Mesh.wait_for_discovery()"
    return f"discovery at {where} answered no endpoints"


def no_endpoints_message(mesh: Mesh, service: str, *, host: bool = False) -> str:
    """The whole message of the NoEndpointsError for `service`; `host`: it came as a
    single-label host of a plain client (not a name given to `@mesh.call`)."""
    message = f"no endpoints for service {service!r}: {no_endpoints_reason(mesh, service)}"
    if host:
        message += f" (a single-label host with no rules is a mesh service; {PASSTHROUGH_HINT})"
    return message
