"""A gateway's route table: its Route document compiled once per Snapshot.

Each rule matches by host (the authority without its port; exact or `*.suffix`), then by path,
headers and methods as any Route does (`meshlib.routing.CompiledMatch`), and names the mesh
services to call with weights. Which endpoint, which subset, how often to retry: the target
service's own Route and Destination say, when the call goes through the mesh client.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from meshlib.gateway.hosts import HostSet
from meshlib.routing import CompiledMatch

if TYPE_CHECKING:
    from meshlib.rules import RouteDoc, RouteRule


class GatewayRoute:
    """One rule of a gateway's Route, ready to match and to pick a service."""

    __slots__ = (
        "_cumulative",
        "_services",
        "_total",
        "hosts",
        "index",
        "match",
        "redirect",
        "rewrite",
        "rule",
        "timeout",
    )

    def __init__(self, rule: RouteRule, index: int) -> None:
        self.rule = rule
        self.index = index
        self.hosts = HostSet(rule.match.hosts)
        self.match = CompiledMatch(rule.match)
        targets = [(t.service, t.weight) for t in rule.to if t.weight > 0 and t.service is not None]
        self._services = tuple(service for service, _ in targets)
        self._cumulative = tuple(accumulate(weight for _, weight in targets))
        self._total = self._cumulative[-1] if self._cumulative else 0
        self.timeout: float | None = rule.timeout
        self.rewrite = rule.rewrite.prefix if rule.rewrite is not None else None
        # `redirect:` (meshlib.redirects): the gateway answers 3xx itself; None on a model without it
        self.redirect: Any = getattr(rule, "redirect", None)

    @property
    def services(self) -> tuple[str, ...]:
        """The mesh services this rule may call."""
        return self._services

    @property
    def name(self) -> str:
        return self.rule.name or f"route-{self.index}"

    def choose(self, u: float) -> str:
        """The service for a uniform draw `u` in [0, 1), by weight."""
        if len(self._services) == 1:
            return self._services[0]
        return self._services[bisect_right(self._cumulative, u * self._total)]

    def rewrite_path(self, path: str) -> str:
        """`rewrite.prefix` in place of the matched prefix (as a client route rewrites)."""
        if self.rewrite is None:
            return path
        rest = path[len(self.match.prefix or "") :]
        if self.rewrite.endswith("/") and rest.startswith("/"):
            rest = rest[1:]
        return self.rewrite + rest


class GatewayTable:
    """The rules of one gateway's Route in order; the first that matches wins, None if none."""

    __slots__ = ("routes",)

    def __init__(self, doc: RouteDoc | None) -> None:
        self.routes = tuple(GatewayRoute(r, i) for i, r in enumerate(doc.routes)) if doc else ()

    def match(self, host: str, method: str, path: str, headers: Any) -> GatewayRoute | None:
        """`headers`: anything with a case-insensitive `get` (a Mapping, or the proxy's view)."""
        for route in self.routes:
            if host in route.hosts and route.match(method, path, headers, None):
                return route
        return None
