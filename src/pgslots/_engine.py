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
import select
import socket
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
# A process LISTENs only from its first wait, and stops this long after its last waiter left: on
# PostgreSQL, every NOTIFY of a database wakes every backend listening in it, whatever the channel.
LISTEN_IDLE_SECONDS = 60.0
EXIT_SECONDS = 5.0  # at interpreter exit, how long pending releases may still take
WATCHDOG_SECONDS = 0.2  # how often the watchdog looks at the time since the last keep-alive
# The worker's connection gives up on a server that does not answer, unless the DSN says otherwise.
CONNECTION_TIMEOUTS = {"connect_timeout": 5, "tcp_user_timeout": 5000}


def connection_timeouts(dsn: str) -> dict[str, int]:
    """The CONNECTION_TIMEOUTS a DSN does not set itself."""
    given = psycopg.conninfo.conninfo_to_dict(dsn)
    return {k: v for k, v in CONNECTION_TIMEOUTS.items() if k not in given}


_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


class _Sleep:
    """The worker's sleep while it does not LISTEN: until nudged (a waiter wants wake-ups, or the
    engine stops), until the server sends something on the connection (it closed it, say; a
    listening worker notices that in notifies()), or until the timeout."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def nudge(self) -> None:
        with contextlib.suppress(OSError):  # full (a nudge is pending anyway), or closed with the worker
            self._writer.send(b"\0")

    def until(self, fileno: int, timeout: float) -> bool:
        """Sleeps; True when the connection has something to read."""
        fds = [fileno, self._reader.fileno()]
        if hasattr(select, "poll"):
            poller = select.poll()
            for fd in fds:
                poller.register(fd, select.POLLIN)
            ready = {fd for fd, _ in poller.poll(timeout * 1000)}
        else:  # Windows
            ready = set(select.select(fds, [], [], timeout)[0])
        if self._reader.fileno() in ready:
            with contextlib.suppress(OSError):
                self._reader.recv(4096)
        return fileno in ready

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


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
    watch for silence (_liveness), and run the calls its callers could not wait for (_cleanup).

    The connection LISTENs only while the process may wait: from the first waiter's ``Listen``
    (ensure_listening) until no waiter has been seen for LISTEN_IDLE_SECONDS. Every NOTIFY in the
    database wakes every listening backend, so a process that never waits costs a busy server
    nothing when others hand slots over."""

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
        self._sleep: _Sleep | None = None  # while the worker runs
        self._listening = threading.Event()
        self._want_listen = False  # a waiter asked for wake-ups; the worker LISTENs
        self._waiters_seen = 0.0  # monotonic time a waiter last relied on wake-ups
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
        self._want_wakeups()
        self.start()
        return self._listening.wait(timeout)

    def _want_wakeups(self) -> None:
        self._waiters_seen = time.monotonic()
        if not self._listening.is_set():
            self._want_listen = True
            self._nudge()

    def _nudge(self) -> None:
        """Wakes the worker from a sleep without LISTEN."""
        sleep = self._sleep
        if sleep is not None:
            sleep.nudge()

    @property
    def listening(self) -> bool:
        return self.listen and self._listening.is_set()

    def link(self) -> Link:
        """This engine as a flow sees it (see _flow.Connect)."""
        if self._listening.is_set():
            self._waiters_seen = time.monotonic()  # a flow may queue on it: keep listening a while
            return self._links[True]  # set only when listen is
        return self._links[False]

    def register(self, ticket: int, wake: Waker) -> None:
        """Calls wake (from the worker) when the ticket is notified, with the lease if it was handed one."""
        self.wakeups.register(ticket, wake)
        if self.listen:
            # Queued while the worker stopped listening: it LISTENs again, then every waiter looks
            # again (a notification sent meanwhile was lost).
            self._want_wakeups()

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
        self._nudge()
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
        sleep = self._sleep = _Sleep()  # the attribute for _nudge, from other threads
        try:
            self._keep_serving(sleep)
        finally:
            self._sleep = None
            sleep.close()

    def _keep_serving(self, sleep: _Sleep) -> None:
        backoff = 0.1
        while True:
            try:
                self._connection()
                backoff = 0.1
                self._serve(sleep)
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
        """The worker's connection, (re)connected, and listening if a waiter wants wake-ups."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._disconnect()
        self._conn = psycopg.connect(self.dsn, autocommit=True, **{**connection_timeouts(self.dsn), **self.connect_kwargs})
        if self._listening.is_set():
            self._want_listen = True  # it listened before the connection was lost
            self._listening.clear()
        self._listen(self._conn)
        return self._conn

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        """LISTENs when a waiter wants wake-ups; stops once none has for LISTEN_IDLE_SECONDS."""
        if self._want_listen and not self._listening.is_set():
            conn.execute(sql.SQL(q.LISTEN).format(sql.Identifier(f"pgslots:{self.session_id}")))
            self._want_listen = False
            self._listening.set()
            self.wakeups.wake_all()  # anyone queued before this LISTEN looks again
        elif self._listening.is_set() and self._unheard():
            # Cleared first, then looked at again: a flow that saw it listening has said so by now.
            self._listening.clear()
            if self._unheard():
                conn.execute(q.UNLISTEN)
            else:
                self._want_listen = False  # still listening: whoever asked meanwhile is heard
                self._listening.set()

    def _unheard(self) -> bool:
        """No waiter now, and none relied on wake-ups for LISTEN_IDLE_SECONDS."""
        return not self.wakeups.waiting() and time.monotonic() - self._waiters_seen > LISTEN_IDLE_SECONDS

    def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    def _serve(self, sleep: _Sleep) -> None:
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
            self._listen(conn)
            timeout = self._sleep_budget()
            if self._listening.is_set():
                for note in conn.notifies(timeout=timeout):
                    self.wakeups.deliver(parse_notification(note.payload))
            elif sleep.until(conn.fileno(), timeout):
                for note in conn.notifies(timeout=0):  # reads what came; raises if the server closed it
                    self.wakeups.deliver(parse_notification(note.payload))

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
