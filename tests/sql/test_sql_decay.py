"""SQL API: rate limits with exact, continuous decay."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from sqlhelp import acquire, advance_clock, create, expect_error, one, rate_limit, status

Conn = psycopg.Connection[Any]


def test_burst_then_refusal_with_exact_wait(sql: Conn) -> None:
    create(sql, "rl", 3, decay=2.0)
    assert all(rate_limit(sql, ["rl"])["granted"] for _ in range(3))
    refused = rate_limit(sql, ["rl"])
    assert not refused["granted"] and refused["blocked_by"] == ["rl"]
    # One slot has to decay at 2/s: half a second, less the few ms that passed already.
    assert 0.4 < refused["retry_after"] <= 0.5
    advance_clock(sql, refused["retry_after"])
    assert rate_limit(sql, ["rl"])["granted"]


def test_rate_limit_needs_decay(sql: Conn) -> None:
    create(sql, "nodecay", 3)
    create(sql, "decays", 3, decay=1)
    message = expect_error(sql, "PS009", "SELECT * FROM pgslots.rate_limit('{decays,nodecay}')")
    assert message == (
        "Only concurrency limits with slot decay can be used for rate limiting. "
        "The following limits do not have a decay configured: 'nodecay'"
    )


def test_decay_is_exact_while_refusals_hammer_the_limit(sql: Conn) -> None:
    """The reference floors decay and restarts its clock on every update; we must not."""
    create(sql, "exact", 5, decay=2.0)
    for _ in range(5):
        assert rate_limit(sql, ["exact"])["granted"]
    start = one(sql, "SELECT pgslots._now() AS t")["t"]
    decayed_at = one(sql, "SELECT decayed_at FROM pgslots.limits WHERE name = 'exact'")["decayed_at"]
    grants = refusals = 0
    for _ in range(400):  # 10 simulated seconds, a call every 25 ms
        advance_clock(sql, 0.025)
        if rate_limit(sql, ["exact"])["granted"]:
            grants += 1
        else:
            refusals += 1
    elapsed = (one(sql, "SELECT pgslots._now() AS t")["t"] - start).total_seconds()
    expected = 2.0 * elapsed
    assert refusals > 300
    assert abs(grants - expected) <= 1, (grants, expected)
    # Refusals wrote pressure but never moved the decay clock.
    assert status(sql, "exact")["denied_slots"] == refusals
    one(sql, "SELECT * FROM pgslots.get_limits('{exact}')")
    assert decayed_at <= one(sql, "SELECT decayed_at FROM pgslots.limits WHERE name = 'exact'")["decayed_at"]


def test_fractional_decay_is_not_floored(sql: Conn) -> None:
    create(sql, "slow", 1, decay=0.1)
    assert rate_limit(sql, ["slow"])["granted"]
    for _ in range(9):  # 9 x 1.05 s = 9.45 s: 0.945 slots decayed, not yet one
        advance_clock(sql, 1.05)
        assert not rate_limit(sql, ["slow"])["granted"]
    advance_clock(sql, 0.6)
    assert rate_limit(sql, ["slow"])["granted"]


def test_edits_keep_decay_exact(sql: Conn) -> None:
    create(sql, "edit", 4, decay=1.0)
    started = time.monotonic()
    for _ in range(4):
        rate_limit(sql, ["edit"])
    advance_clock(sql, 1.5)
    one(sql, "SELECT pgslots.update_limit('edit', slot_decay_per_second => 2.0)")
    advance_clock(sql, 0.5)  # 1.5 at 1/s + 0.5 at 2/s = 2.5 slots decayed
    active = status(sql, "edit")["active_slots"]
    real = time.monotonic() - started  # real time passes on the database clock too, at most at 2/s
    assert 1.5 - 2.0 * real - 1e-9 <= active <= 1.5 + 1e-9, (active, real)


def test_status_reports_after_decay(sql: Conn) -> None:
    create(sql, "read", 10, decay=4.0)
    started = time.monotonic()
    for _ in range(8):
        rate_limit(sql, ["read"])
    advance_clock(sql, 1.0)
    active = status(sql, "read")["active_slots"]
    real = time.monotonic() - started  # real time passes on the database clock too
    assert 4.0 - 4.0 * real - 1e-9 <= active <= 4.0 + 1e-9, (active, real)


def test_concurrency_on_decaying_limit_release_and_decay_both_apply(sql: Conn) -> None:
    create(sql, "both", 3, decay=1.0)
    lease = acquire(sql, ["both"], 2, lease_seconds=60)["lease_id"]
    assert rate_limit(sql, ["both"])["granted"]
    assert not rate_limit(sql, ["both"])["granted"]
    advance_clock(sql, 5)  # the rate-limited slot decays; the leased ones stay until released
    row = status(sql, "both")
    assert row["active_slots"] == 2 and row["leased_slots"] == 2
    one(sql, "SELECT pgslots.release(%s)", [lease])
    assert status(sql, "both")["active_slots"] == 0
    one(sql, "SELECT pgslots.release(%s)", [lease])
    assert status(sql, "both")["active_slots"] == 0


def test_refused_hint_when_leases_block_a_decaying_limit(sql: Conn) -> None:
    create(sql, "mixed", 2, decay=1.0)
    acquire(sql, ["mixed"], 2, lease_seconds=60)
    refused = rate_limit(sql, ["mixed"])
    assert not refused["granted"] and 0.1 <= refused["retry_after"] <= 30
