from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from meshlib.resilience.breaker import CLOSED, HALF_OPEN, OPEN, Admission, BreakerBook, EndpointBreaker
from meshlib.rules import CircuitBreakerSpec

ADDRESS = "10.0.0.1:80"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def spec(failures: int = 5, open_for: str = "30s", trials: int = 1) -> CircuitBreakerSpec:
    """A breaker whose every backoff is `open_for` (base = max): the state machine's tests below
    count on a known wait; the growing backoff has tests of its own."""
    return CircuitBreakerSpec(
        consecutive_failures=failures,
        open_for=open_for,
        half_open_requests=trials,
        backoff={"base": open_for},  # type: ignore[arg-type]
    )


def make(
    failures: int = 5, open_for: str = "30s", trials: int = 1, clock: Callable[[], float] | None = None
) -> tuple[EndpointBreaker, list[tuple[str, str]]]:
    events: list[tuple[str, str]] = []

    def on_change(address: str, old: str, new: str) -> None:
        assert address == ADDRESS
        events.append((old, new))

    kwargs: dict = {"jitter": lambda: 0.0}  # no jitter: the full wait
    if clock is not None:
        kwargs["clock"] = clock
    breaker = EndpointBreaker(ADDRESS, spec(failures, open_for, trials), on_change=on_change, **kwargs)
    return breaker, events


def request(breaker: EndpointBreaker, failed: bool) -> Admission:
    admission = breaker.admit()
    assert admission
    breaker.record(failed, admission)
    return admission


def trip(breaker: EndpointBreaker) -> None:
    for _ in range(breaker.spec.consecutive_failures):
        request(breaker, failed=True)
    assert breaker.state == OPEN


def assert_valid_history(events: list[tuple[str, str]]) -> None:
    """Transitions chain from closed and follow the state machine."""
    allowed = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED), (HALF_OPEN, OPEN)}
    state = CLOSED
    for old, new in events:
        assert old == state, events
        assert (old, new) in allowed, events
        state = new


# --------------------------------------------------------------------------------------------
# The state machine


def test_opens_after_exactly_n_consecutive_failures() -> None:
    breaker, events = make(failures=5)
    for i in range(4):
        request(breaker, failed=True)
        assert breaker.failures == i + 1
    assert breaker.state == CLOSED and breaker.available() and breaker.opened_count == 0
    request(breaker, failed=True)
    assert breaker.state == OPEN
    assert breaker.opened_count == 1
    assert breaker.circuit.current_state == "open"  # pybreaker made the move
    assert events == [(CLOSED, OPEN)]


def test_a_success_resets_the_consecutive_count() -> None:
    breaker, _ = make(failures=5)
    for _ in range(4):
        request(breaker, failed=True)
    request(breaker, failed=False)
    assert breaker.failures == 0
    for _ in range(4):
        request(breaker, failed=True)
    assert breaker.state == CLOSED
    request(breaker, failed=True)
    assert breaker.state == OPEN and breaker.opened_count == 1


def test_not_available_while_open() -> None:
    clock = FakeClock()
    breaker, _ = make(failures=2, open_for="10s", clock=clock)
    trip(breaker)
    for dt in (0.0, 5.0, 9.999):
        assert not breaker.available(clock.now + dt)
        assert breaker.admit(clock.now + dt) is None
    clock.now += 9.999
    assert not breaker.available() and breaker.admit() is None
    assert breaker.state == OPEN and breaker.trials_in_flight == 0


def test_becomes_available_after_open_for() -> None:
    clock = FakeClock()
    breaker, events = make(failures=2, open_for="10s", clock=clock)
    trip(breaker)
    clock.now += 10.0
    assert breaker.available()
    # Eligible, but still "open" until a trial is actually admitted.
    assert breaker.state == OPEN and events == [(CLOSED, OPEN)]
    assert breaker.admit()
    assert breaker.state == HALF_OPEN and breaker.circuit.current_state == "half-open"


def test_becomes_available_after_open_for_on_the_real_clock() -> None:
    breaker, _ = make(failures=1, open_for="200ms")
    trip(breaker)
    assert breaker.opened_at is not None
    assert not breaker.available()
    deadline = time.monotonic() + 10
    while not breaker.available():
        assert time.monotonic() < deadline, "never became available"
        time.sleep(0.005)
    assert time.monotonic() - breaker.opened_at >= 0.2
    assert breaker.admit()
    assert breaker.state == HALF_OPEN


@pytest.mark.parametrize("trials", [1, 3])
def test_half_open_admits_exactly_half_open_requests_concurrent_trials(trials: int) -> None:
    clock = FakeClock()
    breaker, _ = make(failures=1, open_for="1s", trials=trials, clock=clock)
    trip(breaker)
    clock.now += 1.0
    admitted = [breaker.admit() for _ in range(trials)]
    assert all(a is not None and a.trial for a in admitted)
    assert breaker.trials_in_flight == trials
    assert not breaker.available()
    assert breaker.admit() is None and breaker.admit() is None
    breaker.release(admitted[0])  # one trial gave up without reaching the endpoint
    assert breaker.available() and breaker.state == HALF_OPEN
    again = breaker.admit()
    assert again is not None and again.trial
    assert breaker.admit() is None


def test_trial_success_closes() -> None:
    clock = FakeClock()
    breaker, events = make(failures=3, open_for="1s", clock=clock)
    trip(breaker)
    clock.now += 1.0
    trial = breaker.admit()
    assert trial is not None and trial.trial
    breaker.record(False, trial)
    assert breaker.state == CLOSED and breaker.failures == 0 and breaker.trials_in_flight == 0
    assert breaker.available() and breaker.circuit.current_state == "closed"
    assert events == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    # Closed again means a full run of failures is needed to open it again.
    for _ in range(2):
        request(breaker, failed=True)
    assert breaker.state == CLOSED


def test_trial_failure_reopens_and_the_open_period_starts_again() -> None:
    clock = FakeClock(100.0)
    breaker, events = make(failures=3, open_for="1s", clock=clock)
    trip(breaker)
    assert breaker.opened_at == 100.0
    clock.now = 101.0
    trial = breaker.admit()
    assert trial is not None
    clock.now = 101.5
    breaker.record(True, trial)
    assert breaker.state == OPEN and breaker.opened_count == 2 and breaker.opened_at == 101.5
    assert breaker.trials_in_flight == 0
    assert not breaker.available(102.499) and breaker.admit(102.499) is None
    assert breaker.available(102.5)
    assert events == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]


def test_with_several_trials_the_first_outcome_decides() -> None:
    clock = FakeClock()
    breaker, _ = make(failures=2, open_for="1s", trials=2, clock=clock)
    trip(breaker)
    clock.now += 1.0
    first, second = breaker.admit(), breaker.admit()
    assert first is not None and second is not None
    breaker.record(False, first)
    assert breaker.state == CLOSED
    breaker.record(True, second)  # counted as an ordinary closed-state failure
    assert breaker.state == CLOSED and breaker.failures == 1 and breaker.trials_in_flight == 0


def test_outcomes_recorded_while_open_are_ignored() -> None:
    clock = FakeClock()
    breaker, events = make(failures=3, open_for="10s", clock=clock)
    in_flight = [breaker.admit() for _ in range(10)]  # all sent while closed
    for admission in in_flight[:3]:
        breaker.record(True, admission)
    assert breaker.state == OPEN and breaker.failures == 3
    opened_at = breaker.opened_at
    # The other seven finish while it is open: neither failures nor successes count.
    for i, admission in enumerate(in_flight[3:8]):
        clock.now += 1.0
        breaker.record(i % 2 == 0, admission)
    breaker.record(False)  # the same without an admission
    breaker.record(True)
    assert breaker.state == OPEN and breaker.failures == 3 and breaker.opened_at == opened_at
    assert breaker.opened_count == 1
    # Once a trial is out, a late success of an old request must not close the breaker...
    clock.now = opened_at + 10.0
    trial = breaker.admit()
    assert trial is not None and trial.trial
    breaker.record(False, in_flight[8])
    assert breaker.state == HALF_OPEN and breaker.trials_in_flight == 1
    # ... and the trial decides.
    breaker.record(False, trial)
    assert breaker.state == CLOSED
    # An old failure arriving after the breaker closed again is not counted either.
    breaker.record(True, in_flight[9])
    assert breaker.failures == 0
    assert events == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_without_admissions_the_state_decides() -> None:
    """The `record(failed)` form: ignored while open, a trial outcome while half-open."""
    clock = FakeClock()
    breaker, events = make(failures=2, open_for="1s", clock=clock)
    for _ in range(2):
        assert breaker.admit()
        breaker.record(True)
    assert breaker.state == OPEN
    breaker.record(False)
    assert breaker.state == OPEN
    clock.now += 1.0
    assert breaker.admit()
    assert breaker.trials_in_flight == 1
    breaker.record(True)
    assert breaker.state == OPEN and breaker.opened_count == 2 and breaker.trials_in_flight == 0
    clock.now += 1.0
    assert breaker.admit()
    breaker.record(False)
    assert breaker.state == CLOSED
    assert events == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]


def test_a_late_outcome_without_admission_after_open_for_is_ignored() -> None:
    """Open for longer than open_for but no trial admitted yet: an old request's outcome must
    neither half-open nor close the breaker (pybreaker alone would, on the wall clock)."""
    breaker, events = make(failures=1, open_for="50ms")
    trip(breaker)
    deadline = time.monotonic() + 10
    while not breaker.available():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.05)  # time passing: pybreaker's wall-clock reset_timeout has elapsed too
    breaker.record(False)
    breaker.record(True)
    assert breaker.state == OPEN and breaker.circuit.current_state == "open"
    assert breaker.opened_count == 1 and events == [(CLOSED, OPEN)]


def test_an_admission_counts_once() -> None:
    clock = FakeClock()
    breaker, _ = make(failures=1, open_for="1s", trials=2, clock=clock)
    trip(breaker)
    clock.now += 1.0
    trial, other = breaker.admit(), breaker.admit()
    assert trial is not None and other is not None
    breaker.release(trial)
    breaker.release(trial)
    breaker.record(True, trial)
    assert breaker.trials_in_flight == 1 and breaker.state == HALF_OPEN


def test_lost_trials_are_presumed_lost_after_open_for() -> None:
    clock = FakeClock()
    breaker, _ = make(failures=1, open_for="1s", clock=clock)
    trip(breaker)
    clock.now += 1.0
    lost = breaker.admit()  # never recorded nor released
    assert lost is not None
    clock.now += 0.999
    assert not breaker.available() and breaker.admit() is None
    clock.now += 0.001
    assert breaker.available()
    trial = breaker.admit()
    assert trial is not None and trial.trial and breaker.trials_in_flight == 1
    breaker.record(True, lost)  # too late: ignored
    assert breaker.state == HALF_OPEN
    breaker.record(False, trial)
    assert breaker.state == CLOSED


def test_on_change_sees_closed_open_half_open_closed() -> None:
    clock = FakeClock()
    seen: list[tuple[str, str, str]] = []
    book = BreakerBook(on_change=lambda *change: seen.append(change), clock=clock)
    breaker = book.get(ADDRESS, spec(failures=2, open_for="5s"))
    trip(breaker)
    clock.now += 5.0
    request(breaker, failed=False)
    assert seen == [(ADDRESS, CLOSED, OPEN), (ADDRESS, OPEN, HALF_OPEN), (ADDRESS, HALF_OPEN, CLOSED)]


def test_a_failing_on_change_does_not_break_the_breaker(caplog: pytest.LogCaptureFixture) -> None:
    def boom(address: str, old: str, new: str) -> None:
        raise RuntimeError("boom")

    breaker = EndpointBreaker(ADDRESS, spec(failures=1, open_for="1s"), on_change=boom)
    with caplog.at_level(logging.ERROR):
        trip(breaker)
    assert breaker.state == OPEN and breaker.circuit.current_state == "open"
    assert "on_change" in caplog.text


def test_book_creates_once_and_replaces_a_breaker_when_the_spec_changes() -> None:
    book = BreakerBook()
    assert book.peek(ADDRESS) is None
    first = book.get(ADDRESS, spec(failures=2))
    assert book.get(ADDRESS, spec(failures=2)) is first  # equal spec, another object
    assert book.peek(ADDRESS) is first
    trip(first)
    assert book.states() == {ADDRESS: OPEN}
    old = first.admit(first.opened_at)  # refused, nothing to carry over
    assert old is None
    second = book.get(ADDRESS, spec(failures=3))
    assert second is not first and book.peek(ADDRESS) is second
    assert second.state == CLOSED and second.spec.consecutive_failures == 3
    assert book.states() == {ADDRESS: CLOSED}
    other = book.get("10.0.0.2:80", spec())
    assert len(book) == 2
    book.retain([ADDRESS])
    assert book.peek("10.0.0.2:80") is None and book.peek(ADDRESS) is second and other.state == CLOSED


def test_an_admission_of_a_replaced_breaker_does_not_count() -> None:
    book = BreakerBook()
    old = book.get(ADDRESS, spec(failures=1))
    admission = old.admit()
    new = book.get(ADDRESS, spec(failures=1, open_for="1m"))
    new.record(True, admission)
    assert new.state == CLOSED and new.failures == 0


# --------------------------------------------------------------------------------------------
# asyncio


def expected_after(outcomes: list[bool], failures: int) -> tuple[str, int, int]:
    """Reference model for requests all admitted while closed: state, openings, failure count."""
    state, opened, consecutive = CLOSED, 0, 0
    for failed in outcomes:
        if state == OPEN:
            continue  # admitted before the breaker opened: ignored
        consecutive = consecutive + 1 if failed else 0
        if consecutive >= failures:
            state, opened = OPEN, 1
    return state, opened, consecutive


@pytest.mark.timeout(30)
async def test_asyncio_200_tasks_a_run_of_failures_opens_once() -> None:
    breaker, events = make(failures=5, open_for="50ms")
    rng = random.Random(7)

    async def one() -> None:
        admission = breaker.admit()
        assert admission
        await asyncio.sleep(rng.uniform(0.001, 0.2))  # outlives open_for
        breaker.record(True, admission)

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(200))), 20)
    assert breaker.opened_count == 1
    assert events == [(CLOSED, OPEN)]
    assert breaker.failures == 5 and breaker.state == OPEN and breaker.trials_in_flight == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("failures", "p_fail", "seed"), [(3, 0.35, 1), (3, 0.35, 2), (6, 0.15, 3), (6, 0.15, 4)]
)
async def test_asyncio_200_tasks_end_where_the_rules_say(failures: int, p_fail: float, seed: int) -> None:
    breaker, events = make(failures=failures, open_for="1h")
    rng = random.Random(seed)
    plan = [rng.random() < p_fail for _ in range(200)]
    admitted = 0
    recorded: list[bool] = []

    async def one(failed: bool) -> None:
        nonlocal admitted
        admission = breaker.admit()
        assert admission
        admitted += 1
        await asyncio.sleep(rng.uniform(0.001, 0.05))
        assert admitted == 200  # the model below assumes every request went out while closed
        recorded.append(failed)
        breaker.record(failed, admission)

    await asyncio.wait_for(asyncio.gather(*(one(f) for f in plan)), 20)
    state, opened, consecutive = expected_after(recorded, failures)
    assert (breaker.state, breaker.opened_count, breaker.failures) == (state, opened, consecutive)
    assert events == ([(CLOSED, OPEN)] if opened else [])


@pytest.mark.timeout(30)
async def test_asyncio_waves_of_failure_and_recovery() -> None:
    breaker, events = make(failures=4, open_for="20ms", trials=2)
    rng = random.Random(11)
    healthy = False
    stop = False
    trials_now: Counter[int] = Counter()  # trials in flight, by epoch (see `Admission`)
    max_trials = 0
    trial_outcomes = 0

    async def worker() -> None:
        nonlocal max_trials, trial_outcomes
        while not stop:
            admission = breaker.admit()
            if admission is None:
                await asyncio.sleep(0.001)
                continue
            epoch = admission.epoch
            if admission.trial:
                trials_now[epoch] += 1
                max_trials = max(max_trials, trials_now[epoch])
            await asyncio.sleep(rng.uniform(0, 0.004))
            if admission.trial:
                trials_now[epoch] -= 1
                trial_outcomes += 1
            breaker.record(not healthy, admission)

    tasks = [asyncio.create_task(worker()) for _ in range(200)]
    try:
        await asyncio.sleep(0.25)  # unhealthy: opens, trials fail, re-opens
        assert breaker.opened_count >= 2
        healthy = True
        deadline = time.monotonic() + 10
        while breaker.state != CLOSED:
            assert time.monotonic() < deadline, "never closed again"
            await asyncio.sleep(0.005)
    finally:
        stop = True
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    # The trial limit was reached and never exceeded. Counted per epoch: on a loaded machine a
    # trial can outlive open_for, and is then presumed lost and replaced.
    assert max_trials == 2
    assert trial_outcomes > 0 and breaker.trials_in_flight == 0
    assert_valid_history(events)
    assert events.count((CLOSED, OPEN)) == 1  # one run of failures, one opening from closed
    assert breaker.opened_count == sum(1 for _, new in events if new == OPEN)
    assert breaker.state == CLOSED and breaker.circuit.current_state == "closed"


@pytest.mark.timeout(10)
async def test_asyncio_no_lock_is_held_while_a_request_is_awaited() -> None:
    """One task is admitted and suspended mid-request; others on the same loop (same thread)
    admit and record on the same breaker, opening and then half-opening it."""
    clock = FakeClock()
    breaker, events = make(failures=3, open_for="1s", clock=clock)
    release = asyncio.Event()
    suspended = asyncio.Event()

    async def slow() -> None:
        admission = breaker.admit()
        assert admission
        suspended.set()
        await release.wait()
        breaker.record(True, admission)

    async def fast() -> None:
        await suspended.wait()
        for _ in range(3):
            admission = breaker.admit()
            assert admission
            await asyncio.sleep(0)
            breaker.record(True, admission)

    slow_task = asyncio.create_task(slow())
    try:
        await asyncio.wait_for(fast(), 5)
        assert breaker.state == OPEN
        clock.now += 1.0
        trial = breaker.admit()
        assert trial is not None and trial.trial
    finally:
        release.set()
        await asyncio.wait_for(slow_task, 5)
    # The suspended request was sent before the breaker opened: its failure is ignored.
    assert breaker.state == HALF_OPEN and breaker.opened_count == 1
    breaker.record(False, trial)
    assert events == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


@pytest.mark.timeout(10)
async def test_asyncio_another_thread_records_while_a_request_is_awaited() -> None:
    """A thread must not block on anything a suspended coroutine holds."""
    breaker, _ = make(failures=3, open_for="1h")
    release = asyncio.Event()

    async def suspended_request() -> None:
        admission = breaker.admit()
        assert admission
        await release.wait()
        breaker.record(False, admission)

    states: list[str] = []

    def other_thread() -> None:
        for _ in range(3):
            admission = breaker.admit()
            assert admission
            breaker.record(True, admission)
        states.append(breaker.state)

    task = asyncio.create_task(suspended_request())
    await asyncio.sleep(0)
    thread = threading.Thread(target=other_thread, daemon=True)  # daemon: a stuck one cannot hang exit
    try:
        thread.start()
        deadline = time.monotonic() + 5
        while thread.is_alive():  # the loop stays free while waiting: the coroutine stays suspended
            assert time.monotonic() < deadline, "the thread is blocked by the suspended request"
            await asyncio.sleep(0.005)
    finally:
        release.set()
        await asyncio.wait_for(task, 5)
    assert states == [OPEN] and breaker.state == OPEN and breaker.opened_count == 1


# --------------------------------------------------------------------------------------------
# Threads


@pytest.mark.timeout(30)
def test_threads_hammering_keep_counts_consistent() -> None:
    breaker, events = make(failures=3, open_for="2ms", trials=2)
    healthy = threading.Event()
    stop = threading.Event()
    guard = threading.Lock()
    trials_now: Counter[int] = Counter()  # trials in flight, by epoch (see `Admission`)
    max_trials = 0
    counts = {"admitted": 0, "refused": 0, "trials": 0, "trial_outcomes": 0}
    errors: list[BaseException] = []

    def hammer(seed: int) -> None:
        nonlocal max_trials
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                admission = breaker.admit()
                if admission is None:
                    with guard:
                        counts["refused"] += 1
                    time.sleep(0.0002)
                    continue
                epoch = admission.epoch
                with guard:
                    counts["admitted"] += 1
                    if admission.trial:
                        counts["trials"] += 1
                        trials_now[epoch] += 1
                        max_trials = max(max_trials, trials_now[epoch])
                if rng.random() < 0.5:
                    time.sleep(rng.uniform(0, 0.0005))
                failed = not healthy.is_set() and rng.random() < 0.7
                if admission.trial:
                    with guard:
                        trials_now[epoch] -= 1
                        counts["trial_outcomes"] += 1
                breaker.record(failed, admission)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while breaker.opened_count < 5:
            assert time.monotonic() < deadline, "the breaker did not keep opening"
            time.sleep(0.01)
        healthy.set()
        while breaker.state != CLOSED:
            assert time.monotonic() < deadline, "never closed again"
            time.sleep(0.005)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    assert not errors
    assert counts["trials"] == counts["trial_outcomes"] > 0
    assert 1 <= max_trials <= 2  # the half-open trial limit held
    assert breaker.trials_in_flight == 0
    assert_valid_history(events)
    assert breaker.opened_count == sum(1 for _, new in events if new == OPEN)
    assert breaker.state == CLOSED and breaker.circuit.current_state == "closed"


# --------------------------------------------------------------------------------------------
# Probe backoff, forced requests, reset


def backoff_breaker(
    clock: FakeClock, jitter: float = 0.0, **fields: object
) -> tuple[EndpointBreaker, list[tuple[str, str]]]:
    events: list[tuple[str, str]] = []
    cb = CircuitBreakerSpec.model_validate({"consecutive_failures": 1, **fields})
    breaker = EndpointBreaker(
        ADDRESS, cb, on_change=lambda a, o, n: events.append((o, n)), clock=clock, jitter=lambda: jitter
    )
    return breaker, events


def next_wait(breaker: EndpointBreaker, clock: FakeClock) -> float:
    """How long the open breaker waits before its next trial."""
    assert breaker.state == OPEN
    return breaker.retry_at - clock.now


def test_probe_backoff_starts_at_base_and_doubles_up_to_open_for() -> None:
    clock = FakeClock()
    breaker, events = backoff_breaker(clock, open_for="30s")  # README's old rules: base 1s
    request(breaker, failed=True)
    waits = [next_wait(breaker, clock)]
    for _ in range(7):  # each failed trial doubles the wait
        clock.now = breaker.retry_at
        request(breaker, failed=True)
        waits.append(next_wait(breaker, clock))
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert events[:3] == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]
    clock.now = breaker.retry_at
    request(breaker, failed=False)  # a trial succeeds: closed, and the backoff starts over
    assert breaker.state == CLOSED
    request(breaker, failed=True)
    assert next_wait(breaker, clock) == 1.0


def test_backoff_max_overrides_open_for_and_base_never_exceeds_it() -> None:
    clock = FakeClock()
    breaker, _ = backoff_breaker(clock, open_for="30s", backoff={"base": "5s", "max": "12s"})
    request(breaker, failed=True)
    assert next_wait(breaker, clock) == 5.0
    clock.now = breaker.retry_at
    request(breaker, failed=True)
    assert next_wait(breaker, clock) == 10.0
    clock.now = breaker.retry_at
    request(breaker, failed=True)
    assert next_wait(breaker, clock) == 12.0
    short, _ = backoff_breaker(clock, open_for="200ms")  # base 1s > open_for: open_for it is
    request(short, failed=True)
    assert next_wait(short, clock) == pytest.approx(0.2)


def test_jitter_takes_up_to_half_of_each_wait_off() -> None:
    clock = FakeClock()
    most, _ = backoff_breaker(clock, jitter=0.999, backoff={"base": "4s", "max": "60s"})
    request(most, failed=True)
    assert next_wait(most, clock) == pytest.approx(2.0, abs=0.01)
    # on the real jitter, two breakers that opened together do not probe in step
    cb = CircuitBreakerSpec.model_validate({"consecutive_failures": 1, "backoff": {"base": "10s"}})
    waits = set()
    for i in range(20):
        b = EndpointBreaker(f"10.0.0.{i}:80", cb, clock=clock)
        request(b, failed=True)
        waits.add(b.retry_at - clock.now)
    assert len(waits) > 10 and all(5.0 <= w <= 10.0 for w in waits)


def test_forced_request_through_an_open_breaker() -> None:
    """Panic mode: refused as usual, but `force` lets it go; a failure changes nothing, a
    success closes the breaker."""
    clock = FakeClock()
    breaker, events = backoff_breaker(clock, backoff={"base": "10s"})
    request(breaker, failed=True)
    retry_at = breaker.retry_at
    assert breaker.admit() is None
    forced = breaker.admit(force=True)
    assert forced and forced.forced and not forced.trial
    breaker.record(True, forced)
    assert breaker.state == OPEN and breaker.retry_at == retry_at and breaker.opened_count == 1
    forced = breaker.admit(force=True)
    assert forced
    breaker.record(False, forced)
    assert breaker.state == CLOSED
    assert events == [(CLOSED, OPEN), (OPEN, CLOSED)]
    assert breaker.admit(force=True) is breaker.admit()  # closed: the ordinary ticket


def test_a_forced_success_from_before_the_breaker_reopened_is_stale() -> None:
    clock = FakeClock()
    breaker, _ = backoff_breaker(clock, backoff={"base": "1s"})
    request(breaker, failed=True)
    forced = breaker.admit(force=True)
    assert forced
    clock.now = breaker.retry_at
    request(breaker, failed=True)  # the trial fails: open again, a new epoch
    breaker.record(False, forced)
    assert breaker.state == OPEN


def test_forced_while_half_open_with_the_trial_slot_taken() -> None:
    clock = FakeClock()
    breaker, _ = backoff_breaker(clock, backoff={"base": "1s"})
    request(breaker, failed=True)
    clock.now = breaker.retry_at
    trial = breaker.admit()
    assert trial and trial.trial and breaker.state == HALF_OPEN
    assert breaker.admit() is None
    forced = breaker.admit(force=True)
    assert forced and forced.forced
    breaker.record(False, forced)
    assert breaker.state == CLOSED
    breaker.record(True, trial)  # the trial's late failure belongs to the past
    assert breaker.state == CLOSED


def test_reset_closes_forgets_the_backoff_and_makes_in_flight_outcomes_stale() -> None:
    clock = FakeClock()
    breaker, events = backoff_breaker(clock, backoff={"base": "1s"}, consecutive_failures=2)
    before = breaker.admit()
    request(breaker, failed=True)
    request(breaker, failed=True)
    for _ in range(3):  # three failed trials: the backoff has grown
        clock.now = breaker.retry_at
        request(breaker, failed=True)
    assert breaker.state == OPEN and next_wait(breaker, clock) > 1.0
    breaker.reset()
    assert breaker.state == CLOSED and breaker.failures == 0
    breaker.record(True, before)  # admitted long ago: ignored
    assert breaker.failures == 0
    request(breaker, failed=True)
    request(breaker, failed=True)
    assert next_wait(breaker, clock) == 1.0  # the backoff starts over
    assert events[-2:] == [(OPEN, CLOSED), (CLOSED, OPEN)]


def test_book_tracks_tripped_addresses_and_resets() -> None:
    clock = FakeClock()
    book = BreakerBook(clock=clock, jitter=lambda: 0.0)
    cb = CircuitBreakerSpec.model_validate({"consecutive_failures": 1})
    a, b = book.get("a:1", cb), book.get("b:1", cb)
    assert book.tripped == frozenset()
    request(a, failed=True)
    request(b, failed=True)
    assert book.tripped == {"a:1", "b:1"}
    book.reset("a:1")
    assert book.tripped == {"b:1"} and a.state == CLOSED
    book.reset("nowhere:1")  # no breaker: nothing to do
    book.get("b:1", CircuitBreakerSpec.model_validate({"consecutive_failures": 2}))  # replaced: closed
    assert book.tripped == frozenset()
    c = book.get("c:1", cb)
    book.get("c:1", CircuitBreakerSpec.model_validate({"consecutive_failures": 2}))
    request(c, failed=True)  # the replaced breaker's late transition does not mark the address
    assert c.state == OPEN and book.tripped == frozenset()
    request(book.get("a:1", cb), failed=True)
    book.retain(["b:1"])
    assert book.tripped == frozenset()
