"""Margins a strict downstream accepts (margin_seconds): a window counts each grant for its window
plus the margin, a bucket decides as if its slots began to decay the margin later. Exact figures on
the database's clock (moved by advance_clock); the downstream itself is in
tests/processes/test_downstream.py."""

from __future__ import annotations

import json
import math
from typing import Any

import invariants
import psycopg
import pytest

from clihelp import run
from pgslots.client import Client
from sqlhelp import Roles, acquire, advance_clock, create, expect_error, one, rate_limit, status

Conn = psycopg.Connection[Any]
MS = 0.1  # more than the real time a few statements take between the clock reads of a test


def window(conn: Conn, name: str, limit: int, seconds: float, margin: float) -> Any:
    return one(
        conn,
        "SELECT pgslots.create_limit(%s, %s, window_seconds => %s, margin_seconds => %s) AS id",
        [name, limit, seconds, margin],
    )["id"]


def test_a_new_limit_gets_the_default_margin_and_zero_is_kept(sql: Conn) -> None:
    one(sql, "SELECT pgslots.create_limit('plain', 3) AS id")
    one(sql, "SELECT pgslots.create_limit('exact', 3, 1.0, margin_seconds => 0) AS id")
    assert status(sql, "plain")["margin_seconds"] == 0.05
    assert status(sql, "exact")["margin_seconds"] == 0
    one(sql, "SELECT pgslots.update_limit('exact', margin_seconds => 0.25) AS id")
    assert status(sql, "exact")["margin_seconds"] == 0.25
    one(sql, "SELECT pgslots.update_limit('exact', \"limit\" => 4) AS id")  # NULL leaves it as it is
    assert status(sql, "exact")["margin_seconds"] == 0.25


def test_a_window_counts_each_grant_for_its_window_plus_the_margin(sql: Conn) -> None:
    window(sql, "minute", 5, 10.0, 2.5)
    assert all(rate_limit(sql, ["minute"])["granted"] for _ in range(5))
    refused = rate_limit(sql, ["minute"])
    assert not refused["granted"] and 12.5 - MS < refused["retry_after"] <= 12.5
    advance_clock(sql, 10.0)  # the window has passed, the margin has not
    refused = rate_limit(sql, ["minute"])
    assert not refused["granted"] and refused["retry_after"] == pytest.approx(2.5, abs=MS)
    assert status(sql, "minute")["active_slots"] == 5, "what the window counts, margin included"
    advance_clock(sql, 2.5)
    assert all(rate_limit(sql, ["minute"])["granted"] for _ in range(5))
    assert not rate_limit(sql, ["minute"])["granted"]
    invariants.check(sql)


def test_a_window_without_a_margin_stays_exact(sql: Conn) -> None:
    window(sql, "minute", 5, 10.0, 0)
    assert all(rate_limit(sql, ["minute"])["granted"] for _ in range(5))
    advance_clock(sql, 10.0)
    assert all(rate_limit(sql, ["minute"])["granted"] for _ in range(5))


def test_a_bucket_bursts_less_by_rate_times_margin_and_keeps_its_rate(sql: Conn) -> None:
    create(sql, "bucket", 10, decay=1.0, margin=2.0)  # rate x margin = 2 slots
    granted = sum(bool(rate_limit(sql, ["bucket"])["granted"]) for _ in range(12))
    assert granted == 8
    refused = rate_limit(sql, ["bucket"])
    assert not refused["granted"] and 1 - MS < refused["retry_after"] <= 1, "1 slot at 1/s, exact"
    # Steady state: one grant per 1/rate, the same rate as without a margin.
    for _ in range(20):
        advance_clock(sql, 1.0)
        assert rate_limit(sql, ["bucket"])["granted"]
        assert not rate_limit(sql, ["bucket"])["granted"]
    # The real bucket is what status shows: 8 + 20 grants less 20 s at 1/s, about 8.
    assert status(sql, "bucket")["active_slots"] == pytest.approx(8, abs=0.5)


def test_a_bucket_smaller_than_its_margin_spaces_grants_by_the_margin(sql: Conn) -> None:
    """One slot at 1/s, margin 0.5 s: each grant waits for the last to decay, and the margin too,
    so a request that reaches a downstream up to 0.5 s late still finds its bucket empty."""
    create(sql, "single", 1, decay=1.0, margin=0.5)
    create(sql, "single_exact", 1, decay=1.0)
    for name in ("single", "single_exact"):
        assert rate_limit(sql, [name])["granted"]
    advance_clock(sql, 1.0)
    refused = rate_limit(sql, ["single"])
    assert not refused["granted"] and refused["retry_after"] == pytest.approx(0.5, abs=MS)
    assert rate_limit(sql, ["single_exact"])["granted"]
    advance_clock(sql, 0.5)
    assert rate_limit(sql, ["single"])["granted"]


def test_an_idle_bucket_and_a_concurrency_limit_are_not_held_back(sql: Conn) -> None:
    create(sql, "idle", 4, decay=1.0, margin=60)
    create(sql, "pool", 2, margin=60)  # no decay, no window: the margin has nothing to hold back
    assert rate_limit(sql, ["idle"])["granted"], "an empty bucket decides exactly"
    a, b = acquire(sql, ["pool"]), acquire(sql, ["pool"])
    assert a["granted"] and b["granted"] and not acquire(sql, ["pool"])["granted"]
    one(sql, "SELECT pgslots.release(%s) AS r", [a["lease_id"]])
    assert acquire(sql, ["pool"])["granted"]


def test_a_queued_rate_waiter_is_served_with_the_margin_too(sql: Conn) -> None:
    create(sql, "rq", 1, decay=1.0, margin=0.5)
    assert rate_limit(sql, ["rq"])["granted"]
    client = "11111111-1111-1111-1111-111111111111"
    first = rate_limit(sql, ["rq"], queue_client=client)
    assert not first["granted"] and first["waiter"] is not None
    advance_clock(sql, 1.0)
    again = rate_limit(sql, ["rq"], queue_client=client, ticket=first["waiter"])
    assert not again["granted"] and again["retry_after"] == pytest.approx(0.5, abs=MS)
    advance_clock(sql, 0.5)
    assert rate_limit(sql, ["rq"], queue_client=client, ticket=first["waiter"])["granted"]


def test_keys_take_their_templates_margin(sql: Conn) -> None:
    one(sql, "SELECT pgslots.create_limit('calls:*', 2, 1.0, margin_seconds => 0.3) AS id")
    assert rate_limit(sql, ["calls:u1"])["granted"]
    assert status(sql, "calls:u1")["margin_seconds"] == 0.3
    one(sql, "SELECT pgslots.update_limit('calls:*', margin_seconds => 0) AS id")
    assert status(sql, "calls:u1")["margin_seconds"] == 0, "a template's keys follow it at once"
    message = expect_error(sql, "PS016", "SELECT pgslots.update_limit('calls:u1', margin_seconds => 1)")
    assert "follows the template" in message


@pytest.mark.parametrize("bad", [-0.01, 60.5, math.nan, math.inf, -math.inf, 1e300])
def test_bad_margins_are_refused_and_change_nothing(sql: Conn, bad: float) -> None:
    create(sql, "kept", 2, decay=1.0)
    for query in (
        "SELECT pgslots.create_limit('new', 2, 1.0, margin_seconds => %s)",
        "SELECT pgslots.update_limit('kept', margin_seconds => %s)",
    ):
        message = expect_error(sql, "PS002", query, [bad])
        assert "margin_seconds must be a number of seconds from 0 to 60" in message


def test_plain_roles_read_the_margin_but_cannot_change_it(roles: Roles) -> None:
    with psycopg.connect(roles.owner, autocommit=True) as owner:
        create(owner, "shared", 5, decay=1.0, margin=0.1)
    for dsn in (roles.victim, roles.attacker):
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert status(conn, "shared")["margin_seconds"] == 0.1
            for query in (
                "SELECT pgslots.update_limit('shared', margin_seconds => 0)",
                "UPDATE pgslots.limits SET margin_seconds = 0",
            ):
                with pytest.raises(psycopg.Error) as refused:
                    conn.execute(query)
                assert refused.value.sqlstate == "42501"
    with psycopg.connect(roles.owner, autocommit=True) as owner:
        assert status(owner, "shared")["margin_seconds"] == 0.1


def test_the_library_apply_and_the_command_line_know_the_margin(fresh_dsn: str, tmp_path: Any) -> None:
    client = Client(fresh_dsn)
    try:
        assert client.create_limit("api", 5, slot_decay_per_second=5).margin_seconds == 0.05
        assert client.update_limit("api", margin_seconds=0).margin_seconds == 0
        with pytest.raises(Exception, match="margin_seconds must be from 0 to 60"):
            client.update_limit("api", margin_seconds=61)
        wanted: dict[str, dict[str, Any]] = {
            "api": {"limit": 5, "slot_decay_per_second": 5},
            "w": {"limit": 9, "window_seconds": 1, "margin_seconds": 0.2},
        }
        plan = client.apply(wanted)
        assert [(want.name, changes) for want, changes in plan.change] == [("api", {"margin_seconds": (0.0, 0.05)})]
        assert client.read_limit("w").margin_seconds == 0.2
    finally:
        client.close()
    made = run(fresh_dsn, "create", "tokens", "-l", "100", "--window-seconds", "60", "--margin-seconds", "0.5")
    assert made.exit_code == 0, made.output
    shown = run(fresh_dsn, "inspect", "tokens")
    assert "margin" in shown.output and "0.5 s" in shown.output
    assert json.loads(run(fresh_dsn, "inspect", "tokens", "-o", "json").output)["margin_seconds"] == 0.5
    assert run(fresh_dsn, "update", "tokens", "--margin-seconds", "0").exit_code == 0
    assert "0 (exact on the database's clock)" in run(fresh_dsn, "inspect", "tokens").output
    bad = run(fresh_dsn, "update", "tokens", "--margin-seconds", "61")
    assert bad.exit_code == 1 and "'--margin-seconds': 61.0 is not in the range" in bad.output and "Traceback" not in bad.output
    limits = tmp_path / "limits.toml"
    limits.write_text('[tokens]\nlimit = 100\nwindow_seconds = 60\nmargin_seconds = "soon"\n')
    refused = run(fresh_dsn, "apply", str(limits))
    assert refused.exit_code == 1 and "margin_seconds must be a number" in refused.output
