"""Rate limits for real APIs, in SQL: reservations settled with the actual cost, sliding windows,
shadow mode, and what two plain roles can do with them."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import invariants
import psycopg
import pytest

from sqlhelp import acquire, advance_clock, expect_error, login_role, one, rate_limit, rows, snapshot, status

Conn = psycopg.Connection[Any]


def make(conn: Conn, name: str, limit: int, decay: float = 0, window: float = 0, shadow: bool = False) -> Any:
    """A limit for tests of exact figures: no margin (see test_margins.py)."""
    return one(
        conn,
        "SELECT pgslots.create_limit(%s, %s, %s, window_seconds => %s, shadow => %s, margin_seconds => 0) AS id",
        [name, limit, decay, window, shadow],
    )["id"]


def reserve(conn: Conn, names: list[str], slots: int = 1, **kw: Any) -> dict[str, Any]:
    args = "".join(f", {k} => %({k})s" for k in kw)
    return one(conn, f"SELECT * FROM pgslots.reserve(%(names)s, %(slots)s{args})", {"names": names, "slots": slots, **kw})


def settle(conn: Conn, reservation_id: Any, actual: float) -> bool:
    return bool(one(conn, "SELECT pgslots.settle(%s, %s) AS changed", [reservation_id, actual])["changed"])


def held(conn: Conn, name: str) -> float:
    return float(status(conn, name)["active_slots"])


# The pgslots clock moves with real time between statements (milliseconds, more on a busy machine)
# besides the jumps of advance_clock: hence the small tolerances below.
MS = 0.15


# ---- reserve and settle ---------------------------------------------------------------------------


def test_settle_refunds_charges_a_debt_and_is_idempotent(sql: Conn) -> None:
    make(sql, "tokens", 10, decay=1.0)
    r = reserve(sql, ["tokens"], 8)
    assert r["granted"] and r["reservation_id"] is not None and r["retry_after"] is None
    assert held(sql, "tokens") == pytest.approx(8, abs=0.05)
    assert settle(sql, r["reservation_id"], 2) is True
    assert held(sql, "tokens") == pytest.approx(2, abs=0.05), "6 slots refunded"
    assert settle(sql, r["reservation_id"], 2) is False, "the same value again changes nothing"
    assert held(sql, "tokens") == pytest.approx(2, abs=0.05)
    assert settle(sql, r["reservation_id"], 15) is True
    assert held(sql, "tokens") == pytest.approx(15, abs=0.05), "a debt: 15 on a limit of 10"
    refused = rate_limit(sql, ["tokens"])
    assert not refused["granted"]
    assert refused["retry_after"] == pytest.approx(6, abs=0.05), "exact: (15 + 1 - 10) / 1 per second"
    invariants.check(sql, owing=("tokens",))


def test_waiting_on_a_debt_is_exact(sql: Conn) -> None:
    make(sql, "tokens", 10, decay=2.0)
    r = reserve(sql, ["tokens"], 5)
    settle(sql, r["reservation_id"], 14.5)
    wait = rate_limit(sql, ["tokens"], 3)["retry_after"]
    assert wait == pytest.approx((14.5 + 3 - 10) / 2.0, abs=MS)
    advance_clock(sql, wait - MS)
    assert not rate_limit(sql, ["tokens"], 3)["granted"], "not before the hint"
    advance_clock(sql, MS)
    assert rate_limit(sql, ["tokens"], 3)["granted"], "at the hint"


def test_a_refund_never_takes_a_bucket_below_empty(sql: Conn) -> None:
    make(sql, "tokens", 10, decay=1.0)
    r = reserve(sql, ["tokens"], 6)
    advance_clock(sql, 5)  # 1 left
    settle(sql, r["reservation_id"], 0)
    assert held(sql, "tokens") == 0
    assert settle(sql, r["reservation_id"], 3) is True
    assert held(sql, "tokens") == pytest.approx(3, abs=MS), "settling again applies the difference from the last value"


def test_a_reservation_on_several_limits_settles_each(sql: Conn) -> None:
    make(sql, "org", 100, decay=1.0)
    make(sql, "user", 20, window=60)
    r = reserve(sql, ["org", "user", "unknown"], 10)
    assert r["granted"] and r["missing"] == ["unknown"]
    settle(sql, r["reservation_id"], 4)
    assert held(sql, "org") == pytest.approx(4, abs=MS) and held(sql, "user") == 4
    invariants.check(sql)


def test_settle_refuses_unknown_expired_and_bad_values_and_changes_nothing(sql: Conn) -> None:
    make(sql, "tokens", 10, decay=1.0)
    r = reserve(sql, ["tokens"], 4)
    rid = r["reservation_id"]
    for bad in (-1.0, math.nan, math.inf, -math.inf, 1e10, None):
        message = expect_error(sql, "PS011", "SELECT pgslots.settle(%s, %s)", [rid, bad])
        assert "actual must be" in message
    message = expect_error(sql, "PS017", "SELECT pgslots.settle(gen_random_uuid(), 1)")
    assert "is unknown" in message
    expect_error(sql, "PS017", "SELECT pgslots.settle(NULL, 1)")
    sql.execute("UPDATE pgslots.settings SET reservation_seconds = 30")
    r2 = reserve(sql, ["tokens"], 1)
    advance_clock(sql, 30)
    message = expect_error(sql, "PS017", "SELECT pgslots.settle(%s, 0)", [r2["reservation_id"]])
    assert "expired" in message and "estimate (1 slots) stays its cost" in message
    assert held(sql, "tokens") == pytest.approx(0), "both decayed meanwhile; nothing was refunded"
    one(sql, "SELECT pgslots.sweep() AS n")
    left = rows(sql, "SELECT id FROM pgslots.reservations")
    assert left == [{"id": rid}], "sweep removed the expired one; the first (made for 3600 s) stays"


def test_reserve_takes_nothing_when_refused_and_gives_no_id(sql: Conn) -> None:
    make(sql, "tokens", 5, decay=1.0)
    assert reserve(sql, ["tokens"], 5)["granted"]
    r = reserve(sql, ["tokens"], 2)
    assert not r["granted"] and r["reservation_id"] is None and r["retry_after"] > 0
    assert one(sql, "SELECT count(*) AS n FROM pgslots.reservations")["n"] == 1


# ---- sliding windows ------------------------------------------------------------------------------


def test_a_window_grants_at_most_its_limit_in_any_span_with_exact_hints(sql: Conn) -> None:
    make(sql, "hourly", 3, window=10)
    grants: list[Any] = []
    for step in (0, 2, 4):
        advance_clock(sql, step - (grants[-1] if grants else 0))
        assert rate_limit(sql, ["hourly"])["granted"]
        grants.append(step)
    refused = rate_limit(sql, ["hourly"])
    assert refused["retry_after"] == pytest.approx(6, abs=MS), "the grant at 0 leaves at 10; it is 4 now"
    assert rate_limit(sql, ["hourly"], 2)["retry_after"] == pytest.approx(8, abs=MS), "two must leave: at 10 and 12"
    advance_clock(sql, refused["retry_after"] - MS)
    assert not rate_limit(sql, ["hourly"])["granted"], "a grant made less than 10 s ago is still in the window"
    advance_clock(sql, MS)
    assert rate_limit(sql, ["hourly"])["granted"], "10 s after it, it has left"
    assert held(sql, "hourly") == 3
    assert not rate_limit(sql, ["hourly"])["granted"]
    invariants.check(sql)


def test_a_burst_after_an_idle_period_never_exceeds_the_window(sql: Conn) -> None:
    # A token bucket of 3 refilling 3 per 10 s admits 3 + 3 around a refill; a window never does.
    make(sql, "bucket", 3, decay=0.3)
    make(sql, "window", 3, window=10)
    advance_clock(sql, 100)  # idle
    granted = {"bucket": 0, "window": 0}
    for _ in range(90):  # 9 s (and the real time the calls take) in steps of 0.1 s, asking each time
        for name in granted:
            granted[name] += bool(rate_limit(sql, [name])["granted"])
        advance_clock(sql, 0.0999)
    assert granted["window"] == 3
    assert granted["bucket"] >= 5, "the bucket admitted its burst and then its refill"


def test_window_log_stays_bounded_and_sweep_empties_it(sql: Conn) -> None:
    make(sql, "big", 1000, window=1)
    granted = []
    start = one(sql, "SELECT pgslots._now() AS t")["t"]
    for step in range(30):  # 150 asks at start, 150 more at start + 0.1 s, ...
        # Each batch begins 0.1 s of the pgslots clock after the one before, however long the
        # batches take in real time (on a busy machine, 150 calls can take longer than 0.1 s).
        sql.execute(
            "UPDATE pgslots.settings SET clock_offset = %s::timestamptz - clock_timestamp()",
            [start + timedelta(seconds=0.1 * step)],
        )
        granted.append(
            one(
                sql,
                "SELECT count(*) FILTER (WHERE r.granted) AS n FROM generate_series(1, 150) AS i, "
                "LATERAL pgslots.rate_limit(ARRAY['big'], 1 + 0 * i) r",  # one call per row
            )["n"]
        )
        assert one(sql, "SELECT count(*) AS n FROM pgslots.window_grants")["n"] <= 1000
    assert granted[:6] == [150] * 6 and min(granted) < 150, granted
    assert sum(granted) > 2000, "windows turned over"
    assert held(sql, "big") <= 1000
    invariants.check(sql)
    # A window after the newest grant (a slow batch's grants can be newer than the next batch's
    # start, the clock being set back to each batch's start).
    sql.execute(
        "UPDATE pgslots.settings SET clock_offset ="
        " (SELECT max(g.granted_at) FROM pgslots.window_grants g) + interval '1 second' - clock_timestamp()"
    )
    one(sql, "SELECT pgslots.sweep() AS n")
    assert one(sql, "SELECT count(*) AS n FROM pgslots.window_grants")["n"] == 0
    assert one(sql, "SELECT unleased_slots AS n FROM pgslots.limits WHERE name = 'big'")["n"] == 0


def test_a_reservation_on_a_window_is_settled_at_its_grant_time(sql: Conn) -> None:
    make(sql, "minute", 10, window=60)
    r = reserve(sql, ["minute"], 8)
    settle(sql, r["reservation_id"], 3)
    assert rate_limit(sql, ["minute"], 7)["granted"], "refunded: 3 + 7 fit"
    advance_clock(sql, 30)
    settle(sql, r["reservation_id"], 12)  # a debt, counted at the reservation's grant (t = 0)
    refused = rate_limit(sql, ["minute"])
    assert refused["retry_after"] == pytest.approx(30, abs=MS), "the reservation's grant leaves the window at 60"
    advance_clock(sql, 30)
    assert rate_limit(sql, ["minute"], 3)["granted"], "the debt left with its grant; the 7 left too"
    invariants.check(sql, owing=("minute",))


def test_one_kind_per_limit_and_concurrency_on_a_window_is_refused(sql: Conn) -> None:
    message = expect_error(sql, "PS002", "SELECT pgslots.create_limit('both', 5, 1.0, window_seconds => 10)")
    assert "not both" in message
    for bad in (-1.0, math.nan, math.inf, 1e9):
        expect_error(sql, "PS002", "SELECT pgslots.create_limit('w', 5, window_seconds => %s)", [bad])
    make(sql, "win", 2, window=10)
    make(sql, "plain", 2)
    message = expect_error(sql, "PS018", "SELECT * FROM pgslots.acquire(ARRAY['win'])")
    assert "window limit" in message
    expect_error(sql, "PS018", "SELECT * FROM pgslots.acquire(ARRAY['plain', 'win'], queue_client => gen_random_uuid())")
    expect_error(sql, "PS009", "SELECT * FROM pgslots.rate_limit(ARRAY['plain'])")
    expect_error(sql, "PS002", "SELECT pgslots.update_limit('win', slot_decay_per_second => 1)")


def test_switching_kinds_carries_what_a_limit_holds(sql: Conn) -> None:
    make(sql, "api", 10, decay=1.0)
    assert rate_limit(sql, ["api"], 6)["granted"]
    one(sql, "SELECT pgslots.update_limit('api', slot_decay_per_second => 0, window_seconds => 5) AS id")
    assert held(sql, "api") == pytest.approx(6, abs=MS), "the bucket's slots became one grant made now"
    assert rate_limit(sql, ["api"], 5)["retry_after"] == pytest.approx(5, abs=MS)
    advance_clock(sql, 2)
    one(sql, "SELECT pgslots.update_limit('api', slot_decay_per_second => 2, window_seconds => 0) AS id")
    assert held(sql, "api") == pytest.approx(6, abs=MS), "the window's slots now decay"
    assert one(sql, "SELECT count(*) AS n FROM pgslots.window_grants")["n"] == 0
    advance_clock(sql, 1)
    assert held(sql, "api") == pytest.approx(4, abs=MS)
    one(sql, "SELECT pgslots.update_limit('api', slot_decay_per_second => 0, window_seconds => 5, active_slots => 2) AS id")
    assert held(sql, "api") == 2
    invariants.check(sql)


def test_templates_pass_window_and_shadow_to_their_keys(sql: Conn) -> None:
    make(sql, "user:*", 2, window=60)
    assert [rate_limit(sql, ["user:a"])["granted"] for _ in range(3)] == [True, True, False]
    key = status(sql, "user:a")
    assert (key["window_seconds"], key["template"]) == (60, "user:*")
    expect_error(sql, "PS018", "SELECT * FROM pgslots.acquire(ARRAY['user:b'])")
    one(sql, "SELECT pgslots.update_limit('user:*', shadow => true) AS id")
    assert status(sql, "user:a")["shadow"] is True
    assert rate_limit(sql, ["user:a"])["granted"], "in shadow mode the key grants"
    assert status(sql, "user:a")["shadow_refusals"] == 1
    expect_error(sql, "PS016", "SELECT pgslots.update_limit('user:a', shadow => false)")
    invariants.check(sql)


# ---- shadow mode ----------------------------------------------------------------------------------


def test_shadow_grants_everything_and_counts_what_it_would_refuse(sql: Conn) -> None:
    make(sql, "new-limit", 2, shadow=True)
    leases = [acquire(sql, ["new-limit"], queue_client=None) for _ in range(5)]
    assert all(x["granted"] for x in leases)
    row = status(sql, "new-limit")
    assert (row["active_slots"], row["shadow_refusals"], row["shadow"]) == (5, 3, True)
    # Counted as if enforced: releases free slots as usual, and then fewer would be refused.
    for x in leases[:3]:
        one(sql, "SELECT pgslots.release(%s) AS r", [x["lease_id"]])
    assert acquire(sql, ["new-limit"])["granted"]
    assert status(sql, "new-limit")["shadow_refusals"] == 4, "3 held + 1 = 4 > 2: one more would-be refusal"
    one(sql, "SELECT pgslots.update_limit('new-limit', \"limit\" => 10) AS id")
    assert acquire(sql, ["new-limit"])["granted"]
    assert status(sql, "new-limit")["shadow_refusals"] == 4
    # Enforced, it refuses what it holds beyond its limit.
    one(sql, "SELECT pgslots.update_limit('new-limit', \"limit\" => 2, shadow => false) AS id")
    assert not acquire(sql, ["new-limit"])["granted"]
    invariants.check(sql, lowered=("new-limit",))


def test_a_shadow_limit_beside_an_enforced_one(sql: Conn) -> None:
    make(sql, "enforced", 1)
    make(sql, "shadow", 1, decay=1.0, shadow=True)
    make(sql, "shadow-window", 1, window=60, shadow=True)
    assert acquire(sql, ["enforced", "shadow"])["granted"]
    refused = acquire(sql, ["enforced", "shadow"])
    assert not refused["granted"] and refused["blocked_by"] == ["enforced"], "a shadow limit never blocks"
    assert status(sql, "shadow")["shadow_refusals"] == 0, "only grants it would have refused count"
    assert all(rate_limit(sql, ["shadow", "shadow-window"])["granted"] for _ in range(3))
    assert status(sql, "shadow")["shadow_refusals"] == 3 and status(sql, "shadow-window")["shadow_refusals"] == 2
    assert held(sql, "shadow-window") == 3
    invariants.check(sql)


# ---- two plain roles ------------------------------------------------------------------------------


def refused(conn: Conn, sqlstate: str, query: str, params: Any = None) -> str:
    """A call by a plain role (which cannot read the tables to compare before and after) that must
    fail with a SQLSTATE starting with `sqlstate`; the caller compares the admin's snapshot."""
    try:
        with conn.transaction():
            conn.execute(query, params)
    except psycopg.Error as exc:
        assert exc.sqlstate and exc.sqlstate.startswith(sqlstate), f"expected {sqlstate}, got {exc.sqlstate}: {exc}"
        return exc.diag.message_primary or ""
    raise AssertionError(f"no error from {query} {params}")


@pytest.fixture
def two_roles(sql_db: str) -> Iterator[tuple[Conn, Conn, Conn]]:
    victim_dsns, attacker_dsns = login_role(sql_db, "pgslots_user"), login_role(sql_db, "pgslots_user")
    with (
        psycopg.connect(sql_db, autocommit=True) as admin,
        psycopg.connect(next(victim_dsns), autocommit=True) as victim,
        psycopg.connect(next(attacker_dsns), autocommit=True) as attacker,
    ):
        for name in ("v-tokens", "v-window"):
            admin.execute("DELETE FROM pgslots.limits WHERE name = %s", [name])
        make(admin, "v-tokens", 100, decay=0.001)
        make(admin, "v-window", 100, window=3600)
        try:
            yield admin, victim, attacker
        finally:
            admin.execute("DELETE FROM pgslots.limits WHERE name IN ('v-tokens', 'v-window')")
            admin.execute("DELETE FROM pgslots.reservations")
            for gen in (victim_dsns, attacker_dsns):
                gen.close()


def test_a_plain_role_cannot_settle_anothers_reservation_or_change_limits(two_roles: tuple[Conn, Conn, Conn]) -> None:
    admin, victim, attacker = two_roles
    mine = reserve(victim, ["v-tokens", "v-window"], 40)["reservation_id"]
    before = snapshot(admin)
    # The victim's reservation id, learned somehow, is unknown to the attacker: no refund, no debt.
    for actual in (0.0, 1e9):
        message = refused(attacker, "PS017", "SELECT pgslots.settle(%s, %s)", [mine, actual])
        assert "never made by this role" in message
    for query in (
        "SELECT pgslots.create_limit('x', 1, window_seconds => 1)",
        "SELECT pgslots.update_limit('v-tokens', shadow => true)",
        "SELECT pgslots.update_limit('v-window', window_seconds => 0)",
        "SELECT * FROM pgslots.window_grants",
        "SELECT * FROM pgslots.reservations",
        "UPDATE pgslots.reservations SET owner = current_user",
    ):
        refused(attacker, "42501", query)
    for bad in (math.nan, -1.0, math.inf, None):
        refused(attacker, "PS011", "SELECT pgslots.settle(%s, %s)", [mine, bad])
    for query, params in (
        ("SELECT * FROM pgslots.reserve(ARRAY['v-tokens'], 0)", None),
        ("SELECT * FROM pgslots.reserve(ARRAY['v-tokens'], 101)", None),
        ("SELECT * FROM pgslots.reserve(ARRAY['v-window'], -5)", None),
        ("SELECT * FROM pgslots.reserve(NULL)", None),
        ("SELECT * FROM pgslots.reserve(ARRAY['v-tokens'], priority => 1000)", None),
        ("SELECT * FROM pgslots.reserve(ARRAY['v-tokens'], wait_seconds => 'NaN')", None),
    ):
        refused(attacker, "PS", query, params)
    assert snapshot(admin) == before, "nothing the attacker tried changed anything"
    # The attacker's own reservations work, and settle only its own cost.
    theirs = reserve(attacker, ["v-tokens", "v-window"], 10)["reservation_id"]
    assert settle(attacker, theirs, 1)
    assert settle(victim, mine, 20)
    assert held(admin, "v-window") == pytest.approx(21)
    assert held(admin, "v-tokens") == pytest.approx(21, abs=0.1)
    invariants.check(admin)
