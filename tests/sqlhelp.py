"""Small helpers for tests that call the SQL API directly."""

from __future__ import annotations

import json
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql as pgsql
from psycopg.rows import dict_row


def one(conn: psycopg.Connection[Any], query: str, params: Any = None) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        row = cur.fetchone()
        assert row is not None
        return row


def woken(payload: str) -> list[int]:
    """The tickets a wake-up notification tells to ask again (see sql/functions/40_queue.sql)."""
    return list(json.loads(payload)["wake"])


def handed(payload: str) -> dict[str, Any]:
    """The grant a hand-off notification carries: ticket, lease_id, fencing_token, expires_epoch,
    term_seconds."""
    return dict(json.loads(payload)["grant"])


def grant_note(ticket: int, lease_id: Any, fencing_token: Any, expires_epoch: float, term_seconds: float) -> str:
    """A hand-off notification as the database sends it (to forge one)."""
    grant = {"ticket": ticket, "lease_id": str(lease_id), "fencing_token": fencing_token}
    return json.dumps({"grant": grant | {"expires_epoch": expires_epoch, "term_seconds": term_seconds}})


def rows(conn: psycopg.Connection[Any], query: str, params: Any = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchall()


def acquire(conn: psycopg.Connection[Any], names: list[str], slots: int = 1, lease_seconds: float = 300, **kw: Any) -> dict[str, Any]:
    args = ", ".join(f"{k} => %({k})s" for k in kw)
    query = "SELECT * FROM pgslots.acquire(%(names)s, %(slots)s, %(lease_seconds)s" + (", " + args if args else "") + ")"
    return one(conn, query, {"names": names, "slots": slots, "lease_seconds": lease_seconds, **kw})


def rate_limit(conn: psycopg.Connection[Any], names: list[str], slots: int = 1, **kw: Any) -> dict[str, Any]:
    args = ", ".join(f"{k} => %({k})s" for k in kw)
    query = "SELECT * FROM pgslots.rate_limit(%(names)s, %(slots)s" + (", " + args if args else "") + ")"
    return one(conn, query, {"names": names, "slots": slots, **kw})


def create(conn: psycopg.Connection[Any], name: str, limit: int, decay: float = 0, active: bool = True, margin: float = 0) -> Any:
    """A limit for tests of exact figures: no margin unless asked (see test_margins.py)."""
    return one(conn, "SELECT pgslots.create_limit(%s, %s, %s, %s, margin_seconds => %s) AS id", [name, limit, decay, active, margin])["id"]


def status(conn: psycopg.Connection[Any], name: str) -> dict[str, Any]:
    return one(conn, "SELECT * FROM pgslots.status WHERE name = %s", [name])


def snapshot(conn: psycopg.Connection[Any]) -> list[Any]:
    """Everything a rejected call must leave unchanged."""
    return [
        conn.execute("SELECT * FROM pgslots.limits ORDER BY name").fetchall(),
        conn.execute("SELECT * FROM pgslots.leases ORDER BY id, limit_id").fetchall(),
        conn.execute("SELECT * FROM pgslots.waiters ORDER BY limit_id, id").fetchall(),
        conn.execute("SELECT * FROM pgslots.window_grants ORDER BY limit_id, granted_at, id").fetchall(),
        conn.execute("SELECT * FROM pgslots.reservations ORDER BY id").fetchall(),
    ]


def advance_clock(conn: psycopg.Connection[Any], seconds: float) -> None:
    conn.execute("UPDATE pgslots.settings SET clock_offset = clock_offset + make_interval(secs => %s)", [seconds])


def expect_error(
    conn: psycopg.Connection[Any], sqlstate: str, query: str, params: Any = None, *, seen_by: psycopg.Connection[Any] | None = None
) -> str:
    """Runs a call that must fail with `sqlstate`, proves it changed nothing (as `seen_by` sees the
    tables: the owner, for a plain role's call), returns the message."""
    observer = seen_by or conn
    before = snapshot(observer)
    try:
        with conn.transaction():
            conn.execute(query, params)
    except psycopg.Error as exc:
        assert exc.sqlstate == sqlstate, f"expected {sqlstate}, got {exc.sqlstate}: {exc}"
        assert snapshot(observer) == before
        return exc.diag.message_primary or ""
    raise AssertionError(f"no error from {query} {params}")


def login_role(admin_dsn: str, group: str) -> Generator[str, None, None]:
    """A new login role in `group` (pgslots_user or pgslots_admin) for the length of a test: its DSN."""
    name = f"pgslots_test_{group}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(pgsql.Identifier(name), pgsql.Identifier(group)))
        dbname = conn.info.dbname
        conn.execute(pgsql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(pgsql.Identifier(dbname), pgsql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(admin_dsn, user=name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP OWNED BY {}").format(pgsql.Identifier(name)))
            conn.execute(pgsql.SQL("DROP ROLE {}").format(pgsql.Identifier(name)))


@dataclass(frozen=True)
class Roles:
    """Two plain roles of pgslots_user against each other, and the schema owner."""

    owner: str  # the schema owner: creates limits and looks at the tables
    victim: str
    attacker: str


def two_plain_roles(admin_dsn: str) -> Iterator[Roles]:
    victims = login_role(admin_dsn, "pgslots_user")
    attackers = login_role(admin_dsn, "pgslots_user")
    try:
        yield Roles(admin_dsn, next(victims), next(attackers))
    finally:
        for role in (victims, attackers):
            next(role, None)
