"""How one statement reaches the server (``pgslots._wire``): converted once, prepared once per
connection, prepared again when the server forgot it or its columns changed, never prepared when
the connection says not to; errors and rows as a psycopg cursor gives them. Against a real server."""

from __future__ import annotations

import asyncio
import collections
import os
import selectors
import signal
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import psycopg
import pytest

from pgslots import _queries as q
from pgslots import _wire
from pgslots._wire import Statement

T = TypeVar("T")

LOOKUP = "SELECT * FROM wire_t(%(x)s, %(label)s, %(x)s)"


def _prepared(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute("SELECT name FROM pg_prepared_statements WHERE name LIKE 'pgslots\\_%' ORDER BY name").fetchall()
    return [r[0] for r in rows]


def _function(conn: psycopg.Connection[Any], columns: str, body: str) -> None:
    conn.execute("DROP FUNCTION IF EXISTS wire_t(int, text, int)")
    conn.execute(f"CREATE FUNCTION wire_t(x int, label text, y int) RETURNS TABLE ({columns}) LANGUAGE sql AS $$ {body} $$")


def test_a_statement_is_converted_once_per_name() -> None:
    s = Statement("SELECT f(%(a)s, %(b)s, %(a)s)")
    assert s.text == b"SELECT f($1, $2, $1)"
    assert s.names == ("a", "b")
    assert s.prepared_as == Statement("SELECT f(%(a)s, %(b)s, %(a)s)").prepared_as != Statement("SELECT f(%(b)s)").prepared_as
    for bad in ("SELECT %s", "SELECT 7 % 2", "SELECT '%%'"):
        with pytest.raises(ValueError, match="placeholders other than"):
            Statement(bad)
    for query in (q.ACQUIRE, q.RELEASE, q.RELEASE_FAST, q.RENEW_LEASES, q.KEEP_ALIVE, q.ACQUIRE_EACH, q.RELEASE_EACH):
        assert _wire.statement(query) is _wire.statement(query)  # made once


def test_prepared_once_and_again_after_the_server_forgot_it(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        _function(conn, "a int, b text", "SELECT x + y, label")
        stmt = _wire.statement(LOOKUP)
        assert _prepared(conn) == []
        for n in (1, 2, 3):
            assert _wire.run(conn, stmt, {"x": n, "label": "n"}) == [{"a": 2 * n, "b": "n"}]
        assert _prepared(conn) == [stmt.prepared_as.decode()]
        conn.execute("DEALLOCATE ALL")  # what a pooler's reset does
        assert _wire.run(conn, stmt, {"x": 5, "label": "again"}) == [{"a": 10, "b": "again"}]
        assert _wire.run(conn, stmt, {"x": 6, "label": "then"}) == [{"a": 12, "b": "then"}]
        assert _prepared(conn) == [stmt.prepared_as.decode()]


def test_a_function_whose_columns_changed_is_prepared_again(fresh_dsn: str) -> None:
    """A migration that re-creates a function with other columns: the next call answers with them."""
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        _function(conn, "a int", "SELECT x + y")
        stmt = _wire.statement(LOOKUP)
        assert _wire.run(conn, stmt, {"x": 1, "label": "one"}) == [{"a": 2}]
        _function(conn, "a int, b text, c uuid", "SELECT x * y, label, NULL::uuid")
        assert _wire.run(conn, stmt, {"x": 3, "label": "three"}) == [{"a": 9, "b": "three", "c": None}]
        assert _wire.run(conn, stmt, {"x": 4, "label": "four"}) == [{"a": 16, "b": "four", "c": None}]
        assert _prepared(conn) == [stmt.prepared_as.decode()]


def test_nothing_is_prepared_when_the_connection_says_not_to(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True, prepare_threshold=None) as conn:
        _function(conn, "a int, b text", "SELECT x + y, label")
        stmt = _wire.statement(LOOKUP)
        for n in range(8):
            assert _wire.run(conn, stmt, {"x": n, "label": "u"}) == [{"a": 2 * n, "b": "u"}]
        assert _prepared(conn) == []


def test_rows_and_errors_are_what_a_cursor_gives(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        columns = "a int, b text, c uuid, d timestamptz, e text[], f float8"
        _function(conn, columns, "SELECT x, label, NULL::uuid, now(), ARRAY[label, 'z'], 0.5")
        lookup, params = "SELECT * FROM wire_t(%(x)s, %(label)s, %(x)s)", {"x": 7, "label": 'a "quoted", {braced} name'}
        row = _wire.run(conn, _wire.statement(lookup), params)[0]
        by_cursor = conn.cursor(row_factory=psycopg.rows.dict_row).execute(lookup, params).fetchone()
        assert by_cursor is not None and row == by_cursor | {"d": row["d"]}
        assert row["e"] == ['a "quoted", {braced} name', "z"]
        with pytest.raises(psycopg.errors.DivisionByZero):
            _wire.run(conn, _wire.statement("SELECT 1 / %(x)s AS q"), {"x": 0})
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            _wire.run(conn, _wire.statement("SELECT pgslots.release(%(lease_id)s)"), {"lease_id": "not a uuid"})
        conn.execute("CREATE FUNCTION wire_no() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RAISE 'not here' USING ERRCODE = '0A000'; END $$")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="not here"):  # tried again unprepared, then raised
            _wire.run(conn, _wire.statement("SELECT wire_no() AS n"), None)
        with pytest.raises(psycopg.DataError, match="NUL"):
            _wire.run(conn, _wire.statement(lookup), {"x": 1, "label": "a\x00b"})  # refused before sending
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert _wire.run(conn, _wire.statement("SELECT pgslots.release(%(lease_id)s) AS r"), {"lease_id": uuid.uuid4()}) == [{"r": False}]
        assert _wire.run(conn, _wire.statement("SET application_name = 'x'"), None) == []


def test_async_prepared_once_and_again(fresh_dsn: str) -> None:
    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(fresh_dsn, autocommit=True) as conn:
            await conn.execute("DROP FUNCTION IF EXISTS wire_t(int, text, int)")
            await conn.execute("CREATE FUNCTION wire_t(x int, label text, y int) RETURNS TABLE (a int) LANGUAGE sql AS $$ SELECT x + y $$")
            stmt = _wire.statement(LOOKUP)
            for n in (1, 2):
                assert await _wire.arun(conn, stmt, {"x": n, "label": "n"}) == [{"a": 2 * n}]
            await conn.execute("DEALLOCATE ALL")
            assert await _wire.arun(conn, stmt, {"x": 4, "label": "n"}) == [{"a": 8}]
            await conn.execute("DROP FUNCTION wire_t(int, text, int)")
            await conn.execute(
                "CREATE FUNCTION wire_t(x int, label text, y int) RETURNS TABLE (a int, b text) LANGUAGE sql AS $$ SELECT x, label $$"
            )
            assert await _wire.arun(conn, stmt, {"x": 4, "label": "n"}) == [{"a": 4, "b": "n"}]
            with pytest.raises(psycopg.errors.DivisionByZero):
                await _wire.arun(conn, _wire.statement("SELECT 1 / %(x)s AS q"), {"x": 0})
            found = await conn.execute("SELECT count(*) FROM pg_prepared_statements WHERE name = %s", [stmt.prepared_as.decode()])
            assert await found.fetchone() == (1,)

    asyncio.run(main())


def test_async_answers_that_take_many_reads_and_parameters_that_take_many_writes(fresh_dsn: str) -> None:
    """The async wait reads an answer that comes in many pieces, and hands a send that fills libpq's
    output buffer (a parameter of several megabytes) to psycopg's wait."""

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(fresh_dsn, autocommit=True) as conn:
            many = _wire.statement("SELECT g AS n, repeat('x', 200) AS pad FROM generate_series(1, %(n)s) AS g")
            rows = await _wire.arun(conn, many, {"n": 50_000})
            assert len(rows) == 50_000 and rows[-1]["n"] == 50_000
            big = "y" * 8_000_000
            assert await _wire.arun(conn, _wire.statement("SELECT length(%(t)s::text) AS n"), {"t": big}) == [{"n": len(big)}]
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

    asyncio.run(main())


def test_a_cancelled_task_cancels_its_statement_on_the_server(fresh_dsn: str) -> None:
    """As psycopg does on an interrupted wait: the statement stops on the server, and the connection
    serves the next statement."""

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(fresh_dsn, autocommit=True) as conn:
            pid = conn.info.backend_pid
            slow = asyncio.ensure_future(_wire.arun(conn, _wire.statement("SELECT pg_sleep(%(s)s) AS z"), {"s": 30}))
            await asyncio.sleep(0.5)
            started = asyncio.get_running_loop().time()
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            assert asyncio.get_running_loop().time() - started < 5
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert await _wire.arun(conn, _wire.statement("SELECT %(x)s::int + 1 AS y"), {"x": 1}) == [{"y": 2}]
            with psycopg.connect(fresh_dsn) as other:
                row = other.execute("SELECT state, query FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
            assert row is not None and row[0] == "idle" and "pg_sleep" not in row[1]

    asyncio.run(main())


class _CountingLoop(asyncio.SelectorEventLoop):
    """asyncio's own loop, counting the readers added for each socket."""

    def __init__(self, selector: selectors.BaseSelector | None = None) -> None:
        super().__init__(selector)
        self.readers: collections.Counter[int] = collections.Counter()

    def add_reader(self, fd: Any, callback: Any, *args: Any) -> None:  # type: ignore[override]
        self.readers[fd] += 1
        super().add_reader(fd, callback, *args)


def _run_counting(main: Callable[[], Coroutine[Any, Any, T]], selector: selectors.BaseSelector | None = None) -> T:
    with asyncio.Runner(loop_factory=lambda: _CountingLoop(selector)) as runner:
        return runner.run(main())


def test_an_idle_loop_waits_for_the_answer_in_the_task(fresh_dsn: str) -> None:
    """With nothing else to do, the loop is not passed through for each statement (no reader is
    added for the connection's socket); with other work ready, in debug mode, or on a loop that is
    not asyncio's own on epoll, each answer is awaited through the loop."""
    plus = _wire.statement("SELECT %(x)s::int + 1 AS y")

    async def statements(busy: bool, debug: bool) -> tuple[int, list[int]]:
        """The readers added for the statements (psycopg's own connect adds some), and the answers."""
        async with await psycopg.AsyncConnection.connect(fresh_dsn, autocommit=True) as conn:
            loop = asyncio.get_running_loop()
            assert isinstance(loop, _CountingLoop)
            far = loop.call_later(40 * 86400, lambda: None)  # a timer 40 days away bounds no wait
            await asyncio.sleep(0.15)  # the loop drops the timer connect cancelled
            if debug:
                loop.set_debug(True)  # (which schedules a callback: the first statement may go through the loop)
            before = loop.readers[conn.pgconn.socket]
            done = False

            async def spin() -> None:
                while not done:
                    await asyncio.sleep(0)

            spinner = asyncio.ensure_future(spin()) if busy else None
            answers = [(await _wire.arun(conn, plus, {"x": n}))[0]["y"] for n in range(20)]
            done = True
            if spinner is not None:
                await spinner
            far.cancel()
            return loop.readers[conn.pgconn.socket] - before, answers

    for busy, debug, selector, through_the_loop in (
        (False, False, None, False),
        (True, False, None, True),
        (False, True, None, True),
        (False, False, selectors.PollSelector(), True),
    ):
        readers, answers = _run_counting(lambda busy=busy, debug=debug: statements(busy, debug), selector)  # type: ignore[misc]
        assert answers == list(range(1, 21))
        assert readers >= 20 if through_the_loop else readers == 0, (busy, debug, selector, readers)


def test_the_loop_is_not_held_up_while_a_statement_waits(fresh_dsn: str) -> None:
    """While a statement waits in its task (the loop otherwise idle), the loop still serves, on
    time, a timer, a callback from another thread, and another socket that becomes readable."""
    slow = _wire.statement("SELECT pg_sleep(%(s)s) AS z")
    Other = Callable[[asyncio.AbstractEventLoop, Callable[[], None]], Awaitable[float]]

    async def late_by(other: Other) -> tuple[float, list[bool]]:
        async with await psycopg.AsyncConnection.connect(fresh_dsn, autocommit=True) as conn:
            loop = asyncio.get_running_loop()
            assert isinstance(loop, _CountingLoop)
            await asyncio.sleep(0.15)  # the loop drops the timer connect cancelled
            sock, before = conn.pgconn.socket, loop.readers[conn.pgconn.socket]
            in_the_task: list[bool] = []  # whether the statement waited in its task when the thread acted

            def on_the_way() -> None:
                in_the_task.append(loop.readers[sock] == before)

            waiting = asyncio.ensure_future(other(loop, on_the_way))
            await asyncio.sleep(0)  # it waits now
            await _wire.arun(conn, slow, {"s": 0.6})
            return await waiting, in_the_task

    async def timer(loop: asyncio.AbstractEventLoop, on_the_way: Callable[[], None]) -> float:
        due = loop.time() + 0.1
        await asyncio.sleep(0.1)
        return loop.time() - due

    async def from_a_thread(loop: asyncio.AbstractEventLoop, on_the_way: Callable[[], None]) -> float:
        called: asyncio.Future[float] = loop.create_future()
        at: list[float] = []

        def send() -> None:
            time.sleep(0.1)
            on_the_way()
            at.append(time.monotonic())
            loop.call_soon_threadsafe(lambda: called.set_result(time.monotonic()))

        threading.Thread(target=send).start()
        return await called - at[0]

    async def a_socket(loop: asyncio.AbstractEventLoop, on_the_way: Callable[[], None]) -> float:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        at: list[float] = []

        def send() -> None:
            time.sleep(0.1)
            on_the_way()
            at.append(time.monotonic())
            theirs.send(b"x")

        threading.Thread(target=send).start()
        try:
            assert await loop.sock_recv(ours, 1) == b"x"
            return time.monotonic() - at[0]
        finally:
            ours.close()
            theirs.close()

    for other, acted in ((timer, []), (from_a_thread, [True]), (a_socket, [True])):
        lateness, in_the_task = _run_counting(lambda other=other: late_by(other))  # type: ignore[misc]
        assert in_the_task == acted, other.__name__
        assert lateness < 0.1, (other.__name__, lateness)  # held up until the statement's end: 0.5 s


def test_ctrl_c_while_a_statement_waits_on_an_idle_loop(fresh_dsn: str) -> None:
    """Ctrl-C during a statement that waits in the task (no reader added): under asyncio's runner
    the main task is cancelled; with Python's own handler, KeyboardInterrupt comes out of the wait.
    Either way the statement stops on the server, within seconds."""
    slow = _wire.statement("SELECT pg_sleep(%(s)s) AS z")
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    seen: list[tuple[int, int]] = []  # (backend pid, readers added for the statement before Ctrl-C)

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(fresh_dsn, autocommit=True) as conn:
            loop = asyncio.get_running_loop()
            assert isinstance(loop, _CountingLoop)
            await asyncio.sleep(0.2)  # the loop drops the timer connect cancelled: nothing else is due
            sock, before = conn.pgconn.socket, loop.readers[conn.pgconn.socket]

            def ctrl_c() -> None:
                seen.append((conn.info.backend_pid, loop.readers[sock] - before))
                os.kill(os.getpid(), signal.SIGINT)

            threading.Timer(0.5, ctrl_c).start()
            await _wire.arun(conn, slow, {"s": 30})

    def under_the_runner() -> None:
        with asyncio.Runner(loop_factory=_CountingLoop) as runner:  # handles SIGINT: cancels main()
            runner.run(main())

    def with_pythons_handler() -> None:
        loop = _CountingLoop()
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    def stopped(pid: int) -> bool:
        with psycopg.connect(fresh_dsn) as other:
            row = other.execute("SELECT query FROM pg_stat_activity WHERE pid = %s AND state = 'active'", [pid]).fetchone()
        return row is None or "pg_sleep" not in row[0]

    for run in (under_the_runner, with_pythons_handler):
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            run()
        assert time.monotonic() - started < 10
        pid, readers = seen[-1]
        assert readers == 0, (run.__name__, "the statement waited through the loop")
        deadline = time.monotonic() + 5
        while not stopped(pid):
            assert time.monotonic() < deadline, f"the interrupted statement still runs on the server ({run.__name__})"
            time.sleep(0.05)
