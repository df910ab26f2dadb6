"""Where the database is: an explicit DSN, PGSLOTS_DSN, DATABASE_URL, or libpq's PG* variables.

The library never starts a server by itself: with nothing configured, a call raises
ConfigurationError, unless the program opted in to the embedded local server
(``configure(embedded=True)`` or ``PGSLOTS_EMBEDDED=1``). Only then is the embedded module loaded.
"""

from __future__ import annotations

import logging
import os

from .errors import ConfigurationError

logger = logging.getLogger("pgslots")

_LIBPQ_VARIABLES = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")

NOT_CONFIGURED = (
    "No database configured: set PGSLOTS_DSN (or DATABASE_URL, or libpq's PG* variables), or pass the "
    "connection string (configure(dsn=...), Client(dsn), --dsn). To try pgslots on this machine, run "
    "'pgslots embedded start' and export the PGSLOTS_DSN it prints; a program may also opt in to that "
    "local server with configure(embedded=True) or PGSLOTS_EMBEDDED=1."
)


def configured_dsn(explicit: str | None = None) -> str | None:
    """The DSN from the argument or the environment, or None when nothing is configured."""
    if explicit:
        return explicit
    for variable in ("PGSLOTS_DSN", "DATABASE_URL"):
        value = os.environ.get(variable, "").strip()
        if value:
            return value
    if any(os.environ.get(v) for v in _LIBPQ_VARIABLES):
        return ""  # libpq reads the PG* variables itself
    return None


def check_dsn(dsn: str) -> str:
    """The DSN, if it can be read as a connection string at all (a URI or key=value pairs); a
    malformed one is a ConfigurationError that says so, before any connection is tried."""
    import psycopg

    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise ConfigurationError(
            f"The connection string is malformed ({first}): give a URI such as postgresql://user@host:5432/dbname "
            "or key=value pairs such as 'host=localhost dbname=app'."
        ) from None
    return dsn


def embedded_wanted(flag: bool | None = None) -> bool:
    """Whether the program opted in to the embedded server: the flag, else PGSLOTS_EMBEDDED."""
    if flag is not None:
        return flag
    return os.environ.get("PGSLOTS_EMBEDDED", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_dsn(explicit: str | None = None, *, embedded: bool | None = None) -> str:
    """The DSN to connect with. With nothing configured: the embedded server when the program opted
    in (started if needed), else ConfigurationError."""
    dsn = configured_dsn(explicit)
    if dsn is not None:
        return dsn
    if not embedded_wanted(embedded):
        raise ConfigurationError(NOT_CONFIGURED)
    from . import embedded as local

    found = local.embedded_dsn(start=True)
    if found is None:
        local.require_cluster()  # raises, saying which binaries are missing
        raise ConfigurationError("The embedded PostgreSQL could not be started; pass a DSN instead.")
    where = local.started_here
    if where is not None:
        logger.warning("pgslots: started the embedded PostgreSQL in %s (opted in); 'pgslots embedded stop' stops it.", where.root)
    return found
