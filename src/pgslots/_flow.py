"""The waiting logic, written once: pure flows that the sync and async drivers run.

A flow is a generator. It yields commands (:class:`Connect`, :class:`Call` a query,
:class:`Sleep`, :class:`Wait` for a ticket's wake-up, :class:`Listen`, :class:`Hold` and
:class:`Drop` a lease's renewals, :class:`Later` for background clean-up) and receives their
results; a failed command is thrown into it as a :class:`~pgslots.errors.PgSlotsError` (or the
interruption that stopped it). It imports no database driver, starts no thread, never sleeps and
reads neither the time nor a random number itself: the driver passes a :class:`Clock`. So the same
flow serves ``pgslots.sync`` and ``pgslots.asyncio``, and a test steps it with no database and no
real time. Whether a slot is free is never decided here: that is the SQL's job.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from . import _queries as q
from . import _validate as check
from .errors import (
    AcquireConcurrencySlotTimeoutError,
    ConcurrencySlotAcquisitionError,
    DatabaseUnavailableError,
    InvalidArgumentError,
    LeaseRenewalFailedError,
    LockWaitTimeoutError,
    PgSlotsError,
)
from .types import Lease

logger = logging.getLogger("pgslots")

_HOST = socket.gethostname()
LONGEST_WAIT_SECONDS = 60.0  # even a waiter that is never woken looks again this often
POLL_SECONDS = 1.0  # without LISTEN, the longest pause between attempts
RECONNECT_SECONDS = 30.0  # how long an attempt keeps retrying while the database is unreachable
CLEAN_UP_SECONDS = 1.0  # a clean-up the caller waits for never takes longer; the rest goes to the background
# Each SQL call bounds its waits for locks another session holds (an open transaction, say):
RELEASE_WAIT_SECONDS = 2.0  # a release at the end of a body; past it, the release goes on in the background
BACKGROUND_WAIT_SECONDS = 1.0  # a background call: past it, the engine turns to renewals and comes back later
FIRST_ASK_SECONDS = 1.0  # the first attempt is always made (timeout_seconds=0: try once), given this long to answer


class Clock(Protocol):
    """The time and the chance a flow sees, supplied by its driver."""

    def now(self) -> float:
        """Seconds on a monotonic clock."""

    def jitter(self, low: float, high: float) -> float:
        """A random number from low to high, to spread retries."""


# ---- what a flow asks its driver for ---------------------------------------------------------


@dataclass(frozen=True)
class Connect:
    """Make sure the database answers and the schema is current, before anything is in flight; the
    reply is the :class:`Link` to this process's engine."""


@dataclass(frozen=True)
class Link:
    session: uuid.UUID  # this process's session: its waiters queue under it, its leases live with it
    listening: bool  # wake-ups reach this process now
    can_listen: bool  # they could, once the engine listens


@dataclass(frozen=True)
class Call:
    """Run one statement; the reply is its rows as dicts. ``in_transaction``: on the caller's own
    connection, inside the caller's transaction, instead of a pooled one."""

    query: Any
    params: dict[str, Any] | None = None
    timeout: float | None = None
    in_transaction: bool = False


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Wait:
    """Sleep until the ticket is woken or ``seconds`` pass; the reply is the Grant a release handed
    over, or None."""

    ticket: int
    seconds: float


@dataclass(frozen=True)
class Listen:
    """Make sure wake-ups can reach this process; the reply says whether they can."""

    timeout: float


@dataclass(frozen=True)
class Hold:
    """Renew this lease in the background until dropped; if that fails for good, interrupt the body
    (``raise_on_failure``) or warn."""

    lease: Lease
    raise_on_failure: bool


@dataclass(frozen=True)
class Drop:
    """Stop renewing this lease."""

    lease_id: uuid.UUID


@dataclass(frozen=True)
class Later:
    """Run this statement in the background until the database answers (no reply)."""

    query: Any
    params: dict[str, Any]


Command = Connect | Call | Sleep | Wait | Listen | Hold | Drop | Later
T = TypeVar("T")
Flow = Generator[Command, Any, T]


@dataclass(frozen=True)
class Grant:
    """A lease a release handed to a queued waiter (the waiter named its id when it queued). Only a
    grant that names the waiter's own lease id counts: anyone can send a notification."""

    lease_id: uuid.UUID
    fencing_token: int
    expires_at: datetime
    term_seconds: float  # how long it runs before its first renewal is due, from the database


# ---- requests --------------------------------------------------------------------------------


class NameList(list[str]):
    """Limit names as an acquire sends them: a list that also carries its PostgreSQL text-array
    literal, written once per request (the connections dump it as it is, instead of adapting the
    list on every attempt; anything else that reads it sees a plain list)."""

    __slots__ = ("literal",)

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__(names)
        quoted = ('"' + n.replace("\\", "\\\\").replace('"', '\\"') + '"' for n in names)
        self.literal = ("{" + ",".join(quoted) + "}").encode()


_NAME_LISTS: dict[tuple[str, ...], NameList] = {}  # the names of recent requests, shared (never changed once made)
_DEFAULT_HOLDER: tuple[int, str] = (0, "")


# Lease ids, made from the operating system's random bytes as uuid.uuid4() makes them, but 64 at
# a time: one system call (during which other threads may take the GIL) for 64 acquires instead of
# one each. A forked child drops its parent's unused ones, so that no two processes name a lease
# alike. (list.pop and list.extend are single steps for threads.)
_LEASE_IDS: list[uuid.UUID] = []
_LEASE_IDS_AT_ONCE = 64


def new_lease_id() -> uuid.UUID:
    try:
        return _LEASE_IDS.pop()
    except IndexError:
        random = os.urandom(16 * _LEASE_IDS_AT_ONCE)
        _LEASE_IDS.extend(uuid.UUID(bytes=random[i : i + 16], version=4) for i in range(0, len(random), 16))
        return _LEASE_IDS.pop()


os.register_at_fork(after_in_child=_LEASE_IDS.clear)


def holder_json(extra: dict[str, Any] | None) -> str:
    """Who holds a lease, as JSON text: this host and process, and what the caller added. Without
    additions the text is kept per process: an acquire sends it as it is."""
    global _DEFAULT_HOLDER
    pid = os.getpid()
    if extra:
        return json.dumps({"host": _HOST, "pid": pid, **extra}, allow_nan=False)
    if _DEFAULT_HOLDER[0] != pid:
        _DEFAULT_HOLDER = (pid, json.dumps({"host": _HOST, "pid": pid}))
    return _DEFAULT_HOLDER[1]


@dataclass(frozen=True)
class Request:
    """One call of concurrency(), rate_limit() or reserve(), checked. Build it with
    :meth:`for_concurrency` or :meth:`for_rate_limit`: each checks its arguments (named as the caller named
    them) and answers None when no name was given, as there is nothing to acquire."""

    names: tuple[str, ...]
    slots: int
    timeout_seconds: float | None = None
    max_retries: int | None = None
    lease_seconds: float = 300.0
    strict: bool = False
    holder: dict[str, Any] | None = None
    rate_limit: bool = False  # rate slots (decaying or in a window), never released
    reserve: bool = False  # rate slots whose cost is settled later
    priority: int = 0
    fairness_key: str | None = None
    fail_open: bool | None = None  # None: as the client is configured

    @functools.cached_property
    def name_list(self) -> NameList:
        found = _NAME_LISTS.get(self.names)
        if found is None:
            if len(_NAME_LISTS) >= 1024:
                _NAME_LISTS.clear()
            found = _NAME_LISTS[self.names] = NameList(self.names)
        return found

    @functools.cached_property
    def holder_json(self) -> str:
        return holder_json(self.holder)

    @classmethod
    def for_concurrency(
        cls,
        names: Any,
        *,
        slots: Any,
        timeout_seconds: Any = None,
        max_retries: Any = None,
        lease_seconds: Any = 300.0,
        strict: bool = False,
        holder: Any = None,
        priority: Any = 0,
        fairness_key: Any = None,
        fail_open: Any = None,
    ) -> Request | None:
        given = (names, slots, timeout_seconds, max_retries, lease_seconds, strict, holder, priority, fairness_key, fail_open)
        return _remembered(
            ("concurrency", *given, *map(type, given)),
            lambda: cls._checked_concurrency(
                names, slots, timeout_seconds, max_retries, lease_seconds, strict, holder, priority, fairness_key, fail_open
            ),
        )

    @classmethod
    def _checked_concurrency(
        cls,
        names: Any,
        slots: Any,
        timeout_seconds: Any,
        max_retries: Any,
        lease_seconds: Any,
        strict: bool,
        holder: Any,
        priority: Any,
        fairness_key: Any,
        fail_open: Any,
    ) -> Request | None:
        wanted = _check_common(names, slots, timeout_seconds, priority, fairness_key, fail_open)
        check.number("max_retries", max_retries, minimum=0, integer=True, allow_none=True)
        check.number("lease_duration", lease_seconds, minimum=0, integer=False)
        checked_holder = check.holder(holder)
        if not wanted:
            return None
        request = cls(
            wanted,
            slots,
            timeout_seconds=timeout_seconds,
            max_retries=max_retries,
            lease_seconds=float(lease_seconds),
            strict=strict,
            holder=checked_holder,
            priority=priority,
            fairness_key=fairness_key,
            fail_open=fail_open,
        )
        if checked_holder:
            try:
                request.holder_json  # noqa: B018 - written now, so that a holder JSON cannot carry is refused before any call
            except (TypeError, ValueError) as exc:
                raise InvalidArgumentError(
                    f"holder must hold only what JSON can (strings, finite numbers, booleans, None, lists and dicts):"
                    f" {exc} in {checked_holder!r:.200}."
                ) from None
        return request

    @classmethod
    def for_rate_limit(
        cls,
        names: Any,
        *,
        slots: Any,
        timeout_seconds: Any = None,
        strict: bool = False,
        priority: Any = 0,
        fairness_key: Any = None,
        fail_open: Any = None,
        reserve: bool = False,
    ) -> Request | None:
        given = (names, slots, timeout_seconds, strict, priority, fairness_key, fail_open, reserve)
        return _remembered(
            ("rate_limit", *given, *map(type, given)),
            lambda: cls._checked_rate_limit(names, slots, timeout_seconds, strict, priority, fairness_key, fail_open, reserve),
        )

    @classmethod
    def _checked_rate_limit(
        cls, names: Any, slots: Any, timeout_seconds: Any, strict: bool, priority: Any, fairness_key: Any, fail_open: Any, reserve: bool
    ) -> Request | None:
        wanted = _check_common(names, slots, timeout_seconds, priority, fairness_key, fail_open)
        if not wanted:
            return None
        return cls(
            wanted,
            slots,
            timeout_seconds=timeout_seconds,
            strict=strict,
            rate_limit=True,
            reserve=reserve,
            priority=priority,
            fairness_key=fairness_key,
            fail_open=fail_open,
        )


# Checked requests by their arguments: a program asks with the same ones again and again, and
# checking them and making a Request is a good part of a call's own cost. Keyed with the
# arguments' types too (True == 1 and 1.0 == 1, and the checks refuse one and take the other); a
# request with a list of names or a holder dict (neither can be a key) is checked each time. Only
# requests that passed the checks are kept, so that a refused argument is refused every time. A
# forked child starts afresh: a request's holder names its process.
_REQUESTS: dict[tuple[Any, ...], Request | None] = {}
_MAX_REQUESTS = 1024


def _remembered(key: tuple[Any, ...], check_and_make: Callable[[], Request | None]) -> Request | None:
    try:
        return _REQUESTS[key]
    except KeyError:
        keep = True
    except TypeError:
        keep = False
    found = check_and_make()  # out of the except blocks: a refusal is raised without a KeyError as its context
    if keep:
        if len(_REQUESTS) >= _MAX_REQUESTS:
            _REQUESTS.clear()
        _REQUESTS[key] = found
    return found


os.register_at_fork(after_in_child=_REQUESTS.clear)


def _check_common(names: Any, slots: Any, timeout_seconds: Any, priority: Any, fairness_key: Any, fail_open: Any) -> tuple[str, ...]:
    wanted = check.names(names)
    check.no_nul(wanted)
    check.queue_args(priority, fairness_key)
    check.optional_flag("fail_open", fail_open)
    check.number("occupy", slots, minimum=1, integer=True)
    check.number("timeout_seconds", timeout_seconds, minimum=0, integer=False, allow_none=True)
    return wanted


def list_literal(names: tuple[str, ...] | list[str]) -> str:
    return repr(list(names))


def timeout_error(timeout_seconds: float | None, retry_after: float | None = None) -> AcquireConcurrencySlotTimeoutError:
    return AcquireConcurrencySlotTimeoutError(
        f"Attempt to acquire concurrency slots timed out after {timeout_seconds} second(s)", retry_after=retry_after
    )


# ---- one acquire across its attempts ---------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What one attempt's row says: the lease when granted, else the longest pause before the next."""

    lease: Lease | None = None
    wait: float = 0.0


@dataclass(frozen=True)
class Recovery:
    """What to do after a failed attempt; exactly one field is set."""

    error: BaseException | None = None  # raise it
    pause: float | None = None  # try again after this many seconds
    undo: Later | None = None  # first release what the lost attempt may have won, then decide again
    lease: Lease | None = None  # the database stayed unreachable: fail open with this lease


@dataclass
class Attempts:
    """The state of one acquire or rate limit call across its attempts."""

    request: Request
    session: uuid.UUID | None
    listening: bool
    clock: Clock
    started: float = 0.0
    attempts: int = 0
    ticket: int | None = None
    pending_lease: uuid.UUID | None = None
    warned: bool = False
    outage_since: float | None = None
    # Since when the database has not answered at all (only that may fail open).
    unreachable_since: float | None = None
    outage_retries: int = 0
    missing: tuple[str, ...] = ()
    liveness_seconds: float | None = None
    # Fail open once the database has been unreachable this long (None: never).
    fail_open_after: float | None = None
    call_started: float | None = None
    # Whether an attempt has been sent (the first one is, whatever the timeout), and the database's
    # last estimate of the seconds until the request could be granted (None: it gave none).
    asked: bool = False
    hint: float | None = None

    def __post_init__(self) -> None:
        self.started = self.clock.now()

    @property
    def deadline(self) -> float | None:
        t = self.request.timeout_seconds
        return None if t is None else self.started + t

    def remaining(self) -> float | None:
        """Seconds left before the timeout (None: no timeout); raises once it has passed."""
        deadline = self.deadline
        if deadline is None:
            return None
        left = deadline - self.clock.now()
        if left <= 0:
            if not self.asked:
                return FIRST_ASK_SECONDS
            raise timeout_error(self.request.timeout_seconds, self.hint)
        return left

    def query(self) -> tuple[Any, dict[str, Any]]:
        """The statement and parameters of the next attempt."""
        r = self.request
        params: dict[str, Any] = {
            "names": r.name_list,
            "slots": r.slots,
            "strict": r.strict,
            "ticket": self.ticket,
            "queue_client": self.session,
            # A lock held elsewhere may delay the call only as long as the caller would wait anyway.
            "wait_seconds": self.remaining(),
            "priority": r.priority,
            "fairness_key": r.fairness_key,
        }
        if r.rate_limit:
            return (q.RESERVE if r.reserve else q.RATE_LIMIT), params
        if self.pending_lease is None:
            # Named up front, and kept while queued: a release may grant it to us directly.
            self.pending_lease = new_lease_id()
        # The lease lives as long as this process's session (its engine keeps it alive), or until it
        # expires; in the caller's own transaction (no session) only until it expires.
        params.update(lease_seconds=r.lease_seconds, holder=r.holder_json, new_lease_id=self.pending_lease, session=self.session)
        return q.ACQUIRE, params

    def record(self, row: dict[str, Any]) -> Answer:
        """Digests one attempt's row."""
        self.attempts += 1
        self.asked = True
        r = self.request
        if row["missing"] and not self.warned:
            self.warned = True
            logger.warning("Concurrency limits %s do not exist - skipping acquisition.", list_literal(row["missing"]))
        self.ticket = row["waiter"]
        self.missing = tuple(row["missing"] or ())
        self.liveness_seconds = row.get("liveness_seconds")
        if row["granted"]:
            # pending_lease stays: until the flow has handed the lease over, an interruption gives it
            # back (abandon).
            self.ticket = None
            return Answer(
                lease=Lease(
                    lease_id=row.get("lease_id"),
                    fencing_token=row.get("fencing_token"),
                    expires_at=row.get("expires_at"),
                    names=r.names,
                    slots=r.slots,
                    lease_seconds=r.lease_seconds,
                    missing=self.missing,
                    liveness_seconds=self.liveness_seconds,
                    reservation_id=row.get("reservation_id"),
                )
            )
        if self.ticket is None:
            self.pending_lease = None  # not queued: nothing can grant it
        # No limit blocked it (the database saw room appear as it looked): not a refusal to count.
        if r.max_retries is not None and self.attempts > r.max_retries and row["blocked_by"]:
            raise ConcurrencySlotAcquisitionError(
                f"Unable to acquire concurrency slots on {list_literal(r.names)}: still full "
                f"({', '.join(row['blocked_by'] or [])}) after {self.attempts} attempts (max_retries={r.max_retries})"
            )
        self.hint = None if row["retry_after"] is None else float(row["retry_after"])
        hint = 0.1 if self.hint is None else self.hint
        if r.rate_limit:
            wait = hint  # exact: the time until enough slots have decayed
        elif r.max_retries is not None:
            wait = hint  # retries are counted: space them by the database's estimate
        elif self.listening and self.ticket is not None:
            # A release notifies us and the engine's heartbeat is the backstop; the cap is a last resort.
            wait = LONGEST_WAIT_SECONDS * self.clock.jitter(0.8, 1.0)
        else:
            # Nothing will notify us (no LISTEN connection, e.g. PgBouncer, or not queued): poll at the
            # hint, which is 0 when the database saw room appear as it looked.
            wait = min(hint, POLL_SECONDS)
        remaining = self.remaining()
        return Answer(wait=wait if remaining is None else min(wait, remaining))

    def handed(self, grant: Grant) -> Lease | None:
        """The lease a release granted to our queued ticket, if the grant names the lease we named
        (pending_lease); None for any other (a forged or misrouted notification): ask again."""
        if self.pending_lease is None or grant.lease_id != self.pending_lease:
            logger.debug("pgslots: ignoring a hand-off for lease %s: this waiter named %s", grant.lease_id, self.pending_lease)
            return None
        r = self.request
        lease_id, self.ticket = self.pending_lease, None  # pending_lease stays, as after a grant (see record)
        return Lease(
            lease_id,
            grant.fencing_token,
            grant.expires_at,
            r.names,
            r.slots,
            r.lease_seconds,
            self.missing,
            grant.term_seconds,
            self.liveness_seconds,
        )

    def abandon(self) -> list[tuple[Any, dict[str, Any]]]:
        """After a timeout or an interruption, the calls that undo what is in flight: leave the queue,
        then release a grant that may have raced with us (in that order, so that no release can
        hand us the lease after we let it go)."""
        steps: list[tuple[Any, dict[str, Any]]] = []
        if self.ticket is not None and self.session is not None:
            steps.append((q.LEAVE_QUEUE, {"ticket": self.ticket, "queue_client": self.session}))
        if self.pending_lease is not None:
            steps.append((q.RELEASE, release_params(self.pending_lease)))
        self.ticket = self.pending_lease = None
        return steps

    def failed_open(self) -> Lease:
        """The database has been unreachable for fail_open_after seconds: the body runs without a slot."""
        r = self.request
        logger.warning(
            "pgslots: the database has been unreachable for %.1f s: failing open, running without a slot on %s "
            "(fail_open is on; nothing limits this body).",
            self.clock.now() - (self.unreachable_since or self.started),
            list_literal(r.names),
        )
        return Lease(None, None, None, r.names, r.slots, r.lease_seconds, failed_open=True)

    def failed(self, exc: PgSlotsError) -> Recovery:
        """After a failed attempt: the error to raise, the seconds to pause before trying again, or
        first a background release of the lease the attempt may have been granted.

        The database answering with an error means the attempt rolled back: raise it. A lost
        connection (a restart, a failover, a terminated backend) is retried with back-off for up to
        RECONNECT_SECONDS, within the caller's timeout; the attempt may have committed before the
        connection went, so its lease is released in the background. With fail_open, an outage of
        fail_open_after seconds ends in a Lease that holds nothing (see failed_open)."""
        self.asked = True
        if not isinstance(exc, DatabaseUnavailableError):
            if self.ticket is None:
                self.pending_lease = None  # rolled back; while queued, a release may still hand it over
            if isinstance(exc, LockWaitTimeoutError) and self.deadline is not None:
                return Recovery(error=timeout_error(self.request.timeout_seconds, self.hint))  # blocked up to the deadline
            return Recovery(error=exc)
        now = self.clock.now()
        if (exc.pool_exhausted or exc.answered) and self.deadline is not None and now >= self.deadline:
            return Recovery(error=timeout_error(self.request.timeout_seconds, self.hint))  # the caller's timeout, not an outage
        if exc.answered:
            # Busy, not down: the statement never ran or was rolled back, and nothing fails open.
            if self.ticket is None:
                self.pending_lease = None
        elif self.pending_lease is not None:
            lease, self.pending_lease = self.pending_lease, None
            return Recovery(undo=Later(q.RELEASE, release_params(lease)))
        started = now if self.call_started is None else self.call_started
        if self.outage_since is None:
            self.outage_since = started
        if exc.answered:
            self.unreachable_since = None
        elif self.unreachable_since is None:
            self.unreachable_since = started
        if self.fail_open_after is not None and self.unreachable_since is not None and now - self.unreachable_since >= self.fail_open_after:
            return Recovery(lease=self.failed_open())
        if self.unreachable_since is not None and self.deadline is not None and now >= self.deadline:
            # The caller waits no longer and the database never answered: that is an outage, not a
            # refusal. With fail_open the caller goes through now; without, it learns the cause.
            return Recovery(lease=self.failed_open()) if self.fail_open_after is not None else Recovery(error=exc)
        if now - self.outage_since > RECONNECT_SECONDS:
            return Recovery(error=exc)
        self.outage_retries += 1
        pause: float = min(1.0, 0.05 * 2**self.outage_retries) * self.clock.jitter(0.5, 1.0)
        if self.fail_open_after is not None and self.unreachable_since is not None:
            pause = max(0.0, min(pause, self.unreachable_since + self.fail_open_after - now))
        remaining = self.remaining()
        return Recovery(pause=pause if remaining is None else min(pause, remaining))

    def call_timeout(self) -> float | None:
        """How long the next call may take (waiting for a pooled connection included): the caller's
        timeout, and with fail_open no longer than the outage may still last."""
        self.call_started = self.clock.now()
        timeout = self.remaining()
        if self.fail_open_after is not None:
            since = self.call_started if self.unreachable_since is None else self.unreachable_since
            left = max(0.1, since + self.fail_open_after - self.call_started)
            timeout = left if timeout is None else min(timeout, left)
        return timeout

    def reconnected(self) -> None:
        self.outage_since = self.unreachable_since = None
        self.outage_retries = 0


# ---- the flows -------------------------------------------------------------------------------


def concurrency(
    request: Request, raise_on_failure: bool, clock: Clock, fail_open_after: float | None = None, link: Link | None = None
) -> Flow[Lease]:
    """Acquire slots for a body, and keep their lease renewed until :func:`release`."""
    lease = yield from acquire(request, clock, fail_open_after, link)
    if lease.lease_id is not None:
        try:
            yield Hold(lease, raise_on_failure)
        except GeneratorExit:
            raise
        except BaseException:
            yield from let_go(lease)  # interrupted as it was granted: no body will end to release it
            raise
    return lease


def let_go(lease: Lease) -> Flow[None]:
    """Gives back, in the background, a granted lease whose caller was interrupted before its body
    began (so that no body's end will release it)."""
    if lease.lease_id is not None:
        yield Drop(lease.lease_id)
        yield Later(q.RELEASE, release_params(lease.lease_id))


def connect(request: Request, clock: Clock, fail_open_after: float | None) -> Flow[Link | Lease]:
    """The first step of every flow on pooled connections. With fail_open, a database that cannot
    be reached is tried again until fail_open_after seconds have passed, then the flow fails open
    (the reply is then a Lease that holds nothing)."""
    if fail_open_after is None:
        link: Link = yield Connect()
        return link
    state = Attempts(request, None, listening=False, clock=clock, fail_open_after=fail_open_after)
    while True:
        state.call_started = clock.now()
        try:
            link = yield Connect()
            return link
        except DatabaseUnavailableError as exc:
            then = state.failed(exc)
            if then.lease is not None:
                return then.lease
            if then.error is not None:
                raise then.error from exc.__cause__
            assert then.pause is not None  # nothing was in flight, so nothing to undo
            yield Sleep(then.pause)


def acquire(request: Request, clock: Clock, fail_open_after: float | None = None, link: Link | None = None) -> Flow[Lease]:
    """Acquire (or rate limit) on pooled connections, queued first-come-first-served: ask, then
    wait to be woken (or handed the lease), until granted, timed out or out of retries. ``link``:
    the driver is connected already (see Connect), and the flow starts with its first call."""
    if link is None:
        connected = yield from connect(request, clock, fail_open_after)
        if isinstance(connected, Lease):
            return connected
        link = connected
    state = Attempts(request, link.session, listening=link.listening, clock=clock, fail_open_after=fail_open_after)
    try:
        while True:
            query, params = state.query()
            timeout = state.call_timeout()  # past the deadline: raises here, with nothing in flight
            try:
                rows = yield Call(query, params, timeout)
            except LeaseRenewalFailedError:
                raise  # not the database's answer: another lease of this thread was lost (cleaned up below)
            except PgSlotsError as exc:
                then = state.failed(exc)
                while then.undo is not None:  # first release what the lost attempt may have won
                    yield then.undo
                    then = state.failed(exc)
                if then.lease is not None:
                    return then.lease
                if then.error is not None:
                    raise then.error from exc.__cause__
                yield Sleep(then.pause or 0.0)
                continue
            state.reconnected()
            answer = state.record(rows[0])
            if answer.lease is not None:
                return answer.lease
            if not state.listening and link.can_listen:
                state.listening = yield Listen(min(10.0, state.remaining() or 10.0))
                if state.listening:
                    continue  # wake-ups can reach us now: look once more before sleeping
            if state.ticket is None:
                yield Sleep(answer.wait)
                continue
            grant = yield Wait(state.ticket, answer.wait)
            if grant is not None:
                handed = state.handed(grant)
                if handed is not None:
                    return handed
    except GeneratorExit:
        raise  # closed by its driver, which has given up on it: nothing can be yielded any more
    except BaseException as exc:
        yield from clean_up(state.abandon(), now=isinstance(exc, Exception))
        raise


def acquire_in_transaction(request: Request, clock: Clock) -> Flow[Lease]:
    """Acquire, rate limit or reserve inside the caller's transaction, so that a rollback undoes the
    grant. A refusal is rolled back to a savepoint (freeing the row locks it took) and retried after
    the hint: queueing needs committed rows, so this path polls. A grant keeps the limits' row locks
    until the caller's transaction ends."""
    state = Attempts(request, None, listening=False, clock=clock)
    while True:
        query, params = state.query()
        yield Call(q.SAVEPOINT, in_transaction=True)
        try:
            answer = state.record((yield Call(query, params, in_transaction=True))[0])
        except BaseException as exc:
            yield Call(q.ROLLBACK_TO_SAVEPOINT, in_transaction=True)
            if isinstance(exc, LockWaitTimeoutError) and state.deadline is not None:
                raise timeout_error(request.timeout_seconds, state.hint) from exc
            raise
        if answer.lease is not None:
            yield Call(q.RELEASE_SAVEPOINT, in_transaction=True)
            return answer.lease
        yield Call(q.ROLLBACK_TO_SAVEPOINT, in_transaction=True)  # frees the row locks the refused attempt took
        # A rate limit's hint is exact: sleep it out. An acquire polls (nothing notifies it here).
        yield Sleep(answer.wait if request.rate_limit else min(answer.wait, POLL_SECONDS))


def clean_up(steps: list[tuple[Any, dict[str, Any]]], now: bool) -> Flow[None]:
    """Undoes an abandoned acquire: right away after a timeout or an error, so the caller sees the
    queue and the slots as they should be; in the background after an interruption (Ctrl-C, a
    cancelled task), which must not wait for the database."""
    for query, params in steps:
        if now:
            try:
                yield Call(query, {**params, "wait_seconds": CLEAN_UP_SECONDS}, CLEAN_UP_SECONDS)
                continue
            except PgSlotsError:
                now = False
        yield Later(query, {**params, "wait_seconds": BACKGROUND_WAIT_SECONDS})


def release(lease: Lease, in_transaction: bool) -> Flow[None]:
    """Gives a lease's slots back at the end of the body. If that cannot be done now (the database
    is away, or the caller was interrupted) the release goes on in the background: the slots must
    come back all the same."""
    if lease.lease_id is None:
        return
    if in_transaction:
        with contextlib.suppress(PgSlotsError):  # the caller's transaction decides: a rollback takes the lease
            yield Call(q.RELEASE, {"lease_id": lease.lease_id, "wait_seconds": None}, in_transaction=True)
        return
    yield Drop(lease.lease_id)
    try:
        yield Call(q.RELEASE_FAST, release_params(lease.lease_id, RELEASE_WAIT_SECONDS), RELEASE_WAIT_SECONDS)
    except BaseException as error:
        yield Later(q.RELEASE, release_params(lease.lease_id))
        if not isinstance(error, PgSlotsError):
            raise
        logger.warning("Could not release lease %s now (%s); retrying in the background.", lease.lease_id, error)


def settle(reservation_id: uuid.UUID | None, actual: float, in_transaction: bool) -> Flow[bool]:
    """Makes ``actual`` the final cost of a reservation; True when that changed its cost. A
    reservation granted by failing open has nothing to settle."""
    check.number("actual", actual, minimum=0, integer=False)
    if reservation_id is None:
        return False
    params = {"reservation_id": reservation_id, "actual": float(actual), "wait_seconds": None if in_transaction else RELEASE_WAIT_SECONDS}
    rows = yield Call(q.SETTLE, params, None if in_transaction else RELEASE_WAIT_SECONDS, in_transaction=in_transaction)
    return bool(rows[0]["changed"])


def release_params(lease_id: uuid.UUID, wait_seconds: float = BACKGROUND_WAIT_SECONDS) -> dict[str, Any]:
    return {"lease_id": lease_id, "wait_seconds": wait_seconds}
