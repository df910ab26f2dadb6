"""Least privilege: what a plain pgslots_user can and cannot do, and search_path hijacking."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql as pgsql

from sqlhelp import acquire, create, login_role, one, rows

Conn = psycopg.Connection[Any]


@pytest.fixture
def user_dsn(fresh_dsn: str) -> Iterator[str]:
    yield from login_role(fresh_dsn, "pgslots_user")


@pytest.fixture
def admin_role_dsn(fresh_dsn: str) -> Iterator[str]:
    yield from login_role(fresh_dsn, "pgslots_admin")


def _denied(conn: Conn, query: str, params: Any = None) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(query, params)


def test_user_role_acquires_releases_renews_reads(fresh_dsn: str, user_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as owner:
        create(owner, "guarded", 2)
        create(owner, "paced", 2, decay=1)
    with psycopg.connect(user_dsn, autocommit=True) as conn:
        got = acquire(conn, ["guarded"], lease_seconds=60)
        assert got["granted"]
        assert one(conn, "SELECT pgslots.renew(%s, 60) AS e", [got["lease_id"]])["e"]
        assert one(conn, "SELECT * FROM pgslots.status WHERE name = 'guarded'")["active_slots"] == 1
        assert one(conn, "SELECT * FROM pgslots.get_limits('{guarded}')")["leases"] == 1
        assert one(conn, "SELECT pgslots.release(%s) AS r", [got["lease_id"]])["r"] is True
        assert one(conn, "SELECT * FROM pgslots.rate_limit('{paced}')")["granted"]
        assert one(conn, "SELECT pgslots.heartbeat(%s) AS t", [uuid.uuid4()])["t"] == []


@pytest.mark.parametrize(
    "query",
    [
        "INSERT INTO pgslots.limits (name, \"limit\", decayed_at, created, updated) VALUES ('x', 1, now(), now(), now())",
        "UPDATE pgslots.limits SET leased_slots = 0",
        "DELETE FROM pgslots.leases",
        "SELECT id FROM pgslots.leases",
        "UPDATE pgslots.settings SET clock_offset = '1 hour'",
        "SELECT pgslots.create_limit('x', 1)",
        "SELECT pgslots.update_limit('guarded', 100)",
        "SELECT pgslots.delete_limit('guarded')",
        "SELECT * FROM pgslots.list_leases()",
        "SELECT pgslots.sweep()",
        "SELECT * FROM pgslots._admit('{guarded}', 1, 60, NULL, false, NULL, NULL, false, NULL, NULL, 0, NULL, NULL)",
        "SELECT nextval('pgslots.fencing_tokens')",
    ],
)
def test_user_role_cannot_write_tables_change_limits_or_list_lease_ids(fresh_dsn: str, user_dsn: str, query: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as owner:
        create(owner, "guarded", 2)
        acquire(owner, ["guarded"], lease_seconds=60)
    with psycopg.connect(user_dsn, autocommit=True) as conn:
        _denied(conn, query)
    with psycopg.connect(fresh_dsn, autocommit=True) as owner:
        row = one(owner, "SELECT * FROM pgslots.status WHERE name = 'guarded'")
        assert row["limit"] == 2 and row["active_slots"] == 1


def test_admin_role_manages_limits_and_leases(fresh_dsn: str, admin_role_dsn: str) -> None:
    with psycopg.connect(admin_role_dsn, autocommit=True) as conn:
        create(conn, "managed", 1)
        got = acquire(conn, ["managed"], lease_seconds=60)
        assert rows(conn, "SELECT lease_id FROM pgslots.list_leases()") == [{"lease_id": got["lease_id"]}]
        one(conn, "SELECT pgslots.update_limit('managed', 3)")
        assert one(conn, "SELECT pgslots.sweep() AS n")["n"] == 0
        assert one(conn, "SELECT pgslots.release(%s) AS r", [got["lease_id"]])["r"] is True
        one(conn, "SELECT pgslots.delete_limit('managed')")
        _denied(conn, "DELETE FROM pgslots.limits")


def test_public_cannot_call_anything(fresh_dsn: str) -> None:
    name = f"pgslots_test_nobody_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE ROLE {} LOGIN").format(pgsql.Identifier(name)))
    try:
        with psycopg.connect(psycopg.conninfo.make_conninfo(fresh_dsn, user=name), autocommit=True) as conn:
            _denied(conn, "SELECT * FROM pgslots.acquire('{x}')")
    finally:
        with psycopg.connect(fresh_dsn, autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP ROLE {}").format(pgsql.Identifier(name)))


def test_planted_objects_cannot_hijack_the_functions(fresh_dsn: str, user_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as owner:
        create(owner, "target", 1)
    with psycopg.connect(user_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA evil")
        # A frozen clock, a fake settings table and a text equality that always matches.
        conn.execute("CREATE FUNCTION evil.clock_timestamp() RETURNS timestamptz LANGUAGE sql AS $$ SELECT '2000-01-01'::timestamptz $$")
        conn.execute("CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT '2000-01-01'::timestamptz $$")
        conn.execute("CREATE TABLE evil.settings AS SELECT true AS singleton, 1::float8 AS min_lease_seconds")
        conn.execute("CREATE TABLE evil.limits (name text)")
        conn.execute(
            "CREATE FUNCTION evil.always(text, text) RETURNS boolean LANGUAGE sql AS $$ SELECT true $$; "
            "CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.always)"
        )
        conn.execute("CREATE TEMP TABLE limits (name text)")
        conn.execute("SET search_path = evil, pg_temp, public, pg_catalog")
        got = acquire(conn, ["target"], lease_seconds=60)
        assert got["granted"] and got["expires_at"].year >= 2026
        refused = acquire(conn, ["target"], lease_seconds=60)
        assert not refused["granted"]
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT * FROM pgslots.acquire('{target}', 1, 1)")  # the real minimum holds
        assert info.value.sqlstate == "PS007"
        status = one(conn, "SELECT active_slots FROM pgslots.status WHERE name = 'target'")
        assert status["active_slots"] == 1


def test_every_public_function_pins_search_path_and_is_documented(fresh_dsn: str) -> None:
    """Public functions run as the owner with search_path pinned. Helpers carry no SET clause (so
    the planner can inline them) and so must never run with the owner's rights: none is SECURITY
    DEFINER, and none is callable by PUBLIC."""
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        functions = rows(
            conn,
            "SELECT p.proname, p.proconfig, obj_description(p.oid, 'pg_proc') AS doc, p.prosecdef, "
            "has_function_privilege('public', p.oid, 'EXECUTE') AS public_may_call "
            "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'pgslots'",
        )
    assert functions
    for f in functions:
        assert not f["public_may_call"], f["proname"]
        if f["proname"].startswith("_"):
            assert not f["prosecdef"], f"helper {f['proname']} must not run as the owner"
            continue
        assert f["proconfig"] and any(c.startswith("search_path=pg_catalog") for c in f["proconfig"]), f["proname"]
        assert f["doc"], f"{f['proname']} has no COMMENT ON FUNCTION"
        assert f["prosecdef"], f"{f['proname']} is not SECURITY DEFINER"
