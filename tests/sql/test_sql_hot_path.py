"""SQL API: the shape of an uncontended acquire. It answers a declared row type (migration 0020;
rate_limit and reserve too, 0021), and grants on a limit nobody waits on without calling another
PL/pgSQL function; with waiters, it takes stage 1's second statement (in _fast_grant) and still
never overtakes them."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from sqlhelp import acquire, create, one, rows

Conn = psycopg.Connection[Any]

ANSWER = [
    ("granted", "boolean"),
    ("lease_id", "uuid"),
    ("fencing_token", "bigint"),
    ("expires_at", "timestamp with time zone"),
    ("retry_after", "double precision"),
    ("missing", "text[]"),
    ("blocked_by", "text[]"),
    ("waiter", "bigint"),
    ("liveness_seconds", "double precision"),
]


def _pl_calls(conn: Conn, call: str, params: Any) -> tuple[dict[str, Any], dict[str, int]]:
    """One statement's answer, and the PL/pgSQL functions it called with how often, counted by
    PostgreSQL's function statistics in a transaction of its own that is then rolled back. The
    counts of earlier transactions not yet flushed show too, so the difference is taken."""

    def counts() -> dict[str, int]:
        found = rows(conn, "SELECT funcname, calls FROM pg_stat_xact_user_functions WHERE schemaname = 'pgslots'")
        return {r["funcname"]: r["calls"] for r in found}

    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL track_functions = 'pl'")
        before = counts()
        answer = one(conn, call, params)
        after = counts()
    return answer, {name: n - before.get(name, 0) for name, n in after.items() if n > before.get(name, 0)}


RATED = [ANSWER[0], *ANSWER[4:8]]  # rate_limit's answer; reserve's adds reservation_id


def _declared(conn: Conn, function: str) -> tuple[str, list[tuple[str, str]]]:
    """The result type a function of the schema answers, and that type's columns."""
    result = one(conn, "SELECT pg_get_function_result(%s::regproc) AS r", [f"pgslots.{function}"])["r"]
    columns = rows(
        conn,
        "SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type FROM pg_attribute a"
        " WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        [result],
    )
    return result, [(r["name"], r["type"]) for r in columns]


def test_acquire_rate_limit_and_reserve_answer_declared_row_types(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        assert _declared(conn, "acquire") == ("pgslots.acquired", ANSWER)
        assert _declared(conn, "rate_limit") == ("pgslots.rated", RATED)
        assert _declared(conn, "reserve") == ("pgslots.reserved", [*RATED, ("reservation_id", "uuid")])
        create(conn, "calls", 2, decay=1)
        rated = one(conn, "SELECT * FROM pgslots.rate_limit('{calls}')")
        assert list(rated) == [name for name, _ in RATED] and rated["granted"] is True and rated["missing"] == []
        reserved = one(conn, "SELECT * FROM pgslots.reserve('{calls}', 1)")
        assert reserved["granted"] is True and reserved["reservation_id"] is not None
        assert one(conn, "SELECT pgslots.settle(%s, 0) AS s", [reserved["reservation_id"]])["s"] is True
        refused = one(conn, "SELECT * FROM pgslots.reserve('{calls}', 2)")
        assert refused["granted"] is False and refused["reservation_id"] is None and refused["retry_after"] > 0
        create(conn, "shape", 1)
        cur = conn.execute("SELECT * FROM pgslots.acquire('{shape}', session => %s)", [uuid.uuid4()])
        assert cur.description is not None
        assert [c.name for c in cur.description] == [name for name, _ in ANSWER]
        granted = cur.fetchone()
        assert granted is not None and granted[0] is True and granted[5] == [] and granted[8] > 0
        refused = acquire(conn, ["shape"])
        assert refused["granted"] is False and refused["blocked_by"] == ["shape"] and refused["retry_after"] > 0


def test_a_grant_on_a_limit_nobody_waits_on_calls_no_other_plpgsql_function(fresh_dsn: str) -> None:
    query = "SELECT * FROM pgslots.acquire(%s, %s, 60, queue_client => %s, new_lease_id => %s)"
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        create(conn, "quiet", 3)
        answer, called = _pl_calls(conn, query, [["quiet"], 1, None, uuid.uuid4()])
        assert answer["granted"] is True
        assert called == {"acquire": 1}

        # One lease held, then a queued request for 3 slots: the next grant of 1 would overtake it.
        held = acquire(conn, ["quiet"], lease_seconds=60)
        assert held["granted"] is True
        queued = acquire(conn, ["quiet"], slots=3, lease_seconds=60, queue_client=uuid.uuid4())
        assert queued["granted"] is False and queued["waiter"] is not None
        answer, called = _pl_calls(conn, query, [["quiet"], 1, None, uuid.uuid4()])
        assert answer["granted"] is False and answer["blocked_by"] == ["quiet"]
        assert called.get("_fast_grant") == 1, called

        # A name with no limit still reaches the key-creating stage after both statements.
        answer, called = _pl_calls(conn, query, [["nowhere"], 1, None, uuid.uuid4()])
        assert answer["missing"] == ["nowhere"]
        assert called.get("_fast_grant") == 1 and called.get("_fast_new_key") == 1, called
