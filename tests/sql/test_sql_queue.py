"""SQL API: the first-come queue of waiters, heartbeats and wake-up notifications."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from sqlhelp import acquire, advance_clock, create, one, rate_limit, rows, woken

Conn = psycopg.Connection[Any]


def test_queued_waiter_is_served_before_newcomers(sql: Conn) -> None:
    create(sql, "q", 5)
    client = uuid.uuid4()
    held = [acquire(sql, ["q"], 1, lease_seconds=60)["lease_id"] for _ in range(5)]
    big = acquire(sql, ["q"], 5, lease_seconds=60, queue_client=client)
    assert not big["granted"] and big["waiter"] is not None
    one(sql, "SELECT pgslots.release(%s)", [held[0]])
    # A newcomer asking for the one free slot must not overtake the queued request for 5.
    assert not acquire(sql, ["q"], 1, lease_seconds=60)["granted"]
    for lease in held[1:]:
        one(sql, "SELECT pgslots.release(%s)", [lease])
    got = acquire(sql, ["q"], 5, lease_seconds=60, ticket=big["waiter"], queue_client=client)
    assert got["granted"]
    assert one(sql, "SELECT count(*) AS n FROM pgslots.waiters")["n"] == 0


def test_waiters_behind_may_fill_room_left_after_those_ahead(sql: Conn) -> None:
    create(sql, "room", 4)
    client = uuid.uuid4()
    lease = acquire(sql, ["room"], 3, lease_seconds=60)["lease_id"]
    first = acquire(sql, ["room"], 2, lease_seconds=60, queue_client=client)
    assert not first["granted"]
    one(sql, "SELECT pgslots.release(%s)", [lease])
    # 2 reserved for the first waiter, 2 left for a newcomer.
    assert acquire(sql, ["room"], 2, lease_seconds=60)["granted"]
    assert not acquire(sql, ["room"], 1, lease_seconds=60)["granted"]


def test_dead_waiter_leaves_the_queue_by_itself(sql: Conn) -> None:
    create(sql, "dead", 1)
    lease = acquire(sql, ["dead"], lease_seconds=60)["lease_id"]
    acquire(sql, ["dead"], lease_seconds=60, queue_client=uuid.uuid4())
    one(sql, "SELECT pgslots.release(%s)", [lease])
    assert not acquire(sql, ["dead"], lease_seconds=60)["granted"]  # the waiter still has its place
    advance_clock(sql, 4)  # waiter_ttl_seconds (3) without a heartbeat
    assert acquire(sql, ["dead"], lease_seconds=60)["granted"]


def test_heartbeat_keeps_the_place(sql: Conn) -> None:
    create(sql, "hb", 1)
    client = uuid.uuid4()
    lease = acquire(sql, ["hb"], lease_seconds=60)["lease_id"]
    ticket = acquire(sql, ["hb"], lease_seconds=60, queue_client=client)["waiter"]
    assert one(sql, "SELECT pgslots.heartbeat(%s) AS t", [client])["t"] == []  # nothing free yet
    one(sql, "SELECT pgslots.release(%s)", [lease])
    for _ in range(3):
        advance_clock(sql, 4)
        # Still queued, and the free slot could serve it: the heartbeat says so.
        assert one(sql, "SELECT pgslots.heartbeat(%s) AS t", [client])["t"] == [ticket]
    assert not acquire(sql, ["hb"], lease_seconds=60)["granted"]
    assert one(sql, "SELECT pgslots.heartbeat(%s) AS t", [uuid.uuid4()])["t"] == []


def test_leave_queue(sql: Conn) -> None:
    create(sql, "lq", 1)
    lease = acquire(sql, ["lq"], lease_seconds=60)["lease_id"]
    client = uuid.uuid4()
    ticket = acquire(sql, ["lq"], lease_seconds=60, queue_client=client)["waiter"]
    one(sql, "SELECT pgslots.release(%s)", [lease])
    assert one(sql, "SELECT pgslots.leave_queue(%s, %s) AS left", [ticket, client])["left"] is True
    assert one(sql, "SELECT pgslots.leave_queue(%s, %s) AS left", [ticket, client])["left"] is False
    assert acquire(sql, ["lq"], lease_seconds=60)["granted"]


def test_status_counts_waiters(sql: Conn) -> None:
    create(sql, "st", 1)
    acquire(sql, ["st"], lease_seconds=60)
    for _ in range(3):
        acquire(sql, ["st"], lease_seconds=60, queue_client=uuid.uuid4())
    advance_clock(sql, 2)
    row = one(sql, "SELECT * FROM pgslots.status WHERE name = 'st'")
    assert row["waiters"] == 3 and row["oldest_waiter_seconds"] >= 2


def test_rate_limit_waiters_queue_too(sql: Conn) -> None:
    create(sql, "rq", 2, decay=1.0)
    client = uuid.uuid4()
    rate_limit(sql, ["rq"], 2)
    big = rate_limit(sql, ["rq"], 2, queue_client=client)
    assert not big["granted"] and 1.9 < big["retry_after"] <= 2.0
    advance_clock(sql, 1.0)
    # One slot has decayed, but it is the queued waiter's: a newcomer waits behind it.
    small = rate_limit(sql, ["rq"], 1)
    assert not small["granted"] and small["retry_after"] > 1.9
    advance_clock(sql, 1.0)
    assert rate_limit(sql, ["rq"], 2, ticket=big["waiter"], queue_client=client)["granted"]


def test_release_notifies_the_waiters_it_can_serve(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as admin, psycopg.connect(fresh_dsn, autocommit=True) as lis:
        create(admin, "wake", 2)
        client = uuid.uuid4()
        held = [acquire(admin, ["wake"], lease_seconds=60)["lease_id"] for _ in range(2)]
        tickets = [acquire(admin, ["wake"], lease_seconds=60, queue_client=client)["waiter"] for _ in range(3)]
        lis.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(f"pgslots:{client}")))  # its own channel
        one(admin, "SELECT pgslots.release(%s)", [held[0]])
        notes = list(lis.notifies(timeout=2, stop_after=1))
        assert [woken(n.payload) for n in notes] == [[tickets[0]]]  # one slot: only the head wakes
        one(admin, "SELECT pgslots.update_limit('wake', 5)")
        notes = list(lis.notifies(timeout=2, stop_after=1))
        # Four free now: the three queued waiters, not more, in order.
        assert woken(notes[0].payload) == tickets
        assert rows(admin, "SELECT id FROM pgslots.waiters ORDER BY id")


def test_heartbeat_counts_expired_leases_as_free(sql: Conn) -> None:
    create(sql, "gone", 1)
    acquire(sql, ["gone"], lease_seconds=60)  # its holder dies: nobody releases
    client = uuid.uuid4()
    ticket = acquire(sql, ["gone"], lease_seconds=60, queue_client=client)["waiter"]
    advance_clock(sql, 5)
    assert one(sql, "SELECT pgslots.heartbeat(%s) AS t", [client])["t"] == []
    advance_clock(sql, 56)
    assert one(sql, "SELECT pgslots.heartbeat(%s) AS t", [client])["t"] == [ticket]
    assert acquire(sql, ["gone"], lease_seconds=60, ticket=ticket, queue_client=client)["granted"]


def test_client_chosen_lease_id(sql: Conn) -> None:
    create(sql, "named", 2)
    chosen = uuid.uuid4()
    got = acquire(sql, ["named"], lease_seconds=60, new_lease_id=chosen)
    assert got["lease_id"] == chosen
    assert one(sql, "SELECT pgslots.release(%s) AS r", [chosen])["r"] is True
