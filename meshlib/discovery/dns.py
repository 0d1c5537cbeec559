"""DNS as a source of endpoints: A or AAAA records (one port for every address) or SRV records
(the lowest priority group, each target's addresses at the record's port and weight).

Each answer is asked again when its TTL runs out, the TTL clamped to the service's
[`min_refresh`, `max_refresh`]: a TTL of 0 must not turn into a query loop, and a day-long TTL
must not hide a change for a day. A name the server says does not exist (NXDOMAIN), or has no
record of the type (NODATA), is an affirmative "no endpoints": the empty set, asked again after
the negative TTL of the zone's SOA. A timeout, SERVFAIL or refusal is a failure: the watch raises
and the runner keeps the last good set (docs/decisions.md, "Discovery: DNS").

dnspython is imported when a provider is made (the `dns` extra); `Options` needs only pydantic.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from meshlib.discovery.base import EndpointSet, Target
from meshlib.rules import EndpointSpec
from meshlib.rules.models import MAX_WEIGHT, PositiveDuration

if TYPE_CHECKING:
    import dns.asyncresolver
    import dns.message

log = logging.getLogger("meshlib.discovery.dns")

DEFAULT_PORT = 53
RESOLV_CONF = "/etc/resolv.conf"  # the system's nameservers, for `dns://`
NO_SOA_TTL = 0.0  # a negative answer without an SOA may not be cached (RFC 2308): ask at min_refresh


class DnsLookupError(Exception):
    """The resolver gave no answer (timeout, SERVFAIL, refused, malformed): not "no endpoints"."""


class Options(BaseModel):
    """A service's DNS options (the `options` of its `Target`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    record: Literal["A", "AAAA", "SRV"] = "A"
    port: int | None = Field(None, ge=1, le=65535)  # A/AAAA: the port of every address
    target_record: Literal["A", "AAAA"] = "A"  # SRV: the record that gives a target's addresses
    min_refresh: PositiveDuration = 5.0
    max_refresh: PositiveDuration = 300.0
    timeout: PositiveDuration = 5.0  # one resolution, retries included

    @model_validator(mode="after")
    def _consistent(self) -> Options:
        if self.record == "SRV" and self.port is not None:
            raise ValueError("an SRV record carries its own port: leave `port` out")
        if self.record != "SRV" and self.port is None:
            raise ValueError(f"`port` is required with record {self.record} (the records carry no port)")
        if self.min_refresh > self.max_refresh:
            raise ValueError("min_refresh must not be longer than max_refresh")
        return self


@dataclass(frozen=True, slots=True)
class Answer:
    """One resolution: the endpoints, and how long (seconds) they may be kept (the smallest TTL
    of the records they came from, or the negative TTL of an empty answer)."""

    endpoints: EndpointSet
    ttl: float


@dataclass(frozen=True, slots=True)
class Srv:
    """One SRV record, as plain data (the pure functions below need no dnspython)."""

    priority: int
    weight: int
    port: int
    target: str


def refresh_after(ttl: float, options: Options) -> float:
    """When to ask again: the TTL, clamped to the service's bounds."""
    return min(max(ttl, options.min_refresh), options.max_refresh)


def join(address: str, port: int) -> str:
    """`host:port`, IPv6 in brackets (as EndpointSpec wants it)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def address_endpoints(addresses: Iterable[str], port: int) -> EndpointSet:
    """A/AAAA: one endpoint per address, sorted (servers rotate their records' order)."""
    return tuple(EndpointSpec(address=join(a, port)) for a in sorted(set(addresses)))


def srv_group(records: Iterable[Srv]) -> list[Srv]:
    """The records of the lowest priority (RFC 2782: higher ones are fallbacks, used only when
    the lowest group is gone from DNS), without the `.` target that says "no service here"."""
    usable = [r for r in records if r.target not in (".", "")]
    if not usable:
        return []
    best = min(r.priority for r in usable)
    return [r for r in usable if r.priority == best]


def srv_endpoints(group: Sequence[Srv], addresses: Mapping[str, Sequence[str]]) -> EndpointSet:
    """Each target's addresses at its record's port, with its record's weight clamped to the
    rules' 1..MAX_WEIGHT (the rules have no weight 0, so RFC 2782's "rarely" becomes 1). Two
    records for the same address and port add their weights."""
    weights: dict[str, int] = {}
    for r in group:
        for a in addresses.get(r.target, ()):
            key = join(a, r.port)
            weights[key] = weights.get(key, 0) + r.weight
    return tuple(
        EndpointSpec(address=key, weight=min(max(w, 1), MAX_WEIGHT)) for key, w in sorted(weights.items())
    )


def negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308: an NXDOMAIN or NODATA answer may be kept for the smaller of its SOA's TTL and
    the SOA's `minimum` field."""
    if response is None:
        return NO_SOA_TTL
    import dns.rdatatype

    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))
    return NO_SOA_TTL


@dataclass(frozen=True, slots=True)
class _Records:
    rdatas: tuple[Any, ...]  # dnspython rdata objects
    ttl: float
    response: dns.message.Message | None


class DnsProvider:
    """Endpoints from DNS, through the system's resolver (`dns://`) or one nameserver
    (`dns://127.0.0.1:5353`). No cache of its own: each refresh asks the server."""

    kind: ClassVar[str] = "dns"

    def __init__(
        self, nameserver: str | None = None, port: int = DEFAULT_PORT, *, resolv_conf: str = RESOLV_CONF
    ) -> None:
        try:
            import dns.asyncresolver
            import dns.resolver
        except ModuleNotFoundError as exc:  # still one, naming the `dns` package: the registry reads it
            message = "DNS discovery needs dnspython: pip install 'meshlib[dns]'"
            raise ModuleNotFoundError(message, name="dns") from exc

        if nameserver is None:
            try:
                self.resolver = dns.asyncresolver.Resolver(resolv_conf)
            except dns.resolver.NoResolverConfiguration:
                raise ValueError(
                    f"dns://: {resolv_conf} names no nameserver; give one as dns://IP[:PORT]"
                ) from None
        else:
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            self.resolver.nameservers = [nameserver]
            self.resolver.port = port
        self.nameserver = nameserver
        self.port = port
        self._closed = asyncio.Event()

    @classmethod
    def from_url(cls, url: str) -> DnsProvider:
        """`dns://` for the system's resolver, `dns://IP[:PORT]` (IPv6 as `[::1]:5353`) for one
        nameserver (port 53 by default); nothing else in the URL."""
        parts = urlsplit(url)
        if parts.scheme != "dns":
            raise ValueError(f"not a dns:// URL: {url[:80]!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"a dns:// URL is dns:// or dns://IP[:PORT], not {url[:80]!r}")
        if not parts.hostname:
            return cls()
        try:
            ipaddress.ip_address(parts.hostname)
            port = parts.port or DEFAULT_PORT
        except ValueError as exc:
            raise ValueError(
                f"{url[:80]!r}: the nameserver must be an IP address with a port: {exc}"
            ) from None
        return cls(parts.hostname, port)

    def __repr__(self) -> str:
        where = "system resolver" if self.nameserver is None else join(self.nameserver, self.port)
        return f"DnsProvider({where})"

    async def watch(self, target: Target) -> AsyncIterator[EndpointSet]:
        """The set now, then again each time a refresh finds it changed; raises DnsLookupError
        when the resolver fails (the runner keeps the last set and watches again)."""
        options = Options.model_validate(dict(target.options))
        last: EndpointSet | None = None
        while not self._closed.is_set():
            answer = await self.resolve(target.name, options)
            wait = refresh_after(answer.ttl, options)
            if answer.endpoints != last:
                if not answer.endpoints:  # said once per change: a misspelt name reads like this
                    log.info(
                        "dns %s %s: no records (NXDOMAIN, or none of the type): no endpoints",
                        target.name,
                        options.record,
                    )
                else:
                    log.debug("dns %s %s: %d endpoints", target.name, options.record, len(answer.endpoints))
                last = answer.endpoints
                yield last
            if await self._closing(wait):
                return

    async def resolve(self, name: str, options: Options) -> Answer:
        """One resolution of `name` as `options` say, with no retry beyond the resolver's own."""
        if options.record == "SRV":
            return await self._resolve_srv(name, options)
        assert options.port is not None  # Options checks it
        found = await self._lookup(name, options.record, options)
        return Answer(address_endpoints((r.address for r in found.rdatas), options.port), found.ttl)

    async def aclose(self) -> None:
        """Ends every watch at its next wait (the resolver keeps no connection open)."""
        self._closed.set()

    async def _resolve_srv(self, name: str, options: Options) -> Answer:
        found = await self._lookup(name, "SRV", options)
        group = srv_group(Srv(r.priority, r.weight, r.port, _host(r.target)) for r in found.rdatas)
        ttl = found.ttl
        addresses: dict[str, Sequence[str]] = {}
        glue = _glue(found.response, options.target_record)
        missing = sorted({r.target for r in group} - glue.keys())
        pending = {t: asyncio.ensure_future(self._lookup(t, options.target_record, options)) for t in missing}
        try:
            await asyncio.gather(*pending.values())
        except BaseException:  # one failed target fails the set (never a partial one), and the rest stop
            for task in pending.values():
                task.cancel()
            raise
        for target in {r.target for r in group}:
            if target in glue:
                rdatas, target_ttl = glue[target]
            else:
                records = pending[target].result()
                rdatas, target_ttl = records.rdatas, records.ttl
            addresses[target] = [r.address for r in rdatas]
            ttl = min(ttl, target_ttl)
        return Answer(srv_endpoints(group, addresses), ttl)

    async def _lookup(self, name: str, rdtype: str, options: Options) -> _Records:
        import dns.exception
        import dns.resolver

        try:
            answer = await self.resolver.resolve(
                name, rdtype, lifetime=options.timeout, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.responses()
            response = next(iter(responses.values()), None)
            return _Records((), negative_ttl(response), response)
        except DnsLookupError:
            raise
        except (dns.exception.DNSException, OSError) as exc:
            raise DnsLookupError(f"{rdtype} {name}: {exc}") from exc
        if answer.rrset is None:  # NODATA: the name exists, without records of this type
            return _Records((), negative_ttl(answer.response), answer.response)
        # `expiration` counts the whole CNAME chain, whose links may have shorter TTLs
        ttl = max(0.0, min(float(answer.rrset.ttl), answer.expiration - time.time()))
        return _Records(tuple(answer.rrset), ttl, answer.response)

    async def _closing(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._closed.wait(), seconds)
        except TimeoutError:
            return False
        return True


def _glue(response: dns.message.Message | None, rdtype: str) -> dict[str, tuple[tuple[Any, ...], float]]:
    """The targets' addresses a server sent along with its SRV answer (the additional section),
    saving a query per target."""
    if response is None:
        return {}
    import dns.rdatatype

    want = dns.rdatatype.from_text(rdtype)
    return {
        _host(rrset.name): (tuple(rrset), float(rrset.ttl))
        for rrset in response.additional
        if rrset.rdtype == want
    }


def _host(name: Any) -> str:
    """A dnspython name as the key that matches an SRV target to its addresses."""
    return str(name.to_text(omit_final_dot=True).lower())
