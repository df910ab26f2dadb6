"""SQL API under real concurrency: separate connections, row locks, no deadlocks."""

from __future__ import annotations

import threading
from typing import Any

import psycopg

from sqlhelp import acquire, advance_clock, create, one, status


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
