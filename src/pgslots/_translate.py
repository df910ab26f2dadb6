"""The one place where a database driver error becomes a pgslots error.

SQL raises with pgslots' own SQLSTATE codes (class ``PS``), mapped here onto the classes of
``errors``; the "schema not installed" family, lost connections and anything else the database says
become typed errors too, chained to the driver's error (readable as ``__cause__``).
"""

from __future__ import annotations

from types import TracebackType

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout

from .errors import (
    MIGRATE_HINT,
    DatabaseError,
    DatabaseUnavailableError,
    InvalidArgumentError,
    InvalidLimitNameError,
    InvalidLimitValueError,
    LeaseLostError,
    LimitExistsError,
    LimitNotFoundError,
    LockWaitTimeoutError,
    MissingLimitsError,
    PgSlotsError,
    RateLimitWithoutDecayError,
    ReservationError,
    SchemaNotInstalledError,
    SlotsExceedLimitError,
    TemplateError,
    WindowLimitError,
)

_BY_SQLSTATE: dict[str, type[PgSlotsError]] = {
    "PS001": InvalidLimitNameError,
    "PS002": InvalidLimitValueError,
    "PS003": LimitExistsError,
    "PS004": LimitNotFoundError,
    "PS005": InvalidArgumentError,
    "PS006": SlotsExceedLimitError,
    "PS007": InvalidArgumentError,
    "PS008": MissingLimitsError,
    "PS009": RateLimitWithoutDecayError,
    "PS010": LeaseLostError,
    "PS011": InvalidArgumentError,
    "PS012": InvalidArgumentError,
    "PS013": InvalidArgumentError,
    "PS014": InvalidArgumentError,
    "PS015": InvalidArgumentError,
    "PS016": TemplateError,
    "PS017": ReservationError,
    "PS018": WindowLimitError,
}


def translate(exc: psycopg.Error) -> PgSlotsError | None:
    """The pgslots error a database error stands for, or None when it is not one of ours."""
    diag = exc.diag
    state = getattr(exc, "sqlstate", None) or ""
    cls = _BY_SQLSTATE.get(state)
    if cls is not None:
        return cls(diag.message_primary or str(exc))
    if isinstance(exc, (pg_errors.InvalidSchemaName, pg_errors.UndefinedTable)) or (
        isinstance(exc, pg_errors.UndefinedFunction) and "pgslots." in str(exc)
    ):
        return SchemaNotInstalledError(f"The pgslots schema is not installed in this database: {MIGRATE_HINT}.")
    if isinstance(exc, pg_errors.LockNotAvailable):
        return LockWaitTimeoutError(
            "Gave up waiting for a lock held by another database session (an open transaction or an advisory "
            "lock on a pgslots limit); nothing was changed. Find the session in pg_stat_activity, and see "
            "idle_in_transaction_session_timeout."
        )
    if state.startswith("40"):  # class 40, transaction rollback (a deadlock, a serialization failure): an answer
        return DatabaseUnavailableError(
            f"The database rolled this call back ({_first_line(exc)}); nothing was changed. It is safe to try again.",
            answered=True,
        )
    if isinstance(exc, psycopg.OperationalError):
        if server_answered(exc):
            return DatabaseUnavailableError(
                f"The database is too busy to take this call ({_first_line(exc)}). Nothing was changed; try again, "
                "or see its max_connections and the sessions in pg_stat_activity.",
                answered=True,
            )
        return DatabaseUnavailableError(
            f"Cannot reach the database ({_first_line(exc)}). Check --dsn, PGSLOTS_DSN or DATABASE_URL, and that the server is running.",
            pool_exhausted=isinstance(exc, PoolTimeout),
        )
    return None


# A server that is starting up, shutting down or recovering refuses connections with FATAL too:
# that is an outage, not an answer.
_NOT_SERVING = ("starting up", "shutting down", "recovery mode", "accepting connections")


def server_answered(exc: psycopg.Error) -> bool:
    """True when the server itself answered with this error, so it is reachable: out of connection
    slots or another resource (class 53), a statement cancelled (57014), or a connection refused by
    the server with its own FATAL message ("too many connections for role", an unknown role; libpq
    gives no SQLSTATE for those). A connection refused by the network, lost or timed out, and a
    server starting up, shutting down or recovering, carries no such answer."""
    state = getattr(exc, "sqlstate", None) or ""
    if state:
        return state.startswith("53") or state == "57014"
    text = str(exc)
    return "FATAL:" in text and not any(phrase in text for phrase in _NOT_SERVING)


def from_database(exc: psycopg.Error) -> PgSlotsError:
    """The pgslots error to raise for a driver error: its own class, or DatabaseError."""
    return translate(exc) or DatabaseError(f"The database refused the request: {_first_line(exc)}")


class database_errors:  # noqa: N801 - used like a function: `with database_errors(): ...`
    """Raises driver errors from the block as pgslots errors, chained to the original. (A class, not
    a generator: it wraps every statement on the hot path.)"""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(exc, psycopg.Error):
            raise from_database(exc) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
