"""The waiting flows, stepped with no database and no real time: each test plays the driver, answers
the commands a flow yields, and moves a fake clock. They run in milliseconds."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from pgslots import _flow as flows
from pgslots import _queries as q
from pgslots._flow import (
    BACKGROUND_WAIT_SECONDS,
    CLEAN_UP_SECONDS,
    LONGEST_WAIT_SECONDS,
    Call,
    Connect,
    Drop,
    Grant,
    Hold,
    Later,
    Link,
    Listen,
    Request,
    Sleep,
    Wait,
)
from pgslots.errors import (
    AcquireConcurrencySlotTimeoutError,
    ConcurrencySlotAcquisitionError,
    DatabaseUnavailableError,
    LeaseRenewalFailedError,
    PgSlotsError,
)
from pgslots.types import Lease

SESSION = uuid.UUID("00000000-0000-4000-8000-000000000001")
EXPIRES = datetime(2030, 1, 1, tzinfo=UTC)


class FakeClock:
    """Time moves only when a test moves it; jitter always answers its upper bound."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def jitter(self, low: float, high: float) -> float:
        return high


class Stepper:
    """Plays the driver for one flow: ``send`` answers the pending command, ``throw`` fails it."""

    def __init__(self, flow: flows.Flow[Any]) -> None:
        self.flow = flow
        self.result: Any = None
        self.done = False
        self.command: Any = next(flow)

    def _step(self, advance: Any) -> Any:
        try:
            self.command = advance()
        except StopIteration as end:
            self.done, self.result, self.command = True, end.value, None
        return self.command

    def send(self, reply: Any = None) -> Any:
        return self._step(lambda: self.flow.send(reply))

    def throw(self, error: BaseException) -> Any:
        return self._step(lambda: self.flow.throw(error))


def concurrency(**overrides: Any) -> Request:
    args: dict[str, Any] = {"slots": 1, "lease_seconds": 60.0} | overrides
    request = Request.for_concurrency("db", **args)
    assert request is not None
    return request


def params_of(command: Any) -> dict[str, Any]:
    assert isinstance(command, Call) and command.params is not None, command
    return command.params


def granted(**row: Any) -> list[dict[str, Any]]:
    base = {"granted": True, "lease_id": uuid.uuid4(), "fencing_token": 11, "expires_at": EXPIRES, "retry_after": None}
    return [base | {"missing": [], "waiter": None, "blocked_by": None, "liveness_seconds": 10.0} | row]


def refused(retry_after: float = 0.5, waiter: int | None = 7) -> list[dict[str, Any]]:
    return [{"granted": False, "waiter": waiter, "missing": [], "retry_after": retry_after, "blocked_by": ["db"]}]


def started(request: Request, clock: FakeClock, *, listening: bool = True, fail_open_after: float | None = None) -> Stepper:
    """A flow past its Connect, at its first Call."""
    run = Stepper(flows.acquire(request, clock, fail_open_after))
    assert isinstance(run.command, Connect)
    call = run.send(Link(SESSION, listening=listening, can_listen=listening))
    assert isinstance(call, Call) and call.query is (q.RATE_LIMIT if request.rate_limit else q.ACQUIRE)
    return run


def test_a_free_slot_is_one_call_and_the_lease_is_held_until_released() -> None:
    clock = FakeClock()
    run = Stepper(flows.concurrency(concurrency(), True, clock))
    run.send(Link(SESSION, listening=True, can_listen=True))
    params = run.command.params
    assert params["names"] == ["db"] and params["session"] == SESSION and params["queue_client"] == SESSION
    assert params["new_lease_id"] is not None and params["wait_seconds"] is None  # no timeout: no lock bound
    hold = run.send(granted(lease_id=params["new_lease_id"]))
    assert isinstance(hold, Hold) and hold.raise_on_failure
    run.send()
    lease: Lease = run.result
    assert run.done and lease.lease_id == params["new_lease_id"] and lease.fencing_token == 11
    assert lease.liveness_seconds == 10.0
    release = Stepper(flows.release(lease, in_transaction=False))
    assert release.command == Drop(lease.lease_id)
    call = release.send()
    assert call.query is q.RELEASE_FAST and call.params["lease_id"] == lease.lease_id
    release.send([{"release": True}])
    assert release.done


def test_a_refused_rate_limit_sleeps_exactly_the_hint_then_asks_again() -> None:
    clock = FakeClock()
    request = Request.for_rate_limit("api", slots=2)
    assert request is not None
    run = started(request, clock)
    assert "new_lease_id" not in run.command.params
    assert run.send(refused(retry_after=0.25, waiter=None)) == Sleep(0.25)
    clock.t += 0.25
    assert isinstance(run.send(), Call)
    run.send(granted(lease_id=None))
    assert run.done and run.result.names == ("api",) and run.result.slots == 2


def test_a_queued_waiter_waits_for_its_wake_up_within_its_timeout() -> None:
    clock = FakeClock()
    run = started(concurrency(timeout_seconds=5.0), clock)
    assert run.command.params["wait_seconds"] == 5.0  # a lock held elsewhere may delay it no longer
    assert run.send(refused(waiter=7)) == Wait(7, 5.0)
    clock.t += 2.0
    params = params_of(run.send(None))  # woken (or the backstop): ask again, with the ticket
    assert params["ticket"] == 7 and params["wait_seconds"] == 3.0
    # Without a timeout, the pause is capped by the last-resort bound only.
    run = started(concurrency(), clock)
    assert run.send(refused(waiter=8)) == Wait(8, LONGEST_WAIT_SECONDS)


def test_a_waiter_that_cannot_listen_polls_at_the_hint() -> None:
    run = started(concurrency(), FakeClock(), listening=False)
    assert run.send(refused(retry_after=0.3, waiter=7)) == Wait(7, 0.3)  # a hand-off may still come
    run = started(concurrency(), FakeClock(), listening=False)
    assert run.send(refused(retry_after=3.0, waiter=None)) == Sleep(flows.POLL_SECONDS)


def test_wake_ups_become_possible_mid_wait_then_it_looks_once_more() -> None:
    clock = FakeClock()
    run = Stepper(flows.acquire(concurrency(), clock))
    run.send(Link(SESSION, listening=False, can_listen=True))
    assert isinstance(run.send(refused(waiter=7)), Listen)
    assert params_of(run.send(True))["ticket"] == 7  # listening now: a release may have come before, so look again


def test_the_timeout_leaves_the_queue_and_releases_what_a_hand_off_may_have_granted() -> None:
    clock = FakeClock()
    run = started(concurrency(timeout_seconds=1.0), clock)
    lease_id = run.command.params["new_lease_id"]
    run.send(refused(waiter=7))
    clock.t += 1.0
    leave = run.send(None)  # no wake-up, and the deadline has passed
    assert leave == Call(q.LEAVE_QUEUE, {"ticket": 7, "queue_client": SESSION, "wait_seconds": CLEAN_UP_SECONDS}, CLEAN_UP_SECONDS)
    release = run.send([{"leave_queue": True}])
    assert release == Call(q.RELEASE, {"lease_id": lease_id, "wait_seconds": CLEAN_UP_SECONDS}, CLEAN_UP_SECONDS)
    with pytest.raises(AcquireConcurrencySlotTimeoutError, match="timed out after 1.0 second"):
        run.send([{"release": False}])


def test_a_hand_off_names_the_waiters_own_lease_and_any_other_is_ignored() -> None:
    clock = FakeClock()
    run = started(concurrency(), clock)
    lease_id = run.command.params["new_lease_id"]
    wait = run.send(refused(waiter=7))
    assert isinstance(wait, Wait)
    forged = Grant(uuid.uuid4(), 99, EXPIRES, 5.0)
    again = run.send(forged)  # someone else's lease, or a forged notification: ask again
    assert params_of(again)["new_lease_id"] == lease_id
    run.send(refused(waiter=7))
    run.send(Grant(lease_id, 12, EXPIRES, 5.0))
    lease: Lease = run.result
    assert run.done and lease.lease_id == lease_id and lease.fencing_token == 12 and lease.first_term == 5.0


def test_a_hand_off_racing_the_timeout_is_released_not_lost() -> None:
    """The release handed us the lease just as our deadline passed and the wake-up came too late:
    the clean-up releases that lease by its id, so its slots come back."""
    clock = FakeClock()
    run = started(concurrency(timeout_seconds=1.0), clock)
    lease_id = run.command.params["new_lease_id"]
    run.send(refused(waiter=7))
    clock.t += 1.5
    assert run.send(None).query is q.LEAVE_QUEUE
    leave = run.throw(PgSlotsError("the database is busy"))  # the clean-up call failed: the rest in the background
    assert leave == Later(q.LEAVE_QUEUE, {"ticket": 7, "queue_client": SESSION, "wait_seconds": BACKGROUND_WAIT_SECONDS})
    assert run.send() == Later(q.RELEASE, {"lease_id": lease_id, "wait_seconds": BACKGROUND_WAIT_SECONDS})
    with pytest.raises(AcquireConcurrencySlotTimeoutError):
        run.send()


@pytest.mark.parametrize("interruption", [KeyboardInterrupt(), asyncio.CancelledError()])
def test_an_interrupted_waiter_cleans_up_in_the_background(interruption: BaseException) -> None:
    run = started(concurrency(), FakeClock())
    lease_id = run.command.params["new_lease_id"]
    run.send(refused(waiter=7))
    # Interrupted while waiting (Ctrl-C, a cancelled task): nothing may wait for the database now.
    assert run.throw(interruption) == Later(q.LEAVE_QUEUE, {"ticket": 7, "queue_client": SESSION, "wait_seconds": BACKGROUND_WAIT_SECONDS})
    assert run.send() == Later(q.RELEASE, {"lease_id": lease_id, "wait_seconds": BACKGROUND_WAIT_SECONDS})
    with pytest.raises(type(interruption)):
        run.send()


def test_a_lost_lease_heard_during_a_call_releases_what_the_call_may_have_granted() -> None:
    """Another lease of this thread was lost as this acquire was on its way: that is no answer of the
    database's, and the lease this attempt named may have been granted."""
    run = started(concurrency(), FakeClock())
    lease_id = run.command.params["new_lease_id"]
    cleanup = run.throw(LeaseRenewalFailedError())
    assert isinstance(cleanup, Call) and cleanup.query is q.RELEASE and params_of(cleanup)["lease_id"] == lease_id
    with pytest.raises(LeaseRenewalFailedError):
        run.send([{"release": True}])


@pytest.mark.parametrize("interruption", [KeyboardInterrupt(), LeaseRenewalFailedError()])
def test_an_interruption_as_the_lease_is_granted_gives_it_back(interruption: BaseException) -> None:
    """Interrupted once the grant was in, before the body began (no body's end will release it)."""
    run = Stepper(flows.concurrency(concurrency(), True, FakeClock()))
    lease_id = run.send(Link(SESSION, listening=True, can_listen=True)).params["new_lease_id"]
    assert isinstance(run.send(granted(lease_id=lease_id)), Hold)
    assert run.throw(interruption) == Drop(lease_id)
    assert run.send() == Later(q.RELEASE, {"lease_id": lease_id, "wait_seconds": BACKGROUND_WAIT_SECONDS})
    with pytest.raises(type(interruption)):
        run.send()


def test_an_interruption_while_the_grant_is_recorded_releases_the_lease() -> None:
    """The attempt's lease stays named until the flow hands it over: an interruption between the
    grant's answer and the hand-over gives it back."""
    state = flows.Attempts(concurrency(), SESSION, listening=True, clock=FakeClock())
    _, params = state.query()
    assert state.record(granted(lease_id=params["new_lease_id"])[0]).lease is not None
    assert state.abandon() == [(q.RELEASE, {"lease_id": params["new_lease_id"], "wait_seconds": BACKGROUND_WAIT_SECONDS})]


def test_a_lost_connection_releases_the_lost_attempt_then_retries_with_back_off() -> None:
    clock = FakeClock()
    run = started(concurrency(timeout_seconds=30.0), clock)
    lease_id = run.command.params["new_lease_id"]
    # The attempt may have committed before the connection went: release its lease first.
    undo = run.throw(DatabaseUnavailableError("server closed the connection"))
    assert undo == Later(q.RELEASE, {"lease_id": lease_id, "wait_seconds": BACKGROUND_WAIT_SECONDS})
    pause = run.send()
    assert isinstance(pause, Sleep) and 0 < pause.seconds <= 1.0
    clock.t += pause.seconds
    again = params_of(run.send())["new_lease_id"]
    assert again != lease_id  # a new name: the old one is gone
    run.send(granted(lease_id=again))
    assert run.done and run.result.lease_id == again


def test_a_busy_database_is_never_an_outage_and_ends_at_the_timeout() -> None:
    clock = FakeClock()
    run = started(concurrency(timeout_seconds=2.0), clock)
    busy = DatabaseUnavailableError("no pooled connection free", pool_exhausted=True, answered=True)
    pause = run.throw(busy)
    assert isinstance(pause, Sleep)  # no lease to undo: a busy pool never ran the statement
    clock.t += 2.0
    with pytest.raises(AcquireConcurrencySlotTimeoutError):
        run.send()


def test_an_unreachable_database_fails_open_after_the_configured_outage() -> None:
    clock = FakeClock()
    run = Stepper(flows.acquire(concurrency(), clock, fail_open_after=5.0))
    assert isinstance(run.command, Connect)
    while not run.done:
        step = run.throw(DatabaseUnavailableError("connection refused"))
        if isinstance(step, Sleep):
            assert step.seconds <= 5.0
            clock.t += step.seconds
            assert isinstance(run.send(), Connect)
    lease: Lease = run.result
    assert lease.failed_open and lease.lease_id is None and clock.t - 1000.0 == pytest.approx(5.0)


def test_an_error_the_database_answered_is_raised_as_is() -> None:
    run = started(concurrency(), FakeClock())
    with pytest.raises(PgSlotsError, match="said no"):  # rolled back: nothing in flight to undo
        run.throw(PgSlotsError("the database said no"))


def test_max_retries_counts_refusals_and_spaces_them_by_the_hint() -> None:
    run = started(concurrency(max_retries=1), FakeClock())
    assert run.send(refused(retry_after=0.2, waiter=None)) == Sleep(0.2)
    run.send()
    with pytest.raises(ConcurrencySlotAcquisitionError, match="after 2 attempts"):
        run.send(refused(retry_after=0.2, waiter=None))


def test_in_a_transaction_a_refusal_rolls_back_to_its_savepoint_and_polls() -> None:
    run = Stepper(flows.acquire_in_transaction(concurrency(), FakeClock()))
    assert run.command == Call(q.SAVEPOINT, in_transaction=True)
    attempt = run.send()
    assert attempt.in_transaction and attempt.params["session"] is None
    assert run.send(refused(retry_after=5.0, waiter=None)) == Call(q.ROLLBACK_TO_SAVEPOINT, in_transaction=True)
    assert run.send() == Sleep(flows.POLL_SECONDS)
    run.send()
    run.send()
    assert run.send(granted()) == Call(q.RELEASE_SAVEPOINT, in_transaction=True)
    run.send()
    assert run.done and run.result.fencing_token == 11


def test_giving_up_while_queued_releases_the_lease_a_release_may_hand_over() -> None:
    """However an attempt ends while its ticket is queued (the deadline passing before the next
    call, or the database refusing that call), the clean-up names the lease a release could hand
    that ticket, as well as the ticket."""
    request = concurrency()
    for error in (flows.timeout_error(1), PgSlotsError("the database said no")):
        state = flows.Attempts(request, SESSION, listening=True, clock=FakeClock())
        _, params = state.query()
        state.record(refused(waiter=7)[0])
        assert state.failed(error).error is error
        assert state.abandon() == [
            (q.LEAVE_QUEUE, {"ticket": 7, "queue_client": SESSION}),
            (q.RELEASE, {"lease_id": params["new_lease_id"], "wait_seconds": BACKGROUND_WAIT_SECONDS}),
        ]
