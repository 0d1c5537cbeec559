"""The inbound sequence, written once for every server protocol.

identity -> telemetry -> end user (JWT) -> authorization -> rate limit -> concurrency limit ->
deadline and caller context -> stats.
A protocol shell (the ASGI and WSGI middleware; a gRPC interceptor could be a third) reads its
request into a `Request`, asks `Gate.admit`, and only translates: a `Refusal` into its own
response, an admission into running the app, then `Request.finish`. Telemetry starts before
authorization, so refused requests are traced and logged too; authorization comes before the
rate limit, so requests refused anyway spend no tokens; the concurrency limit (a
`ConcurrencyLimit` document) comes last, so its slots and latencies are those of requests the
app will run, and `finish` hands the slot back with the request's latency.

`admit` does no IO but two waits: a `scope: global` rate limit asks Redis, and a token may need
a JWKS fetch under way (the first of its URL, or a key rotation). It then returns `Pending`; the
shell calls `Pending.wait()` where blocking is fine (a worker thread, for an event loop), then
`Pending.then()` in its own context for the verdict (which may be another `Pending`), as
tenacity's `iter` says what to do next and leaves the doing to its sync or async driver.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from meshlib.context import InboundContext, inbound, inbound_context
from meshlib.headers import RETRY_AFTER, SOURCE, TIMEOUT
from meshlib.resilience.adaptive_concurrency import ConcurrencyLimiter, Ticket
from meshlib.security.authentication import WAIT_FOR_KEYS, Authenticator, Failure, Verified, authenticator_for
from meshlib.security.authorization import (
    MTLS_ON,
    Policy,
    counted_denial,
    peer_var,
    policy_for,
    source_of,
)
from meshlib.security.users import User, user_var
from meshlib.telemetry.providers import RECHECK_S, UNSETTLED
from meshlib.telemetry.sdk_spans import lightly
from meshlib.telemetry.server import observe

if TYPE_CHECKING:
    from contextvars import Token

    from meshlib.mesh import Mesh
    from meshlib.rules import ConcurrencyLimitDoc, RateLimitDoc
    from meshlib.snapshot import Snapshot
    from meshlib.telemetry.server import Inbound

log = logging.getLogger("meshlib.security")
MARK = "meshlib.inbound"
"""Set on the ASGI scope or WSGI environ by the outermost middleware: an inner one passes through."""
MAX_TIMEOUT_MS = 24 * 3600 * 1000

# the context variables' methods, bound once: `inbound.set(...)` on an imported name compiles to
# an attribute load that CPython 3.11 does not specialize (a bound method made per call)
_set_inbound, _reset_inbound = inbound.set, inbound.reset
_set_peer, _reset_peer = peer_var.set, peer_var.reset
_set_user, _reset_user = user_var.set, user_var.reset


@dataclass(slots=True)
class Request:
    """An inbound request as the sequence sees it, whatever the protocol: the view a shell
    fills in, then the sequence's own state (caller, telemetry, context) until `finish`.

    The gRPC shell (`meshlib.grpc.server`) fills it with method "POST", the full method name as
    the path, metadata as `headers` and `carrier`, the peer from the call's auth context, and
    an `Rpc` that lets telemetry speak of the call in RPC terms.
    """

    method: str
    path: str  # as the caller wrote it (decoded), mount point included: what rules match
    scheme: str
    peer: str | None  # the SPIFFE id the TLS layer verified; nothing a request says can set it
    secure: bool  # a TLS connection: a header never names the caller then
    headers: dict[str, str]  # the mesh's own (`meshlib.headers.INBOUND`) that were sent
    carrier: Any  # all headers, for the OpenTelemetry propagator, read with `getter`
    getter: Any
    rpc: Rpc | None = None  # an RPC's names and final status code; None over HTTP
    stream: bool = False  # a WebSocket: its connection is no request of the concurrency limit or load
    # set by `Gate.admit` (one object per request: the hot path allocates little)
    mesh: Mesh = field(init=False)
    source: str | None = field(init=False)  # the calling service
    observed: Inbound | None = field(init=False)
    started: float = field(init=False)
    user: User | None = field(default=None, init=False)  # the end user a verified token names
    drop: tuple[str, ...] = field(default=(), init=False)  # headers the app must not see (a token)
    concurrency: InboundLimit | None = field(default=None, init=False)  # the service's ConcurrencyLimit
    ticket: Ticket | None = field(default=None, init=False)  # its slot, while the app runs
    admitted: float = field(default=-1.0, init=False)  # `mesh.load.begin()`'s stamp once the app runs
    _token: Token[InboundContext | None] | None = field(default=None, init=False, repr=False)
    _peer_token: Token[str | None] | None = field(default=None, init=False, repr=False)
    _user_token: Token[User | None] | None = field(default=None, init=False, repr=False)

    def limit(self, wait: float) -> Refusal | None:
        """The rate limiter's answer: 0 to proceed, else the seconds until a token is free."""
        if wait <= 0:
            return self.enter_within_limit()
        mesh = self.mesh
        mesh.stats.count("rate_limited", mesh.service or "")
        return self.refuse(too_many(max(1, math.ceil(wait))))

    def enter_within_limit(self) -> Refusal | None:
        """Past every check but the concurrency limit: take a slot under it, then `enter`."""
        gate = self.concurrency
        if gate is not None:
            ticket = gate.limiter.try_acquire(gate.partition(self) if gate.partition_by else None)
            if ticket is None:
                self.mesh.stats.count("concurrency_limited", self.mesh.service or "")
                return self.refuse(gate.refusal)
            self.ticket = ticket
        self.enter()
        return None

    def enter(self) -> None:
        """Make the caller and its deadline the context the app (and the calls it makes) runs in."""
        headers = self.headers
        deadline = None
        if TIMEOUT in headers:
            budget = parse_timeout_ms(headers[TIMEOUT])
            if budget is not None:
                deadline = self.started + budget
        mesh = self.mesh
        load = mesh.load
        if load.tracking and not self.stream:
            self.admitted = load.begin()
        self._token = _set_inbound(
            inbound_context(mesh.service or "", self.source or None, deadline, self.method, self.path)
        )
        if self.peer is not None:
            self._peer_token = _set_peer(self.peer)
        if self.user is not None:
            self._user_token = _set_user(self.user)

    def leave(self) -> None:
        """The app has returned: restore the context, in the context the app ran in (a WSGI body
        may be sent from elsewhere, after this)."""
        if self._token is not None:
            if self._peer_token is not None:
                _reset_peer(self._peer_token)
                self._peer_token = None
            if self._user_token is not None:
                _reset_user(self._user_token)
                self._user_token = None
            _reset_inbound(self._token)
            self._token = None
        if self.observed is not None:
            self.observed.detach()

    def refuse(self, refusal: Refusal) -> Refusal:
        if self.observed is not None:
            self.observed.refused(refusal.reason)
        self.finish(refusal.status)
        return refusal

    def finish(self, status: int | None, error: BaseException | None = None, route: Any = None) -> None:
        """The response is done (or failed): count it, end its span, log it."""
        token = self._token
        if token is not None:  # not left yet: `leave`, inline (`observed.finish` detaches its own)
            self._token = None
            if self._peer_token is not None:
                _reset_peer(self._peer_token)
                self._peer_token = None
            if self._user_token is not None:
                _reset_user(self._user_token)
                self._user_token = None
            _reset_inbound(token)
        ticket = self.ticket
        if ticket is not None:
            self.ticket = None
            assert self.concurrency is not None
            dropped = error is not None or status is None or status == 503 or status == 504
            self.concurrency.limiter.release(ticket, dropped)
        if self.admitted >= 0.0:  # the app ran: a request of this server's load, a 5xx an error
            self.mesh.load.end(self.admitted, failed=status is None or status >= 500)
            self.admitted = -1.0
        self.mesh.stats.record_in(self.source or "unknown", status, time.monotonic() - self.started)
        if self.observed is not None:
            self.observed.finish(self, status, error, route)


@dataclass(slots=True)
class Rpc:
    """What an RPC shell adds for telemetry (the OpenTelemetry rpc conventions): the service and
    method names, and the protocol's own status code, set by the shell before `finish`."""

    system: str  # "grpc"
    service: str  # "pkg.Service"
    method: str  # "Method"
    code: int | None = None  # the protocol's status code (gRPC: 0 OK, 14 UNAVAILABLE, ...)


class Refusal(NamedTuple):
    """The answer instead of the app's: `reason` is the body, `headers` frame it over HTTP
    (a gRPC shell would take the status, the reason and `retry-after`)."""

    status: int
    reason: str
    body: bytes
    headers: tuple[tuple[str, str], ...]


def forbidden(reason: str) -> Refusal:
    body = reason.encode("utf-8", "replace")
    headers = (
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        ("x-content-type-options", "nosniff"),
    )
    return Refusal(403, reason, body, headers)


def unauthorized(reason: str) -> Refusal:
    """401 for a token that did not verify (RFC 6750's invalid_token); `reason` is a fixed text."""
    body = reason.encode("utf-8", "replace")
    challenge = f'Bearer error="invalid_token", error_description="{reason}"'
    headers = (
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        ("www-authenticate", challenge),
        ("x-content-type-options", "nosniff"),
    )
    return Refusal(401, reason, body, headers)


def overloaded(retry_after: int) -> Refusal:
    """503 for a request over the concurrency limit (a gRPC shell answers UNAVAILABLE)."""
    headers = (("content-type", "text/plain"), ("content-length", "10"), (RETRY_AFTER, str(retry_after)))
    return Refusal(503, "overloaded", b"overloaded", headers)


class InboundLimit:
    """A service's ConcurrencyLimit as the sequence applies it: the limiter (kept across
    snapshots by `ResilienceState`), how callers are classed, and the refusal, built once."""

    __slots__ = ("header", "limiter", "partition_by", "refusal")

    def __init__(self, limiter: ConcurrencyLimiter, doc: ConcurrencyLimitDoc) -> None:
        self.limiter = limiter
        by = self.partition_by = doc.partition_by if doc.partitions else None
        self.header = by.removeprefix("header:") if by is not None and by != "source" else None
        self.refusal = overloaded(max(1, math.ceil(doc.retry_after)))

    def partition(self, request: Request) -> str | None:
        """The caller class of `request`: its calling service, or its header's value."""
        if self.header is None:
            return request.source
        values = request.getter.get(request.carrier, self.header)
        return values[0] if values else None


def too_many(retry_after: int) -> Refusal:
    headers = (("content-type", "text/plain"), ("content-length", "12"), (RETRY_AFTER, str(retry_after)))
    return Refusal(429, "rate limited", b"rate limited", headers)


def parse_timeout_ms(value: str | None) -> float | None:
    """The remaining budget in seconds from `x-mesh-timeout` (relative ms); None if absent or bad."""
    if not value:
        return None
    try:
        ms = float(value)
    except ValueError:
        return None
    if ms != ms or ms < 0:  # NaN or negative: ignore rather than fail the request
        return None
    return (ms if ms < MAX_TIMEOUT_MS else MAX_TIMEOUT_MS) / 1000.0  # `min`, without its call


FULL, BARE, LIGHT = 0, 1, 2
"""`Gate.lane`'s answers."""

_Rules = tuple[object, Policy | None, "RateLimitDoc | None", Authenticator | None, InboundLimit | None, bool]
"""(snapshot, Authorization, RateLimit, RequestAuthentication, ConcurrencyLimit, none of them)."""
_NOTHING: _Rules = (None, None, None, None, None, False)


class Gate:
    """The sequence for one middleware instance (HTTP requests and WebSocket handshakes alike)."""

    __slots__ = ("_drops", "_rules", "last", "load", "mesh", "telemetry")

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.load = mesh.load
        self.telemetry = mesh.telemetry
        self._rules: _Rules = _NOTHING
        self._drops: tuple[Any, bool] = (None, False)  # (tracer, `sdk_spans.lightly(tracer)`)
        self.last: tuple[object, bool, bool, int, float] = (None, False, False, FULL, 0.0)
        """`lane`'s last answer, as (rules snapshot, load counted, metrics served, the answer,
        until when): still the answer while the first three are the mesh's now, before that
        time (`time.monotonic()`). A shell may check that inline, without the call."""

    def admit(self, request: Request) -> Refusal | Pending | None:
        """Everything before the app: None to run it (in the caller's context until
        `request.finish`), else a refusal, already counted, traced and logged."""
        mesh = request.mesh = self.mesh
        source = request.source = source_of(request.peer, request.secure, request.headers.get(SOURCE), mesh)
        request.started = time.monotonic()
        request.observed = observe(self.telemetry, request)
        rules = self._rules
        snapshot = mesh._snapshot  # `mesh.snapshot` without the property's call
        if rules[0] is not snapshot:  # decided once per rules snapshot, not per request
            rules = self._rules = _rules_of(snapshot, mesh)
        if rules[5]:  # no document of this service applies: straight to the app
            request.enter()
            return None
        limit = request.concurrency = rules[4] if not request.stream else None
        if rules[3] is not None:
            verdict = _authenticate(request, rules, True)
            if verdict is not None:
                return verdict
        if rules[1] is not None:
            reason = counted_denial(mesh, rules[1], source, request.method, request.path, request.user)
            if reason is not None:
                return request.refuse(forbidden(reason))
        if rules[2] is None:
            if limit is None:
                request.enter()
                return None
            return request.enter_within_limit()
        limiter = mesh.resilience.limiter(rules[2])
        if getattr(limiter, "blocking", False):
            return Pending.limited(request, limiter)
        wait = limiter.try_acquire()
        if wait <= 0 and limit is None:  # the common case, without a call to `limit`
            request.enter()
            return None
        return request.limit(wait)

    def lane(self, now: float | None = None) -> int:
        """How a plaintext request may be served now (a shell may do `BARE` and `LIGHT` inline,
        without a `Request`; the ASGI one does: docs/decisions.md, "The light request"):
        `FULL` while a document of the service applies, the server's load is counted, mTLS names
        callers or an access log is kept; else `BARE` when telemetry has nothing to do either
        (only the caller, deadline and counts), and `LIGHT` when it has (those, and for a request
        that comes out unsampled, `telemetry.server.unsampled`'s context and the in-flight count;
        for a new trace decided ahead as sampled, `telemetry.server.sampled`'s span).

        Asked per request (`now`: `time.monotonic()`, if the caller has read it), answered from
        the last answer while the rules snapshot and the two switches a running server may turn
        on (load counting, metrics served) are as they were. What else it reads is settled by
        then: the Mesh's mTLS mode and its access log (a closed Mesh's telemetry leaves a stale
        answer that is still right, as `FULL` always is and `unsampled` checks the tracer
        itself), and the tracer and the instruments once found. While either is still looked
        for (a global provider the app has not set, and may set later) the answer holds for
        `RECHECK_S`, so a provider set while serving is taken up within a second."""
        last = self.last
        telemetry = self.telemetry
        snapshot, counted, served = self.mesh._snapshot, self.load.tracking, telemetry.exposed
        if now is None:
            now = time.monotonic()
        if last[0] is snapshot and last[1] is counted and last[2] is served and now < last[4]:
            return last[3]
        answer = self._lane_now()
        settled = telemetry.traces.settled is not UNSETTLED and telemetry.meters.settled is not UNSETTLED
        self.last = (snapshot, counted, served, answer, math.inf if settled else now + RECHECK_S)
        return answer

    def _lane_now(self) -> int:
        telemetry = self.telemetry
        tracer = telemetry.traces.settled
        if tracer is UNSETTLED:
            tracer = telemetry.traces.get()
        if tracer is not None:  # light only if some requests may be (dropped, new and light): asked first
            known = self._drops
            if known[0] is not tracer:
                known = self._drops = (tracer, lightly(tracer))
            if not known[1]:
                return FULL
        mesh = self.mesh
        rules = self._rules
        snapshot = mesh._snapshot
        if rules[0] is not snapshot:
            rules = self._rules = _rules_of(snapshot, mesh)
        if not rules[5] or mesh.load.tracking or mesh.mtls in MTLS_ON or telemetry.access is not None:
            return FULL
        if tracer is not None:
            return LIGHT
        instruments = telemetry.meters.settled
        if instruments is UNSETTLED:
            instruments = telemetry.meters.get()
        return BARE if instruments is None and not telemetry.exposed else LIGHT  # nothing measured


def unauthenticated(mesh: Mesh, reason: str) -> Refusal:
    """The 401 of an invalid token, counted and logged (at debug: the reason, never the token)."""
    mesh.stats.count("unauthenticated", mesh.service or "")
    log.debug("%s: invalid end-user token: %s", mesh.service, reason)
    return unauthorized(reason)


def _authenticate(request: Request, rules: _Rules, may_wait: bool) -> Refusal | Pending | None:
    """The end-user step: None to go on (with `request.user` set if a token verified)."""
    authenticator = rules[3]
    assert authenticator is not None
    outcome = authenticator.authenticate(request.getter, request.carrier, may_wait)
    if outcome is None:
        return None
    if isinstance(outcome, Verified):
        request.user, request.drop = outcome
        return None
    if isinstance(outcome, Failure):
        return request.refuse(unauthenticated(request.mesh, outcome.reason))
    source, generation = outcome.source, outcome.generation

    def then() -> Refusal | Pending | None:  # the fetch is over (or timed out): start over
        verdict = _authenticate(request, rules, False)
        return verdict if verdict is not None else _after_authentication(request, rules)

    return Pending(None, lambda: source.wait(generation, WAIT_FOR_KEYS), then)


def _after_authentication(request: Request, rules: _Rules) -> Refusal | Pending | None:
    """Authorization and the rate limit, as `Gate.admit` does them, for the path after a wait
    (`admit` keeps its own copy inline: one call less per request on the hot path)."""
    mesh = request.mesh
    if rules[1] is not None:
        reason = counted_denial(mesh, rules[1], request.source, request.method, request.path, request.user)
        if reason is not None:
            return request.refuse(forbidden(reason))
    if rules[2] is None:
        return request.enter_within_limit()
    limiter = mesh.resilience.limiter(rules[2])
    if getattr(limiter, "blocking", False):
        return Pending.limited(request, limiter)
    return request.limit(limiter.try_acquire())


def _rules_of(snapshot: Snapshot, mesh: Mesh) -> _Rules:
    """(snapshot, the service's compiled Authorization, its RateLimit, its compiled
    RequestAuthentication, its ConcurrencyLimit, whether there is none of them): the plan each
    request of this snapshot follows, made once."""
    service = mesh.service
    if not service:
        return snapshot, None, None, None, None, True
    rules = snapshot.rules
    doc = rules.authorization(service)
    users = rules.request_authentication(service)
    limit = rules.concurrency_limit(service)
    policy = policy_for(doc) if doc is not None else None
    rate_limit = rules.rate_limit(service)
    authenticator = authenticator_for(mesh, users) if users is not None else None
    gate = None
    if limit is not None:
        gate = InboundLimit(mesh.resilience.concurrency("in", service, limit), limit)
    none = policy is None and rate_limit is None and authenticator is None and gate is None
    return snapshot, policy, rate_limit, authenticator, gate, none


class Pending:
    """Admission waits on the network: call `wait()` where blocking is fine (a worker thread,
    for an event loop; it changes no context), then `then()` in the request's own context: the
    verdict, None to run the app, or another `Pending`. `limiter` is the Redis-backed limiter
    when that is what waits (None when it is a JWKS fetch)."""

    __slots__ = ("_answer", "_then", "_wait", "limiter")

    def __init__(
        self, limiter: Any, wait: Callable[[], Any], then: Callable[[], Refusal | Pending | None]
    ) -> None:
        self.limiter = limiter
        self._wait = wait
        self._then = then
        self._answer: Any = None

    @classmethod
    def limited(cls, request: Request, limiter: Any) -> Pending:
        """The rate limiter's answer, asked in `wait`, handed to `request.limit` in `then`."""
        pending = cls(limiter, limiter.try_acquire, lambda: request.limit(pending._answer))
        return pending

    def wait(self) -> None:
        self._answer = self._wait()

    def then(self) -> Refusal | Pending | None:
        return self._then()
