"""Request -> route -> weighted subset: the pure half of routing.

Routes are compiled once per Snapshot (regexes compiled, weights made cumulative, policies
turned into the typed fields the filters read) so that a match is a handful of comparisons and
a filter with nothing to do on a route is skipped for an attribute read. Nothing here knows a
protocol: a request is its method, path, headers (a case-insensitive mapping) and the calling service.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable, Mapping
from itertools import accumulate
from typing import TYPE_CHECKING, ClassVar

from meshlib.resilience.hedge import HedgePolicy
from meshlib.resilience.retry import RetryPolicy

if TYPE_CHECKING:
    from meshlib.rules import (
        AdaptiveConcurrencySpec,
        CircuitBreakerSpec,
        FaultSpec,
        HeaderMatch,
        Match,
        MirrorSpec,
        RateLimitDoc,
        RedirectSpec,
        RouteDoc,
        RouteRule,
        StringMatch,
    )

Matcher = Callable[[str], bool]


def _string_matcher(m: StringMatch | HeaderMatch) -> tuple[Matcher, str | None]:
    """A predicate for one string match, and the literal prefix it consumed (for rewrites)."""
    if m.exact is not None:
        exact = m.exact
        return (lambda s: s == exact), None
    if m.prefix is not None:
        prefix = m.prefix
        return (lambda s: s.startswith(prefix)), prefix
    pattern = re.compile(m.regex or "")
    return (lambda s: pattern.fullmatch(s) is not None), None


def _header_matcher(m: HeaderMatch) -> Callable[[str | None], bool]:
    if m.present is not None:
        want = m.present
        return lambda v: (v is not None) is want
    inner, _ = _string_matcher(m)  # HeaderMatch has exact/prefix/regex like StringMatch
    return lambda v: v is not None and inner(v)


class CompiledMatch:
    __slots__ = ("always", "headers", "methods", "path", "prefix", "sources")

    def __init__(self, match: Match) -> None:
        self.path: Matcher | None = None
        self.prefix: str | None = None
        if match.path is not None:
            self.path, self.prefix = _string_matcher(match.path)
        self.headers = tuple((name.lower(), _header_matcher(h)) for name, h in match.headers.items())
        self.methods = frozenset(m.upper() for m in match.methods)
        self.sources = frozenset(match.source)
        self.always = not (self.path or self.headers or self.methods or self.sources)
        """No condition at all: the table takes it without calling it (a call costs ~2,000
        instructions; a catch-all rule, such as a weighted split, is common)."""

    def __call__(self, method: str, path: str, headers: Mapping[str, str], source: str | None) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.path is not None and not self.path(path):
            return False
        if self.sources and source not in self.sources:
            return False
        for name, test in self.headers:  # noqa: SIM110 - a loop, not all(...): no generator per request
            if not test(headers.get(name)):
                return False
        return True


class CompiledRoute:
    """One rule of a Route document, ready to match and to choose a subset.

    Its policies are typed fields, None where the rule has none (the filter that applies one
    names it as its `needs`, and is skipped on a route where it is None)."""

    POLICIES: ClassVar[tuple[str, ...]] = (
        "breaker",
        "bulkhead",
        "fault",
        "hedge",
        "mirror",
        "per_try_timeout",
        "rate_limit",
        "redirect",
        "retry",
        "timeout",
    )
    """The fields a filter may name as its `needs` (`policies` holds those that are set)."""

    __slots__ = (
        "_cumulative",
        "_subsets",
        "_total",
        "breaker",
        "bulkhead",
        "fault",
        "hedge",
        "index",
        "match",
        "mirror",
        "only",
        "per_try_timeout",
        "policies",
        "rate_limit",
        "redirect",
        "retry",
        "rewrite",
        "rule",
        "split",
        "timeout",
    )

    def __init__(
        self,
        rule: RouteRule,
        index: int,
        bulkhead: int | AdaptiveConcurrencySpec | None = None,
        breaker: CircuitBreakerSpec | None = None,
        rate_limit: RateLimitDoc | None = None,
    ) -> None:
        self.rule = rule
        self.index = index
        self.match = CompiledMatch(rule.match)
        targets = [t for t in rule.to if t.weight > 0]
        self._subsets = tuple(t.subset for t in targets)
        self._cumulative = tuple(accumulate(t.weight for t in targets))
        self._total = self._cumulative[-1] if self._cumulative else 0
        self.split = len(self._subsets) > 1
        """Whether `choose` draws; if not, `only` is the subset (None: every endpoint)."""
        self.only = self._subsets[0] if self._subsets else None
        self.rewrite = rule.rewrite.prefix if rule.rewrite is not None else None
        retries = rule.retries
        self.timeout: float | None = rule.timeout
        self.per_try_timeout = retries.per_try_timeout if retries is not None else None
        self.retry = RetryPolicy(retries) if retries is not None and retries.attempts > 1 else None
        self.hedge = HedgePolicy(rule.hedge, retries) if rule.hedge is not None else None
        self.fault: FaultSpec | None = rule.fault
        self.mirror: MirrorSpec | None = rule.mirror
        # answered by the mesh itself (meshlib.redirects.location, with `match.prefix` as the
        # matched prefix): such a rule has none of the policies above
        self.redirect: RedirectSpec | None = rule.redirect
        self.bulkhead = bulkhead
        """The Destination's `max_concurrent_requests` or `adaptive_concurrency`, on each of its
        routes (one cap for all)."""
        self.breaker = breaker
        """The Destination's `circuit_breaker`, on each of its routes (the breakers are per endpoint)."""
        self.rate_limit = rate_limit
        """An External host's RateLimit, kept by the calling process (on each of its routes)."""
        self.policies = frozenset(name for name in self.POLICIES if getattr(self, name) is not None)
        """The names of the policies this route has: the stack runs one plan per such set."""

    @property
    def name(self) -> str:
        return self.rule.name or f"route-{self.index}"

    def choose(self, u: float) -> str | None:
        """The subset for a uniform draw `u` in [0, 1): weighted, None meaning every endpoint."""
        return self._subsets[bisect_right(self._cumulative, u * self._total)]

    def rewrite_path(self, path: str) -> str:
        """Apply `rewrite.prefix` in place of the matched prefix (no-op without a rewrite)."""
        if self.rewrite is None:
            return path
        prefix = self.match.prefix or ""
        rest = path[len(prefix) :]
        if self.rewrite.endswith("/") and rest.startswith("/"):
            rest = rest[1:]
        return self.rewrite + rest


class RouteTable:
    """The routes of one service in order; the first that matches wins.

    A request that no rule matches (or a service without a Route document) takes the default
    route: every endpoint of the service, with no timeout or retry policy of its own.
    """

    __slots__ = ("default", "reads_headers", "routes")

    def __init__(
        self,
        doc: RouteDoc | None,
        bulkhead: int | AdaptiveConcurrencySpec | None = None,
        breaker: CircuitBreakerSpec | None = None,
        rate_limit: RateLimitDoc | None = None,
    ) -> None:
        """`bulkhead`, `breaker`: the Destination's `max_concurrent_requests` (or
        `adaptive_concurrency`) and `circuit_breaker`;
        `rate_limit`: an External host's RateLimit; policies of every route."""
        from meshlib.rules import RouteRule

        rules = doc.routes if doc else ()
        self.routes = tuple(CompiledRoute(r, i, bulkhead, breaker, rate_limit) for i, r in enumerate(rules))
        self.default = CompiledRoute(
            RouteRule.model_validate({"name": "default"}), -1, bulkhead, breaker, rate_limit
        )
        self.reads_headers = any(r.match.headers for r in self.routes)

    def match(self, method: str, path: str, headers: Mapping[str, str], source: str | None) -> CompiledRoute:
        for route in self.routes:
            match = route.match
            if match.always or match(method, path, headers, source):
                return route
        return self.default
