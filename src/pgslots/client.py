"""The client: one per database. Offers the admin calls (create, read, list, update, delete
limits; leases; sweep; migrate); its connections and background worker stay private.

Most programs use the default client, configured by :func:`configure` or the environment
(``PGSLOTS_DSN``, ``DATABASE_URL``, libpq's ``PG*`` variables). Programs that talk to several
databases make one :class:`Client` each and pass it as ``client=``.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool, ConnectionPool

from . import _queries as q
from . import _validate as check
from ._connections import DEFAULT_POOL_SIZE, Connections
from ._definitions import Plan, apply_desired, parse
from ._observe import observe
from .errors import InvalidArgumentError, LimitExistsError, LimitNotFoundError, PgSlotsError
from .migrate import migrate, migration_plan
from .types import LeaseInfo, LimitInfo, MigrationPlan, Overview

MAX_SHOWN = 1000  # the most keys per template, or holders per limit, one overview reads

DEFAULT_FAIL_OPEN_SECONDS = 5.0


class Client:
    """Everything pgslots needs to talk to one database: the admin calls below, and the connections
    and background worker that ``concurrency()`` and ``rate_limit()`` use (pass ``client=``).

    Nothing connects until first used. With no DSN given or configured, the first call raises
    ``ConfigurationError``: the library never starts a server behind your back. ``embedded=True``
    (or ``PGSLOTS_EMBEDDED=1``) opts in to the embedded local server instead, started on first use
    if it is not running (see ``pgslots embedded``); for trying pgslots on one machine only.

    Behind PgBouncer in transaction mode, give ``listen_dsn`` a direct connection string for
    wake-ups (or ``listen=False`` to poll). ``prepared_statements``: None (the default) prepares
    statements on the server unless the first connection shows a pooler in between (the server
    listens on another port than the one connected to); False never does (a pooler on the same
    port), True always does (PgBouncer 1.21+ with ``max_prepared_statements``).

    ``fail_open=True``: when the database cannot be reached for ``fail_open_after_seconds`` (5 by
    default; a refused connection is retried until then), ``concurrency()``, ``rate_limit()`` and
    ``reserve()`` let the caller through without a slot and log a warning. A refusal from a database
    that answered is never failed open. Each call can override it with ``fail_open=``.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: ConnectionPool[Any] | AsyncConnectionPool[Any] | None = None,
        listen_dsn: str | None = None,
        listen: bool = True,
        max_connections: int = DEFAULT_POOL_SIZE,
        prepared_statements: bool | None = None,
        fail_open: bool = False,
        fail_open_after_seconds: float = DEFAULT_FAIL_OPEN_SECONDS,
        embedded: bool | None = None,
    ) -> None:
        check.flag("fail_open", fail_open)
        check.optional_flag("embedded", embedded)
        check.number("fail_open_after_seconds", fail_open_after_seconds, minimum=0, integer=False)
        self._connections = Connections(dsn, pool, listen_dsn, listen, max_connections, prepared_statements, embedded)
        self.fail_open = fail_open
        self.fail_open_after_seconds = float(fail_open_after_seconds)

    def _fail_open_after(self, per_call: bool | None) -> float | None:
        """Seconds of outage after which a call fails open, or None when it never does."""
        return self.fail_open_after_seconds if (self.fail_open if per_call is None else per_call) else None

    @property
    def dsn(self) -> str:
        """The connection string in use (with ``embedded=True``, resolving it may start the embedded server)."""
        return self._connections.dsn

    def __repr__(self) -> str:
        return self._connections.describe()

    def _call(self, query: Any, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self._connections.call(query, params)

    async def aclose(self) -> None:
        """Closes this event loop's pool now (it is also closed when the loop ends)."""
        await self._connections.aclose()

    def close(self) -> None:
        """Stops the background worker and closes the connections this client opened."""
        self._connections.close()

    # ---- admin ------------------------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Installs or upgrades the schema; returns the migration versions applied."""
        applied = migrate(self.dsn)
        self._connections.schema_changed()
        return applied

    def migration_plan(self) -> MigrationPlan:
        """What :meth:`migrate` would do now (pending migrations, changed functions), changing nothing."""
        return migration_plan(self.dsn)

    def create_limit(
        self,
        name: str,
        limit: int,
        *,
        slot_decay_per_second: float = 0.0,
        active: bool = True,
        active_slots: int = 0,
        window_seconds: float = 0.0,
        shadow: bool = False,
        max_keys: int | None = None,
        margin_seconds: float | None = None,
        exist_ok: bool = False,
    ) -> LimitInfo:
        """Creates a limit. ``slot_decay_per_second`` > 0 makes it a token bucket for rate limits;
        ``window_seconds`` > 0 instead grants at most ``limit`` slots in any span of that length.
        ``shadow=True`` grants everything and counts what it would have refused. ``max_keys`` (for
        a template) caps how many live keys it may have (None: the database's
        ``max_keys_per_template``). ``margin_seconds`` (decay and window limits; None: 0.05) is the
        most a request may take from its grant to reach a downstream that enforces the same rate:
        grants are held back by that much so that it accepts them (0: exact on the database's
        clock). ``exist_ok=True``: a limit of that name already there is left as it is and returned
        (to make it match, use :meth:`apply`)."""
        check.limit_values(
            limit=limit,
            slot_decay_per_second=slot_decay_per_second,
            active_slots=active_slots,
            window_seconds=window_seconds,
            max_keys=max_keys,
            margin_seconds=margin_seconds,
        )
        check.flag("exist_ok", exist_ok)
        try:
            self._call(
                q.CREATE_LIMIT,
                self._create_params(
                    name, limit, slot_decay_per_second, active, active_slots, window_seconds, shadow, max_keys, margin_seconds
                ),
            )
        except LimitExistsError:
            if not exist_ok:
                raise
        return self.read_limit(name)

    @staticmethod
    def _create_params(
        name: str,
        limit: int,
        slot_decay_per_second: float,
        active: bool,
        active_slots: int,
        window_seconds: float,
        shadow: bool,
        max_keys: int | None,
        margin_seconds: float | None,
    ) -> dict[str, Any]:
        return {
            "name": name,
            "limit": limit,
            "slot_decay_per_second": float(slot_decay_per_second),
            "active": active,
            "active_slots": active_slots,
            "window_seconds": float(window_seconds),
            "shadow": check.flag("shadow", shadow),
            "max_keys": max_keys,
            "margin_seconds": None if margin_seconds is None else float(margin_seconds),
        }

    def update_limit(
        self,
        name: str,
        *,
        limit: int | None = None,
        slot_decay_per_second: float | None = None,
        active: bool | None = None,
        active_slots: int | None = None,
        new_name: str | None = None,
        window_seconds: float | None = None,
        shadow: bool | None = None,
        max_keys: int | None = None,
        margin_seconds: float | None = None,
    ) -> LimitInfo:
        """Changes the given fields. A limit has decay or a window, not both: to switch, set the
        other to 0 in the same call. ``max_keys=0`` puts a template back on the database's default.
        ``margin_seconds``: see :meth:`create_limit`."""
        check.limit_values(
            limit=limit,
            slot_decay_per_second=slot_decay_per_second,
            active_slots=active_slots,
            window_seconds=window_seconds,
            max_keys=max_keys,
            margin_seconds=margin_seconds,
        )
        self._call(
            q.UPDATE_LIMIT,
            {
                "name": name,
                "limit": limit,
                "slot_decay_per_second": None if slot_decay_per_second is None else float(slot_decay_per_second),
                "active": active,
                "active_slots": active_slots,
                "new_name": new_name,
                "window_seconds": None if window_seconds is None else float(window_seconds),
                "shadow": None if shadow is None else check.flag("shadow", shadow),
                "max_keys": max_keys,
                "margin_seconds": None if margin_seconds is None else float(margin_seconds),
            },
        )
        return self.read_limit(new_name or name)

    def apply(self, config: Mapping[str, Mapping[str, Any]], *, prune: bool = False, dry_run: bool = False) -> Plan:
        """Makes the database's limits match ``config``, in one transaction: the mapping a limits
        file holds (``pgslots apply``), e.g. ``{"api": {"limit": 10}, "tenant:*": {"limit": 5}}``.
        Limits it names are created or changed to match, others are left alone (``prune=True``
        deletes them; keys of templates never). Returns the plan carried out; ``dry_run=True``
        carries it out and rolls it back, so the database checks it and nothing changes. Safe to
        run at every start of every worker."""
        return apply_desired(self._connections, parse(config, "Client.apply()"), prune=prune, dry_run=dry_run)

    def pause(self, name: str, seconds: float, reason: str | None = None) -> datetime:
        """Closes a limit (or one key of a template) for ``seconds``, as an upstream's 429 with
        ``Retry-After`` asks: nothing is granted on it before then, callers wait (queued waiters keep
        their places) or are told the time left. A later pause extends the time, never shortens it.
        At most ``max_pause_seconds`` (300 by default). Returns when the limit opens."""
        check.number("seconds", seconds, minimum=0, integer=False)
        if reason is not None and not isinstance(reason, str):
            raise InvalidArgumentError(f"reason must be a string (or None), got {reason!r}.")
        with observe("pause", [name], seconds=float(seconds), reason=reason) as seen:
            until: datetime = self._call(q.PAUSE, {"name": name, "seconds": float(seconds), "reason": reason})[0]["until"]
            seen.note(until=until.isoformat())
        return until

    def resume(self, name: str) -> bool:
        """Admin: opens a paused limit now; False when it was not paused."""
        return bool(self._call(q.RESUME, {"name": name})[0]["resumed"])

    def delete_limit(self, name: str) -> None:
        self._call(q.DELETE_LIMIT, {"name": name})

    def clear_debt(self, name: str) -> float:
        """Empties a limit's rate slots (its bucket, or its window's grants), debts included, so that
        it admits again at once; for a template, of every key. Returns the slots removed."""
        return float(self._call(q.CLEAR_DEBT, {"name": name})[0]["cleared"])

    def read_limit(self, name: str) -> LimitInfo:
        found = self.read_limits([name])
        if not found:
            raise LimitNotFoundError(f"Global concurrency limit {name!r} not found.")
        return found[0]

    def read_limits(self, names: Sequence[str] | None = None, *, instances: bool = True) -> list[LimitInfo]:
        """The named limits (all when None), by name; ``instances=False`` leaves out templates' keys."""
        rows = self._call(q.GET_LIMITS, {"names": None if names is None else list(names), "with_instances": instances})
        return [LimitInfo(**row) for row in rows]

    def read_instances(self, template: str, *, busiest: int | None = None) -> list[LimitInfo]:
        """The keys of the template ``template`` (e.g. ``'tenant:*'``), by name; with ``busiest=N``
        only the N with the most slots in use."""
        if busiest is not None:
            check.number("busiest", busiest, minimum=1, integer=True)
        rows = self._call(q.GET_INSTANCES, {"template": template, "busiest": busiest})
        return [LimitInfo(**row) for row in rows]

    def list_leases(self, name: str | None = None) -> list[LeaseInfo]:
        return [LeaseInfo(**row) for row in self._call(q.LIST_LEASES, {"name": name})]

    def overview(self, names: Sequence[str] | None = None, *, busiest: int = 5, holders: int = 10) -> Overview:
        """Every limit and template (or the named ones) with their gauges, each template's
        ``busiest`` keys, and at most ``holders`` holders of each limit and key shown: what a view
        of the limits shows, read in two queries however many keys there are. Holders need
        pgslots_admin (lease ids are in them); without it ``holders_error`` says so."""
        check.number("busiest", busiest, minimum=0, integer=True)
        check.number("holders", holders, minimum=0, integer=True)
        if busiest > MAX_SHOWN or holders > MAX_SHOWN:
            raise InvalidArgumentError(f"busiest and holders must be at most {MAX_SHOWN}, got {busiest} and {holders}.")
        rows = self._call(q.GET_OVERVIEW, {"names": None if names is None else list(names), "busiest": busiest})
        infos = [LimitInfo(**row) for row in rows]
        # The limits come first (by name), then the templates' busiest keys.
        asked = None if names is None else set(names)
        first = next((n for n, i in enumerate(infos) if (i.template is not None if asked is None else i.name not in asked)), len(infos))
        limits = infos[:first]
        busiest_keys: dict[str, list[LimitInfo]] = {}
        for info in infos[first:]:
            busiest_keys.setdefault(info.template or "", []).append(info)
        held: dict[str, list[LeaseInfo]] = {}
        error = None
        shown = [i.name for i in limits if not i.is_template] + [k.name for keys in busiest_keys.values() for k in keys]
        if holders and shown:
            try:
                for row in self._call(q.LIST_HOLDERS, {"names": shown, "per_limit": holders}):
                    held.setdefault(row.pop("name"), []).append(LeaseInfo(**row))
            except PgSlotsError as exc:
                error = f"Holders are not shown: {exc}"
        return Overview(limits, busiest_keys, held, error)

    def release(self, lease_id: uuid.UUID | str) -> bool:
        """Releases one lease (any holder's); False when it was already gone."""
        try:
            parsed = lease_id if isinstance(lease_id, uuid.UUID) else uuid.UUID(str(lease_id))
        except ValueError:
            raise InvalidArgumentError(f"{lease_id!r} is not a lease id: lease ids are UUIDs.") from None
        rows = self._call(q.RELEASE, {"lease_id": parsed, "wait_seconds": None})
        return bool(rows and rows[0]["release"])

    def sweep(self) -> int:
        """Reclaims every expired lease now; returns how many."""
        rows = self._call(q.SWEEP)
        return int(rows[0]["sweep"])


_default: Client | None = None
_default_lock = threading.Lock()


def configure(
    dsn: str | None = None,
    *,
    pool: ConnectionPool[Any] | AsyncConnectionPool[Any] | None = None,
    listen_dsn: str | None = None,
    listen: bool = True,
    max_connections: int = DEFAULT_POOL_SIZE,
    prepared_statements: bool | None = None,
    fail_open: bool = False,
    fail_open_after_seconds: float = DEFAULT_FAIL_OPEN_SECONDS,
    embedded: bool | None = None,
) -> Client:
    """Sets the database the module-level functions use; returns the new default client (see
    :class:`Client` for the arguments)."""
    global _default
    with _default_lock:
        old, _default = (
            _default,
            Client(
                dsn,
                pool=pool,
                listen_dsn=listen_dsn,
                listen=listen,
                max_connections=max_connections,
                prepared_statements=prepared_statements,
                fail_open=fail_open,
                fail_open_after_seconds=fail_open_after_seconds,
                embedded=embedded,
            ),
        )
    if old is not None:
        old.close()
    return _default


def default_client() -> Client:
    global _default
    found = _default
    if found is not None:
        return found  # the hot path: no lock once it exists (configure() replaces it under the lock)
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def connections_of(client: Client | None) -> Connections:
    """The connections that run flows for ``client`` (the default client when None): the one door
    through which the sync and async faces and ``apply`` reach a client's connections."""
    return (client or default_client())._connections


def _forget_after_fork() -> None:
    # A forked child must not share its parent's connections or engine thread.
    global _default
    _default = None


os.register_at_fork(after_in_child=_forget_after_fork)

__all__ = ["Client", "configure", "default_client", "connections_of"]
