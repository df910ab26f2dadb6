"""The values pgslots hands out: what a body holds (:class:`Lease`), what a read returns
(:class:`LimitInfo`, :class:`LeaseInfo`), what a migration would do (:class:`MigrationPlan`),
and what the sync and async ``Reservation`` share (:class:`ReservationBase`). Plain frozen
dataclasses: no connection, no behaviour beyond their own fields."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: A new decay or window limit's margin_seconds when none is given (the database's default too).
DEFAULT_MARGIN_SECONDS = 0.05


@dataclass(frozen=True)
class Lease:
    """A granted acquire: what ``with concurrency(...) as lease`` gives the body."""

    lease_id: uuid.UUID | None
    fencing_token: int | None
    expires_at: datetime | None
    names: tuple[str, ...]
    slots: int
    lease_seconds: float
    missing: tuple[str, ...] = ()
    first_term: float | None = field(default=None, repr=False, compare=False)  # when handed over: shorter
    # Bound to this process's session: the database may take it back once it has not heard from the
    # process for this long, so the process gives it up before then. None: it lives until it expires.
    liveness_seconds: float | None = field(default=None, repr=False, compare=False)
    #: Granted by reserve(): the id to settle the actual cost with.
    reservation_id: uuid.UUID | None = None
    #: The database could not be reached for fail_open_after_seconds: the body runs without a slot.
    failed_open: bool = False


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
    #: For a key of a template (an instance, created on first use): the template's name.
    template: str | None = None
    is_template: bool = False
    #: For a template: how many keys it has now (instances not yet removed as idle).
    instances: int | None = None
    #: Above 0: a window limit, at most ``limit`` slots granted in any span of this many seconds.
    window_seconds: float = 0.0
    #: Grants every request, counting those it would have refused in ``shadow_refusals``.
    shadow: bool = False
    shadow_refusals: int = 0
    #: Counters since the limit was created (a template's: totals over its keys, removed ones included).
    grants_total: int = 0
    refusals_total: int = 0
    wait_seconds_total: float = 0.0
    expired_leases_total: int = 0
    #: The distinct priorities of the waiters now, highest first.
    waiter_priorities: list[int] | None = None
    #: For a template: how many live keys it may have (its own max_keys, else the database's setting).
    max_keys: int | None = None
    #: Leased slots whose holders are gone (expired, or their session dead): counted in
    #: ``leased_slots`` and ``active_slots`` but held by nobody; the next caller that needs them
    #: takes them back.
    reclaimable_slots: int = 0
    #: While the limit is paused (see :meth:`pgslots.Client.pause`): when it opens, and why.
    paused_until: datetime | None = None
    pause_reason: str | None = None
    #: For a decay or window limit: the most a request may take from its grant to a downstream that
    #: enforces the same rate; grants are held back by that much (0: exact on the database's clock).
    margin_seconds: float = DEFAULT_MARGIN_SECONDS
    #: For a template: how many of its keys are paused now.
    paused_keys: int | None = None
    #: Slots in use by living holders: ``active_slots`` less ``reclaimable_slots``.
    held_slots: float = 0.0


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
    #: Its holder is gone (expired, or its session dead): its slots are held by nobody, and the
    #: next caller that needs them takes them back.
    gone: bool = False


@dataclass(frozen=True)
class Overview:
    """Everything a view of the limits shows, read in one go (:meth:`pgslots.Client.overview`): what
    ``pgslots ls``, ``watch``, ``metrics`` and the page show, so that none computes a figure itself."""

    #: Every limit and template (or those asked for), by name; a template's gauges (slots, leases,
    #: reclaimable slots, waiters, oldest wait, paused keys) are its keys' summed, in SQL.
    limits: list[LimitInfo]
    #: Per template: its busiest keys, the most slots in use first.
    busiest: dict[str, list[LimitInfo]]
    #: Per limit or key shown: who holds it (at most the number asked for), oldest first.
    holders: dict[str, list[LeaseInfo]]
    #: Why ``holders`` is empty when holders were asked for (listing leases is for pgslots_admin).
    holders_error: str | None = None


@dataclass(frozen=True)
class Migration:
    """One step of the schema's history."""

    version: int
    name: str
    sql: str

    @property
    def label(self) -> str:
        return f"migrations/{self.version:04d}_{self.name}.sql"


@dataclass(frozen=True)
class CodeFile:
    """One file of functions, views or privileges, re-applied whenever its checksum changes."""

    name: str  # relative to sql/, e.g. "functions/20_admission.sql"
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True)
class MigrationPlan:
    """What migrating a database would do."""

    migrations: tuple[Migration, ...]  # pending, in order
    changed_code: tuple[str, ...]  # code files whose checksum differs (or that are new)
    code: tuple[CodeFile, ...]  # every code file, applied whole when anything changes
    sql: str = field(default="", repr=False, compare=False)  # the script, see script()

    @property
    def up_to_date(self) -> bool:
        return not self.migrations and not self.changed_code

    def script(self) -> str:
        """The SQL a migration would run (in one transaction), for review; empty when up to date."""
        return self.sql


class ReservationBase:
    """What the sync and async ``Reservation`` share: a granted ``reserve()``."""

    def __init__(self, lease: Lease | None, names: tuple[str, ...], slots: int) -> None:
        #: The id to settle with (None when nothing was reserved: no names, or failed open).
        self.reservation_id: uuid.UUID | None = None if lease is None else lease.reservation_id
        self.names = names
        #: The estimate reserved.
        self.slots = slots
        #: The cost settled last (None until settled: the estimate counts).
        self.actual: float | None = None
        self.failed_open = bool(lease and lease.failed_open)

    def __repr__(self) -> str:
        return f"Reservation({self.reservation_id}, names={list(self.names)!r}, slots={self.slots}, actual={self.actual!r})"


__all__ = [
    "DEFAULT_MARGIN_SECONDS",
    "CodeFile",
    "Lease",
    "LeaseInfo",
    "LimitInfo",
    "Migration",
    "MigrationPlan",
    "Overview",
    "ReservationBase",
]
