"""The plumbing behind a :class:`~pgslots.Client`: connection pools, the schema probe, the engine,
and the three ways to run one statement (pooled sync, pooled async, on the caller's connection).

Private: the drivers in ``pgslots.sync`` and ``pgslots.asyncio`` and the admin calls of ``Client``
talk to it; users never do. Every driver error leaves it as a pgslots error (see errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any, Generic, LiteralString, TypeVar

import psycopg
from psycopg.adapt import Dumper
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from . import _queries as q
from . import _wire
from ._config import check_dsn, configured_dsn, resolve_dsn
from ._engine import Engine, connection_timeouts
from ._flow import Link, NameList
from ._translate import database_errors, server_answered
from .errors import MIGRATE_HINT, DatabaseUnavailableError, SchemaNotInstalledError
from .migrate import LATEST_VERSION

logger = logging.getLogger("pgslots")

DEFAULT_POOL_SIZE = 2  # calls are single short statements: two connections serve many threads
IDLE_SECONDS = 10.0  # a pooled connection above the first closes after this long unused


# This process's id, kept by a fork hook: the hot path asks it several times a cycle (to notice a
# fork, after which a child starts afresh), and os.getpid() is a system call each time. Python runs
# the hook in every child it forks (os.fork, multiprocessing, and embedders such as uWSGI, which
# must call PyOS_AfterFork_Child for Python's own threads to work in the child).
_process_id = os.getpid()


def _forked() -> None:
    global _process_id
    _process_id = os.getpid()


os.register_at_fork(after_in_child=_forked)


def process_id() -> int:
    """os.getpid(), without a system call."""
    return _process_id


def _application_name() -> str:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"pgslots:{prog}"[:63]


class _NamesDumper(Dumper):
    """Limit names as the flows send them (:class:`~pgslots._flow.NameList`): the text-array literal
    they carry, as it is. (A connection made without this dumper adapts them as any list.)"""

    oid = psycopg.adapters.types["text"].array_oid

    def dump(self, obj: Any) -> bytes:
        literal: bytes = obj.literal
        return literal


psycopg.adapters.register_dumper(NameList, _NamesDumper)


# A kept connection goes back to its pool after this many statements in a row, so that the pool's
# own upkeep (replacing connections older than its max_lifetime) reaches it too.
KEPT_USES = 1000

C = TypeVar("C", psycopg.Connection[Any], psycopg.AsyncConnection[Any])


class _Keeper(Generic[C]):
    """The connection the last statement used, kept out of its pool for the next statement while no
    other statement runs or waits for a connection: statements mostly come one after another, and
    a pool's get and put cost more than the rest of the library's Python around a statement. A
    statement that finds another under way takes its connection from the pool and puts it back,
    so a statement waiting for the pool is never kept waiting by a connection nobody uses. Not
    locked: the async face's keeper belongs to one event loop; the sync face's is used under a lock."""

    __slots__ = ("calls", "keeps", "kept", "uses")

    def __init__(self, keeps: bool) -> None:
        self.keeps = keeps  # False for a pool the caller gave (its own code may wait for it) and once closing
        self.kept: C | None = None
        self.calls = 0  # statements under way (waiting for a connection included)
        self.uses = 0  # statements the kept connection has run in a row

    def take(self) -> C | None:
        """A statement starts (it counts until done): the kept connection, or None (ask the pool)."""
        self.calls += 1
        kept = self.kept
        if kept is not None:
            self.kept = None
            self.uses += 1
        return kept

    def done(self, conn: C | None, ok: bool) -> C | None:
        """A statement that ran on `conn` ended (`ok`: it was answered): the connection for the pool,
        or None when it is kept."""
        self.calls -= 1
        if ok and self.calls == 0 and self.keeps and self.kept is None:
            if self.uses < KEPT_USES:
                self.kept = conn
                return None
            self.uses = 0
        return conn

    def give_back(self) -> C | None:
        """Stops keeping (the pool closes, or the loop ends): the connection kept, if any."""
        self.keeps = False
        kept, self.kept = self.kept, None
        return kept


class _LoopPool(_Keeper[psycopg.AsyncConnection[Any]]):
    """One event loop's pool, with its kept connection; only the loop's own thread touches it."""

    __slots__ = ("loop", "pool")

    def __init__(self, loop: asyncio.AbstractEventLoop | None, pool: AsyncConnectionPool[Any], keeps: bool) -> None:
        super().__init__(keeps)
        self.loop, self.pool = loop, pool


class Connections:
    """Pools, probe and engine of one client. The DSN is resolved on first use: a client made with
    nothing configured raises ConfigurationError when it first connects, or, when its program opted
    in to the embedded server, starts that server then (from a worker thread inside an event loop)."""

    def __init__(
        self,
        dsn: str | None,
        pool: ConnectionPool[Any] | AsyncConnectionPool[Any] | None,
        listen_dsn: str | None,
        listen: bool,
        max_connections: int,
        prepared_statements: bool | None = None,
        embedded: bool | None = None,
    ) -> None:
        if pool is not None and dsn is None and isinstance(pool.conninfo, str):
            dsn = pool.conninfo
        self._explicit_dsn = configured_dsn(dsn)  # None: nothing configured, see resolve_dsn
        if self._explicit_dsn:
            check_dsn(self._explicit_dsn)
        self._embedded = embedded
        self._dsn: str | None = self._explicit_dsn
        self._listen_dsn = listen_dsn
        self.listen = listen
        self.max_connections = max_connections
        self._pool: ConnectionPool[Any] | None = pool if isinstance(pool, ConnectionPool) else None
        self._owns_pool = self._pool is None
        # The sync face's kept connection (see _Keeper), shared by the process's threads.
        self._keeper: _Keeper[psycopg.Connection[Any]] = self._new_keeper()
        self._keeper_lock = threading.Lock()
        self._given_apool = _LoopPool(None, pool, keeps=False) if isinstance(pool, AsyncConnectionPool) else None
        self._apools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[_LoopPool]] = weakref.WeakKeyDictionary()
        self._owners: set[asyncio.Task[None]] = set()
        # The open pool of the loop that used one last, found without a lookup by weak reference
        # (every async statement asks for its loop's pool); forgotten as that loop ends.
        self._last_apool: _LoopPool | None = None
        self._lock = threading.Lock()
        self._schema_checked = False
        self._engine: Engine | None = None
        self._pid = process_id()
        # Server-side prepared statements (each statement is prepared the first time a connection runs it: _wire.py)
        # break behind a pooler in transaction mode, where consecutive statements of one connection
        # may reach different server connections. None: decided by the probe (see _check_version).
        self._prepare = prepared_statements

    # ---- where the database is ----------------------------------------------------------------

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            self._dsn = resolve_dsn(self._explicit_dsn, embedded=self._embedded)  # may start the embedded server: blocks
        return self._dsn

    async def adsn(self) -> str:
        if self._dsn is None:
            await asyncio.to_thread(lambda: self.dsn)
        return self.dsn

    def connect_kwargs(self) -> dict[str, Any]:
        if "application_name" in psycopg.conninfo.conninfo_to_dict(self.dsn) or os.environ.get("PGAPPNAME"):
            return {}
        return {"application_name": _application_name()}

    def _pooled_kwargs(self) -> dict[str, Any]:
        """How the pools connect: autocommit, bounded waits for a server that does not answer (a
        black-holed network must not hold a body's exit), no prepared statements behind a pooler."""
        kwargs: dict[str, Any] = {"autocommit": True, **connection_timeouts(self.dsn), **self.connect_kwargs()}
        if self._prepare is False:
            kwargs["prepare_threshold"] = None
        return kwargs

    @property
    def engine(self) -> Engine:
        """The background worker (created on first use; its thread starts when needed)."""
        if self._pid != process_id():
            self._after_fork()
        engine = self._engine
        if engine is None:
            with self._lock:
                if self._engine is None:
                    kwargs = self.connect_kwargs() if self._listen_dsn else self._pooled_kwargs()
                    kwargs.pop("autocommit", None)
                    # Through a pooler, the engine's backend is not this process's: liveness by time alone.
                    direct = bool(self._listen_dsn) or self._prepare is not False
                    self._engine = Engine(self._listen_dsn or self.dsn, kwargs, listen=self.listen, bind_session=direct)
                engine = self._engine
        return engine

    def ready_link(self, asynchronous: bool = False) -> Link | None:
        """What a flow's Connect command answers, when there is nothing left for it to do: the pool
        of this face (and, for the async face, of this event loop) is open and the engine made. The
        flow then starts with its first call. None: the flow connects first."""
        engine = self._engine
        if engine is None or self._pid != process_id():
            return None
        if asynchronous:
            loop = asyncio.get_running_loop()
            last = self._last_apool
            if self._given_apool is None and (last is None or last.loop is not loop):
                opening = self._apools.get(loop)
                if opening is None or not opening.done() or opening.cancelled() or opening.exception() is not None:
                    return None
        elif self._pool is None:
            return None
        return engine.link()

    def _after_fork(self) -> None:
        """A forked child must not use its parent's connections or wait on its parent's listener
        thread (which did not survive the fork): it starts afresh."""
        self._pid = process_id()
        self._pool = None if self._owns_pool else self._pool
        self._keeper = self._new_keeper()
        self._keeper_lock = threading.Lock()
        self._apools = weakref.WeakKeyDictionary()
        self._last_apool = None
        self._owners = set()
        self._lock = threading.Lock()
        self._engine = None

    # ---- pools --------------------------------------------------------------------------------

    def _new_keeper(self) -> _Keeper[psycopg.Connection[Any]]:
        return _Keeper(keeps=self._owns_pool)  # never from a pool the caller gave: its code may wait for it

    def pool(self) -> ConnectionPool[Any]:
        if self._pid != process_id():
            self._after_fork()
        pool = self._pool
        if pool is not None:
            return pool  # the hot path: no lock once the pool exists
        with self._lock:
            if self._pool is None:
                self._probe()
                self._pool = ConnectionPool(
                    self.dsn,
                    min_size=1,
                    max_size=self.max_connections,
                    kwargs=self._pooled_kwargs(),
                    max_idle=IDLE_SECONDS,
                    open=True,
                    name="pgslots",
                )
            return self._pool

    async def apool(self) -> AsyncConnectionPool[Any]:
        return (await self._loop_pool()).pool

    async def _loop_pool(self) -> _LoopPool:
        if self._pid != process_id():
            self._after_fork()
        if self._given_apool is not None:
            return self._given_apool
        loop = asyncio.get_running_loop()
        last = self._last_apool
        if last is not None and last.loop is loop:
            return last  # the hot path
        opening = self._apools.get(loop)
        if opening is None:
            # Stored before the first await: concurrent first calls share one pool.
            opening = self._apools[loop] = loop.create_task(self._open_apool())
        try:
            here = await asyncio.shield(opening) if not opening.done() else opening.result()
            self._last_apool = here
            return here
        except BaseException:
            if opening.done() and (opening.cancelled() or opening.exception() is not None):
                self._apools.pop(loop, None)  # let a later call try again
            raise

    async def _open_apool(self) -> _LoopPool:
        dsn = await self.adsn()
        await self._aprobe()
        apool = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=self.max_connections,
            kwargs=self._pooled_kwargs(),
            max_idle=IDLE_SECONDS,
            open=False,
            name="pgslots-async",
        )
        await apool.open()
        here = _LoopPool(asyncio.get_running_loop(), apool, keeps=True)
        self._owners.add(asyncio.get_running_loop().create_task(self._own_apool(here), name="pgslots-pool-owner"))
        return here

    async def _own_apool(self, here: _LoopPool) -> None:
        """Lives as long as the event loop: when asyncio.run() ends and cancels every task, this one
        closes the loop's connections, so none outlives its loop, and forgets the loop's pool (the
        task that opened it refers to the loop: kept, it would keep every finished loop alive)."""
        loop = asyncio.get_running_loop()
        apool = here.pool
        try:
            await asyncio.Event().wait()
        finally:
            # The pool's own workers are being cancelled too, which stops AsyncConnectionPool.close()
            # half-way; its idle connections (and the one kept out of it) are closed here first
            # (libpq's finish is synchronous).
            kept = here.give_back()
            for conn in [*getattr(apool, "_pool", ()), kept]:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.pgconn.finish()
            with contextlib.suppress(BaseException):
                await apool.close(timeout=1)
            self._forget_apool(loop)  # the loop is ending: whatever it opened is closing
            self._owners.discard(asyncio.current_task())

    def _forget_apool(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task[_LoopPool] | None:
        """The loop's pool is closing: the next call in that loop (if any) opens another."""
        if self._last_apool is not None and self._last_apool.loop is loop:
            self._last_apool = None
        return self._apools.pop(loop, None)

    # ---- the schema probe ---------------------------------------------------------------------

    def _probe(self) -> None:
        """One direct connection before a pool exists: a clear error for a wrong DSN or a missing
        schema, instead of a pool that retries in the background until a timeout."""
        if self._schema_checked:
            return
        with database_errors(), psycopg.connect(self.dsn, autocommit=True, **self._probe_kwargs()) as conn:
            row = conn.execute(q.PROBE).fetchone()
            self._check_version(row, conn.info.port)

    async def _aprobe(self) -> None:
        if self._schema_checked:
            return
        with database_errors():
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, **self._probe_kwargs()) as conn:
                row = await (await conn.execute(q.PROBE)).fetchone()
                self._check_version(row, conn.info.port)

    def _probe_kwargs(self) -> dict[str, Any]:
        kwargs = self.connect_kwargs()
        if "connect_timeout" not in psycopg.conninfo.conninfo_to_dict(self.dsn):
            kwargs["connect_timeout"] = 10
        return kwargs

    def _check_version(self, row: Any, connected_port: int) -> None:
        version, server_port = row if row else (None, None)
        if self._prepare is None and server_port is not None and server_port != connected_port:
            self._prepare = False
            logger.info(
                "pgslots: the server listens on port %s, this client connected to %s: a pooler is in between, "
                "so statements are not prepared on the server.",
                server_port,
                connected_port,
            )
        if version is None or version < LATEST_VERSION:
            raise SchemaNotInstalledError(
                f"The pgslots schema in this database is at version {version or 0}, this library needs "
                f"{LATEST_VERSION}: {MIGRATE_HINT.replace('install', 'upgrade')}."
            )
        self._schema_checked = True

    def schema_changed(self) -> None:
        self._schema_checked = False

    # ---- running statements -------------------------------------------------------------------

    def call(self, query: LiteralString, params: dict[str, Any] | None = None, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """Runs one statement of ``_queries.py`` on a pooled connection (see _wire.py), the one the
        last statement used when it is kept (see _Keeper)."""
        stmt = _wire.statement(query)
        try:
            with database_errors():
                pool = self.pool()
                keeper = self._keeper
                with self._keeper_lock:
                    conn = keeper.take()
                ok = False
                try:
                    if conn is None:
                        # getconn and putconn, not the pool's connection() context: the connection is
                        # in autocommit, so there is no transaction for it to end, and a statement costs less.
                        conn = pool.getconn(timeout=timeout)
                    rows = _wire.run(conn, stmt, params)
                    ok = True
                    return rows
                finally:
                    with self._keeper_lock:
                        back = keeper.done(conn, ok)
                    if back is not None:
                        pool.putconn(back)
        except DatabaseUnavailableError as exc:
            if exc.pool_exhausted and self._server_answers():
                raise self._busy_pool(exc) from exc.__cause__
            raise

    async def acall(
        self, query: LiteralString, params: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """``call`` on this event loop's pool, which keeps its own connection (see _Keeper)."""
        stmt = _wire.statement(query)
        try:
            with database_errors():
                here = self._last_apool  # _loop_pool's hot path, without awaiting a coroutine for it
                if here is None or here.loop is not asyncio.get_running_loop() or self._pid != process_id():
                    here = await self._loop_pool()
                conn = here.take()
                ok = False
                try:
                    if conn is None:
                        conn = await here.pool.getconn(timeout=timeout)  # see call()
                    rows = await _wire.arun(conn, stmt, params)
                    ok = True
                    return rows
                finally:
                    back = here.done(conn, ok)
                    if back is not None:
                        await here.pool.putconn(back)
        except DatabaseUnavailableError as exc:
            if exc.pool_exhausted and await asyncio.to_thread(self._server_answers):
                raise self._busy_pool(exc) from exc.__cause__
            raise

    def _server_answers(self) -> bool:
        """After no pooled connection was free in time: does the server answer a new connection? Its
        answer, even a refusal such as "too many clients", means the database is busy, not down."""
        try:
            with psycopg.connect(self.dsn, autocommit=True, **{**self._probe_kwargs(), "connect_timeout": 2}):
                return True
        except psycopg.Error as exc:
            return server_answered(exc)

    def _busy_pool(self, exc: DatabaseUnavailableError) -> DatabaseUnavailableError:
        return DatabaseUnavailableError(
            f"All {self.max_connections} pooled connections of this client stayed busy (another session may hold a "
            "lock they wait for) while the database answers: nothing was changed. Try again, raise the client's "
            "max_connections, or look for long transactions in pg_stat_activity.",
            pool_exhausted=True,
            answered=True,
        )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection inside one transaction, for several calls that must see one state."""
        pool = self.pool()
        with self._keeper_lock:  # counted as a statement under way: nothing is kept meanwhile
            kept = self._keeper.take()
        try:
            if kept is not None:
                pool.putconn(kept)  # to the pool, whose connection() gives it (or another) next
            with database_errors(), pool.connection() as conn, conn.transaction():
                yield conn
        finally:
            with self._keeper_lock:
                self._keeper.done(None, False)

    @staticmethod
    def call_on(conn: psycopg.Connection[Any], query: Any, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Runs one statement on the caller's own connection (inside the caller's transaction)."""
        with database_errors(), conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []

    # ---- closing ------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Closes this event loop's pool now (it is also closed when the loop ends)."""
        opening = self._forget_apool(asyncio.get_running_loop())
        if opening is not None and opening.done() and not opening.cancelled() and opening.exception() is None:
            here = opening.result()
            kept = here.give_back()
            if kept is not None:
                await here.pool.putconn(kept)
            await here.pool.close()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.stop()
        with self._keeper_lock:
            kept = self._keeper.give_back()
        with self._lock:
            if self._pool is not None and self._owns_pool:
                if kept is not None:
                    self._pool.putconn(kept)
                self._pool.close()
                self._pool = None
            self._keeper = self._new_keeper()  # the next pool keeps again

    def describe(self) -> str:
        if self._dsn is None:
            return "Client(embedded server, not started yet)"
        safe = psycopg.conninfo.conninfo_to_dict(self._dsn)
        safe.pop("password", None)
        return f"Client({safe!r})"
