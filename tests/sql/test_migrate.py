"""The migrator: idempotent, safe when run concurrently, recorded, and shipped inside the wheel."""

from __future__ import annotations

import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgslots
from pgslots._translate import translate
from pgslots.errors import SchemaNotInstalledError
from pgslots.migrate import LATEST_VERSION, migrations
from sqlhelp import handed, woken

ROOT = Path(__file__).resolve().parents[2]
# The schema as released at version 3, before functions became code: what databases in use hold.
SCHEMA_V3 = sorted((Path(__file__).parent / "fixtures" / "schema_v3").glob("*.sql"))


def _install_old(dsn: str, files: list[Path]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA pgslots")
        conn.execute(
            "CREATE TABLE pgslots.migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for path in files:
            version, name = path.stem.split("_", 1)
            with conn.transaction():
                conn.execute(path.read_bytes())
                conn.execute("INSERT INTO pgslots.migrations (version, name) VALUES (%s, %s)", [int(version), name])


def test_migrations_are_numbered_in_order() -> None:
    versions = [m.version for m in migrations()]
    assert versions == list(range(1, len(versions) + 1))
    assert versions[-1] == LATEST_VERSION


def test_migrate_twice_changes_nothing(empty_dsn: str) -> None:
    assert pgslots.migrate(empty_dsn) == [m.version for m in migrations()]
    assert pgslots.migrate(empty_dsn) == []
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute("SELECT pgslots.schema_version()").fetchone() == (LATEST_VERSION,)


def test_concurrent_migrations_are_safe(empty_dsn: str) -> None:
    results: list[Any] = []

    def run() -> None:
        try:
            results.append(pgslots.migrate(empty_dsn))
        except BaseException as exc:  # noqa: BLE001 - reported below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(map(len, results)) == [0, 0, 0, LATEST_VERSION], results


def test_missing_schema_names_the_command(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn) as conn, pytest.raises(psycopg.Error) as info:
        conn.execute("SELECT * FROM pgslots.acquire('{a}')")
    mapped = translate(info.value)
    assert isinstance(mapped, SchemaNotInstalledError)
    assert "pgslots migrate" in str(mapped)


def test_wheel_ships_the_sql(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("pgslots-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n for n in names if n.startswith("pgslots/sql/"))
    assert shipped == sorted(f"pgslots/sql/{p.relative_to(ROOT / 'sql')}" for p in (ROOT / "sql").rglob("*.sql"))
    assert "pgslots/sql/functions/20_admission.sql" in shipped and "pgslots/sql/privileges.sql" in shipped
    assert "pgslots_cli/main.py" in names


def test_upgrade_from_0002_keeps_leases_and_queue(empty_dsn: str) -> None:
    """A database in use at version 2 (a holder, a queued waiter) upgrades to the hand-off schema
    without losing either: the old waiter is woken as before, the old lease releases normally."""
    import uuid

    _install_old(empty_dsn, SCHEMA_V3[:2])
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("SELECT pgslots.create_limit('old', 1)")
        held = conn.execute("SELECT lease_id FROM pgslots.acquire('{old}', 1, 60)").fetchone()
        client = uuid.uuid4()
        ticket = conn.execute("SELECT waiter FROM pgslots.acquire('{old}', 1, 60, queue_client => %s)", [client]).fetchone()
        assert held and ticket and ticket[0] is not None

    assert pgslots.migrate(empty_dsn) == [m.version for m in migrations()[2:]]

    with psycopg.connect(empty_dsn, autocommit=True) as conn, psycopg.connect(empty_dsn, autocommit=True) as lis:
        lis.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(f"pgslots:{client}")))
        assert conn.execute("SELECT pgslots.release(%s)", [held[0]]).fetchone() == (True,)
        assert [woken(n.payload) for n in lis.notifies(timeout=2, stop_after=1)] == [[ticket[0]]]
        got = conn.execute(
            "SELECT granted FROM pgslots.acquire('{old}', 1, 60, ticket => %s, queue_client => %s)", [ticket[0], client]
        ).fetchone()
        assert got == (True,)
        assert conn.execute("SELECT pgslots.heartbeat(%s, %s)", [client, [ticket[0]]]).fetchone() == ([ticket[0]],)


def test_upgrade_from_0003_with_a_holder_and_a_waiter_live(empty_dsn: str) -> None:
    """A database in use at version 3 (functions still defined by migrations) upgrades: the old
    bodies are gone, one definition of each function is left, and the holder's release hands its
    slot to the waiter queued before the upgrade, which then gets its named lease."""
    import uuid

    _install_old(empty_dsn, SCHEMA_V3)
    client, named = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("SELECT pgslots.create_limit('live', 1)")
        held = conn.execute("SELECT lease_id FROM pgslots.acquire('{live}', 1, 60)").fetchone()
        waiting = conn.execute(
            "SELECT waiter FROM pgslots.acquire('{live}', 1, 60, queue_client => %s, new_lease_id => %s)", [client, named]
        ).fetchone()
        conn.execute("SELECT pgslots.acquire('{live}', 1, 60)")  # a refusal: pressure to keep
        assert held and waiting and waiting[0] is not None

    assert pgslots.migrate(empty_dsn) == [m.version for m in migrations()[3:]]
    assert pgslots.migration_plan(empty_dsn).up_to_date

    with psycopg.connect(empty_dsn, autocommit=True) as conn, psycopg.connect(empty_dsn, autocommit=True) as lis:
        bodies: dict[Any, Any] = dict(
            conn.execute(
                "SELECT proname, count(*) FROM pg_proc WHERE pronamespace = 'pgslots'::regnamespace"
                " AND proname IN ('acquire', 'heartbeat', '_admit', 'release') GROUP BY proname"
            ).fetchall()
        )
        assert bodies == {"acquire": 1, "heartbeat": 1, "_admit": 1, "release": 1}
        status = conn.execute("SELECT leases, waiters, denied_slots FROM pgslots.status WHERE name = 'live'").fetchone()
        assert status == (1, 1, 2)  # the queued refusal and the plain one
        lis.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(f"pgslots:{client}")))
        assert conn.execute("SELECT pgslots.release(%s)", [held[0]]).fetchone() == (True,)
        payloads = [n.payload for n in lis.notifies(timeout=2, stop_after=1)]
        assert payloads and handed(payloads[0])["ticket"] == waiting[0]  # handed over
        got = conn.execute(
            "SELECT granted, lease_id FROM pgslots.acquire('{live}', 1, 60, ticket => %s, queue_client => %s, new_lease_id => %s)",
            [waiting[0], client, named],
        ).fetchone()
        assert got == (True, named)
        assert conn.execute("SELECT pgslots.release(%s)", [named]).fetchone() == (True,)
        assert conn.execute("SELECT active_slots, waiters FROM pgslots.status WHERE name = 'live'").fetchone() == (0, 0)


def test_changed_functions_are_reapplied_and_reported(fresh_dsn: str) -> None:
    """The migrator keeps functions current by checksum: a stale body is found by the plan and
    replaced by migrate, with the privileges applied again."""
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("UPDATE pgslots.code SET checksum = 'stale' WHERE file = 'functions/30_slots.sql'")
        triggers = "SELECT tgname FROM pg_trigger WHERE tgrelid = 'pgslots.limits'::regclass AND NOT tgisinternal"
        assert conn.execute(triggers).fetchall() == [("limits_rules",)]
        conn.execute("CREATE FUNCTION pgslots.leftover() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        # A procedure is a routine DROP FUNCTION refuses: it once stopped the migration.
        conn.execute("CREATE PROCEDURE pgslots.leftover_loop(n int) LANGUAGE sql AS 'SELECT 1'")
    todo = pgslots.migration_plan(fresh_dsn)
    assert not todo.migrations and todo.changed_code == ("functions/30_slots.sql",)
    assert "CREATE FUNCTION pgslots.release" in todo.script()
    assert pgslots.migrate(fresh_dsn) == []
    assert pgslots.migration_plan(fresh_dsn).up_to_date
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT to_regproc('pgslots.leftover')").fetchone() == (None,)
        assert conn.execute("SELECT to_regproc('pgslots.leftover_loop')").fetchone() == (None,)
        # The trigger that runs a pgslots function is dropped and created again with it.
        assert conn.execute(triggers).fetchall() == [("limits_rules",)]
        definer = conn.execute("SELECT prosecdef FROM pg_proc WHERE oid = 'pgslots.release'::regproc").fetchone()
        assert definer == (True,)
        public = conn.execute(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgslots'::regnamespace AND has_function_privilege('public', oid, 'EXECUTE')"
        ).fetchone()
        assert public == (0,)


# Everything a schema is made of, as the catalogs describe it (names, definitions, privileges), and
# the settings row: what a fresh install and an upgrade must agree on.
_CATALOG = {
    "columns": """
        SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid)
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = 'pgslots'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY 1, 2""",
    "constraints": """
        SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid)
        FROM pg_constraint c WHERE c.connamespace = 'pgslots'::regnamespace ORDER BY 1, 2""",
    "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'pgslots' ORDER BY 1",
    "triggers": """
        SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t
        JOIN pg_class c ON c.oid = t.tgrelid
        WHERE c.relnamespace = 'pgslots'::regnamespace AND NOT t.tgisinternal ORDER BY 1, 2""",
    "relations": """
        SELECT c.relname, c.relkind, coalesce(c.relacl::text, '') FROM pg_class c
        WHERE c.relnamespace = 'pgslots'::regnamespace ORDER BY 1""",
    "functions": """
        SELECT p.oid::regprocedure::text, md5(pg_get_functiondef(p.oid)), p.prosecdef, coalesce(p.proacl::text, '')
        FROM pg_proc p WHERE p.pronamespace = 'pgslots'::regnamespace ORDER BY 1""",
    "settings": "SELECT to_jsonb(s) - 'singleton' FROM pgslots.settings s",
}


def _catalog(dsn: str) -> dict[str, list[Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {what: conn.execute(query).fetchall() for what, query in _CATALOG.items()}


def _install_up_to(dsn: str, version: int) -> None:
    """The tables of schema version `version`: its migrations, recorded as the migrator records them."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute("CREATE SCHEMA pgslots")
        conn.execute(
            "CREATE TABLE pgslots.migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute("SET LOCAL search_path = pg_catalog, pgslots, pg_temp")
        for m in migrations():
            if m.version <= version:
                conn.execute(m.sql.encode())
                conn.execute("INSERT INTO pgslots.migrations (version, name) VALUES (%s, %s)", [m.version, m.name])


def test_every_upgrade_path_ends_in_the_fresh_schema(pg_server: dict[str, Any], empty_dsn: str) -> None:
    """From each earlier schema version, migrating gives exactly what a fresh install gives:
    columns, defaults, constraints, indexes, functions, privileges and settings."""
    pgslots.migrate(empty_dsn)
    fresh = _catalog(empty_dsn)
    admin = pg_server["dsn"]
    for version in range(1, LATEST_VERSION):
        name = f"pgslots_upgrade_from_{version}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        dsn = psycopg.conninfo.make_conninfo(admin, dbname=name)
        try:
            _install_up_to(dsn, version)
            pgslots.migrate(dsn)
            upgraded = _catalog(dsn)
            for what in _CATALOG:
                assert upgraded[what] == fresh[what], f"from version {version}: {what} differ"
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
