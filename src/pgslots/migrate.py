"""The schema migrator: keeps a database's pgslots schema at what this library ships.

What it applies comes from ``pgslots/sql`` (shipped in the wheel), in two kinds:

* **history**, ``sql/migrations/NNNN_name.sql``: tables, indexes, sequences, roles and data moves,
  append-only, applied once each in order and recorded in ``pgslots.migrations``;
* **code**, ``sql/functions/*.sql`` then ``sql/privileges.sql``: every function, view and trigger,
  each with one current definition, and every privilege. Their checksums are recorded in
  ``pgslots.code``; when any differs, or a migration is pending, all functions, views and triggers
  are dropped and created afresh, then the privileges applied, so nothing stale or unguarded is left
  behind.

All of it happens in one transaction under an advisory lock: two processes migrating at once are
safe (the second waits, then finds the work done), and a failure leaves the database as it was.
Nothing migrates on import: callers run :func:`migrate` or ``pgslots migrate``; :func:`migration_plan`
says what a migration would do without doing it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

import psycopg

from ._translate import database_errors
from .errors import PgSlotsError
from .types import CodeFile, Migration, MigrationPlan

# Any fixed number works; all migrators of one database must agree on it.
ADVISORY_LOCK_KEY = 7_048_297_117_401

_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_CODE_FILE = re.compile(r"^\d{2}_[a-z0-9_]+\.sql$")

_PREPARE = (
    "CREATE SCHEMA IF NOT EXISTS pgslots",
    "CREATE TABLE IF NOT EXISTS pgslots.migrations ("
    " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
)
# Objects a migration or a code file creates resolve names against this path, whatever the session's.
_PIN_SEARCH_PATH = "SET LOCAL search_path = pg_catalog, pgslots, pg_temp"

# Drops every trigger, view and routine (function, procedure, aggregate) of the schema. Objects that
# others depend on go in a later pass; an object outside the schema that depends on one (a view of
# yours over pgslots.status, say) stops the migration with PostgreSQL's own message naming it,
# rather than being dropped with it.
_DROP_CODE = """
DO $drop$
DECLARE
    o record;
    left_over integer;
    progress boolean := true;
BEGIN
    -- Triggers on the schema's tables that run its functions are code too (created with them).
    FOR o IN SELECT format('DROP TRIGGER %I ON %s', t.tgname, t.tgrelid::regclass) AS stmt
             FROM pg_catalog.pg_trigger t
             JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
             JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
             WHERE NOT t.tgisinternal AND p.pronamespace = 'pgslots'::regnamespace
               AND c.relnamespace = 'pgslots'::regnamespace LOOP
        EXECUTE o.stmt;
    END LOOP;
    WHILE progress LOOP
        progress := false;
        FOR o IN SELECT format('DROP VIEW %s', c.oid::regclass) AS stmt
                 FROM pg_catalog.pg_class c
                 WHERE c.relnamespace = 'pgslots'::regnamespace AND c.relkind = 'v'
                 UNION ALL
                 SELECT format('DROP ROUTINE %s', p.oid::regprocedure)   -- a function, a procedure or an aggregate
                 FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'pgslots'::regnamespace LOOP
            BEGIN
                EXECUTE o.stmt;
                progress := true;
            EXCEPTION WHEN dependent_objects_still_exist THEN
                NULL;   -- another pass, once what depends on it is gone
            END;
        END LOOP;
    END LOOP;
    SELECT count(*) INTO left_over FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'pgslots'::regnamespace;
    IF left_over > 0 OR EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                                WHERE c.relnamespace = 'pgslots'::regnamespace AND c.relkind = 'v') THEN
        DROP VIEW IF EXISTS pgslots.status;   -- raises, naming what depends on it
        RAISE EXCEPTION 'objects outside the pgslots schema depend on its functions; drop them first';
    END IF;
END
$drop$"""


def _sql_dir() -> Traversable:
    packaged = resources.files("pgslots") / "sql"
    if packaged.is_dir():
        return packaged
    # Running from a source checkout (editable install): the top-level sql/ folder.
    return Path(__file__).resolve().parents[2] / "sql"


def migrations() -> list[Migration]:
    """All shipped migrations, in order."""
    found = []
    for entry in (_sql_dir() / "migrations").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if not found:
        raise PgSlotsError("No SQL migrations found in the installed package; reinstall pgslots.")
    return found


def code_files() -> list[CodeFile]:
    """Every file of functions and views, in the order they are created, then the privileges."""
    root = _sql_dir()
    functions = sorted((e for e in (root / "functions").iterdir() if _CODE_FILE.match(e.name)), key=lambda e: e.name)
    found = [CodeFile(f"functions/{e.name}", e.read_text(encoding="utf-8")) for e in functions]
    found.append(CodeFile("privileges.sql", (root / "privileges.sql").read_text(encoding="utf-8")))
    return found


LATEST_VERSION = migrations()[-1].version


@contextmanager
def _connection(conninfo: str | None, connection: psycopg.Connection[Any] | None) -> Iterator[psycopg.Connection[Any]]:
    if connection is not None:
        yield connection
        return
    from ._config import resolve_dsn

    with database_errors(), psycopg.connect(resolve_dsn(conninfo), autocommit=True) as conn:
        yield conn


def _plan(conn: psycopg.Connection[Any]) -> MigrationPlan:
    applied: set[int] = set()
    recorded: dict[str, str] = {}
    if conn.execute("SELECT to_regclass('pgslots.migrations') IS NOT NULL").fetchone() == (True,):
        applied = {row[0] for row in conn.execute("SELECT version FROM pgslots.migrations")}
    if conn.execute("SELECT to_regclass('pgslots.code') IS NOT NULL").fetchone() == (True,):
        recorded = dict(conn.execute("SELECT file, checksum FROM pgslots.code").fetchall())
    code = tuple(code_files())
    changed = tuple(f.name for f in code if recorded.get(f.name) != f.checksum)
    if not changed and set(recorded) != {f.name for f in code}:
        changed = tuple(sorted(set(recorded) - {f.name for f in code}))  # a file was removed
    pending = tuple(m for m in migrations() if m.version not in applied)
    return MigrationPlan(pending, changed, code, _script(pending, code) if pending or changed else "")


def _script(pending: tuple[Migration, ...], code: tuple[CodeFile, ...]) -> str:
    """The SQL a migration runs (in one transaction), for review."""
    parts = ["BEGIN;", f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY});", *(s + ";" for s in _PREPARE)]
    parts.append(_PIN_SEARCH_PATH + ";")
    parts.append("-- drop every function and view; they are created afresh below" + _DROP_CODE + ";")
    for m in pending:
        parts.append(f"-- {m.label}\n{m.sql.rstrip()}")
        parts.append(f"INSERT INTO pgslots.migrations (version, name) VALUES ({m.version}, '{m.name}');")
    for f in code:
        parts.append(f"-- {f.name}\n{f.sql.rstrip()}")
    parts.append("-- and the checksums of the files above into pgslots.code\nCOMMIT;")
    return "\n\n".join(parts) + "\n"


def migration_plan(conninfo: str | None = None, *, connection: psycopg.Connection[Any] | None = None) -> MigrationPlan:
    """What :func:`migrate` would do now, without changing anything."""
    with _connection(conninfo, connection) as conn, database_errors():
        return _plan(conn)


def migrate(conninfo: str | None = None, *, connection: psycopg.Connection[Any] | None = None) -> list[int]:
    """Brings the schema up to date; returns the migration versions applied (empty: none were
    pending; the functions may still have been refreshed, see :func:`migration_plan`)."""
    with _connection(conninfo, connection) as conn, database_errors():
        return _migrate(conn)


def _migrate(conn: psycopg.Connection[Any]) -> list[int]:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [ADVISORY_LOCK_KEY])
        for statement in _PREPARE:
            conn.execute(statement)
        todo = _plan(conn)
        if todo.up_to_date:
            return []
        conn.execute(_PIN_SEARCH_PATH)
        _run(conn, "dropping the old functions", _DROP_CODE)
        for m in todo.migrations:
            _run(conn, f"Migration {m.version:04d}_{m.name}", m.sql)
            conn.execute("INSERT INTO pgslots.migrations (version, name) VALUES (%s, %s)", [m.version, m.name])
        for f in todo.code:
            _run(conn, f"SQL file {f.name}", f.sql)
        conn.execute("DELETE FROM pgslots.code")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO pgslots.code (file, checksum) VALUES (%s, %s)", [(f.name, f.checksum) for f in todo.code])
        return [m.version for m in todo.migrations]


def _run(conn: psycopg.Connection[Any], what: str, script: str) -> None:
    try:
        conn.execute(script.encode())
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0]
        raise PgSlotsError(f"{what} failed and was rolled back: {first}") from exc
