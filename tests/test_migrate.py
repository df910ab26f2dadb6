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
from pgslots.errors import SchemaNotInstalledError, translate
from pgslots.migrate import LATEST_VERSION, migrations

ROOT = Path(__file__).resolve().parents[1]


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
    shipped = sorted(n for n in names if n.startswith("pgslots/sql/migrations/"))
    assert shipped == [f"pgslots/sql/migrations/{p.name}" for p in sorted((ROOT / "sql/migrations").glob("*.sql"))]
    assert "pgslots_cli/main.py" in names


def test_upgrade_from_0002_keeps_leases_and_queue(empty_dsn: str) -> None:
    """A database in use at version 2 (a holder, a queued waiter) upgrades to the hand-off schema
    without losing either: the old waiter is woken as before, the old lease releases normally."""
    import uuid

    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA pgslots")
        conn.execute(
            "CREATE TABLE pgslots.migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for m in migrations()[:2]:
            with conn.transaction():
                conn.execute(m.sql.encode())
                conn.execute("INSERT INTO pgslots.migrations (version, name) VALUES (%s, %s)", [m.version, m.name])
        conn.execute("SELECT pgslots.create_limit('old', 1)")
        held = conn.execute("SELECT lease_id FROM pgslots.acquire('{old}', 1, 60)").fetchone()
        client = uuid.uuid4()
        ticket = conn.execute("SELECT waiter FROM pgslots.acquire('{old}', 1, 60, queue_client => %s)", [client]).fetchone()
        assert held and ticket and ticket[0] is not None

    assert pgslots.migrate(empty_dsn) == [m.version for m in migrations()[2:]]

    with psycopg.connect(empty_dsn, autocommit=True) as conn, psycopg.connect(empty_dsn, autocommit=True) as lis:
        lis.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(f"pgslots:{client}")))
        assert conn.execute("SELECT pgslots.release(%s)", [held[0]]).fetchone() == (True,)
        assert [n.payload for n in lis.notifies(timeout=2, stop_after=1)] == [str(ticket[0])]
        got = conn.execute(
            "SELECT granted FROM pgslots.acquire('{old}', 1, 60, ticket => %s, queue_client => %s)", [ticket[0], client]
        ).fetchone()
        assert got == (True,)
        assert conn.execute("SELECT pgslots.heartbeat(%s, %s)", [client, [ticket[0]]]).fetchone() == ([ticket[0]],)
