"""acquire_each and release_each: many requests in one call and one transaction, decided in order
as if sent one after another (all-or-nothing per request, no request overtaking one queued before
it), each grant with its own lease and fencing token; their bounds and hostile input, as two plain
roles."""

from __future__ import annotations

import json
import uuid
from typing import Any

import invariants
import psycopg

from sqlhelp import Roles, acquire, create, one, rows, snapshot

Conn = psycopg.Connection[Any]


def each(conn: Conn, requests: list[dict[str, Any]], wait_seconds: float | None = None) -> list[dict[str, Any]]:
    return rows(conn, "SELECT * FROM pgslots.acquire_each(%s::jsonb, %s)", [json.dumps(requests), wait_seconds])


def test_requests_are_decided_in_order_each_with_its_own_lease(sql: Conn) -> None:
    create(sql, "api", 3)
    create(sql, "db", 10)
    got = each(sql, [{"names": ["api", "db"], "lease_seconds": 60} for _ in range(4)] + [{"names": ["db"], "slots": 2}])
    assert [r["granted"] for r in got] == [True, True, True, False, True]
    assert got[3]["blocked_by"] == ["api"] and got[3]["retry_after"] is not None
    leases = [r["lease_id"] for r in got if r["granted"]]
    tokens = [r["fencing_token"] for r in got if r["granted"]]
    assert len(set(leases)) == 4 and tokens == sorted(tokens) and len(set(tokens)) == 4
    assert one(sql, "SELECT leased_slots FROM pgslots.limits WHERE name = 'db'")["leased_slots"] == 5
    released = rows(sql, "SELECT * FROM pgslots.release_each(%s, NULL)", [[*leases[:2], uuid.uuid4()]])
    assert [r["released"] for r in released] == [True, True, False]
    assert [r["lease_id"] for r in released][:2] == leases[:2]
    assert one(sql, "SELECT leased_slots FROM pgslots.limits WHERE name = 'api'")["leased_slots"] == 1
    invariants.check(sql)


def test_a_later_request_never_overtakes_one_queued_before_it(sql: Conn) -> None:
    create(sql, "two", 2)
    held = acquire(sql, ["two"], lease_seconds=60)
    queue = str(uuid.uuid4())
    got = each(
        sql,
        [
            {"names": ["two"], "slots": 2, "queue_client": queue, "new_lease_id": str(uuid.uuid4())},  # needs both: queued
            {"names": ["two"], "slots": 1, "queue_client": queue, "new_lease_id": str(uuid.uuid4())},  # would fit, but behind it
        ],
    )
    assert [r["granted"] for r in got] == [False, False]
    assert got[0]["waiter"] is not None and got[1]["waiter"] is not None and got[0]["waiter"] < got[1]["waiter"]
    # The holder's release hands the two slots to the head of the queue, the big request.
    assert one(sql, "SELECT pgslots.release(%s) AS r", [held["lease_id"]])["r"] is True
    assert one(sql, "SELECT count(*) AS n FROM pgslots.leases WHERE slots = 2")["n"] == 1
    invariants.check(sql)


def refused(conn: Conn, owner: Conn, sqlstate: str, query: str, params: Any = None) -> str:
    """A call by a plain role that must fail with `sqlstate` and change nothing (seen by the owner)."""
    before = snapshot(owner)
    try:
        conn.execute(query, params)
    except psycopg.Error as exc:
        assert exc.sqlstate == sqlstate, f"expected {sqlstate}, got {exc.sqlstate}: {exc}"
        assert snapshot(owner) == before
        return exc.diag.message_primary or ""
    raise AssertionError(f"no error from {query} {params}")


def test_bounds_and_hostile_input_change_nothing(roles: Roles) -> None:
    with psycopg.connect(roles.owner, autocommit=True) as owner:
        create(owner, "api", 2)
    with psycopg.connect(roles.owner, autocommit=True) as owner, psycopg.connect(roles.attacker, autocommit=True) as attacker:
        for bad in ("null", '{"names": ["api"]}', '"api"', json.dumps([{"names": ["api"]}] * 1001), '[{"names": "api"}]', "[3]"):
            message = refused(attacker, owner, "PS002", "SELECT * FROM pgslots.acquire_each(%s::jsonb)", [bad])
            assert "request" in message
        refused(attacker, owner, "PS002", "SELECT * FROM pgslots.release_each(%s)", [[uuid.uuid4()] * 1001])
        refused(attacker, owner, "PS002", "SELECT * FROM pgslots.release_each(NULL)")
        # One bad request fails the whole batch, and nothing of it stays.
        one_bad = json.dumps([{"names": ["api"]}, {"names": ["a/b"]}])
        refused(attacker, owner, "PS001", "SELECT * FROM pgslots.acquire_each(%s::jsonb)", [one_bad])
        mine = each(attacker, [{"names": ["api"], "lease_seconds": 60}])
        assert mine[0]["granted"]
    with psycopg.connect(roles.victim, autocommit=True) as victim:
        # Another role's batch cannot release a lease it does not know; with its id it can, as release can.
        assert [r["released"] for r in rows(victim, "SELECT * FROM pgslots.release_each(%s)", [[uuid.uuid4()]])] == [False]
        got = each(victim, [{"names": ["api"], "lease_seconds": 60}, {"names": ["api"], "lease_seconds": 60}])
        assert [r["granted"] for r in got] == [True, False]  # the attacker holds one of the two slots
    with psycopg.connect(roles.owner, autocommit=True) as owner:
        invariants.check(owner)
