"""Host names as a gateway matches them: the request's authority without its port, against
exact names and `*.suffix` wildcards (any name under the suffix, as Istio's hosts match)."""

from __future__ import annotations

from collections.abc import Iterable


def host_of(authority: str) -> str:
    """The host of an authority (`Host` header): lowercased, without the port or IPv6 brackets."""
    authority = authority.strip().lower()
    if authority.startswith("["):  # [::1]:8443
        end = authority.find("]")
        return authority[1:end] if end > 0 else authority
    host, _, port = authority.rpartition(":")
    if host and port.isdigit():
        return host.rstrip(".")
    return authority.rstrip(".")


class HostSet:
    """A set of host patterns, compiled once: exact names in a set, wildcards as suffixes."""

    __slots__ = ("any", "exact", "suffixes")

    def __init__(self, patterns: Iterable[str]) -> None:
        patterns = tuple(patterns)
        self.any = not patterns  # no hosts listed: every host
        self.exact = frozenset(p for p in patterns if not p.startswith("*."))
        # "*.example.com" -> ".example.com": a name under it, never the bare suffix itself
        self.suffixes = tuple(sorted((p[1:] for p in patterns if p.startswith("*.")), key=len, reverse=True))

    def __contains__(self, host: str) -> bool:
        if self.any or host in self.exact:
            return True
        return any(host.endswith(s) and len(host) > len(s) for s in self.suffixes)

    def specificity(self, host: str) -> int:
        """How closely the set names `host` (exact beats the longest wildcard); -1 if not at all."""
        if host in self.exact:
            return 1_000
        for s in self.suffixes:  # longest first
            if host.endswith(s) and len(host) > len(s):
                return len(s)
        return -1
