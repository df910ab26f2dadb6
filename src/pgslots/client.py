"""The client: one per database. Holds the connection pools and the background engine, and offers
the admin calls (create, read, list, update, delete limits; leases; sweep; migrate).

Most programs use the default client, configured by :func:`configure` or the environment
(``PGSLOTS_DSN``, ``DATABASE_URL``, libpq's ``PG*`` variables). Programs that talk to several
databases make one :class:`Client` each and pass it as ``client=``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from . import _queries as q
from ._config import resolve_dsn
from ._engine import Engine
from .errors import MIGRATE_HINT, InvalidArgumentError, LimitNotFoundError, PgSlotsError, SchemaNotInstalledError, translate
from .migrate import LATEST_VERSION, migrate

DEFAULT_POOL_SIZE = 2  # calls are single short statements: two connections serve many threads
IDLE_SECONDS = 10.0  # a pooled connection above the first closes after this long unused


@dataclass(frozen=True)
class LimitInfo:
    """A limit as read now; ``active_slots`` already accounts for decay."""

    id: uuid.UUID
    name: str
    limit: int
    active: bool
    slot_decay_per_second: float
    active_slots: float
    leased_slots: int
    unleased_slots: float
    denied_slots: int
    avg_slot_occupancy_seconds: float
    leases: int
    expired_leases: int
    waiters: int
    oldest_waiter_seconds: float | None
    created: datetime
    updated: datetime


@dataclass(frozen=True)
class LeaseInfo:
    """One lease, as listed for operators."""

    lease_id: uuid.UUID
    limit_names: list[str]
    slots: int
    fencing_token: int
    acquired_at: datetime
    expires_at: datetime
    expired: bool
    host: str | None
    pid: int | None
    application_name: str | None
    holder: dict[str, Any] | None


def _application_name() -> str:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"pgslots:{prog}"[:63]


def _dicts(cur: Any, rows: list[Any]) -> list[dict[str, Any]]:
    """Rows as dicts by column name: what a dict row factory gives, for less on the hot path."""
    if not rows:
        return []
    names = [column.name for column in cur.description]
    return [dict(zip(names, row, strict=True)) for row in rows]


def raise_translated(exc: psycopg.Error) -> NoReturn:
    mapped = translate(exc)
    if mapped is None:
        raise exc
    raise mapped from exc


class Client:
    """Everything pgslots needs to talk to one database."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: ConnectionPool[Any] | AsyncConnectionPool[Any] | None = None,
        listen_dsn: str | None = None,
        listen: bool = True,
        max_connections: int = DEFAULT_POOL_SIZE,
    ) -> None:
        if pool is not None and dsn is None and isinstance(pool.conninfo, str):
            dsn = pool.conninfo
        self.dsn = resolve_dsn(dsn)
        self._connect_kwargs: dict[str, Any] = {}
        if "application_name" not in psycopg.conninfo.conninfo_to_dict(self.dsn) and not os.environ.get("PGAPPNAME"):
            self._connect_kwargs["application_name"] = _application_name()
        self.max_connections = max_connections
        self._pool: ConnectionPool[Any] | None = pool if isinstance(pool, ConnectionPool) else None
        self._owns_pool = self._pool is None
        self._apools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[AsyncConnectionPool[Any]]] = (
            weakref.WeakKeyDictionary()
        )
        if isinstance(pool, AsyncConnectionPool):
            self._given_apool: AsyncConnectionPool[Any] | None = pool
        else:
            self._given_apool = None
        self._owners: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()
        self._schema_checked = False
        self._listen_dsn = listen_dsn or self.dsn
        self._listen = listen
        self.engine = Engine(self._listen_dsn, self._connect_kwargs, listen=listen)
        self._pid = os.getpid()

    def _after_fork(self) -> None:
        """A forked child must not use its parent's connections or wait on its parent's listener
        thread (which did not survive the fork): it starts afresh."""
        self._pid = os.getpid()
        self._pool = None if self._owns_pool else self._pool
        self._apools = weakref.WeakKeyDictionary()
        self._owners = set()
        self._lock = threading.Lock()
        self.engine = Engine(self._listen_dsn, self._connect_kwargs, listen=self._listen)

    def __repr__(self) -> str:
        safe = psycopg.conninfo.conninfo_to_dict(self.dsn)
        safe.pop("password", None)
        return f"Client({safe!r})"

    # ---- connections ------------------------------------------------------------------------

    def pool(self) -> ConnectionPool[Any]:
        if self._pid != os.getpid():
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
                    kwargs={"autocommit": True, **self._connect_kwargs},
                    max_idle=IDLE_SECONDS,
                    open=True,
                    name="pgslots",
                )
            return self._pool

    async def apool(self) -> AsyncConnectionPool[Any]:
        if self._pid != os.getpid():
            self._after_fork()
        if self._given_apool is not None:
            return self._given_apool
        loop = asyncio.get_running_loop()
        opening = self._apools.get(loop)
        if opening is None:
            # Stored before the first await: concurrent first calls share one pool.
            opening = self._apools[loop] = loop.create_task(self._open_apool())
        try:
            return await asyncio.shield(opening) if not opening.done() else opening.result()
        except BaseException:
            if opening.done() and (opening.cancelled() or opening.exception() is not None):
                self._apools.pop(loop, None)  # let a later call try again
            raise

    async def _open_apool(self) -> AsyncConnectionPool[Any]:
        await self._aprobe()
        apool = AsyncConnectionPool(
            self.dsn,
            min_size=1,
            max_size=self.max_connections,
            kwargs={"autocommit": True, **self._connect_kwargs},
            max_idle=IDLE_SECONDS,
            open=False,
            name="pgslots-async",
        )
        await apool.open()
        self._owners.add(asyncio.get_running_loop().create_task(self._own_apool(apool), name="pgslots-pool-owner"))
        return apool

    @staticmethod
    async def _own_apool(apool: AsyncConnectionPool[Any]) -> None:
        """Lives as long as the event loop: when asyncio.run() ends and cancels every task, this one
        closes the loop's connections, so none outlives its loop."""
        try:
            await asyncio.Event().wait()
        finally:
            # The pool's own workers are being cancelled too, which stops AsyncConnectionPool.close()
            # half-way; its idle connections are closed here first (libpq's finish is synchronous).
            for conn in list(getattr(apool, "_pool", ())):
                with contextlib.suppress(Exception):
                    conn.pgconn.finish()
            with contextlib.suppress(BaseException):
                await apool.close(timeout=1)

    def _probe(self) -> None:
        """One direct connection before a pool exists: a clear error for a wrong DSN or a missing
        schema, instead of a pool that retries in the background until a timeout."""
        if self._schema_checked:
            return
        try:
            with psycopg.connect(self.dsn, autocommit=True, **self._probe_kwargs()) as conn:
                row = conn.execute(q.SCHEMA_VERSION).fetchone()
        except psycopg.Error as exc:
            raise_translated(exc)
        self._check_version(row[0] if row else None)

    async def _aprobe(self) -> None:
        if self._schema_checked:
            return
        try:
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, **self._probe_kwargs()) as conn:
                row = await (await conn.execute(q.SCHEMA_VERSION)).fetchone()
        except psycopg.Error as exc:
            raise_translated(exc)
        self._check_version(row[0] if row else None)

    def _probe_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self._connect_kwargs)
        if "connect_timeout" not in psycopg.conninfo.conninfo_to_dict(self.dsn):
            kwargs["connect_timeout"] = 10
        return kwargs

    def _check_version(self, version: int | None) -> None:
        if version is None or version < LATEST_VERSION:
            raise SchemaNotInstalledError(
                f"The pgslots schema in this database is at version {version or 0}, this library needs "
                f"{LATEST_VERSION}: {MIGRATE_HINT.replace('install', 'upgrade')}."
            )
        self._schema_checked = True

    def call(self, query: Any, params: Any = None, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """Runs one statement on a pooled connection; pgslots errors come out translated."""
        try:
            with self.pool().connection(timeout=timeout) as conn:
                cur = conn.execute(query, params)
                return _dicts(cur, cur.fetchall() if cur.description else [])
        except psycopg.Error as exc:
            raise_translated(exc)

    async def acall(self, query: Any, params: Any = None, *, timeout: float | None = None) -> list[dict[str, Any]]:
        try:
            apool = await self.apool()
            async with apool.connection(timeout=timeout) as conn:
                cur = await conn.execute(query, params)
                return _dicts(cur, await cur.fetchall() if cur.description else [])
        except psycopg.Error as exc:
            raise_translated(exc)

    def call_on(self, conn: psycopg.Connection[Any], query: Any, params: Any = None) -> list[dict[str, Any]]:
        """Runs one statement on the caller's own connection (inside the caller's transaction)."""
        try:
            with conn.cursor(row_factory=dict_row) as cur:
                cur.execute(query, params)
                return cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise_translated(exc)

    async def aclose(self) -> None:
        """Closes this event loop's pool now (it is also closed when the loop ends)."""
        loop = asyncio.get_running_loop()
        opening = self._apools.pop(loop, None)
        if opening is not None and opening.done() and not opening.cancelled() and opening.exception() is None:
            await opening.result().close()

    def close(self) -> None:
        self.engine.stop()
        with self._lock:
            if self._pool is not None and self._owns_pool:
                self._pool.close()
                self._pool = None

    # ---- admin ------------------------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Installs or upgrades the schema; returns the migration versions applied."""
        applied = migrate(self.dsn)
        self._schema_checked = False
        return applied

    def create_limit(
        self,
        name: str,
        limit: int,
        *,
        slot_decay_per_second: float = 0.0,
        active: bool = True,
        active_slots: int = 0,
    ) -> LimitInfo:
        _check_limit_args(limit=limit, slot_decay_per_second=slot_decay_per_second, active_slots=active_slots)
        self.call(
            q.CREATE_LIMIT,
            {
                "name": name,
                "limit": limit,
                "slot_decay_per_second": float(slot_decay_per_second),
                "active": active,
                "active_slots": active_slots,
            },
        )
        return self.read_limit(name)

    def update_limit(
        self,
        name: str,
        *,
        limit: int | None = None,
        slot_decay_per_second: float | None = None,
        active: bool | None = None,
        active_slots: int | None = None,
        new_name: str | None = None,
    ) -> LimitInfo:
        _check_limit_args(limit=limit, slot_decay_per_second=slot_decay_per_second, active_slots=active_slots)
        self.call(
            q.UPDATE_LIMIT,
            {
                "name": name,
                "limit": limit,
                "slot_decay_per_second": None if slot_decay_per_second is None else float(slot_decay_per_second),
                "active": active,
                "active_slots": active_slots,
                "new_name": new_name,
            },
        )
        return self.read_limit(new_name or name)

    def delete_limit(self, name: str) -> None:
        self.call(q.DELETE_LIMIT, {"name": name})

    def read_limit(self, name: str) -> LimitInfo:
        found = self.read_limits([name])
        if not found:
            raise LimitNotFoundError(f"Global concurrency limit {name!r} not found.")
        return found[0]

    def read_limits(self, names: Sequence[str] | None = None) -> list[LimitInfo]:
        rows = self.call(q.GET_LIMITS, {"names": None if names is None else list(names)})
        return [LimitInfo(**row) for row in rows]

    def list_leases(self, name: str | None = None) -> list[LeaseInfo]:
        return [LeaseInfo(**row) for row in self.call(q.LIST_LEASES, {"name": name})]

    def release(self, lease_id: uuid.UUID | str) -> bool:
        """Releases one lease (any holder's); False when it was already gone."""
        try:
            parsed = lease_id if isinstance(lease_id, uuid.UUID) else uuid.UUID(str(lease_id))
        except ValueError:
            raise InvalidArgumentError(f"{lease_id!r} is not a lease id: lease ids are UUIDs.") from None
        rows = self.call(q.RELEASE, {"lease_id": parsed})
        return bool(rows and rows[0]["release"])

    def sweep(self) -> int:
        """Reclaims every expired lease now; returns how many."""
        rows = self.call(q.SWEEP)
        return int(rows[0]["sweep"])


def _check_limit_args(**values: Any) -> None:
    """Rejects what the SQL would reject too, before any round trip: a clearer message for Python types."""
    for label, value in values.items():
        if value is None:
            continue
        integer = label != "slot_decay_per_second"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            kind = "a whole number" if integer else "a number"
            raise InvalidArgumentError(f"{label} must be {kind}, got {value!r}.")
        if not math.isfinite(value) or value < 0:
            raise InvalidArgumentError(f"{label} must be a finite number >= 0, got {value!r}.")
        if integer and value > 2**31 - 1:
            raise InvalidArgumentError(f"{label} must be at most {2**31 - 1}, got {value!r}.")


_default: Client | None = None
_default_lock = threading.Lock()


def configure(
    dsn: str | None = None,
    *,
    pool: ConnectionPool[Any] | AsyncConnectionPool[Any] | None = None,
    listen_dsn: str | None = None,
    listen: bool = True,
    max_connections: int = DEFAULT_POOL_SIZE,
) -> Client:
    """Sets the database the module-level functions use; returns the new default client."""
    global _default
    with _default_lock:
        old, _default = _default, Client(dsn, pool=pool, listen_dsn=listen_dsn, listen=listen, max_connections=max_connections)
    if old is not None:
        old.close()
    return _default


def default_client() -> Client:
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def _forget_after_fork() -> None:
    # A forked child must not share its parent's connections or engine thread.
    global _default
    _default = None


os.register_at_fork(after_in_child=_forget_after_fork)

__all__ = ["Client", "LeaseInfo", "LimitInfo", "PgSlotsError", "configure", "default_client"]
