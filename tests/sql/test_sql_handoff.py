"""Direct hand-off: a release grants the slots it frees to the head of the queue (migration 0003)."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from sqlhelp import acquire, advance_clock, create, handed, one, rate_limit, rows, status, woken

Conn = psycopg.Connection[Any]


def queue(conn: Conn, names: list[str], client: uuid.UUID, slots: int = 1, lease_seconds: float = 60) -> tuple[int, uuid.UUID]:
    """A refused acquire that queues and names its lease: (ticket, lease id)."""
    lease = uuid.uuid4()
    got = acquire(conn, names, slots, lease_seconds=lease_seconds, queue_client=client, new_lease_id=lease)
    assert not got["granted"] and got["waiter"] is not None
    return got["waiter"], lease


def listener(dsn: str, client: uuid.UUID) -> Conn:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(f"pgslots:{client}")))
    return conn


def payloads(conn: Conn, expected: int) -> list[str]:
    return [n.payload for n in conn.notifies(timeout=2, stop_after=expected)]


@pytest.fixture
def admin(fresh_dsn: str) -> Any:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        yield conn


def test_release_hands_the_slot_to_the_head_of_the_queue(admin: Conn, fresh_dsn: str) -> None:
    create(admin, "h", 1)
    held = acquire(admin, ["h"], lease_seconds=60)
    client = uuid.uuid4()
    ticket, lease = queue(admin, ["h"], client, lease_seconds=120)
    with listener(fresh_dsn, client) as lis, listener(fresh_dsn, uuid.uuid4()) as bystander:
        assert one(admin, "SELECT pgslots.release(%s) AS r", [held["lease_id"]])["r"] is True
        [note] = payloads(lis, 1)
        assert list(bystander.notifies(timeout=0.3)) == []  # each client hears only about its own waiters
    # The grant names the waiter's ticket and lease, written by the release.
    grant = handed(note)
    t, named, token, epoch, seconds = (grant[k] for k in ("ticket", "lease_id", "fencing_token", "expires_epoch", "term_seconds"))
    got = one(admin, "SELECT *, extract(epoch FROM expires_at) AS epoch FROM pgslots.leases WHERE id = %s", [lease])
    assert int(t) == ticket and uuid.UUID(named) == lease and int(token) == got["fencing_token"] > held["fencing_token"]
    assert float(epoch) == pytest.approx(float(got["epoch"]), abs=1e-3)
    assert float(seconds) == 6  # 2 x waiter_ttl_seconds first; the waiter's client renews it
    assert (got["expires_at"] - got["acquired_at"]).total_seconds() == pytest.approx(6)
    assert got["pid"] is not None and got["host"]
    assert rows(admin, "SELECT * FROM pgslots.waiters") == []
    assert status(admin, "h")["active_slots"] == 1


def test_asking_again_returns_the_handed_lease_renewed(admin: Conn) -> None:
    create(admin, "again", 1)
    held = acquire(admin, ["again"], lease_seconds=60)
    client = uuid.uuid4()
    ticket, lease = queue(admin, ["again"], client, lease_seconds=120)
    one(admin, "SELECT pgslots.release(%s)", [held["lease_id"]])
    # Its notification was lost: heartbeat says the ticket is no longer queued, so it asks again.
    assert one(admin, "SELECT pgslots.heartbeat(%s, %s) AS t", [client, [ticket]])["t"] == [ticket]
    got = acquire(admin, ["again"], lease_seconds=120, ticket=ticket, queue_client=client, new_lease_id=lease)
    assert got["granted"] and got["lease_id"] == lease
    row = one(admin, "SELECT count(*) AS n, max(expires_at - acquired_at) AS run FROM pgslots.leases")
    assert row["n"] == 1 and row["run"].total_seconds() == pytest.approx(120, abs=1)
    assert status(admin, "again")["active_slots"] == 1


def test_a_dead_waiter_gives_the_handed_slot_back_soon(admin: Conn) -> None:
    create(admin, "dead", 1)
    held = acquire(admin, ["dead"], lease_seconds=60)
    queue(admin, ["dead"], uuid.uuid4(), lease_seconds=3600)  # dies right after its last heartbeat
    one(admin, "SELECT pgslots.release(%s)", [held["lease_id"]])
    assert not acquire(admin, ["dead"], lease_seconds=60)["granted"]
    advance_clock(admin, 6.5)  # not the hour it asked for: 2 x waiter_ttl_seconds
    assert acquire(admin, ["dead"], lease_seconds=60)["granted"]


def test_head_on_several_limits_is_woken_and_nobody_overtakes_it(admin: Conn, fresh_dsn: str) -> None:
    create(admin, "a", 1)
    create(admin, "b", 1)
    held = acquire(admin, ["a"], lease_seconds=60)
    client = uuid.uuid4()
    head, head_lease = queue(admin, ["a", "b"], client)
    behind, behind_lease = queue(admin, ["a"], client)
    with listener(fresh_dsn, client) as lis:
        one(admin, "SELECT pgslots.release(%s)", [held["lease_id"]])
        assert [woken(p) for p in payloads(lis, 1)] == [[head]]  # woken to take both limits itself
    assert rows(admin, "SELECT id FROM pgslots.leases") == []
    got = acquire(admin, ["a", "b"], ticket=head, queue_client=client, new_lease_id=head_lease)
    assert got["granted"] and got["lease_id"] == head_lease
    assert not acquire(admin, ["a"], ticket=behind, queue_client=client, new_lease_id=behind_lease)["granted"]


def test_rate_limit_waiters_and_unnamed_waiters_are_woken_not_handed(admin: Conn, fresh_dsn: str) -> None:
    create(admin, "r", 1, decay=0.001)
    held = acquire(admin, ["r"], lease_seconds=60)
    client = uuid.uuid4()
    rated = rate_limit(admin, ["r"], queue_client=client)["waiter"]
    unnamed = acquire(admin, ["r"], lease_seconds=60, queue_client=client)["waiter"]
    with listener(fresh_dsn, client) as lis:
        one(admin, "SELECT pgslots.release(%s)", [held["lease_id"]])
        assert [woken(p) for p in payloads(lis, 1)] == [[rated]]  # only the head fits
    assert rows(admin, "SELECT id FROM pgslots.leases") == []
    assert rate_limit(admin, ["r"], ticket=rated, queue_client=client)["granted"]
    assert unnamed is not None


def test_hand_off_waits_until_the_head_fits(admin: Conn, fresh_dsn: str) -> None:
    create(admin, "fit", 3)
    held = [acquire(admin, ["fit"], lease_seconds=60)["lease_id"] for _ in range(3)]
    client = uuid.uuid4()
    big, big_lease = queue(admin, ["fit"], client, slots=2)
    small, small_lease = queue(admin, ["fit"], client)
    with listener(fresh_dsn, client) as lis:
        one(admin, "SELECT pgslots.release(%s)", [held[0]])
        assert list(lis.notifies(timeout=0.5)) == []  # 1 free: the head needs 2, nobody overtakes it
        one(admin, "SELECT pgslots.release(%s)", [held[1]])
        [note] = payloads(lis, 1)
    assert handed(note)["ticket"] == big
    assert one(admin, "SELECT slots FROM pgslots.leases WHERE id = %s", [big_lease])["slots"] == 2
    one(admin, "SELECT pgslots.release(%s)", [held[2]])
    assert one(admin, "SELECT slots FROM pgslots.leases WHERE id = %s", [small_lease])["slots"] == 1
    assert status(admin, "fit")["active_slots"] == 3 and rows(admin, "SELECT * FROM pgslots.waiters") == []


def test_releasing_a_queued_lease_id_leaves_the_queue(admin: Conn) -> None:
    create(admin, "gone", 1)
    held = acquire(admin, ["gone"], lease_seconds=60)
    ticket, lease = queue(admin, ["gone"], uuid.uuid4())
    # The caller gave up (even without knowing its ticket): releasing the named lease withdraws it.
    assert one(admin, "SELECT pgslots.release(%s) AS r", [lease])["r"] is False
    assert rows(admin, "SELECT * FROM pgslots.waiters") == []
    one(admin, "SELECT pgslots.release(%s)", [held["lease_id"]])
    assert rows(admin, "SELECT * FROM pgslots.leases") == []
    assert status(admin, "gone")["active_slots"] == 0 and ticket


def test_a_release_that_hands_over_is_durable(admin: Conn) -> None:
    create(admin, "d", 1)
    admin.execute("SET synchronous_commit = on")  # the test server runs with it off
    for queued, expected in ((False, "off"), (True, "on")):
        held = acquire(admin, ["d"], lease_seconds=60)
        if queued:
            queue(admin, ["d"], uuid.uuid4())
        with admin.transaction():
            one(admin, "SELECT pgslots.release(%s, false)", [held["lease_id"]])
            # A plain release may skip the WAL flush; one that grants a lease may not.
            assert one(admin, "SELECT current_setting('synchronous_commit') AS s")["s"] == expected


def test_heartbeat_keeps_only_the_tickets_given(admin: Conn) -> None:
    create(admin, "hb", 1)
    acquire(admin, ["hb"], lease_seconds=60)
    client = uuid.uuid4()
    kept, _ = queue(admin, ["hb"], client)
    orphan, _ = queue(admin, ["hb"], client)  # its caller was interrupted before it saw the ticket
    for _ in range(3):
        advance_clock(admin, 2)
        assert one(admin, "SELECT pgslots.heartbeat(%s, %s) AS t", [client, [kept]])["t"] == []
    assert [r["id"] for r in rows(admin, "SELECT id FROM pgslots.waiters WHERE expires_at > pgslots._now()")] == [kept]
    assert orphan != kept
