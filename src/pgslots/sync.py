"""Blocking API: ``concurrency()`` and ``rate_limit()``, with the signatures of
``prefect.concurrency.sync``, and ``reserve()`` for costs known only afterwards.

::

    from pgslots.sync import concurrency, rate_limit, reserve

    with concurrency("database", occupy=2, timeout_seconds=30):
        ...                                   # at most `limit` slots are in use, on every machine

    rate_limit("external-api")                # returns once a slot is free; slots decay

    with reserve("llm-tokens", occupy=2000) as r:   # an estimate now...
        r.settle(call_the_model().usage.total_tokens)  # ...the actual cost afterwards

This module is the blocking driver of the flows in ``_flow``: it runs the commands they yield
with blocking calls, and holds no waiting logic of its own.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from types import TracebackType
from typing import Any, TypeVar

import psycopg

from . import _flow as flows
from ._batching import batchable, thread_batcher
from ._connections import Connections
from ._engine import allow_interruptions, defer_interruptions, deferred_interruption, interrupt_later, interrupt_thread
from ._faces import CLOCK, ConcurrencyArguments, on_lease_lost
from ._flow import Call, Connect, Drop, Flow, Grant, Hold, Later, Listen, Request, Sleep, Wait
from ._observe import Holding, observe
from .client import Client, connections_of, default_client
from .errors import LeaseRenewalFailedError
from .types import Lease, ReservationBase

T = TypeVar("T")


def run(db: Connections, flow: Flow[T], connection: psycopg.Connection[Any] | None = None) -> T:
    """Runs a flow to its end: each command it yields is carried out here, and its result (or the
    exception it raised) goes back into the flow. An interruption the flow could not hear (it
    came with its last command) is raised into this thread again, to reach the body it was meant for."""
    done = _run(db, flow, connection)
    me = threading.get_ident()
    if deferred_interruption(me):
        interrupt_later(me)
    return done


def _run(db: Connections, flow: Flow[T], connection: psycopg.Connection[Any] | None = None) -> T:
    me = threading.get_ident()
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            command = flow.send(reply) if error is None else flow.throw(error)
            reply, error = None, None
            if deferred_interruption(me):
                # Interrupted while its last command was carried out: the flow has its outcome now,
                # and hears the interruption instead of running its next command.
                raise LeaseRenewalFailedError()
            # A lost lease's interruption waits while a command is carried out (a call on its way,
            # a lease being held), so that the flow hears it with that command's outcome known;
            # waits and sleeps, which change nothing, are interrupted at once (see
            # _engine.interrupt_thread).
            deferring = not isinstance(command, (Wait, Sleep))
            try:
                if deferring:
                    defer_interruptions(me)
                reply = _perform(db, command, connection)
            finally:
                if deferring:
                    allow_interruptions(me)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        except BaseException as exc:
            if inspect.getgeneratorstate(flow) != inspect.GEN_SUSPENDED:
                raise  # the flow ended with it
            # The command failed, or an interruption was raised into this thread after the flow had
            # yielded it: the flow hears it instead of the command's reply, and cleans up.
            reply, error = None, exc


def _perform(db: Connections, command: flows.Command, connection: psycopg.Connection[Any] | None) -> Any:
    # The commands of an uncontended acquire and release come first.
    if isinstance(command, Call):
        if command.in_transaction:
            assert connection is not None
            return db.call_on(connection, command.query, command.params)
        if batchable(command.query):
            return thread_batcher(db).call(command.query, command.params or {}, command.timeout)
        return db.call(command.query, command.params, timeout=command.timeout)
    if isinstance(command, Connect):
        db.pool()
        return db.engine.link()
    if isinstance(command, Hold):
        lost = on_lease_lost(command.raise_on_failure, interrupt_thread(threading.get_ident()))
        db.engine.hold(command.lease, lost)
    elif isinstance(command, Drop):
        db.engine.drop(command.lease_id)
    elif isinstance(command, Wait):
        return _wait(db, command.ticket, command.seconds)
    elif isinstance(command, Sleep):
        time.sleep(command.seconds)
    elif isinstance(command, Listen):
        return db.engine.ensure_listening(command.timeout)
    elif isinstance(command, Later):
        db.engine.later(command.query, command.params)
    return None


def _wait(db: Connections, ticket: int, seconds: float) -> Grant | None:
    """Sleeps until the engine wakes the ticket or `seconds` pass; returns the lease if a release
    handed one over."""
    woken = threading.Event()
    grants: list[Grant] = []

    def wake(grant: Grant | None) -> None:  # called from the engine's thread
        if grant is not None:
            grants.append(grant)
        woken.set()

    db.engine.register(ticket, wake)
    try:
        woken.wait(seconds)
    finally:
        db.engine.unregister(ticket)
    return grants[0] if grants else None


class concurrency(ConcurrencyArguments, contextlib.ContextDecorator):  # noqa: N801 - named like the function it replaces
    """Holds ``occupy`` slots on every named limit while the block (or decorated function) runs.

    Waits until the slots are free (by ``priority``, -100..100, higher first; then round-robin
    across ``fairness_key`` values such as tenant ids; then first come), ``timeout_seconds`` passes
    (``AcquireConcurrencySlotTimeoutError``) or ``max_retries`` refusals happened
    (``ConcurrencySlotAcquisitionError``). The lease is renewed in the background every 0.75 x
    ``lease_duration``. Pass ``connection=`` to acquire inside your own transaction, ``client=`` to
    use a database other than the default one.
    """

    def _recreate_cm(self) -> concurrency:
        # Each call of a decorated function gets its own acquire.
        return concurrency(
            *self._args,
            client=self._client,
            connection=self._connection,
            priority=self._priority,
            fairness_key=self._fairness_key,
            fail_open=self._fail_open,
        )

    def __enter__(self) -> Lease | None:
        if self._request is None:
            return None
        db = connections_of(self._client)
        if self._connection is not None:
            flow = flows.acquire_in_transaction(self._request, CLOCK)
        else:
            fail_open_after = (self._client or default_client())._fail_open_after(self._request.fail_open)
            flow = flows.concurrency(self._request, self._raise_on_failure, CLOCK, fail_open_after, db.ready_link())
        try:
            with observe("acquire", self._request.names, self._request.slots) as seen:
                self._lease = _run(db, flow, self._connection)
                seen.granted(self._lease)
            self._holding = Holding(self._lease)
            if deferred_interruption(threading.get_ident()):
                raise LeaseRenewalFailedError()  # came with the grant: heard here, before the body begins
        except BaseException:
            # Interrupted once granted, before the body began: no __exit__ will release the lease.
            lease, self._lease = self._lease, None
            if lease is not None and self._connection is None:
                run(db, flows.let_go(lease))
            raise
        return self._lease

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            self._holding.end(exc)
            with observe("release", lease.names, lease.slots, lease_id=lease.lease_id):
                run(connections_of(self._client), flows.release(lease, in_transaction=self._connection is not None), self._connection)


def _rate_slots(request: Request | None, client: Client | None, connection: psycopg.Connection[Any] | None) -> Lease | None:
    if request is None:
        return None
    with observe("reserve" if request.reserve else "rate_limit", request.names, request.slots) as seen:
        if connection is not None:
            lease = run(connections_of(client), flows.acquire_in_transaction(request, CLOCK), connection)
        else:
            fail_open_after = (client or default_client())._fail_open_after(request.fail_open)
            lease = run(connections_of(client), flows.acquire(request, CLOCK, fail_open_after))
        seen.granted(lease)
    return lease


def rate_limit(
    names: str | list[str] | None,
    occupy: int = 1,
    timeout_seconds: float | None = None,
    strict: bool = False,
    *,
    client: Client | None = None,
    connection: psycopg.Connection[Any] | None = None,
    priority: int = 0,
    fairness_key: str | None = None,
    fail_open: bool | None = None,
) -> None:
    """Occupies ``occupy`` slots that are never released; blocks until they fit.

    The named limits need ``slot_decay_per_second`` > 0 (the slots decay) or ``window_seconds`` > 0
    (they count in the window). A refused call sleeps exactly as long as the database says it takes
    for enough slots to decay or leave the window. Waiters are served by ``priority`` (-100..100,
    higher first), then round-robin across ``fairness_key`` values, then first come. With
    ``connection=``, the slots are taken inside your transaction: a rollback gives them back (and
    the limits' rows stay locked until it ends). ``fail_open``: see :func:`pgslots.configure`.
    """
    request = Request.for_rate_limit(
        names,
        slots=occupy,
        timeout_seconds=timeout_seconds,
        strict=strict,
        priority=priority,
        fairness_key=fairness_key,
        fail_open=fail_open,
    )
    _rate_slots(request, client, connection)


class Reservation(ReservationBase):
    """A granted :func:`reserve`: settle it with the actual cost. Also a context manager; leaving
    the block without settling keeps the estimate as the cost."""

    def __init__(self, lease: Lease | None, names: tuple[str, ...], slots: int, client: Client | None, connection: Any) -> None:
        super().__init__(lease, names, slots)
        self._client = client
        self._connection = connection

    def settle(self, actual: float) -> bool:
        """Makes ``actual`` (a number >= 0) the final cost: a refund when lower than the estimate, a
        debt the limit must work off first when higher. Settling again applies the difference from
        the last value; the same value again changes nothing (returns False). Raises
        ``ReservationError`` once ``reservation_seconds`` (1 hour by default) have passed."""
        with observe("settle", self.names, self.slots, actual=actual, reservation_id=self.reservation_id):
            changed = run(
                connections_of(self._client), flows.settle(self.reservation_id, actual, self._connection is not None), self._connection
            )
        self.actual = float(actual)
        return changed

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        return None


def reserve(
    names: str | list[str] | None,
    occupy: int = 1,
    timeout_seconds: float | None = None,
    strict: bool = False,
    *,
    client: Client | None = None,
    connection: psycopg.Connection[Any] | None = None,
    priority: int = 0,
    fairness_key: str | None = None,
    fail_open: bool | None = None,
) -> Reservation:
    """Like :func:`rate_limit`, for a cost known only afterwards (tokens of an LLM call, points of
    a GraphQL query): occupies the estimate ``occupy`` now and returns a :class:`Reservation` to
    settle with the actual cost.

    ::

        with reserve("openai-tokens", occupy=estimate) as r:
            reply = client.chat(...)
            r.settle(reply.usage.total_tokens)
    """
    request = Request.for_rate_limit(
        names,
        slots=occupy,
        timeout_seconds=timeout_seconds,
        strict=strict,
        priority=priority,
        fairness_key=fairness_key,
        fail_open=fail_open,
        reserve=True,
    )
    lease = _rate_slots(request, client, connection)
    return Reservation(lease, () if request is None else request.names, occupy, client, connection)


__all__ = ["Reservation", "concurrency", "rate_limit", "reserve"]
