"""SQL API: creating, changing and deleting limits, and every input they must reject."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from sqlhelp import acquire, create, expect_error, one, rate_limit, status

Conn = psycopg.Connection[Any]


def test_create_reports_id_and_defaults(sql: Conn) -> None:
    new_id = create(sql, "api", 3)
    row = status(sql, "api")
    assert row["id"] == new_id
    assert (row["limit"], row["active"], row["slot_decay_per_second"], row["active_slots"]) == (3, True, 0.0, 0)
    assert row["denied_slots"] == 0 and row["leases"] == 0 and row["waiters"] == 0


@pytest.mark.parametrize("name", ["with space", "ünïcødé ✓", "a.b-c_d:e", "x" * 255, "'quoted'", "日本"])
def test_names_allowed(sql: Conn, name: str) -> None:
    create(sql, name, 1)
    assert status(sql, name)["name"] == name
    assert acquire(sql, [name], lease_seconds=60)["granted"]


@pytest.mark.parametrize("name", ["", "a/b", "50%", "x&y", "a>b", "a<b", "x" * 256])
def test_bad_names_rejected_with_the_rule(sql: Conn, name: str) -> None:
    message = expect_error(sql, "PS001", "SELECT pgslots.create_limit(%s, 1)", [name])
    assert "name" in message.lower()
    if name and len(name) < 256:
        assert "/ % & > <" in message


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ('SET "limit" = -1', "limit is 0 or more"),
        ("SET name = 'a/b'", "none of / % & > <"),
        ("SET slot_decay_per_second = 'NaN'", "slot_decay_per_second is 0 or more, and finite"),
        ("SET window_seconds = 60", "slot decay or a window, not both"),
        ("SET margin_seconds = 61", "margin_seconds is from 0 to 60"),
        ("SET max_keys = 0", "max_keys is 1 or more"),
        ('SET leased_slots = -1, "limit" = 5', "leased_slots and unleased_slots are 0 or more"),
    ],
)
def test_a_row_written_around_the_functions_still_keeps_the_rules(sql: Conn, change: str, rule: str) -> None:
    """The rules of a limit's row are checked by a trigger when its settings change (not on the
    counters' updates of acquire and release): even the owner writing the table directly cannot
    store a limit that breaks one, and nothing changes."""
    create(sql, "bucket", 5, 1.0)
    message = expect_error(sql, "23514", f"UPDATE pgslots.limits {change} WHERE name = 'bucket'")
    assert message.startswith("Limit '") and "' breaks a rule of pgslots.limits: " in message and rule in message
    message = expect_error(
        sql,
        "23514",
        'INSERT INTO pgslots.limits (name, "limit", decayed_at, created, updated) VALUES (%s, 1, now(), now(), now())',
        ["evil\x1b[2Jname>"],
    )
    assert "\x1b" not in message and "'evil?[2Jname>'" in message
    assert acquire(sql, ["bucket"], lease_seconds=60)["granted"]


def test_null_name_rejected(sql: Conn) -> None:
    expect_error(sql, "PS001", "SELECT pgslots.create_limit(NULL, 1)")


@pytest.mark.parametrize("limit", [-1, -2147483648])
def test_negative_limit_rejected(sql: Conn, limit: int) -> None:
    message = expect_error(sql, "PS002", "SELECT pgslots.create_limit('x', %s)", [limit])
    assert "limit must be 0 or more" in message


def test_null_limit_rejected(sql: Conn) -> None:
    expect_error(sql, "PS002", "SELECT pgslots.create_limit('x', NULL)")


@pytest.mark.parametrize("decay", ["NaN", "Infinity", "-Infinity", "-0.5", "5e-324"])
def test_bad_decay_rejected(sql: Conn, decay: str) -> None:
    message = expect_error(sql, "PS002", "SELECT pgslots.create_limit('x', 1, %s::float8)", [decay])
    assert "0 (no decay) or a finite number from 1e-9 up" in message
    create(sql, "y", 1)
    expect_error(sql, "PS002", "SELECT pgslots.update_limit('y', slot_decay_per_second => %s::float8)", [decay])


def test_duplicate_name_is_a_clear_error(sql: Conn) -> None:
    create(sql, "dup", 1)
    message = expect_error(sql, "PS003", "SELECT pgslots.create_limit('dup', 5)")
    assert message == "Global concurrency limit 'dup' already exists."
    assert status(sql, "dup")["limit"] == 1


def test_update_fields_independently(sql: Conn) -> None:
    create(sql, "u", 2)
    one(sql, "SELECT pgslots.update_limit('u', \"limit\" => 7)")
    one(sql, "SELECT pgslots.update_limit('u', slot_decay_per_second => 1.5)")
    one(sql, "SELECT pgslots.update_limit('u', active => false)")
    row = status(sql, "u")
    assert (row["limit"], row["slot_decay_per_second"], row["active"]) == (7, 1.5, False)
    one(sql, "SELECT pgslots.update_limit('u', new_name => 'u2')")
    assert status(sql, "u2")["limit"] == 7


def test_update_and_delete_unknown(sql: Conn) -> None:
    assert expect_error(sql, "PS004", "SELECT pgslots.update_limit('nope', 1)") == "Global concurrency limit 'nope' not found."
    expect_error(sql, "PS004", "SELECT pgslots.delete_limit('nope')")


def test_update_rejects_bad_values_and_changes_nothing(sql: Conn) -> None:
    create(sql, "v", 2)
    create(sql, "w", 2)
    expect_error(sql, "PS002", "SELECT pgslots.update_limit('v', -3)")
    expect_error(sql, "PS001", "SELECT pgslots.update_limit('v', new_name => 'a/b')")
    expect_error(sql, "PS003", "SELECT pgslots.update_limit('v', new_name => 'w')")
    expect_error(sql, "PS002", "SELECT pgslots.update_limit('v', active_slots => -1)")


def test_active_slots_can_be_set_but_not_below_leased(sql: Conn) -> None:
    create(sql, "s", 5)
    acquire(sql, ["s"], 2, lease_seconds=60)
    one(sql, "SELECT pgslots.update_limit('s', active_slots => 4)")
    assert status(sql, "s")["active_slots"] == 4
    message = expect_error(sql, "PS002", "SELECT pgslots.update_limit('s', active_slots => 1)")
    assert "held by leases" in message
    one(sql, "SELECT pgslots.update_limit('s', active_slots => 2)")
    assert status(sql, "s")["active_slots"] == 2


def test_delete_removes_limit_and_its_leases(sql: Conn) -> None:
    create(sql, "d", 2)
    lease = acquire(sql, ["d"], lease_seconds=60)["lease_id"]
    one(sql, "SELECT pgslots.delete_limit('d')")
    assert one(sql, "SELECT count(*) AS n FROM pgslots.leases")["n"] == 0
    assert one(sql, "SELECT pgslots.release(%s) AS r", [lease])["r"] is False


def test_lowering_limit_preempts_nobody_and_blocks_new(sql: Conn) -> None:
    create(sql, "low", 3)
    leases = [acquire(sql, ["low"], lease_seconds=60)["lease_id"] for _ in range(3)]
    one(sql, "SELECT pgslots.update_limit('low', 1)")
    assert status(sql, "low")["active_slots"] == 3
    assert not acquire(sql, ["low"], lease_seconds=60)["granted"]
    for lease in leases[:2]:
        one(sql, "SELECT pgslots.release(%s)", [lease])
    assert not acquire(sql, ["low"], lease_seconds=60)["granted"]  # 1 held, limit 1
    one(sql, "SELECT pgslots.release(%s)", [leases[2]])
    assert acquire(sql, ["low"], lease_seconds=60)["granted"]


def test_limit_zero_never_fails_a_release(sql: Conn) -> None:
    create(sql, "z", 2, decay=0)
    lease = acquire(sql, ["z"], 2, lease_seconds=60)["lease_id"]
    one(sql, "SELECT pgslots.update_limit('z', 0)")
    assert one(sql, "SELECT pgslots.release(%s) AS r", [lease])["r"] is True
    row = status(sql, "z")
    assert row["active_slots"] == 0 and row["avg_slot_occupancy_seconds"] > 0
    message = expect_error(sql, "PS006", "SELECT * FROM pgslots.acquire('{z}', 1, 60)")
    assert "slots requested is greater than the limit" in message
    assert one(sql, "SELECT pgslots.sweep() AS n")["n"] == 0


def test_limit_zero_with_decay_and_rate_limit(sql: Conn) -> None:
    create(sql, "zd", 0, decay=1)
    expect_error(sql, "PS006", "SELECT * FROM pgslots.rate_limit('{zd}')")
    assert status(sql, "zd")["active_slots"] == 0


def test_inactive_limit_enforces_nothing(sql: Conn) -> None:
    create(sql, "off", 1, active=False)
    results = [acquire(sql, ["off"], 1, lease_seconds=60) for _ in range(5)]
    assert all(r["granted"] for r in results)
    assert all(r["lease_id"] is None for r in results)  # nothing was occupied
    assert status(sql, "off")["active_slots"] == 0
    # Too many slots is no error either: nothing is enforced.
    assert acquire(sql, ["off"], 10, lease_seconds=60)["granted"]
    one(sql, "SELECT pgslots.update_limit('off', active => true)")
    assert acquire(sql, ["off"], lease_seconds=60)["granted"]
    assert not acquire(sql, ["off"], lease_seconds=60)["granted"]


def test_inactive_rate_limit_does_not_need_decay(sql: Conn) -> None:
    create(sql, "ioff", 1, active=False)
    assert rate_limit(sql, ["ioff"])["granted"]


def test_reading_status_is_never_jit_compiled(fresh_dsn: str) -> None:
    """A fresh database has never been analyzed: the planner guesses hundreds of rows for the
    one-row settings table. The status view must still plan below jit_above_cost (compiling it took
    0.5-1.3 s for a read of a few rows), and the read functions switch JIT off outright."""
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        for name in ("a", "b", "c"):
            create(conn, name, 2)
        plan = one(conn, "EXPLAIN (FORMAT JSON) SELECT * FROM pgslots.status")["QUERY PLAN"][0]["Plan"]
        threshold = float(one(conn, "SELECT current_setting('jit_above_cost') AS c")["c"])
        assert plan["Total Cost"] < threshold
        readers = conn.execute(
            "SELECT p.proname, p.proconfig FROM pg_proc p WHERE p.pronamespace = 'pgslots'::regnamespace "
            "AND p.proname IN ('get_limits', 'get_instances', 'list_leases')"
        ).fetchall()
        assert len(readers) == 3 and all("jit=off" in (config or []) for _, config in readers), readers
