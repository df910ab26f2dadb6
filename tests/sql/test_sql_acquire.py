"""SQL API: acquire, release, renew, leases, expiry, fencing, missing names, sweep."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest

from sqlhelp import acquire, advance_clock, create, expect_error, one, rows, status

Conn = psycopg.Connection[Any]


def test_grant_returns_lease_token_expiry(sql: Conn) -> None:
    create(sql, "a", 2)
    now = one(sql, "SELECT pgslots._now() AS t")["t"]
    got = acquire(sql, ["a"], 1, lease_seconds=120)
    assert got["granted"] and got["lease_id"] is not None and got["retry_after"] is None
    assert 119 < (got["expires_at"] - now).total_seconds() < 125
    assert got["missing"] == [] and got["blocked_by"] is None
    assert status(sql, "a")["active_slots"] == 1


def test_refusal_gives_hint_blocked_by_and_pressure(sql: Conn) -> None:
    create(sql, "full", 1)
    acquire(sql, ["full"], lease_seconds=60)
    refused = acquire(sql, ["full"], lease_seconds=60)
    assert not refused["granted"] and refused["lease_id"] is None
    assert refused["blocked_by"] == ["full"]
    assert 0.1 <= refused["retry_after"] <= 30
    assert status(sql, "full")["denied_slots"] == 1
    assert one(sql, "SELECT count(DISTINCT id) AS n FROM pgslots.leases")["n"] == 1


def test_retry_after_learns_occupancy_and_is_capped(sql: Conn) -> None:
    create(sql, "ema", 1)
    lease = acquire(sql, ["ema"], lease_seconds=60)["lease_id"]
    advance_clock(sql, 1000)  # a slot held for a long time pushes the average up
    one(sql, "SELECT pgslots.release(%s)", [lease])
    assert status(sql, "ema")["avg_slot_occupancy_seconds"] > 400
    acquire(sql, ["ema"], lease_seconds=60)
    assert acquire(sql, ["ema"], lease_seconds=60)["retry_after"] == 30


def test_fencing_tokens_increase_per_limit(sql: Conn) -> None:
    create(sql, "f", 5)
    tokens = []
    for _ in range(4):
        got = acquire(sql, ["f"], lease_seconds=60)
        tokens.append(got["fencing_token"])
        one(sql, "SELECT pgslots.release(%s)", [got["lease_id"]])
    assert tokens == sorted(tokens) and len(set(tokens)) == 4


def test_slots_zero_negative_or_null(sql: Conn) -> None:
    create(sql, "s", 3)
    for bad in (0, -1, None):
        message = expect_error(sql, "PS005", "SELECT * FROM pgslots.acquire('{s}', %s, 60)", [bad])
        assert "slots must be 1 or more" in message


def test_slots_over_limit_fail_at_once(sql: Conn) -> None:
    create(sql, "small", 2)
    message = expect_error(sql, "PS006", "SELECT * FROM pgslots.acquire('{small}', 3, 60)")
    assert message.startswith("Unable to acquire concurrency slots on ['small']")


@pytest.mark.parametrize("seconds", [59.9, 86400.5, 0, -5, None, "NaN", "Infinity"])
def test_lease_seconds_bounds(sql: Conn, seconds: Any) -> None:
    create(sql, "l", 1)
    message = expect_error(sql, "PS007", "SELECT * FROM pgslots.acquire('{l}', 1, %s::float8)", [seconds])
    assert "between 60 and 86400" in message


def test_lease_minimum_is_a_setting(sql: Conn) -> None:
    create(sql, "m", 1)
    sql.execute("UPDATE pgslots.settings SET min_lease_seconds = 1")
    assert acquire(sql, ["m"], lease_seconds=1.5)["granted"]


def test_null_or_bad_names(sql: Conn) -> None:
    expect_error(sql, "PS011", "SELECT * FROM pgslots.acquire(NULL, 1, 60)")
    expect_error(sql, "PS001", "SELECT * FROM pgslots.acquire(ARRAY['ok', NULL], 1, 60)")
    expect_error(sql, "PS001", "SELECT * FROM pgslots.acquire('{a/b}', 1, 60)")


def test_empty_names_grant_nothing(sql: Conn) -> None:
    got = acquire(sql, [], lease_seconds=60)
    assert got["granted"] and got["lease_id"] is None and got["missing"] == []


def test_missing_names_all_and_partial(sql: Conn) -> None:
    got = acquire(sql, ["ghost"], lease_seconds=60)
    assert got["granted"] and got["missing"] == ["ghost"] and got["lease_id"] is None
    create(sql, "real", 1)
    got = acquire(sql, ["ghost", "real", "ghost2"], lease_seconds=60)
    assert got["granted"] and got["missing"] == ["ghost", "ghost2"] and got["lease_id"] is not None
    assert status(sql, "real")["active_slots"] == 1


def test_missing_names_strict(sql: Conn) -> None:
    create(sql, "real", 1)
    message = expect_error(sql, "PS008", "SELECT * FROM pgslots.acquire('{real,ghost}', 1, 60, strict => true)")
    assert message == "Concurrency limits ['ghost'] must be created before acquiring slots"


def test_duplicate_names_in_one_call_count_once(sql: Conn) -> None:
    create(sql, "twice", 2)
    got = acquire(sql, ["twice", "twice"], 2, lease_seconds=60)
    assert got["granted"]
    assert status(sql, "twice")["active_slots"] == 2


def test_multi_name_all_or_nothing(sql: Conn) -> None:
    create(sql, "x", 2)
    create(sql, "y", 1)
    acquire(sql, ["y"], lease_seconds=60)
    refused = acquire(sql, ["x", "y"], lease_seconds=60)
    assert not refused["granted"] and refused["blocked_by"] == ["y"]
    assert status(sql, "x")["active_slots"] == 0
    assert status(sql, "x")["denied_slots"] == 0 and status(sql, "y")["denied_slots"] == 1


def test_multi_name_lease_releases_every_limit(sql: Conn) -> None:
    create(sql, "p", 3)
    create(sql, "q", 3)
    got = acquire(sql, ["q", "p"], 2, lease_seconds=60)
    assert status(sql, "p")["active_slots"] == 2 and status(sql, "q")["active_slots"] == 2
    leases = rows(sql, "SELECT * FROM pgslots.list_leases()")
    assert len(leases) == 1 and leases[0]["limit_names"] == ["p", "q"] and leases[0]["slots"] == 2
    assert one(sql, "SELECT pgslots.release(%s) AS r", [got["lease_id"]])["r"] is True
    assert status(sql, "p")["active_slots"] == 0 and status(sql, "q")["active_slots"] == 0


def test_release_is_idempotent_and_never_negative(sql: Conn) -> None:
    create(sql, "r", 2)
    lease = acquire(sql, ["r"], lease_seconds=60)["lease_id"]
    assert one(sql, "SELECT pgslots.release(%s) AS r", [lease])["r"] is True
    assert one(sql, "SELECT pgslots.release(%s) AS r", [lease])["r"] is False
    assert one(sql, "SELECT pgslots.release(gen_random_uuid()) AS r")["r"] is False
    assert one(sql, "SELECT pgslots.release(NULL) AS r")["r"] is False
    assert status(sql, "r")["active_slots"] == 0


def test_malformed_lease_id_is_a_type_error(sql: Conn) -> None:
    expect_error(sql, "22P02", "SELECT pgslots.release('not-a-uuid')")


def test_holder_information(sql: Conn) -> None:
    create(sql, "h", 1)
    sql.execute("SET application_name = 'etl-job'")
    holder = {"host": "worker-7", "pid": 4242, "type": "flow_run", "id": "abc"}
    acquire(sql, ["h"], lease_seconds=60, holder=json.dumps(holder))
    lease = rows(sql, "SELECT * FROM pgslots.list_leases('h')")[0]
    assert (lease["host"], lease["pid"], lease["application_name"]) == ("worker-7", 4242, "etl-job")
    assert lease["holder"]["type"] == "flow_run"


def test_holder_defaults_to_connection_details(sql: Conn) -> None:
    create(sql, "h2", 1)
    acquire(sql, ["h2"], lease_seconds=60, holder=json.dumps({"pid": "not a number"}))
    lease = rows(sql, "SELECT * FROM pgslots.list_leases('h2')")[0]
    backend = one(sql, "SELECT pg_backend_pid() AS p")["p"]
    assert lease["pid"] == backend and lease["host"]


def test_renew_extends_a_live_lease(sql: Conn) -> None:
    create(sql, "n", 1)
    got = acquire(sql, ["n"], lease_seconds=60)
    advance_clock(sql, 50)
    new_expiry = one(sql, "SELECT pgslots.renew(%s, 120) AS e", [got["lease_id"]])["e"]
    assert (new_expiry - got["expires_at"]).total_seconds() > 100
    advance_clock(sql, 100)  # past the first expiry, inside the renewed one
    assert not acquire(sql, ["n"], lease_seconds=60)["granted"]


def test_renew_of_expired_released_or_unknown_lease_fails(sql: Conn) -> None:
    create(sql, "e", 1)
    got = acquire(sql, ["e"], lease_seconds=60)
    advance_clock(sql, 61)
    message = expect_error(sql, "PS010", "SELECT pgslots.renew(%s, 60)", [got["lease_id"]])
    assert "was lost" in message
    other = acquire(sql, ["e"], lease_seconds=60)  # reclaims the expired one
    assert other["granted"]
    one(sql, "SELECT pgslots.release(%s)", [other["lease_id"]])
    expect_error(sql, "PS010", "SELECT pgslots.renew(%s, 60)", [other["lease_id"]])
    expect_error(sql, "PS010", "SELECT pgslots.renew(gen_random_uuid(), 60)")
    expect_error(sql, "PS007", "SELECT pgslots.renew(%s, 10)", [other["lease_id"]])


def test_renew_of_partly_reclaimed_multi_limit_lease_fails(sql: Conn) -> None:
    create(sql, "m1", 1)
    create(sql, "m2", 1)
    got = acquire(sql, ["m1", "m2"], lease_seconds=60)
    advance_clock(sql, 61)
    assert acquire(sql, ["m1"], lease_seconds=60)["granted"]  # reclaims only m1's part
    expect_error(sql, "PS010", "SELECT pgslots.renew(%s, 60)", [got["lease_id"]])
    assert one(sql, "SELECT pgslots.release(%s) AS r", [got["lease_id"]])["r"] is True
    assert status(sql, "m2")["active_slots"] == 0 and status(sql, "m1")["active_slots"] == 1


def test_renew_leases_renews_the_live_ones_in_one_call_and_names_the_lost(sql: Conn) -> None:
    create(sql, "b1", 3)
    create(sql, "b2", 1)
    live = [acquire(sql, ["b1"], lease_seconds=60)["lease_id"] for _ in range(2)]
    multi = acquire(sql, ["b1", "b2"], lease_seconds=60)["lease_id"]
    advance_clock(sql, 50)
    assert not acquire(sql, ["b1"], lease_seconds=60)["granted"]  # full: all three are held
    ids, seconds = [*live, multi, uuid.uuid4()], [120.0, 70.0, 120.0, 60.0]
    lost = one(sql, "SELECT pgslots.renew_leases(%s, %s) AS lost", [ids, seconds])["lost"]
    assert lost == [ids[3]]  # the unknown one; the others live on, each for its own lease_seconds
    left = {
        r["id"]: r["left"]
        for r in rows(
            sql, "SELECT id, min(extract(epoch FROM expires_at - pgslots._now()))::float8 AS left FROM pgslots.leases GROUP BY id"
        )
    }
    assert left[live[0]] == pytest.approx(120, abs=1) and left[live[1]] == pytest.approx(70, abs=1)
    assert left[multi] == pytest.approx(120, abs=1)
    # A lease partly taken back is lost as a whole: its other part is not extended.
    advance_clock(sql, 121)
    assert acquire(sql, ["b2"], lease_seconds=60)["granted"]  # reclaims multi's part on b2 only
    before = rows(sql, "SELECT limit_id, expires_at FROM pgslots.leases WHERE id = %s", [multi])
    assert one(sql, "SELECT pgslots.renew_leases(%s, %s) AS lost", [[multi], [60.0]])["lost"] == [multi]
    assert rows(sql, "SELECT limit_id, expires_at FROM pgslots.leases WHERE id = %s", [multi]) == before
    assert one(sql, "SELECT pgslots.renew_leases('{}', '{}') AS lost")["lost"] == []


@pytest.mark.parametrize(
    ("query", "params", "sqlstate"),
    [
        ("SELECT pgslots.renew_leases(%s, %s)", [[uuid.uuid4()], [60.0, 60.0]], "PS011"),  # one duration per lease
        ("SELECT pgslots.renew_leases(NULL, %s)", [[60.0]], "PS011"),
        ("SELECT pgslots.renew_leases(%s, NULL)", [[uuid.uuid4()]], "PS011"),
        ("SELECT pgslots.renew_leases(array_fill(gen_random_uuid(), ARRAY[10001]), array_fill(60::float8, ARRAY[10001]))", None, "PS011"),
        ("SELECT pgslots.renew_leases(%s, %s)", [[uuid.uuid4()], [float("nan")]], "PS007"),
        ("SELECT pgslots.renew_leases(%s, %s)", [[uuid.uuid4()], [10.0]], "PS007"),
        ("SELECT pgslots.renew_leases(%s, %s, -1)", [[uuid.uuid4()], [60.0]], "PS012"),
    ],
)
def test_renew_leases_rejects_bad_input_and_changes_nothing(sql: Conn, query: str, params: Any, sqlstate: str) -> None:
    create(sql, "bad", 1)
    acquire(sql, ["bad"], lease_seconds=60)
    expect_error(sql, sqlstate, query, params)


def test_expired_lease_slots_come_back_on_next_acquire(sql: Conn) -> None:
    create(sql, "exp", 2)
    acquire(sql, ["exp"], 2, lease_seconds=60)
    assert not acquire(sql, ["exp"], lease_seconds=60)["granted"]
    advance_clock(sql, 60.5)
    got = acquire(sql, ["exp"], 2, lease_seconds=60)
    assert got["granted"]
    row = status(sql, "exp")
    assert row["active_slots"] == 2 and row["leases"] == 1


def test_unexpired_leases_are_not_reclaimed(sql: Conn) -> None:
    create(sql, "keep", 1)
    acquire(sql, ["keep"], lease_seconds=60)
    advance_clock(sql, 59)
    assert not acquire(sql, ["keep"], lease_seconds=60)["granted"]
    assert status(sql, "keep")["leases"] == 1


def test_sweep_reclaims_every_expired_lease(sql: Conn) -> None:
    create(sql, "s1", 3)
    create(sql, "s2", 3)
    acquire(sql, ["s1"], lease_seconds=60)
    acquire(sql, ["s1", "s2"], 2, lease_seconds=60)
    live = acquire(sql, ["s2"], lease_seconds=600)
    advance_clock(sql, 61)
    assert one(sql, "SELECT pgslots.sweep() AS n")["n"] == 2
    assert status(sql, "s1")["active_slots"] == 0
    assert status(sql, "s2")["active_slots"] == 1
    assert rows(sql, "SELECT lease_id FROM pgslots.list_leases()") == [{"lease_id": live["lease_id"]}]
    assert one(sql, "SELECT pgslots.sweep() AS n")["n"] == 0


def test_status_view_counts_expired_leases(sql: Conn) -> None:
    create(sql, "v", 2)
    acquire(sql, ["v"], lease_seconds=60)
    advance_clock(sql, 61)
    row = status(sql, "v")
    assert row["leases"] == 1 and row["expired_leases"] == 1
    listed = rows(sql, "SELECT expired FROM pgslots.list_leases('v')")
    assert listed == [{"expired": True}]


def test_get_limits_and_list_leases_filters(sql: Conn) -> None:
    create(sql, "g1", 1)
    create(sql, "g2", 1)
    acquire(sql, ["g1"], lease_seconds=60)
    assert [r["name"] for r in rows(sql, "SELECT * FROM pgslots.get_limits()")][-2:] == ["g1", "g2"]
    assert [r["name"] for r in rows(sql, "SELECT * FROM pgslots.get_limits('{g2}')")] == ["g2"]
    assert len(rows(sql, "SELECT * FROM pgslots.list_leases('g2')")) == 0
    assert len(rows(sql, "SELECT * FROM pgslots.list_leases('g1')")) == 1
