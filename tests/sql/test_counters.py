"""Each limit's monotonic counters, kept by the statements that grant, refuse, hand off and reclaim:
grants_total, refusals_total, wait_seconds_total, expired_leases_total, shadow_refusals."""

from __future__ import annotations

import uuid
from typing import Any

import invariants
import psycopg
import pytest

from sqlhelp import acquire, advance_clock, create, login_role, one, rate_limit, rows, status

Conn = psycopg.Connection[Any]


def counters(conn: Conn, name: str) -> tuple[int, int, float, int, int]:
    row = status(conn, name)
    return (row["grants_total"], row["refusals_total"], row["wait_seconds_total"], row["expired_leases_total"], row["shadow_refusals"])


def test_grants_and_refusals_are_counted_per_request(sql: Conn) -> None:
    create(sql, "db", 2)
    create(sql, "api", 3, decay=0.001)
    a = acquire(sql, ["db"])  # the one-limit fast path
    acquire(sql, ["db", "api"], slots=1)  # the general path, both limits
    assert not acquire(sql, ["db"], slots=2)["granted"]
    assert not acquire(sql, ["db"])["granted"]
    assert rate_limit(sql, ["api"], 2)["granted"]
    assert not rate_limit(sql, ["api"])["granted"]
    assert counters(sql, "db") == (2, 2, 0, 0, 0)
    assert counters(sql, "api")[:2] == (2, 1)
    assert status(sql, "db")["denied_slots"] == 3, "denied_slots counts slots, refusals_total requests"
    one(sql, "SELECT pgslots.release(%s) AS r", [a["lease_id"]])
    assert counters(sql, "db")[0] == 2, "a release is not a grant"


def test_a_wait_that_ends_in_a_grant_is_not_a_refusal(sql: Conn) -> None:
    """refusals_total counts calls that ended without their slots: a queued waiter later granted
    (handed its lease, or asking again) is not one; one that gives up, times out or dies is, on the
    limits that refused it; a call that does not queue counts at once."""
    create(sql, "q", 1)
    create(sql, "roomy", 5)
    held = acquire(sql, ["q"], lease_seconds=60)
    client, lease = uuid.uuid4(), uuid.uuid4()
    queued = acquire(sql, ["q"], queue_client=client, new_lease_id=lease)
    again = acquire(sql, ["q"], queue_client=client, ticket=queued["waiter"], new_lease_id=lease)
    assert not again["granted"] and again["waiter"] == queued["waiter"]
    assert counters(sql, "q")[:2] == (1, 0) and status(sql, "q")["denied_slots"] == 2  # pressure, not refusals
    sql.execute("UPDATE pgslots.waiters SET expires_at = expires_at + interval '1 hour'")
    one(sql, "SELECT pgslots.release(%s) AS r", [held["lease_id"]])  # handed to the waiter
    assert counters(sql, "q")[:2] == (2, 0), "a wait that ended in a grant"
    # Gives up: one refusal, on the limit that refused it and not on the one with room.
    quitter = uuid.uuid4()
    waiting = acquire(sql, ["q", "roomy"], queue_client=quitter)
    assert not waiting["granted"] and waiting["blocked_by"] == ["q"]
    assert one(sql, "SELECT pgslots.leave_queue(%s, %s) AS left", [waiting["waiter"], quitter])["left"]
    assert (counters(sql, "q")[1], counters(sql, "roomy")[1]) == (1, 0)
    # Dies (no heartbeats): counted once its place is swept.
    acquire(sql, ["q"], queue_client=uuid.uuid4())
    advance_clock(sql, 10)
    one(sql, "SELECT pgslots.sweep() AS n")
    assert counters(sql, "q")[1] == 2 and rows(sql, "SELECT * FROM pgslots.waiters") == []
    # Gives up by releasing the lease it named: counted too.
    assert acquire(sql, ["q"], lease_seconds=60)["granted"]  # the handed lease expired: full again
    named, who = uuid.uuid4(), uuid.uuid4()
    assert not acquire(sql, ["q"], queue_client=who, new_lease_id=named)["granted"]
    assert one(sql, "SELECT pgslots.release(%s) AS r", [named])["r"] is False
    assert counters(sql, "q")[1] == 3
    # A call that does not queue: its refusal ends it.
    assert not acquire(sql, ["q"])["granted"]
    assert counters(sql, "q")[1] == 4
    invariants.check(sql)


def test_waits_hand_offs_and_reclaims_are_counted(sql: Conn) -> None:
    create(sql, "db", 1)
    held = acquire(sql, ["db"], lease_seconds=60)
    client, lease = uuid.uuid4(), uuid.uuid4()
    queued = acquire(sql, ["db"], queue_client=client, new_lease_id=lease)
    assert not queued["granted"] and queued["waiter"]
    advance_clock(sql, 2.5)  # heartbeats are not needed within one transaction's clock
    sql.execute("UPDATE pgslots.waiters SET expires_at = expires_at + interval '1 hour'")
    one(sql, "SELECT pgslots.release(%s) AS r", [held["lease_id"]])  # hands the slot to the waiter
    grants, _, waited, _, _ = counters(sql, "db")
    assert grants == 2 and waited == pytest.approx(2.5, abs=0.2), "the hand-off counts a grant and its wait"
    # A queued waiter that asks again and is granted counts its wait too.
    one(sql, "SELECT pgslots.release(%s) AS r", [lease])
    blocker = acquire(sql, ["db"], lease_seconds=60)
    second = acquire(sql, ["db"], queue_client=client)
    advance_clock(sql, 1.0)
    sql.execute("UPDATE pgslots.waiters SET expires_at = expires_at + interval '1 hour'")
    one(sql, "SELECT pgslots.release(%s) AS r", [blocker["lease_id"]])  # no named lease: woken, not handed
    again = acquire(sql, ["db"], queue_client=client, ticket=second["waiter"])
    assert again["granted"]
    grants, _, waited, _, _ = counters(sql, "db")
    assert grants == 4 and waited == pytest.approx(3.5, abs=0.3)
    # Expired leases taken back by a full limit, and by sweep.
    advance_clock(sql, 400)
    assert acquire(sql, ["db"])["granted"], "the expired lease was reclaimed"
    assert counters(sql, "db")[3] == 1
    advance_clock(sql, 400)
    one(sql, "SELECT pgslots.sweep() AS n")
    assert counters(sql, "db")[3] == 2
    invariants.check(sql)


def test_a_templates_totals_include_its_keys_removed_ones_too(sql: Conn) -> None:
    create(sql, "tenant:*", 1)
    for key in ("tenant:a", "tenant:b"):
        lease = acquire(sql, [key])
        assert not acquire(sql, [key])["granted"]
        one(sql, "SELECT pgslots.release(%s) AS r", [lease["lease_id"]])
    assert counters(sql, "tenant:*")[:2] == (2, 2)
    one(sql, "SELECT pgslots.sweep() AS n")  # both keys are idle: removed
    assert one(sql, "SELECT count(*) AS n FROM pgslots.limits WHERE template_id IS NOT NULL")["n"] == 0
    assert counters(sql, "tenant:*")[:2] == (2, 2), "never goes down"
    assert acquire(sql, ["tenant:a"])["granted"]
    assert counters(sql, "tenant:*")[:2] == (3, 2)


def test_shadow_refusals_are_a_counter_too(sql: Conn) -> None:
    one(sql, "SELECT pgslots.create_limit('trial', 1, shadow => true) AS id")
    for _ in range(3):
        assert acquire(sql, ["trial"])["granted"]
    assert counters(sql, "trial") == (3, 0, 0, 0, 2)


def test_plain_roles_read_counters_but_cannot_change_them(sql_db: str) -> None:
    victim_dsns, attacker_dsns = login_role(sql_db, "pgslots_user"), login_role(sql_db, "pgslots_user")
    try:
        with (
            psycopg.connect(sql_db, autocommit=True) as admin,
            psycopg.connect(next(victim_dsns), autocommit=True) as victim,
            psycopg.connect(next(attacker_dsns), autocommit=True) as attacker,
        ):
            admin.execute("DELETE FROM pgslots.limits WHERE name = 'counted'")
            create(admin, "counted", 1)
            lease = acquire(victim, ["counted"])
            assert not acquire(attacker, ["counted"])["granted"]
            before = counters(admin, "counted")
            assert before[:2] == (1, 1)
            assert counters(attacker, "counted") == before, "readable through status"
            for query in (
                "UPDATE pgslots.limits SET grants_total = 0",
                "UPDATE pgslots.refusals SET refusals_total = 0",
                "DELETE FROM pgslots.retired_counters",
                "SELECT pgslots._count_refusal(ARRAY(SELECT id FROM pgslots.status), 1, true)",
                "SELECT pgslots._gave_up(ARRAY(SELECT id FROM pgslots.status))",
            ):
                try:
                    with attacker.transaction():
                        attacker.execute(query)
                except psycopg.Error as exc:
                    assert exc.sqlstate == "42501", exc
                else:
                    raise AssertionError(query)
            assert counters(admin, "counted") == before
            one(victim, "SELECT pgslots.release(%s) AS r", [lease["lease_id"]])
            admin.execute("DELETE FROM pgslots.limits WHERE name = 'counted'")
    finally:
        victim_dsns.close()
        attacker_dsns.close()
