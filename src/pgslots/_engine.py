"""The per-process background worker: one thread and one connection serve every waiter and lease.

What it schedules lives in one module each: wake-ups and the heartbeat of queued waiters
(``_wakeups``), renewals of held leases (``_renewals``), the session's keep-alive and the silence
watchdog (``_liveness``), and calls callers could not wait for (``_cleanup``). This module keeps the
thread, the connection and the loop that gives each its turn. Being a thread, it keeps renewing
while an event loop is blocked by CPU-bound code.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from . import _queries as q
from ._cleanup import Cleanup
from ._flow import Link, release_params
from ._liveness import Liveness
from ._renewals import HeldLeases, renew
from ._wakeups import Waker, WakeUps, parse_notification
from .errors import LeaseRenewalFailedError
from .types import Lease

logger = logging.getLogger("pgslots")

IDLE_POLL_SECONDS = 0.25  # longest the worker sleeps before looking at new work
EXIT_SECONDS = 5.0  # at interpreter exit, how long pending releases may still take
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
    """Before the interpreter exits, leases still held (a with block never left: a daemon thread's,
    say) are released, and releases that could not be done when their bodies ended (the database
    was away, or busy) get a last chance: bounded by EXIT_SECONDS, so a clean exit leaves no slot
    held and never hangs."""
    deadline = time.monotonic() + EXIT_SECONDS
    for engine in list(_engines):
        engine.release_held()
    for engine in list(_engines):
        engine.finish(deadline)


# Threads in the middle of a pgslots command (a call on its way, a lease being held). A lost lease
# interrupts its body's thread at once, unless that thread is in such a command: an exception raised
# into it then would leave the command's outcome (a grant committed or not) unknown, or a lock of
# Python's own threading code taken. Such an interruption waits in _DEFERRED until the command is
# done and the flow has taken its outcome; the sync driver then raises it into the flow.
_CALLS_LOCK = threading.Lock()
_IN_CALL: set[int] = set()
_DEFERRED: set[int] = set()


def _raise_in(thread_id: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(LeaseRenewalFailedError))


def interrupt_thread(thread_id: int) -> Callable[[BaseException], None]:
    """A callback that raises LeaseRenewalFailedError in another (sync) thread: at once, or once the
    pgslots command that thread is in is done."""

    def interrupt(_: BaseException) -> None:
        with _CALLS_LOCK:
            if thread_id in _IN_CALL:
                _DEFERRED.add(thread_id)
            else:
                _raise_in(thread_id)

    return interrupt


def defer_interruptions(thread_id: int) -> None:
    with _CALLS_LOCK:
        _IN_CALL.add(thread_id)


def allow_interruptions(thread_id: int) -> None:
    with _CALLS_LOCK:
        _IN_CALL.discard(thread_id)


def deferred_interruption(thread_id: int) -> bool:
    """True (once) when this thread was interrupted during a command that is done since."""
    if thread_id not in _DEFERRED:
        return False  # the hot path: no lock
    with _CALLS_LOCK:
        if thread_id in _IN_CALL or thread_id not in _DEFERRED:
            return False
        _DEFERRED.discard(thread_id)
        return True


def interrupt_later(thread_id: int) -> None:
    """Raises a deferred interruption that no flow took into this thread's own code, as it comes back to it."""
    with _CALLS_LOCK:
        _raise_in(thread_id)


class Engine:
    """One process's background worker: a thread and one connection that LISTEN for its waiters'
    wake-ups and heartbeat them (_wakeups), renew its leases (_renewals), keep its session alive and
    watch for silence (_liveness), and run the calls its callers could not wait for (_cleanup)."""

    def __init__(self, dsn: str, connect_kwargs: dict[str, Any], listen: bool = True, bind_session: bool = True) -> None:
        self.dsn = dsn
        self.connect_kwargs = connect_kwargs
        self.listen = listen
        self.session_id = uuid.uuid4()
        self.wakeups = WakeUps()
        self.held = HeldLeases()
        self.cleanup = Cleanup()
        self.liveness = Liveness(self.session_id, self.held, bind_session, self.release_later)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._links = (Link(self.session_id, False, listen), Link(self.session_id, True, listen))
        self._conn: psycopg.Connection[Any] | None = None
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
            self.liveness.check_silence()

    def ensure_listening(self, timeout: float = 10.0) -> bool:
        """Starts the worker and waits until it LISTENs; False when listening is off or failed."""
        if not self.listen:
            return False
        self.start()
        return self._listening.wait(timeout)

    @property
    def listening(self) -> bool:
        return self.listen and self._listening.is_set()

    def link(self) -> Link:
        """This engine as a flow sees it (see _flow.Connect)."""
        return self._links[self.listening]

    def register(self, ticket: int, wake: Waker) -> None:
        """Calls wake (from the worker) when the ticket is notified, with the lease if it was handed one."""
        self.wakeups.register(ticket, wake)

    def unregister(self, ticket: int) -> None:
        self.wakeups.unregister(ticket)

    def hold(self, lease: Lease, on_lost: Callable[[BaseException], None]) -> None:
        """Keeps a lease alive until :meth:`drop`; calls on_lost from the worker if that fails for good."""
        self.held.hold(lease, on_lost)
        self.start()

    def drop(self, lease_id: uuid.UUID) -> None:
        self.held.drop(lease_id)

    def release_later(self, lease_id: uuid.UUID) -> None:
        """Releases a lease in the background (after an interrupted call that may have granted it)."""
        self.later(q.RELEASE, release_params(lease_id))

    def release_held(self) -> None:
        """Releases every lease still held (at interpreter exit: nobody will leave those bodies)."""
        for held in self.held.snapshot():
            self.held.drop(held.lease_id)
            logger.info("pgslots: releasing lease %s, still held as the interpreter exits.", held.lease_id)
            self.release_later(held.lease_id)

    def later(self, query: Any, params: dict[str, Any]) -> None:
        """Runs a clean-up call in the background, retrying until the database answers."""
        self.cleanup.add(query, params)
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
        return self.cleanup.pending()

    # ---- the worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                self._connection()
                backoff = 0.1
                self._serve()
                return
            except psycopg.Error as exc:
                logger.debug("pgslots engine connection lost: %s", exc)
                self._disconnect()
                if self._stop.is_set():
                    return  # stopping with the database away: leases left behind expire by themselves
                self.liveness.check_silence()
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _connection(self) -> psycopg.Connection[Any]:
        """The worker's connection, (re)connected and listening."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._disconnect()
        self._conn = psycopg.connect(self.dsn, autocommit=True, **{**connection_timeouts(self.dsn), **self.connect_kwargs})
        if self.listen:
            self._conn.execute(sql.SQL(q.LISTEN).format(sql.Identifier(f"pgslots:{self.session_id}")))
            reconnected = self._listening.is_set()
            self._listening.set()
            if reconnected:
                self.wakeups.wake_all()  # notifications may have been lost while we were away
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    def _serve(self) -> None:
        while True:
            self.cleanup.run(self._connection())
            if self._stop.is_set():
                self._disconnect()
                return
            batch = self.held.take_due()
            if batch:
                lost, failure = renew(self._connection, batch)
                self.held.renewed(batch, lost, failure)
            conn = self._connection()
            tickets = self.wakeups.heartbeat_due(random.uniform(0.8, 1.0))
            if tickets:
                row = conn.execute(q.HEARTBEAT, {"queue_client": self.session_id, "tickets": tickets}).fetchone()
                self.wakeups.heard(row[0] if row else None)
            self.liveness.keep_alive(conn)
            timeout = self._sleep_budget()
            if self.listen:
                for note in conn.notifies(timeout=timeout):
                    self.wakeups.deliver(parse_notification(note.payload))
            else:
                self._stop.wait(timeout)

    def _sleep_budget(self) -> float:
        budget = IDLE_POLL_SECONDS
        now = time.monotonic()
        due = self.held.next_due()
        if due is not None:
            budget = min(budget, max(0.0, due - now))
        keep_alive = self.liveness.seconds_to_next()
        if keep_alive is not None:
            budget = min(budget, keep_alive)
        return max(budget, 0.001)
