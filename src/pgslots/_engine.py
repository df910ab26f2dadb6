"""The per-client background worker: one thread and one connection serve every waiter and lease.

It LISTENs on its own channel (``pgslots:<client id>``) and wakes the waiters whose tickets a
notification names, handing over the lease when the notification says a release granted it to
them; it heartbeats this client's queued waiters (one call for all of them), which also returns the
tickets that should ask again: the backstop for lost notifications; it renews leases at 0.75 x
their term; and it releases leases and leaves queues on behalf of callers that were interrupted.
Being a thread, it keeps renewing while an event loop is blocked by CPU-bound code.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import heapq
import itertools
import logging
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from . import _queries as q
from ._flow import BACKGROUND_WAIT_SECONDS, Grant, Lease, release_params
from ._translate import translate
from .errors import LeaseLostError, LeaseRenewalFailedError, PgSlotsError

logger = logging.getLogger("pgslots")

HEARTBEAT_SECONDS = 1.0  # well inside the queue's waiter_ttl_seconds (3 s by default)
RENEW_TRIES = 3
RENEW_BACKOFF = (0.25, 1.0)  # between the tries of one renewal
IDLE_POLL_SECONDS = 0.25  # longest the worker sleeps before looking at new work
EXIT_SECONDS = 5.0  # at interpreter exit, how long pending releases may still take
BLOCKED_RETRY_SECONDS = 1.0  # a background call that found its lock held is tried again after this
# How often the session of a process holding leases says it is alive, and how long before the
# database may take a lease back the process gives it up: at most these, less for a short
# liveness_seconds (a fifth and a third of it).
KEEP_ALIVE_SECONDS = 0.5
SILENCE_MARGIN_SECONDS = 1.0
WATCHDOG_SECONDS = 0.2  # how often the watchdog looks at the time since the last keep-alive
# The worker's connection gives up on a server that does not answer, unless the DSN says otherwise.
CONNECTION_TIMEOUTS = {"connect_timeout": 5, "tcp_user_timeout": 5000}


def connection_timeouts(dsn: str) -> dict[str, int]:
    """The CONNECTION_TIMEOUTS a DSN does not set itself."""
    given = psycopg.conninfo.conninfo_to_dict(dsn)
    return {k: v for k, v in CONNECTION_TIMEOUTS.items() if k not in given}


_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _finish_at_exit() -> None:
    """A release that could not be done when its body ended (the database was away, or busy) is
    retried in the background; before the interpreter exits, it gets a last bounded chance, so a
    clean exit leaves no slot held."""
    deadline = time.monotonic() + EXIT_SECONDS
    for engine in list(_engines):
        engine.finish(deadline)


Waker = Callable[[Grant | None], None]


def parse_notification(payload: str) -> list[tuple[int, Grant | None]]:
    """``12,13:<lease uuid>:77:1700000000.5:6`` -> [(12, None), (13, Grant(<lease uuid>, 77, ..., 6.0))];
    the format is described in sql/functions/40_queue.sql. Whether a grant is ours is decided by the
    waiter, which alone knows the lease id it named."""
    woken: list[tuple[int, Grant | None]] = []
    for entry in payload.split(","):
        parts = entry.split(":")
        try:
            if len(parts) == 5:
                expires = datetime.fromtimestamp(float(parts[3]), UTC)
                woken.append((int(parts[0]), Grant(uuid.UUID(parts[1]), int(parts[2]), expires, float(parts[4]))))
            elif parts[0]:
                woken.append((int(parts[0]), None))
        except (ValueError, OverflowError):
            logger.debug("pgslots: ignoring a notification entry it cannot read: %r", entry)
    return woken


@dataclass(order=True)
class _Renewal:
    due: float
    seq: int
    lease_id: uuid.UUID = field(compare=False)
    lease_seconds: float = field(compare=False)
    on_lost: Callable[[BaseException], None] = field(compare=False)
    valid_until: float = field(default=0.0, compare=False)
    cancelled: bool = field(default=False, compare=False)
    liveness: float | None = field(default=None, compare=False)  # see Lease.liveness_seconds
    held_at: float = field(default=0.0, compare=False)  # monotonic, just after the grant


def interrupt_thread(thread_id: int) -> Callable[[BaseException], None]:
    """A callback that raises LeaseRenewalFailedError in another (sync) thread."""

    def interrupt(_: BaseException) -> None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(LeaseRenewalFailedError))

    return interrupt


class Engine:
    def __init__(self, dsn: str, connect_kwargs: dict[str, Any], listen: bool = True, bind_session: bool = True) -> None:
        self.dsn = dsn
        self.connect_kwargs = connect_kwargs
        self.listen = listen
        # False when this connection reaches the server through a pooler: its backend says nothing
        # about this process, so the session is judged by time alone.
        self.bind_session = bind_session
        self.client_id = uuid.uuid4()
        self._lock = threading.Lock()
        self._wakers: dict[int, Waker] = {}
        # Tickets notified before their waiter registered: when, and the lease if one was handed over.
        self._recent: dict[int, tuple[float, Grant | None]] = {}
        self._renewals: list[_Renewal] = []
        self._by_lease: dict[uuid.UUID, _Renewal] = {}
        self._cleanup: list[tuple[Any, dict[str, Any]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._next_heartbeat = 0.0
        self._cleanup_not_before = 0.0
        # Session liveness: when the last keep-alive that the database answered was sent, and the
        # liveness_seconds it answered with (None until the first answer).
        self._alive_sent_ok: float | None = None
        self._next_keep_alive = 0.0
        _engines.add(self)

    # ---- called from any thread -------------------------------------------------------------

    def start(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            return  # the hot path (every hold): no lock
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="pgslots-engine", daemon=True)
                self._thread.start()
                if self._watchdog is None or not self._watchdog.is_alive():
                    self._watchdog = threading.Thread(target=self._watch, name="pgslots-watchdog", daemon=True)
                    self._watchdog.start()

    def _watch(self) -> None:
        """Apart from the worker, which a black-holed network can hold up in a call for minutes:
        gives up this process's leases in time when the database has not heard from it."""
        while not self._stop.wait(WATCHDOG_SECONDS):
            self._check_silence()

    def ensure_listening(self, timeout: float = 10.0) -> bool:
        """Starts the worker and waits until it LISTENs; False when listening is off or failed."""
        if not self.listen:
            return False
        self.start()
        return self._listening.wait(timeout)

    @property
    def listening(self) -> bool:
        return self.listen and self._listening.is_set()

    def register(self, ticket: int, wake: Waker) -> None:
        """Calls wake (from the worker) when the ticket is notified, with the lease if it was handed one."""
        with self._lock:
            self._wakers[ticket] = wake
            notified = self._recent.pop(ticket, None)
        if notified is not None:
            wake(notified[1])

    def unregister(self, ticket: int) -> None:
        with self._lock:
            self._wakers.pop(ticket, None)

    def hold(self, lease: Lease, on_lost: Callable[[BaseException], None]) -> None:
        """Keeps a lease alive until :meth:`drop`; calls on_lost from the worker if renewal fails for good.

        A lease handed over by a release first runs for less than lease_seconds (its first_term);
        renewals then extend it to lease_seconds."""
        assert lease.lease_id is not None
        lease_id, lease_seconds, first_term = lease.lease_id, lease.lease_seconds, lease.first_term
        now = time.monotonic()
        term = lease_seconds if first_term is None else min(first_term, lease_seconds)
        renewal = _Renewal(
            now + 0.75 * term, next(self._seq), lease_id, lease_seconds, on_lost, now + term, liveness=lease.liveness_seconds, held_at=now
        )
        with self._lock:
            heapq.heappush(self._renewals, renewal)
            self._by_lease[lease_id] = renewal
        self.start()

    def drop(self, lease_id: uuid.UUID) -> None:
        with self._lock:
            renewal = self._by_lease.pop(lease_id, None)
            if renewal is not None:
                renewal.cancelled = True

    def release_later(self, lease_id: uuid.UUID) -> None:
        """Releases a lease in the background (after an interrupted call that may have granted it)."""
        self.later(q.RELEASE, release_params(lease_id))

    def later(self, query: Any, params: dict[str, Any]) -> None:
        """Runs a clean-up call in the background, retrying until the database answers."""
        with self._lock:
            self._cleanup.append((query, params))
        self.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finishes pending cleanup (for up to ``timeout`` seconds), then stops the worker."""
        deadline = time.monotonic() + timeout
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and thread.is_alive():
            self.finish(deadline)
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))

    def finish(self, deadline: float) -> None:
        """Waits (until the monotonic deadline) for the pending background calls to be done."""
        pending = self.pending_cleanup()
        if not pending:
            return
        logger.info("pgslots: finishing %d pending release(s) before exit.", pending)
        self.start()
        while self.pending_cleanup() and time.monotonic() < deadline:
            time.sleep(0.02)
        left = self.pending_cleanup()
        if left:
            logger.warning(
                "pgslots: %d release(s) could not be finished before exit; their slots come back when their leases expire.",
                left,
            )

    def pending_cleanup(self) -> int:
        with self._lock:
            return len(self._cleanup)

    # ---- the worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                self._connect()
                backoff = 0.1
                self._serve()
                return
            except psycopg.Error as exc:
                logger.debug("pgslots engine connection lost: %s", exc)
                self._disconnect()
                if self._stop.is_set():
                    return  # stopping with the database away: leases left behind expire by themselves
                self._check_silence()
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _connect(self) -> None:
        if self._conn is not None and not self._conn.closed:
            return
        self._conn = psycopg.connect(self.dsn, autocommit=True, **{**connection_timeouts(self.dsn), **self.connect_kwargs})
        if self.listen:
            self._conn.execute(sql.SQL(q.LISTEN).format(sql.Identifier(f"pgslots:{self.client_id}")))
            reconnected = self._listening.is_set()
            self._listening.set()
            if reconnected:
                self._wake_all()  # notifications may have been lost while we were away

    def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    def _wake_all(self) -> None:
        with self._lock:
            wakers = list(self._wakers.values())
        for wake in wakers:
            wake(None)

    def _wake(self, woken: list[tuple[int, Grant | None]]) -> None:
        now = time.monotonic()
        with self._lock:
            calls = []
            for ticket, grant in woken:
                wake = self._wakers.get(ticket)
                if wake is None:
                    self._recent[ticket] = (now, grant)
                else:
                    calls.append((wake, grant))
            if len(self._recent) > 1000:
                self._recent = {t: seen for t, seen in self._recent.items() if now - seen[0] < 5}
        for wake, grant in calls:
            wake(grant)

    def _serve(self) -> None:
        conn = self._conn
        assert conn is not None
        while True:
            self._run_cleanup(conn)
            if self._stop.is_set():
                self._disconnect()
                return
            self._run_renewals(conn)
            self._run_heartbeat(conn)
            self._run_keep_alive(conn)
            timeout = self._sleep_budget()
            if self.listen:
                for note in conn.notifies(timeout=timeout):
                    self._wake(parse_notification(note.payload))
            else:
                self._stop.wait(timeout)

    def _sleep_budget(self) -> float:
        with self._lock:
            due = self._renewals[0].due if self._renewals else None
        budget = IDLE_POLL_SECONDS
        if due is not None:
            budget = min(budget, max(0.0, due - time.monotonic()))
        if self._by_lease:
            budget = min(budget, max(0.0, self._next_keep_alive - time.monotonic()))
        return max(budget, 0.001)

    def _run_keep_alive(self, conn: psycopg.Connection[Any]) -> None:
        """While it holds leases, tells the database this process is alive (so its leases live on),
        and hears which of them are gone (reclaimed, released by an operator, or missing on a
        server that took over): those are given up at once, even by short bodies."""
        now = time.monotonic()
        with self._lock:
            held = list(self._by_lease)
            shortest = min((r.liveness for r in self._by_lease.values() if r.liveness is not None), default=None)
        if not held or now < self._next_keep_alive:
            if not held:
                self._next_keep_alive = 0.0  # the next lease is announced at once
            return
        interval = KEEP_ALIVE_SECONDS if shortest is None else min(KEEP_ALIVE_SECONDS, shortest / 5)
        self._next_keep_alive = now + interval
        row = conn.execute(q.KEEP_ALIVE, {"session": self.client_id, "leases": held, "bind": self.bind_session}).fetchone()
        assert row is not None
        self._alive_sent_ok = now
        with self._lock:
            for renewal in self._by_lease.values():
                if renewal.liveness is not None:
                    renewal.liveness = float(row[0])  # the setting as it is now
        for lease_id in row[1] or ():
            message = f"Lease {lease_id} was lost: the database no longer has it, so its slots may be held by others now."
            self._lose(lease_id, LeaseLostError(message))
        for lease_id in row[2] or ():  # e.g. a release lost in a failover: given back now, not at its expiry
            logger.info("pgslots: releasing lease %s, which this process no longer holds.", lease_id)
            self.release_later(lease_id)

    def _check_silence(self) -> None:
        """Cut off from the database: before it may take a lease back (liveness_seconds after it last
        heard from this process, or after the grant), give the lease up as lost."""
        now = time.monotonic()
        sent = self._alive_sent_ok or 0.0
        with self._lock:
            late = [
                (r.lease_id, now - max(sent, r.held_at), r.liveness)
                for r in self._by_lease.values()
                if r.liveness is not None and now - max(sent, r.held_at) >= r.liveness - min(SILENCE_MARGIN_SECONDS, r.liveness / 3)
            ]
        for lease_id, silent, liveness in late:
            error = LeaseRenewalFailedError(
                f"The database has not heard from this process for {silent:.1f} s: after {liveness:g} s (liveness_seconds) "
                "it may give its slots to others, so the lease is treated as lost."
            )
            self._lose(lease_id, error)

    def _lose(self, lease_id: uuid.UUID, error: BaseException) -> None:
        with self._lock:
            renewal = self._by_lease.pop(lease_id, None)
            if renewal is None or renewal.cancelled:
                return
            renewal.cancelled = True
        renewal.on_lost(error)

    def _run_cleanup(self, conn: psycopg.Connection[Any]) -> None:
        if time.monotonic() < self._cleanup_not_before:
            return
        for _ in range(len(self._cleanup)):
            with self._lock:
                if not self._cleanup:
                    return
                query, params = self._cleanup[0]
            try:
                conn.execute(query, params)  # a connection error leaves it queued for the next try
            except psycopg.errors.LockNotAvailable:
                # Another session holds a lock it needs: behind the rest, back to renewals and
                # heartbeats first, and again a little later.
                with self._lock:
                    self._cleanup.append(self._cleanup.pop(0))
                self._cleanup_not_before = time.monotonic() + BLOCKED_RETRY_SECONDS
                return
            with self._lock:
                self._cleanup.pop(0)

    def _run_heartbeat(self, conn: psycopg.Connection[Any]) -> None:
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        with self._lock:
            # Taken before the call: each of these tickets was queued (committed) before it registered.
            tickets = list(self._wakers)
        if not tickets:
            return
        self._next_heartbeat = now + HEARTBEAT_SECONDS * random.uniform(0.8, 1.0)
        row = conn.execute(q.HEARTBEAT, {"queue_client": self.client_id, "tickets": tickets}).fetchone()
        again = list(row[0]) if row and row[0] else []
        if again:
            self._wake([(ticket, None) for ticket in again])

    def _run_renewals(self, conn: psycopg.Connection[Any]) -> None:
        while True:
            with self._lock:
                if not self._renewals or self._renewals[0].due > time.monotonic():
                    return
                renewal = heapq.heappop(self._renewals)
                if renewal.cancelled:
                    continue
            failure = self._renew(conn, renewal)
            now = time.monotonic()
            with self._lock:
                if renewal.cancelled:
                    continue
                if failure is None:
                    renewal.valid_until = now + renewal.lease_seconds
                    renewal.due = now + 0.75 * renewal.lease_seconds
                    heapq.heappush(self._renewals, renewal)
                    continue
                if not isinstance(failure, LeaseLostError) and now + 1.0 < renewal.valid_until:
                    # The database is away, but the lease is still good for a while: keep trying.
                    renewal.due = now + 1.0
                    heapq.heappush(self._renewals, renewal)
                    continue
                self._by_lease.pop(renewal.lease_id, None)
            renewal.on_lost(failure)

    def _renew(self, conn: psycopg.Connection[Any], renewal: _Renewal) -> BaseException | None:
        """None when renewed; else the final error, after up to RENEW_TRIES tries."""
        error: BaseException | None = None
        for attempt in range(RENEW_TRIES):
            if attempt:
                time.sleep(RENEW_BACKOFF[min(attempt - 1, len(RENEW_BACKOFF) - 1)])
            try:
                if conn.closed:
                    self._disconnect()
                    self._connect()
                    assert self._conn is not None
                    conn = self._conn
                conn.execute(
                    q.RENEW,
                    {"lease_id": renewal.lease_id, "lease_seconds": renewal.lease_seconds, "wait_seconds": BACKGROUND_WAIT_SECONDS},
                )
                return None
            except psycopg.Error as exc:
                mapped: PgSlotsError | None = translate(exc)
                error = mapped or exc
                if isinstance(mapped, LeaseLostError):
                    return mapped  # gone for good: retrying cannot bring it back
                if isinstance(exc, psycopg.OperationalError):
                    self._disconnect()
        return error
