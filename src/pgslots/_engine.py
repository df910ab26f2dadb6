"""The per-client background worker: one thread and one connection serve every waiter and lease.

It LISTENs on the ``pgslots`` channel and wakes the waiters whose tickets a notification names;
it heartbeats this client's queued waiters (one call for all of them), which also returns the
tickets that free slots could serve now: the backstop for lost notifications; it renews leases at
0.75 x their duration; and it releases leases and leaves queues on behalf of callers that were
interrupted. Being a thread, it keeps renewing while an event loop is blocked by CPU-bound code.
"""

from __future__ import annotations

import contextlib
import ctypes
import heapq
import itertools
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from . import _queries as q
from .errors import LeaseLostError, LeaseRenewalFailedError, PgSlotsError, translate

logger = logging.getLogger("pgslots")

HEARTBEAT_SECONDS = 1.0  # well inside the queue's waiter_ttl_seconds (3 s by default)
RENEW_TRIES = 3
RENEW_BACKOFF = (0.25, 1.0)  # between the tries of one renewal
IDLE_POLL_SECONDS = 0.25  # longest the worker sleeps before looking at new work


@dataclass(order=True)
class _Renewal:
    due: float
    seq: int
    lease_id: uuid.UUID = field(compare=False)
    lease_seconds: float = field(compare=False)
    on_lost: Callable[[BaseException], None] = field(compare=False)
    valid_until: float = field(default=0.0, compare=False)
    cancelled: bool = field(default=False, compare=False)


def interrupt_thread(thread_id: int) -> Callable[[BaseException], None]:
    """A callback that raises LeaseRenewalFailedError in another (sync) thread."""

    def interrupt(_: BaseException) -> None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(LeaseRenewalFailedError))

    return interrupt


class Engine:
    def __init__(self, dsn: str, connect_kwargs: dict[str, Any], listen: bool = True) -> None:
        self.dsn = dsn
        self.connect_kwargs = connect_kwargs
        self.listen = listen
        self.client_id = uuid.uuid4()
        self._lock = threading.Lock()
        self._wakers: dict[int, Callable[[], None]] = {}
        self._recent: dict[int, float] = {}  # tickets notified before their waiter registered
        self._renewals: list[_Renewal] = []
        self._by_lease: dict[uuid.UUID, _Renewal] = {}
        self._cleanup: list[tuple[Any, dict[str, Any]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._next_heartbeat = 0.0

    # ---- called from any thread -------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="pgslots-engine", daemon=True)
                self._thread.start()

    def ensure_listening(self, timeout: float = 10.0) -> bool:
        """Starts the worker and waits until it LISTENs; False when listening is off or failed."""
        if not self.listen:
            return False
        self.start()
        return self._listening.wait(timeout)

    @property
    def listening(self) -> bool:
        return self.listen and self._listening.is_set()

    def register(self, ticket: int, wake: Callable[[], None]) -> None:
        with self._lock:
            self._wakers[ticket] = wake
            notified = self._recent.pop(ticket, None) is not None
        if notified:
            wake()

    def unregister(self, ticket: int) -> None:
        with self._lock:
            self._wakers.pop(ticket, None)

    def hold(self, lease_id: uuid.UUID, lease_seconds: float, on_lost: Callable[[BaseException], None]) -> None:
        """Keeps a lease alive until :meth:`drop`; calls on_lost from the worker if renewal fails for good."""
        now = time.monotonic()
        renewal = _Renewal(now + 0.75 * lease_seconds, next(self._seq), lease_id, lease_seconds, on_lost, now + lease_seconds)
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
        self._later(q.RELEASE, {"lease_id": lease_id})

    def leave_later(self, ticket: int) -> None:
        self._later(q.LEAVE_QUEUE, {"ticket": ticket})

    def _later(self, query: Any, params: dict[str, Any]) -> None:
        with self._lock:
            self._cleanup.append((query, params))
        self.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finishes pending cleanup, then stops the worker."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

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
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _connect(self) -> None:
        if self._conn is not None and not self._conn.closed:
            return
        self._conn = psycopg.connect(self.dsn, autocommit=True, **self.connect_kwargs)
        if self.listen:
            self._conn.execute(q.LISTEN)
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
            wake()

    def _wake(self, tickets: list[int]) -> None:
        now = time.monotonic()
        with self._lock:
            wakers = []
            for ticket in tickets:
                wake = self._wakers.get(ticket)
                if wake is None:
                    self._recent[ticket] = now
                else:
                    wakers.append(wake)
            if len(self._recent) > 1000:
                self._recent = {t: at for t, at in self._recent.items() if now - at < 5}
        for wake in wakers:
            wake()

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
            timeout = self._sleep_budget()
            if self.listen:
                for note in conn.notifies(timeout=timeout):
                    self._wake([int(t) for t in note.payload.split(",") if t])
            else:
                self._stop.wait(timeout)

    def _sleep_budget(self) -> float:
        with self._lock:
            due = self._renewals[0].due if self._renewals else None
        budget = IDLE_POLL_SECONDS
        if due is not None:
            budget = min(budget, max(0.0, due - time.monotonic()))
        return max(budget, 0.001)

    def _run_cleanup(self, conn: psycopg.Connection[Any]) -> None:
        while True:
            with self._lock:
                if not self._cleanup:
                    return
                query, params = self._cleanup[0]
            conn.execute(query, params)  # a connection error leaves it queued for the next try
            with self._lock:
                self._cleanup.pop(0)

    def _run_heartbeat(self, conn: psycopg.Connection[Any]) -> None:
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        with self._lock:
            waiting = bool(self._wakers)
        if not waiting:
            return
        self._next_heartbeat = now + HEARTBEAT_SECONDS * random.uniform(0.8, 1.0)
        row = conn.execute(q.HEARTBEAT, {"queue_client": self.client_id}).fetchone()
        servable = list(row[0]) if row and row[0] else []
        if servable:
            self._wake(servable)

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
                conn.execute(q.RENEW, {"lease_id": renewal.lease_id, "lease_seconds": renewal.lease_seconds})
                return None
            except psycopg.Error as exc:
                mapped: PgSlotsError | None = translate(exc)
                error = mapped or exc
                if isinstance(mapped, LeaseLostError):
                    return mapped  # gone for good: retrying cannot bring it back
                if isinstance(exc, psycopg.OperationalError):
                    self._disconnect()
        return error
