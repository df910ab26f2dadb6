"""The exceptions pgslots raises.

::

    PgSlotsError
    ├── ConfigurationError                   no database configured or reachable
    │   └── DatabaseUnavailableError         the database cannot be reached now (retried where safe)
    ├── DatabaseError                        the database refused a request for a reason of its own
    │   └── LockWaitTimeoutError             another session held a lock longer than the call may wait
    ├── SchemaNotInstalledError              schema missing or older than this library
    ├── InvalidArgumentError (ValueError)    bad slots, lease seconds or other argument
    │   ├── InvalidLimitNameError            a name breaks the naming rule
    │   ├── InvalidLimitValueError           a negative limit, a NaN or infinite decay, ...
    │   └── TemplateError                    a template or one of its keys misused, or a key beyond max_keys
    ├── LimitExistsError                     create of a name that is taken
    ├── LimitNotFoundError                   update/delete/inspect of an unknown name
    ├── LeaseLostError                       renew of a lease that expired or was released
    │   └── LeaseRenewalFailedError          raised in a sync body whose lease could not be renewed
    ├── ReservationError                     settle of an unknown or expired reservation
    ├── ConcurrencySlotAcquisitionError      an acquire that cannot succeed
    │   ├── SlotsExceedLimitError            more slots than the limit has
    │   ├── MissingLimitsError               strict acquire of limits that do not exist
    │   ├── RateLimitWithoutDecayError       rate limit on limits without decay or window
    │   └── WindowLimitError                 concurrency() on a window limit
    └── AcquireConcurrencySlotTimeoutError (TimeoutError)

SQL raises with pgslots' own SQLSTATE codes (class ``PS``). ``_translate`` is the one place where a
driver error becomes one of the classes above; nothing else leaves the library. This module imports
no driver, so the pure flows can raise these classes without one.
"""

from __future__ import annotations

MIGRATE_HINT = "run `pgslots migrate` (or pgslots.migrate() from Python) to install it"


class PgSlotsError(Exception):
    """Base class of every error pgslots raises on purpose."""


class ConfigurationError(PgSlotsError):
    """No database is configured, or the configured one cannot be reached."""


class DatabaseUnavailableError(ConfigurationError):
    """The database cannot be reached now: refused, lost or timed-out connections, no pooled
    connection free in time (``pool_exhausted``). Waiting flows retry these for a while.

    ``answered`` is True when the server did answer (no pooled connection was free while the
    server accepts connections, it has no connection slot left, or a statement was cancelled): it is
    busy, not unreachable, so such an error never makes a call fail open."""

    def __init__(self, message: str, *, pool_exhausted: bool = False, answered: bool = False) -> None:
        super().__init__(message)
        self.pool_exhausted = pool_exhausted
        self.answered = answered


class DatabaseError(PgSlotsError):
    """The database refused a request with an error that is not one of pgslots' own."""


class LockWaitTimeoutError(DatabaseError):
    """A call gave up waiting for a lock another session holds (an open transaction, an advisory
    lock): its ``wait_seconds`` passed. Nothing was changed."""


class SchemaNotInstalledError(PgSlotsError):
    """The database has no pgslots schema, or an older one than this library needs."""


class InvalidArgumentError(PgSlotsError, ValueError):
    """An argument is out of range: slots, lease seconds, names list, ..."""


class InvalidLimitNameError(InvalidArgumentError):
    """A limit name is empty, too long or contains one of ``/ % & > <``."""


class InvalidLimitValueError(InvalidArgumentError):
    """A limit's slot count or decay is negative, NaN or infinite."""


class TemplateError(InvalidArgumentError):
    """A template or one of its keys used the wrong way: a bare ``*``, a template's own name acquired,
    a key changed apart from its template, a template renamed."""


class LimitExistsError(PgSlotsError):
    """A limit with this name exists already."""


class LimitNotFoundError(PgSlotsError):
    """No limit has this name."""


class LeaseLostError(PgSlotsError):
    """A lease expired or was released before it could be renewed."""


class ReservationError(PgSlotsError):
    """A reservation cannot be settled: unknown (never made by this role, or removed) or past
    ``reservation_seconds``. Its estimate stays its cost."""


class LeaseRenewalFailedError(LeaseLostError):
    """Raised inside the body holding slots whose lease could not be renewed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(
            message
            or "The lease on the concurrency slots could not be renewed and may be lost: the body was "
            "interrupted so that it does not run without its slots. Use a longer lease_duration or "
            "raise_on_lease_renewal_failure=False to keep running."
        )


class ConcurrencySlotAcquisitionError(PgSlotsError):
    """Slots could not be acquired (and waiting would not help, or retries ran out)."""


class SlotsExceedLimitError(ConcurrencySlotAcquisitionError):
    """More slots were requested than the limit has: it could never succeed."""


class MissingLimitsError(ConcurrencySlotAcquisitionError):
    """A strict acquire named limits that do not exist."""


class RateLimitWithoutDecayError(ConcurrencySlotAcquisitionError):
    """A rate limit named limits that have neither slot decay nor a window."""


class WindowLimitError(ConcurrencySlotAcquisitionError):
    """``concurrency()`` named a window limit, whose slots are never released: use ``rate_limit()``."""


class AcquireConcurrencySlotTimeoutError(PgSlotsError, TimeoutError):
    """Waiting for slots took longer than ``timeout_seconds`` (0: the one attempt was refused).

    ``retry_after`` is the database's last estimate of the seconds until the request could be
    granted (the time until enough rate slots decay or leave the window, or a pause ends; for held
    slots a guess), None when it gave none: what an HTTP ``Retry-After`` or a task's retry uses."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
