"""SQL API under real concurrency: separate connections, row locks, no deadlocks."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg

from sqlhelp import acquire, advance_clock, create, one, rows, status


def test_race_for_the_last_slot(fresh_dsn: str) -> None:
    """Both ask at once inside open transactions: one wins, the other waits on the lock, then is refused."""
    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        create(admin, "last", 1)
    a = psycopg.connect(fresh_dsn)
    b = psycopg.connect(fresh_dsn)
    try:
        first = acquire(a, ["last"], lease_seconds=60)  # a holds the row lock until commit
        assert first["granted"]
        result: dict[str, Any] = {}

        def contender() -> None:
            result["b"] = acquire(b, ["last"], lease_seconds=60)
            b.commit()

        thread = threading.Thread(target=contender)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "b must wait on a's row lock"
        with psycopg.connect(fresh_dsn, autocommit=True) as watcher:
            waiting = one(watcher, "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            assert waiting["n"] == 1
        a.commit()
        thread.join(5)
        assert not thread.is_alive()
        assert result["b"]["granted"] is False
        with psycopg.connect(fresh_dsn, autocommit=True) as admin:
            assert status(admin, "last")["active_slots"] == 1
    finally:
        a.close()
        b.close()


def test_multi_name_acquires_in_opposite_orders_do_not_deadlock(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        for name in ("alpha", "beta", "gamma"):
            create(admin, name, 2)
    errors: list[BaseException] = []
    orders = [["alpha", "beta", "gamma"], ["gamma", "beta", "alpha"], ["beta", "gamma", "alpha"]]

    def worker(names: list[str]) -> None:
        try:
            with psycopg.connect(fresh_dsn, autocommit=True) as conn:
                for _ in range(150):
                    got = acquire(conn, names, lease_seconds=60)
                    if got["granted"]:
                        one(conn, "SELECT pgslots.release(%s)", [got["lease_id"]])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(orders[i % 3],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        for name in ("alpha", "beta", "gamma"):
            assert status(admin, name)["active_slots"] == 0
        assert one(admin, "SELECT count(*) AS n FROM pgslots.leases")["n"] == 0


def test_multi_name_acquire_with_one_limit_full_changes_nothing(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        create(conn, "free", 5)
        create(conn, "busy", 2)
        acquire(conn, ["busy"], 1, lease_seconds=60)
        before = one(conn, "SELECT leased_slots, unleased_slots FROM pgslots.limits WHERE name = 'free'")
        refused = acquire(conn, ["free", "busy"], 2, lease_seconds=60)
        assert not refused["granted"]
        after = one(conn, "SELECT leased_slots, unleased_slots FROM pgslots.limits WHERE name = 'free'")
        assert before == after
        assert one(conn, "SELECT count(*) AS n FROM pgslots.leases")["n"] == 1


def test_release_racing_the_reclaim_of_its_own_expired_lease(fresh_dsn: str) -> None:
    """A full limit reclaims an expired lease while its holder releases it: counted once, not twice."""
    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        create(admin, "twice", 1)
        stale = acquire(admin, ["twice"], lease_seconds=60)["lease_id"]
        advance_clock(admin, 61)  # the holder was too slow: its lease has expired
    a = psycopg.connect(fresh_dsn)
    b = psycopg.connect(fresh_dsn, autocommit=True)
    try:
        fresh = acquire(a, ["twice"], lease_seconds=60)  # reclaims the stale lease; holds the row lock
        assert fresh["granted"]
        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.update(one(b, "SELECT pgslots.release(%s) AS r", [stale])))
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "the release must wait on the reclaim's row lock"
        a.commit()
        thread.join(5)
        assert result["r"] is False  # the reclaim had it
        with psycopg.connect(fresh_dsn, autocommit=True) as admin:
            row = status(admin, "twice")
            assert row["active_slots"] == 1 and row["leases"] == 1
            assert not acquire(admin, ["twice"], lease_seconds=60)["granted"]
    finally:
        a.close()
        b.close()


def _waits_on_advisory_lock(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as watcher:
        row = one(watcher, "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'")
        return bool(row["n"] == 1)


def test_a_release_waits_for_a_refusal_still_queueing(fresh_dsn: str) -> None:
    """A refusal queues without the limit's row lock, so a release running at the same moment must
    not miss it: the release waits on the queue lock until the refusal commits, then hands it the slot."""
    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        create(admin, "q", 1)
        held = acquire(admin, ["q"], lease_seconds=60)["lease_id"]
    a = psycopg.connect(fresh_dsn)
    b = psycopg.connect(fresh_dsn, autocommit=True)
    try:
        named = uuid.uuid4()
        refused = acquire(a, ["q"], lease_seconds=60, queue_client=uuid.uuid4(), new_lease_id=named)
        assert not refused["granted"] and refused["waiter"] is not None  # queued, not yet committed
        thread = threading.Thread(target=lambda: one(b, "SELECT pgslots.release(%s)", [held]))
        thread.start()
        thread.join(0.5)
        assert thread.is_alive() and _waits_on_advisory_lock(fresh_dsn), "the release must wait for the queueing refusal"
        a.commit()
        thread.join(5)
        assert not thread.is_alive()
        with psycopg.connect(fresh_dsn, autocommit=True) as admin:
            assert [r["id"] for r in rows(admin, "SELECT id FROM pgslots.leases")] == [named]  # handed over
            assert status(admin, "q")["active_slots"] == 1 and status(admin, "q")["denied_slots"] == 1
    finally:
        a.close()
        b.close()


def test_room_appearing_while_queueing_means_ask_again(fresh_dsn: str) -> None:
    """A refusal that finds, once it holds the queue lock, that the waiter ahead of it has gone and
    the slot is free, tells the caller to ask again at once (retry_after 0, not queued)."""
    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        create(admin, "gap", 1)
        held = acquire(admin, ["gap"], lease_seconds=60)["lease_id"]
        ahead_client = uuid.uuid4()
        ahead = acquire(admin, ["gap"], lease_seconds=60, queue_client=ahead_client)["waiter"]  # names no lease
        one(admin, "SELECT pgslots.release(%s)", [held])  # the slot is free, kept for the waiter ahead
    b = psycopg.connect(fresh_dsn)
    a = psycopg.connect(fresh_dsn, autocommit=True)
    try:
        one(b, "SELECT pgslots.leave_queue(%s, %s)", [ahead, ahead_client])  # the waiter gives up; not committed yet
        result: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: result.update(acquire(a, ["gap"], lease_seconds=60, queue_client=uuid.uuid4(), new_lease_id=uuid.uuid4()))
        )
        thread.start()
        thread.join(0.5)
        assert thread.is_alive() and _waits_on_advisory_lock(fresh_dsn)
        b.commit()
        thread.join(5)
        assert result["granted"] is False and result["retry_after"] == 0
        assert result["waiter"] is None and result["blocked_by"] == []
        assert acquire(a, ["gap"], lease_seconds=60)["granted"]  # and asking again gets it
    finally:
        a.close()
        b.close()
