"""The schema migrator: applies the numbered SQL files shipped in ``pgslots/sql/migrations``.

Each migration runs in its own transaction under one advisory lock, so two processes migrating at
once are safe (the second waits, then finds the work done), and it is recorded in
``pgslots.migrations``. Nothing migrates on import: callers run :func:`migrate` or
``pgslots migrate``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

import psycopg

from .errors import PgSlotsError, translate

# Any fixed number works; all migrators of one database must agree on it.
ADVISORY_LOCK_KEY = 7_048_297_117_401

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def _migrations_dir() -> Traversable:
    packaged = resources.files("pgslots") / "sql" / "migrations"
    if packaged.is_dir():
        return packaged
    # Running from a source checkout (editable install): the top-level sql/ folder.
    return Path(__file__).resolve().parents[2] / "sql" / "migrations"


def migrations() -> list[Migration]:
    """All shipped migrations, in order."""
    found = []
    for entry in _migrations_dir().iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if not found:
        raise PgSlotsError("No SQL migrations found in the installed package; reinstall pgslots.")
    return found


LATEST_VERSION = migrations()[-1].version


def migrate(conninfo: str | None = None, *, connection: psycopg.Connection[Any] | None = None) -> list[int]:
    """Applies the migrations the database lacks; returns the versions applied (empty: up to date)."""
    if connection is not None:
        return _migrate(connection)
    from ._config import resolve_dsn

    try:
        with psycopg.connect(resolve_dsn(conninfo), autocommit=True) as conn:
            return _migrate(conn)
    except psycopg.OperationalError as exc:
        mapped = translate(exc)
        if mapped is None:
            raise
        raise mapped from exc


def _migrate(conn: psycopg.Connection[Any]) -> list[int]:
    applied: list[int] = []
    for migration in migrations():
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [ADVISORY_LOCK_KEY])
            conn.execute("CREATE SCHEMA IF NOT EXISTS pgslots")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS pgslots.migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = conn.execute("SELECT 1 FROM pgslots.migrations WHERE version = %s", [migration.version]).fetchone()
            if done:
                continue
            try:
                conn.execute(migration.sql.encode())
            except psycopg.Error as exc:
                first = str(exc).strip().splitlines()[0]
                raise PgSlotsError(f"Migration {migration.version:04d}_{migration.name} failed and was rolled back: {first}") from exc
            conn.execute(
                "INSERT INTO pgslots.migrations (version, name) VALUES (%s, %s)",
                [migration.version, migration.name],
            )
            applied.append(migration.version)
    return applied
