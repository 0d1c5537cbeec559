"""Per-endpoint circuit breakers built on pybreaker, correct under asyncio and threads.

pybreaker's `CircuitBreaker.call()` holds a threading lock while the guarded function runs, its
`call_async` needs tornado, and it learns about failures from exceptions. A mesh request is an
`await` (or a blocking sync call) whose outcome is a classified status code. So no IO ever runs
inside pybreaker here:

* Admission (`available()`, `admit()`) reads state this module mirrors from a pybreaker
  listener. In the closed state that is two attribute reads and no lock.
* When a request has finished, `record()` reports its outcome with `cb.call(_report, failed)`:
  `_report` raises a private exception for a failure and returns for a success. pybreaker's lock
  is held only for that instant, never across an await, and pybreaker's own state machine
  decides closed -> open (after `consecutive_failures` consecutive failures) and
  half-open -> closed (first trial success) / -> open (first trial failure). A success while
  closed with no failure counted changes nothing in pybreaker, so that call is skipped.
* open -> half-open is decided here, on the monotonic clock, when the first trial is admitted
  (`cb.half_open()`, public API). pybreaker would only make that move lazily inside `call()`,
  after the trial had already run, and by comparing wall-clock `datetime.now()` with
  `opened_at + reset_timeout`; a wall-clock step (NTP) must not hold an endpoint open or release
  it early, and the balancer needs to see the trial slot taken when the trial is sent.

States as the mesh sees them (`EndpointBreaker.state`):

* "closed": every request goes; consecutive failures are counted.
* "open": nothing goes. Once its probe backoff has elapsed the breaker still reads "open" but
  `available()` turns True; the first request `admit()` lets through is a trial and moves it
  to "half-open".
* "half-open": at most `half_open_requests` trials are in flight at once; the first trial
  outcome closes the breaker (success) or opens it again for a longer backoff (failure).

The probe backoff (Linkerd's and Finagle's, not a fixed `open_for`): the first opening waits
`backoff.base`, each failed trial doubles the wait, up to `backoff.max` (default `open_for`);
each wait is jittered down by up to half, so callers that saw one crash do not probe in step.
Closing resets it. `reset()` closes the breaker at once (the endpoint is known to be new: a
re-registration, or it came back in discovery), and `admit(force=True)` lets a request through
whatever the state (panic mode, or the pool's ejection budget is spent): as a trial when one is
due, else as a forced request whose success closes the breaker (the endpoint is back) and
whose failure changes nothing (the breaker is open already: panic traffic neither churns its
state nor grows its backoff).

Which outcomes count: only those of requests admitted since the breaker last opened. A request
admitted while closed that finishes after the breaker opened (it was in flight when the failures
piled up) is ignored, whether the breaker is still open, already half-open, or closed again.
`admit()` returns an `Admission` (truthy; None when refused) that carries this information; pass
it back to `record()` for an exact answer. Without it, `record()` falls back to the current
state: ignored while open, taken as a trial outcome while half-open with a trial in flight, counted
while closed (exact as long as no request stays in flight for longer than `open_for`).

Every admitted request must end with `record()` (it reached the endpoint) or `release()` (it did
not: cancelled, or declined by the mesh before sending), or a trial slot stays taken. As a safety
net a half-open breaker whose trial slots are all taken presumes them lost once `open_for` has
passed since the last trial was admitted, and lets a new trial go; late outcomes of the presumed
lost trials are ignored.

Locking: one small `threading.Lock` per breaker guards the trial counter and every call into
pybreaker (so a transition and the bookkeeping that goes with it are one step). It is taken only
for an instant state update, never around IO of the request and never across an await, and it is
never needed on the closed-state admission path. `on_change` callbacks run while it is held
(that keeps them in order): they must be quick and must not call `admit`, `record` or `release`
of the same breaker (`state` and `available` are fine). An exception they raise is logged.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import types
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING


def _import_pybreaker() -> types.ModuleType:
    """pybreaker without its Redis storage: pybreaker imports redis (and redis.asyncio, ~100 ms)
    whenever it is installed, for a storage the mesh never uses. Hiding redis while pybreaker
    is imported leaves its Redis support off and redis itself importable as ever after."""
    import sys

    if "pybreaker" in sys.modules or "redis" in sys.modules:
        import pybreaker as module

        return module
    sys.modules["redis"] = None  # type: ignore[assignment]  # an import of it fails at once
    try:
        import pybreaker as module
    finally:
        del sys.modules["redis"]
    return module


if TYPE_CHECKING:
    import pybreaker

    from meshlib.rules.models import CircuitBreakerSpec
else:
    pybreaker = _import_pybreaker()

log = logging.getLogger("meshlib.resilience.breaker")

CLOSED: str = pybreaker.STATE_CLOSED
OPEN: str = pybreaker.STATE_OPEN
HALF_OPEN: str = pybreaker.STATE_HALF_OPEN
# pybreaker's names mapped to the objects above, so the hot path can compare with `is`.
_CANONICAL = {CLOSED: CLOSED, OPEN: OPEN, HALF_OPEN: HALF_OPEN}

OnChange = Callable[[str, str, str], None]


class _Failed(Exception):
    """Raised inside pybreaker's `call()` to report one failed request."""


def _report(failed: bool) -> None:
    if failed:
        raise _Failed


class Admission:
    """Permission for one request to go to an endpoint, as returned by `EndpointBreaker.admit`.

    Always truthy. It remembers the breaker's epoch when the request was let through (the epoch
    advances each time the breaker opens, and when lost trials are given up) and whether the
    request is a half-open trial (`trial`); `record()` and `release()` use both to count only
    current outcomes and to free the right trial slot.
    Requests admitted while closed share one Admission per epoch, so the closed path allocates
    nothing.
    """

    __slots__ = ("breaker", "epoch", "forced", "trial")

    def __init__(self, breaker: EndpointBreaker, epoch: int, trial: bool, forced: bool = False) -> None:
        self.breaker = breaker
        self.epoch = epoch
        self.trial = trial
        self.forced = forced  # let through although the breaker is open: `admit(force=True)`

    def __repr__(self) -> str:
        kind = "trial" if self.trial else "forced" if self.forced else "request"
        return f"<Admission {kind} of {self.breaker.address} epoch={self.epoch}>"


class _Listener(pybreaker.CircuitBreakerListener):
    __slots__ = ("_breaker",)

    def __init__(self, breaker: EndpointBreaker) -> None:
        self._breaker = breaker

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self._breaker._changed(old_state.name if old_state is not None else CLOSED, new_state.name)


class EndpointBreaker:
    """Circuit breaker of one endpoint (address).

    `available()` is what the balancer asks to skip endpoints (cheap, lock-free); `admit()` is
    called right before sending to the picked endpoint; `record(failed, admission)` reports the
    outcome afterwards. See the module documentation for the state machine and what counts.
    """

    __slots__ = (
        "_base",
        "_cb",
        "_clock",
        "_epoch",
        "_level",
        "_lock",
        "_on_change",
        "_open_for",
        "_opened_at",
        "_random",
        "_retry_at",
        "_state",
        "_ticket",
        "_trial_limit",
        "_trials",
        "_trials_expire_at",
        "address",
        "opened_count",
        "spec",
    )

    def __init__(
        self,
        address: str,
        spec: CircuitBreakerSpec,
        *,
        on_change: OnChange | None = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.address = address
        self.spec = spec
        self.opened_count = 0  # times the breaker opened (from closed or from half-open)
        self._on_change = on_change
        self._clock = clock
        self._random = jitter  # uniform in [0, 1): how much of half the wait to take off
        self._open_for = spec.probe_max  # the longest wait; also when lost trials are given up
        self._base = spec.probe_base
        self._level = 0  # openings since the breaker last closed: the backoff's exponent
        self._trial_limit = spec.half_open_requests
        self._lock = threading.Lock()
        self._state = CLOSED
        self._epoch = 0
        self._ticket = Admission(self, 0, False)
        self._trials = 0
        self._opened_at: float | None = None
        self._retry_at = 0.0
        self._trials_expire_at = 0.0
        self._cb = pybreaker.CircuitBreaker(
            fail_max=spec.consecutive_failures,
            reset_timeout=self._open_for,
            name=address,
            listeners=[_Listener(self)],
        )

    # -- reading -----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """One of "closed", "open", "half-open".

        An open breaker whose `open_for` has elapsed still reads "open" (with `available()`
        True) until a trial is admitted.
        """
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures counted by pybreaker (reset by a success and on closing)."""
        return self._cb.fail_counter

    @property
    def trials_in_flight(self) -> int:
        """Half-open trials admitted and not yet recorded or released."""
        return self._trials

    @property
    def opened_at(self) -> float | None:
        """When the breaker last opened, on its clock (None if it never did)."""
        return self._opened_at

    @property
    def circuit(self) -> pybreaker.CircuitBreaker:
        """The underlying pybreaker breaker (for inspection; drive it through this class)."""
        return self._cb

    @property
    def retry_at(self) -> float:
        """When an open breaker lets its next trial through, on its clock."""
        return self._retry_at

    def available(self, now: float | None = None) -> bool:
        """May a request be sent now? Lock-free and side-effect free, for the balancer.

        True when closed; when open, once its probe backoff has elapsed; when half-open, while
        fewer than `half_open_requests` trials are in flight.
        """
        state = self._state
        if state is CLOSED:
            return True
        if now is None:
            now = self._clock()
        if state is OPEN:
            return now >= self._retry_at
        return self._trials < self._trial_limit or now >= self._trials_expire_at

    # -- admitting and reporting -------------------------------------------------------------

    def admit(self, now: float | None = None, *, force: bool = False) -> Admission | None:
        """Let one request go to the endpoint, or refuse it (None).

        Called right before sending. While closed this is lock-free. Otherwise it reserves a
        half-open trial slot when one is free (moving an open breaker whose backoff has
        elapsed to half-open); with `force`, it always does (over the trial limit if need be).
        Pass the result to `record()` or `release()` when done.
        """
        ticket = self._ticket  # read before the state: see `_changed`
        if self._state is CLOSED:
            return ticket
        return self._admit_trial(self._clock() if now is None else now, force)

    def _admit_trial(self, now: float, force: bool = False) -> Admission | None:
        if self._state is OPEN and now < self._retry_at and not force:
            return None  # the common refusal, without the lock
        with self._lock:
            state = self._state
            if state is CLOSED:
                return self._ticket
            if state is OPEN:
                if now < self._retry_at:
                    return Admission(self, self._epoch, False, True) if force else None
            elif self._trials >= self._trial_limit:
                if now < self._trials_expire_at:
                    return Admission(self, self._epoch, False, True) if force else None
                # Every slot has been taken for longer than open_for: the trials were lost
                # (never recorded nor released). Forget them; their late outcomes are stale.
                self._trials = 0
                self._new_epoch()
            self._trials += 1
            self._trials_expire_at = now + self._open_for
            if state is OPEN:
                self._cb.half_open()  # -> _changed(OPEN, HALF_OPEN)
            return Admission(self, self._epoch, True)

    def record(self, failed: bool, admission: Admission | None = None) -> None:
        """Report the outcome of a request `admit()` let through; frees its trial slot.

        Outcomes of requests admitted before the breaker last opened are ignored. Without
        `admission` the current state decides (see the module documentation).
        """
        if (
            not failed
            and self._state is CLOSED
            and (admission is None or not admission.trial)
            and self._cb.fail_counter == 0
        ):
            # The common case changes nothing: pybreaker would only reset a zero counter.
            # Skipping its call (and both locks) saves ~3 µs per request.
            return
        if admission is not None and admission.forced:
            if not failed:
                self._back(admission)
            return
        with self._lock:
            state = self._state
            if admission is None:
                if state is OPEN:
                    return
                if state is HALF_OPEN:
                    if self._trials <= 0:
                        return  # no trial in flight: admitted before the breaker opened
                    self._trials -= 1
            else:
                if admission.breaker is not self or admission.epoch != self._epoch:
                    return  # the breaker opened since (or it was replaced): stale
                if admission.trial:
                    admission.epoch = -1  # a second record/release of it is ignored
                    if self._trials > 0:
                        self._trials -= 1
                elif state is not CLOSED:
                    return
                if state is OPEN:
                    return
            try:  # noqa: SIM105 - contextlib.suppress costs more on this per-request path
                self._cb.call(_report, failed)
            except (_Failed, pybreaker.CircuitBreakerError):
                pass

    def release(self, admission: Admission | None) -> None:
        """Give back an admission without an outcome (the request never reached the endpoint,
        or was cancelled): frees its trial slot, counts nothing."""
        if admission is None or not admission.trial:
            return
        with self._lock:
            if admission.breaker is self and admission.epoch == self._epoch:
                admission.epoch = -1
                if self._trials > 0:
                    self._trials -= 1

    def _back(self, admission: Admission) -> None:
        """A forced request succeeded: the endpoint answers again, close (unless the breaker
        moved on since that request was let through)."""
        with self._lock:
            if admission.breaker is not self or admission.epoch != self._epoch or self._state is CLOSED:
                return
            self._close()

    def _close(self) -> None:
        self._level = 0
        self._trials = 0
        self._new_epoch()  # outcomes of requests let through before are stale
        self._cb.close()  # -> _changed(..., CLOSED); pybreaker zeroes its failure count

    def reset(self) -> None:
        """Close now and forget the failures and the backoff: the endpoint is a new process.
        Outcomes of requests admitted before are ignored."""
        with self._lock:
            self._level = 0
            if self._state is CLOSED and self._cb.fail_counter == 0:
                return
            self._close()

    def _probe_wait(self) -> float:
        """The next backoff: base * 2^level, capped, minus up to half of it at random."""
        wait = min(self._open_for, self._base * 2.0 ** min(self._level, 60))
        self._level += 1
        return wait * (1.0 - 0.5 * self._random())

    # -- transitions (called by pybreaker, under this breaker's lock) ----------------------

    def _new_epoch(self) -> None:
        self._epoch += 1
        self._ticket = Admission(self, self._epoch, False)

    def _changed(self, old: str, new: str) -> None:
        old = _CANONICAL.get(old, old)
        new = _CANONICAL.get(new, new)
        if new is OPEN:
            now = self._clock()
            self._opened_at = now
            self._retry_at = now + self._probe_wait()  # before the state: `available` reads it after
            self._trials = 0
            self.opened_count += 1
            self._state = OPEN
            # After the state: a lock-free `admit` reads the ticket first, so one that still saw
            # "closed" holds the old epoch's ticket and its outcome will be ignored.
            self._new_epoch()
        else:
            if new is CLOSED:
                self._level = 0
            self._state = new
        if self._on_change is not None and old is not new:
            try:
                self._on_change(self.address, old, new)
            except Exception:
                log.exception("circuit breaker on_change callback failed for %s", self.address)

    def __repr__(self) -> str:
        return (
            f"<EndpointBreaker {self.address} {self._state} failures={self.failures} "
            f"opened={self.opened_count} trials={self._trials}>"
        )


class BreakerBook:
    """Breakers of one Mesh keyed by address; a spec change replaces the breaker.

    Lookups are lock-free; creating or replacing a breaker takes a small lock. A replaced
    breaker starts closed and its predecessor's in-flight admissions no longer count.
    `tripped` is the set of addresses whose breaker is not closed, kept up to date by the
    transitions, so the balancer can tell in one truth test that every breaker is closed.
    """

    def __init__(
        self,
        on_change: OnChange | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._on_change = on_change
        self._clock = clock
        self._jitter = jitter
        self._breakers: dict[str, EndpointBreaker] = {}
        self._lock = threading.Lock()
        self._tripped_lock = threading.Lock()
        self.tripped: frozenset[str] = frozenset()  # replaced, never mutated: safe to iterate

    def _changed(self, address: str, old: str, new: str) -> None:
        # Runs under the breaker's lock, after its state changed. A replaced breaker's late
        # transition must not mark the address: only the current breaker's state counts.
        current = self._breakers.get(address)
        self._mark(address, current is not None and current.state is not CLOSED)
        if self._on_change is not None:
            self._on_change(address, old, new)

    def _mark(self, address: str, tripped: bool) -> None:
        if (address in self.tripped) is tripped:
            return
        with self._tripped_lock:
            self.tripped = self.tripped | {address} if tripped else self.tripped - {address}

    def get(self, address: str, spec: CircuitBreakerSpec) -> EndpointBreaker:
        """The breaker of `address`, created on first use and replaced if `spec` differs."""
        breaker = self._breakers.get(address)
        if breaker is not None and (breaker.spec is spec or breaker.spec == spec):
            return breaker
        with self._lock:
            breaker = self._breakers.get(address)
            if breaker is None or breaker.spec != spec:
                breaker = EndpointBreaker(
                    address, spec, on_change=self._changed, clock=self._clock, jitter=self._jitter
                )
                self._breakers[address] = breaker
                self._mark(address, False)
            return breaker

    def reset(self, address: str) -> None:
        """Close the breaker of `address`, if it has one, and forget its backoff (a new process
        answers there)."""
        breaker = self._breakers.get(address)
        if breaker is not None:
            breaker.reset()

    def peek(self, address: str) -> EndpointBreaker | None:
        """The breaker of `address` if one exists (never creates one)."""
        return self._breakers.get(address)

    def states(self) -> dict[str, str]:
        """Address -> "closed" | "open" | "half-open"."""
        return {address: b.state for address, b in self._breakers.copy().items()}

    def retain(self, addresses: Iterable[str]) -> None:
        """Forget the breakers of addresses not in `addresses` (endpoints that went away)."""
        keep = set(addresses)
        with self._lock:
            for address in [a for a in self._breakers if a not in keep]:
                del self._breakers[address]
                self._mark(address, False)

    def __len__(self) -> int:
        return len(self._breakers)
