"""What every source of endpoints is to the mesh: a `Provider` that watches a `Target`.

A provider knows one kind of source (Consul, Kubernetes, DNS, ...) at one address; for each
service the rules or the process point at it, the mesh asks it to `watch` a `Target` and reads
the service's whole endpoint set each time it may have changed. Sets, not diffs: a source
that sends diffs (a Kubernetes watch) keeps the set itself, so the runner never has to and a
missed event cannot leave a stale endpoint behind.

The runner (meshlib.discovery.runner) owns what is common: it runs each watch on the mesh's
event loop, feeds the sets into the Snapshot as the rules are fed, keeps the last good set
when a watch fails and restarts it with jittered backoff, and warns once per outage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeAlias

if TYPE_CHECKING:
    from meshlib.rules.models import EndpointSpec

# a string, so that importing this module does not import the rules models (pydantic)
EndpointSet: TypeAlias = "tuple[EndpointSpec, ...]"


@dataclass(frozen=True, slots=True)
class Target:
    """What to watch: the mesh service the endpoints are for, its name at the source (the
    Consul service, the Kubernetes Service, the DNS name; the mesh name by default) and the
    provider's own options for it (validated by the provider's `Options` model)."""

    service: str
    name: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


class Provider(Protocol):
    """One source of endpoints at one address, shared by every service that uses it.

    `kind` is the name the rules and `Mesh(discovery=...)` use (`consul`, `kubernetes`, `dns`);
    the class is made from a URL by `from_url` (its scheme is the kind). The client library a
    provider speaks with is imported when the provider is made, never when the module is, so
    the rules can validate a provider's `Options` without it installed.
    """

    kind: ClassVar[str]

    def watch(self, target: Target) -> AsyncIterator[EndpointSet]:
        """The target's full endpoint set: the first as soon as it is known, then again each
        time it may have changed (the same set twice is fine). Raise on failure: the runner
        keeps the last good set and calls `watch` again later. Never yield a set that a failure
        made incomplete; an empty set only when the source says there are no endpoints."""
        ...

    async def aclose(self) -> None:
        """Stop every watch and release connections."""
        ...
