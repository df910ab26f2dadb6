"""Blocking API: ``concurrency()`` and ``rate_limit()``, with the signatures of
``prefect.concurrency.sync``.

::

    from pgslots.sync import concurrency, rate_limit

    with concurrency("database", occupy=2, timeout_seconds=30):
        ...                                   # at most `limit` slots are in use, on every machine

    rate_limit("external-api")                # returns once a slot is free; slots decay
"""

from __future__ import annotations

import contextlib
import threading
import time
from types import TracebackType
from typing import Any

import psycopg

from . import _queries as q
from ._core import POLL_SECONDS, Attempts, ConcurrencyBase, Lease, Request, make_request, on_lease_lost
from ._engine import Engine, Grant, interrupt_thread
from .client import Client, default_client
from .errors import InvalidArgumentError, PgSlotsError


def _wait(engine: Engine, ticket: int | None, seconds: float) -> Grant | None:
    """Sleeps until woken or `seconds` pass; returns the lease if a release handed one over."""
    if ticket is None:
        time.sleep(seconds)
        return None
    woken = threading.Event()
    grants: list[Grant] = []

    def wake(grant: Grant | None) -> None:  # called from the engine's thread
        if grant is not None:
            grants.append(grant)
        woken.set()

    engine.register(ticket, wake)
    try:
        woken.wait(seconds)
    finally:
        engine.unregister(ticket)
    return grants[0] if grants else None


def _acquire(client: Client, request: Request) -> tuple[Lease, float | None]:
    """The lease, and its first term when shorter than lease_seconds (handed over by a release)."""
    client.pool()  # connection and schema problems surface here, before anything is in flight
    engine = client.engine
    state = Attempts(request, engine.client_id, listening=engine.listening)
    try:
        while True:
            query, params = state.query()
            timeout = state.remaining()  # past the deadline: raises here, with nothing in flight
            try:
                row = client.call(query, params, timeout=timeout)[0]
            except PgSlotsError as exc:
                retry = state.failed(exc, engine)
                if isinstance(retry, BaseException):
                    raise retry from exc.__cause__
                time.sleep(retry)
                continue
            state.reconnected()
            outcome = state.record(row)
            if isinstance(outcome, Lease):
                return outcome, None
            if not state.listening and engine.listen:
                state.listening = engine.ensure_listening(min(10.0, state.remaining() or 10.0))
                if state.listening:
                    continue  # wake-ups can reach us now: look once more before sleeping
            grant = _wait(engine, state.ticket, outcome)
            if grant is not None:
                return state.handed(grant), grant.term_seconds
    except BaseException as exc:
        _clean_up(client, state.abandon(), now=isinstance(exc, Exception))
        raise


def _clean_up(client: Client, steps: list[tuple[Any, dict[str, Any]]], now: bool) -> None:
    """Undoes an abandoned acquire: right away after a timeout or an error, so the caller sees the
    queue and the slots as they should be; in the background after an interruption (Ctrl-C)."""
    for query, params in steps:
        if now:
            try:
                client.call(query, params, timeout=1)  # never long: the caller is waiting for its error
                continue
            except PgSlotsError:
                now = False
        client.engine.later(query, params)


def _acquire_in_transaction(client: Client, request: Request, conn: psycopg.Connection[Any]) -> Lease:
    """Acquire inside the caller's transaction. A refusal is rolled back to a savepoint (freeing the
    row locks it took) and retried after the hint: queueing needs committed rows, so this path polls."""
    if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        raise InvalidArgumentError(
            "connection= acquires inside your transaction, but this connection is in autocommit mode "
            "outside a transaction: open one (with conn.transaction(): ...) or leave out connection=."
        )
    state = Attempts(request, None, listening=False)
    while True:
        query, params = state.query()
        client.call_on(conn, q.SAVEPOINT)
        try:
            outcome = state.record(client.call_on(conn, query, params)[0])
        except BaseException:
            client.call_on(conn, q.ROLLBACK_TO_SAVEPOINT)
            raise
        if isinstance(outcome, Lease):
            client.call_on(conn, q.RELEASE_SAVEPOINT)
            return outcome
        client.call_on(conn, q.ROLLBACK_TO_SAVEPOINT)  # frees the row locks the refused attempt took
        time.sleep(min(outcome, POLL_SECONDS))


class concurrency(ConcurrencyBase, contextlib.ContextDecorator):  # noqa: N801 - named like the function it replaces
    """Holds ``occupy`` slots on every named limit while the block (or decorated function) runs.

    Waits first-come-first-served until the slots are free, ``timeout_seconds`` passes
    (``AcquireConcurrencySlotTimeoutError``) or ``max_retries`` refusals happened
    (``ConcurrencySlotAcquisitionError``). The lease is renewed in the background every 0.75 x
    ``lease_duration``. Pass ``connection=`` to acquire inside your own transaction, ``client=`` to
    use a database other than the default one.
    """

    def _recreate_cm(self) -> concurrency:
        # Each call of a decorated function gets its own acquire.
        return concurrency(*self._args, client=self._client, connection=self._connection)

    def __enter__(self) -> Lease | None:
        if self._request is None:
            return None
        client = self._client or default_client()
        if self._connection is not None:
            self._lease = _acquire_in_transaction(client, self._request, self._connection)
            return self._lease
        self._lease, first_term = _acquire(client, self._request)
        if self._lease.lease_id is not None:
            lost = on_lease_lost(self._raise_on_failure, interrupt_thread(threading.get_ident()))
            client.engine.hold(self._lease.lease_id, self._lease.lease_seconds, lost, first_term)
        return self._lease

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        lease, self._lease = self._lease, None
        if lease is None or lease.lease_id is None:
            return
        client = self._client or default_client()
        if self._connection is not None:
            with contextlib.suppress(PgSlotsError, psycopg.Error):
                client.call_on(self._connection, q.RELEASE, {"lease_id": lease.lease_id})
            return
        client.engine.drop(lease.lease_id)
        try:
            client.call(q.RELEASE_FAST, {"lease_id": lease.lease_id})
        except BaseException as error:
            self.release_failed(client.engine, lease.lease_id, error)


def rate_limit(
    names: str | list[str] | None,
    occupy: int = 1,
    timeout_seconds: float | None = None,
    strict: bool = False,
    *,
    client: Client | None = None,
) -> None:
    """Occupies ``occupy`` slots that decay (never released); blocks until they fit.

    The named limits need ``slot_decay_per_second`` > 0. A refused call sleeps exactly as long as
    the database says it takes for enough slots to decay, first-come-first-served.
    """
    request = make_request(names, occupy, timeout_seconds, None, 300, strict, None, rate_limit=True)
    if request is None:
        return
    _acquire(client or default_client(), request)


__all__ = ["concurrency", "rate_limit"]
