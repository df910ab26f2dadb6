"""One statement of ``_queries.py`` on a pooled connection, sent through libpq with psycopg's own
adapters but without its cursor.

A cursor's execute does more than the library needs: it converts the query on every call, keeps
counts to decide when to prepare, and drives the exchange through a chain of Python generators.
Measured on an acquire and release in one process, a cursor cost about 40 us of CPU per statement
more than libpq alone; this path, which keeps psycopg's adapters, saves about half of that. Here
each statement is converted once, prepared once per connection under a name of its own, and the
exchange is psycopg's own: the C generator that sends and fetches, and the connection's wait,
which cancels a statement interrupted by Ctrl-C. On an async connection the wait to read the answer
is done here (``_answer``), without the 0.1 s timer psycopg's arms at every wait; an interruption
is answered as psycopg answers it.
Parameters are sent as text, typed by the function they are passed to; rows come back as the
cursor would give them (the same loaders, through a psycopg Transformer kept per connection).

Of psycopg, this uses its libpq wrapper (``pgconn``) and ``Transformer``, which it documents, and
``errors.error_from_result``, ``generators.execute``, ``Connection.wait`` and the ``waiting``
constants, which its own cursors use (present since 3.0, not in its user guide): a psycopg that
changed them would fail every statement, and so every test, at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import math
import re
import select
import selectors
from collections.abc import Sequence
from typing import Any, LiteralString

import psycopg
from psycopg import errors as e
from psycopg import generators, pq
from psycopg.abc import Buffer, PQGen
from psycopg.adapt import PyFormat, Transformer
from psycopg.waiting import READY_R, WAIT_R, Wait

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
_TEXT = PyFormat.TEXT
_ANSWERED = (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK)


class Statement:
    """A query with ``%(name)s`` placeholders as libpq takes it: ``$n`` placeholders, the names in
    their order, and the name it is prepared under (from its text: the same on every connection)."""

    __slots__ = ("names", "prepared_as", "text")

    def __init__(self, query: str) -> None:
        order: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in order:
                order.append(match.group(1))
            return f"${order.index(match.group(1)) + 1}"

        text = _PLACEHOLDER.sub(number, query)
        if "%" in text:
            raise ValueError(f"pgslots: a statement with placeholders other than %(name)s: {query!r}")
        self.text = text.encode()
        self.names = tuple(order)
        self.prepared_as = b"pgslots_" + hashlib.sha1(self.text).hexdigest()[:20].encode()


_STATEMENTS: dict[str, Statement] = {}  # one per statement of _queries.py (constants: it cannot grow beyond them)


def statement(query: LiteralString) -> Statement:
    found = _STATEMENTS.get(query)
    if found is None:
        found = _STATEMENTS[query] = Statement(query)  # the same for every thread that makes it
    return found


class _State:
    """What a pooled connection keeps between statements: its adapters, and which statements it has
    prepared."""

    __slots__ = ("idle_loop", "idle_poll", "prepared", "tx")

    def __init__(self, conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
        self.tx = Transformer(conn)
        self.prepared: set[bytes] = set()
        # An async connection's wait while its event loop has nothing else to do (see _idle_wait).
        self.idle_loop: asyncio.AbstractEventLoop | None = None
        self.idle_poll: select.poll | None = None


def _state(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> _State:
    found: _State | None = getattr(conn, "_pgslots_wire", None)
    if found is None:
        found = conn._pgslots_wire = _State(conn)  # type: ignore[union-attr]
    return found


def _values(state: _State, stmt: Statement, params: dict[str, Any] | None) -> Sequence[Buffer | None] | None:
    if not stmt.names:
        return None
    assert params is not None, "pgslots: a statement with parameters called without them"
    return state.tx.dump_sequence([params[name] for name in stmt.names], [_TEXT] * len(stmt.names))


def _rows(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], state: _State, res: pq.abc.PGresult) -> list[dict[str, Any]]:
    if res.status not in _ANSWERED:
        raise e.error_from_result(res, encoding=conn.info.encoding)
    if not res.nfields:
        return []
    names = [(res.fname(i) or b"").decode() for i in range(res.nfields)]
    state.tx.set_pgresult(res)
    return [dict(zip(names, row, strict=True)) for row in state.tx.load_rows(0, res.ntuples, tuple)]


def _sqlstate(res: pq.abc.PGresult) -> bytes | None:
    return None if res.status in _ANSWERED else res.error_field(pq.DiagnosticField.SQLSTATE)


def _gone(res: pq.abc.PGresult) -> bool:
    """The server no longer knows a prepared statement of ours (26000: DISCARD ALL, DEALLOCATE), or
    cannot run its plan any more (0A000: "cached plan must not change result type", after a
    migration re-created a function with other columns; the message is not read, the server may
    speak another language). The failed execution changed nothing: this call goes unprepared, and
    the next prepares the statement afresh (a 0A000 of another cause then comes back as it is)."""
    return _sqlstate(res) in (b"26000", b"0A000")


def _ready(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], state: _State, stmt: Statement, res: pq.abc.PGresult) -> None:
    """After preparing `stmt`: the connection has it (42P05, prepared already, is the same text:
    the name comes from it)."""
    if _sqlstate(res) != b"42P05":
        _rows(conn, state, res)
    state.prepared.add(stmt.prepared_as)


def run(conn: psycopg.Connection[Any], stmt: Statement, params: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Runs `stmt` on `conn` (in autocommit) and returns its rows as dicts by column name."""
    state = _state(conn)
    values = _values(state, stmt, params)
    pgconn = conn.pgconn
    with conn.lock:
        # Prepared on the server unless the connection says not to (prepare_threshold None: behind a
        # pooler in transaction mode, consecutive statements may reach different server connections).
        if conn.prepare_threshold is not None:
            if stmt.prepared_as not in state.prepared:
                pgconn.send_prepare(stmt.prepared_as, stmt.text)
                _ready(conn, state, stmt, conn.wait(generators.execute(pgconn))[-1])
            pgconn.send_query_prepared(stmt.prepared_as, values)
            res = conn.wait(generators.execute(pgconn))[-1]
            if res.status in _ANSWERED or not _gone(res):
                return _rows(conn, state, res)
            state.prepared.discard(stmt.prepared_as)
            pgconn.send_query_params(b"DEALLOCATE " + stmt.prepared_as, None)
            conn.wait(generators.execute(pgconn))  # its error (gone already) changes nothing
        pgconn.send_query_params(stmt.text, values)
        return _rows(conn, state, conn.wait(generators.execute(pgconn))[-1])


async def arun(conn: psycopg.AsyncConnection[Any], stmt: Statement, params: dict[str, Any] | None) -> list[dict[str, Any]]:
    """`run` on an async connection."""
    state = _state(conn)
    values = _values(state, stmt, params)
    pgconn = conn.pgconn
    async with conn.lock:
        if conn.prepare_threshold is not None:
            if stmt.prepared_as not in state.prepared:
                pgconn.send_prepare(stmt.prepared_as, stmt.text)
                _ready(conn, state, stmt, (await _answer(conn, state, generators.execute(pgconn)))[-1])
            pgconn.send_query_prepared(stmt.prepared_as, values)
            res = (await _answer(conn, state, generators.execute(pgconn)))[-1]
            if res.status in _ANSWERED or not _gone(res):
                return _rows(conn, state, res)
            state.prepared.discard(stmt.prepared_as)
            pgconn.send_query_params(b"DEALLOCATE " + stmt.prepared_as, None)
            await _answer(conn, state, generators.execute(pgconn))
        pgconn.send_query_params(stmt.text, values)
        return _rows(conn, state, (await _answer(conn, state, generators.execute(pgconn)))[-1])


Exchange = PQGen[list[pq.abc.PGresult]]
_INTERRUPTIONS = (asyncio.CancelledError, KeyboardInterrupt, SystemExit)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def _answer(conn: psycopg.AsyncConnection[Any], state: _State, exchange: Exchange) -> list[pq.abc.PGresult]:
    """``conn.wait(exchange)``, with the waits to read done here: in the task itself while the loop
    has nothing else to do (see _idle_wait), else the socket's reader is added, the task sleeps on
    a future it resolves, and the reader is removed. psycopg's wait also arms a 0.1 s
    timer at each (to notice Ctrl-C, which asyncio delivers by itself), which cost the async face
    about 2% of its uncontended cycle. Any other wait (libpq's output to flush) goes on in psycopg's
    wait. An interruption (a cancelled task) is answered as psycopg answers it: the statement is
    cancelled on the server and its end read, so that the connection can serve again."""
    loop = asyncio.get_running_loop()
    fileno = conn.pgconn.socket
    try:
        wait = next(exchange)
        while wait == WAIT_R:
            if _idle_wait(loop, state, fileno):
                wait = exchange.send(READY_R)
                continue
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fileno, _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fileno)
            wait = exchange.send(READY_R)
    except StopIteration as done:
        results: list[pq.abc.PGresult] = done.value
        return results
    except OSError as exc:
        raise e.OperationalError("connection socket closed") from exc  # as psycopg's wait says it
    except _INTERRUPTIONS:
        if conn.pgconn.transaction_status == pq.TransactionStatus.ACTIVE:
            await _cancelled(conn, _resumed(WAIT_R, exchange))
        raise
    return await conn.wait(_resumed(wait, exchange))


_LONGEST_IDLE_WAIT_MS = 24 * 3600 * 1000  # as asyncio bounds its own (poll takes a C int of milliseconds)


def _idle_wait(loop: asyncio.AbstractEventLoop, state: _State, fileno: int) -> bool:
    """True when the answer can be read now, waited for without a pass of the event loop: only when
    the loop has nothing else to do. The wait then ends as soon as the loop would have woken for
    anything else: the loop's own epoll descriptor is watched beside the connection's socket (it
    becomes readable when any of the loop's sockets is, including the one a thread or a signal
    wakes it through), and the wait lasts no longer than the loop's next timer. False when the
    loop has work (the statement's answer is then awaited as any other), runs in debug mode, or is
    not asyncio's own loop on epoll (uvloop, another platform's selector).

    A pass of the loop for each statement (a reader added and removed, a future, a task step, a
    second poll) cost the async face about a fifth of its CPU per uncontended cycle. This reads
    three private parts of asyncio's loop (``_selector``, ``_ready``, ``_scheduled``), there since
    asyncio's first release; their types are checked once per connection and loop, and a loop
    without them is waited on as before."""
    if state.idle_loop is not loop:
        state.idle_loop, state.idle_poll = loop, _idle_poller(loop, fileno)
    poller = state.idle_poll
    if poller is None or loop.get_debug():  # in debug mode, such a wait would be reported as a slow callback
        return False
    for callback in loop._ready:  # type: ignore[attr-defined]
        if not callback.cancelled():  # a cancelled one is dropped by the loop's next pass
            return False
    timeout_ms = -1  # no timer: until the socket or the loop has something
    timers = loop._scheduled  # type: ignore[attr-defined]
    if timers:
        left = timers[0].when() - loop.time()
        if left <= 0:
            return False
        timeout_ms = min(math.ceil(left * 1000), _LONGEST_IDLE_WAIT_MS)  # rounded up, as the loop's own wait
    return any(fd == fileno for fd, _ in poller.poll(timeout_ms))


def _idle_poller(loop: asyncio.AbstractEventLoop, fileno: int) -> select.poll | None:
    """A poll of the connection's socket and the loop's epoll descriptor, if the loop is asyncio's
    own on epoll."""
    selector = getattr(loop, "_selector", None)
    if not (
        isinstance(selector, selectors.EpollSelector)
        and isinstance(getattr(loop, "_ready", None), collections.deque)
        and isinstance(getattr(loop, "_scheduled", None), list)
    ):
        return None
    poller = select.poll()
    poller.register(fileno, select.POLLIN)
    poller.register(selector.fileno(), select.POLLIN)
    return poller


def _resumed(wait: Wait, exchange: Exchange) -> Exchange:
    """The rest of an exchange whose last wait was `wait`, for psycopg's wait to go on with."""
    while True:
        ready = yield wait
        try:
            wait = exchange.send(ready)
        except StopIteration as done:
            results: list[pq.abc.PGresult] = done.value
            return results


async def _cancelled(conn: psycopg.AsyncConnection[Any], rest: Exchange) -> None:
    """After an interruption: the statement is cancelled on the server and its end read. A
    statement that does not end within 5 s, or a second interruption, closes the connection (its
    state is unknown: the pool then replaces it)."""
    try:
        with contextlib.suppress(Exception):  # the statement may end anyway
            await conn.cancel_safe(timeout=5.0)
        await conn.wait(rest, timeout=5.0)
    except BaseException as exc:
        conn.pgconn.finish()
        if not isinstance(exc, Exception):
            raise
