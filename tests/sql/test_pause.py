"""Pausing a limit until a time (an upstream's 429 with Retry-After): SQL, bounds, two plain roles,
the library and the command line."""

from __future__ import annotations

import math
import threading
import time
import uuid
from typing import Any

import invariants
import psycopg
import pytest

import pgslots
from clihelp import run
from pgslots import metrics
from pgslots.client import Client
from pgslots.sync import concurrency, rate_limit
from sqlhelp import Roles, acquire, advance_clock, create, expect_error, one, rows, status
from sqlhelp import rate_limit as sql_rate_limit

Conn = psycopg.Connection[Any]
MS = 0.05


def pause(conn: Conn, name: str, seconds: float, reason: str | None = None) -> Any:
    return one(conn, "SELECT pgslots.pause(%s, %s, %s) AS until", [name, seconds, reason])["until"]


def test_a_paused_limit_grants_nothing_and_says_how_long(sql: Conn) -> None:
    create(sql, "api", 5)
    create(sql, "bucket", 5, decay=1.0)
    held = acquire(sql, ["api"], lease_seconds=60)
    until = pause(sql, "api", 30, "429 from the API")
    refused = acquire(sql, ["api"], lease_seconds=60)
    assert not refused["granted"] and refused["blocked_by"] == ["api"]
    assert refused["retry_after"] == pytest.approx(30, abs=MS)
    row = status(sql, "api")
    assert (row["paused_until"], row["pause_reason"]) == (until, "429 from the API")
    # A later, shorter pause changes nothing but the reason; a longer one extends.
    assert pause(sql, "api", 10, "again") == until
    longer = pause(sql, "api", 60)
    assert (longer - until).total_seconds() == pytest.approx(30, abs=MS) and status(sql, "api")["pause_reason"] == "again"
    # Several limits: the pause refuses the whole request; releases still work.
    assert not acquire(sql, ["api", "bucket"], lease_seconds=60)["granted"]
    assert one(sql, "SELECT pgslots.release(%s) AS r", [held["lease_id"]])["r"] is True
    pause(sql, "bucket", 5)
    assert not sql_rate_limit(sql, ["bucket"])["granted"]
    advance_clock(sql, 60.5)
    assert status(sql, "api")["paused_until"] is None and status(sql, "api")["pause_reason"] is None
    assert acquire(sql, ["api", "bucket"], lease_seconds=60)["granted"] and sql_rate_limit(sql, ["bucket"])["granted"]
    invariants.check(sql)


def test_queued_waiters_keep_their_places_and_are_told_when_it_opens(sql: Conn) -> None:
    create(sql, "one", 1)
    held = acquire(sql, ["one"], lease_seconds=60)
    client = uuid.uuid4()
    first = acquire(sql, ["one"], lease_seconds=60, queue_client=client, new_lease_id=uuid.uuid4())
    second = acquire(sql, ["one"], lease_seconds=60, queue_client=client)
    pause(sql, "one", 10)
    assert one(sql, "SELECT pgslots.release(%s) AS r", [held["lease_id"]])["r"] is True
    assert rows(sql, "SELECT id FROM pgslots.leases") == [], "nothing is handed over while paused"
    sql.execute("UPDATE pgslots.waiters SET expires_at = expires_at + interval '1 hour'")
    tickets = [first["waiter"], second["waiter"]]
    assert one(sql, "SELECT pgslots.heartbeat(%s, %s) AS t", [client, tickets])["t"] == []
    advance_clock(sql, 10.5)
    # Open: the heartbeat tells the head of the queue to ask again, and it gets the slot.
    assert one(sql, "SELECT pgslots.heartbeat(%s, %s) AS t", [client, tickets])["t"] == [first["waiter"]]
    assert acquire(sql, ["one"], lease_seconds=60, queue_client=client, ticket=first["waiter"])["granted"]
    assert not acquire(sql, ["one"], lease_seconds=60, queue_client=client, ticket=second["waiter"])["granted"]


@pytest.mark.parametrize(
    ("args", "sqlstate"),
    [
        (["api", 301.0, None], "PS011"),  # beyond max_pause_seconds
        (["api", 1e300, None], "PS011"),
        (["api", -5.0, None], "PS011"),
        (["api", 0.0, None], "PS011"),
        (["api", math.nan, None], "PS011"),
        (["api", math.inf, None], "PS011"),
        (["api", None, None], "PS011"),
        (["api", 5.0, "x" * 201], "PS011"),
        (["api", 5.0, "bell\x07"], "PS011"),
        (["ghost", 5.0, None], "PS004"),
        (["tenant:*", 5.0, None], "PS016"),
        (["", 5.0, None], "PS001"),
    ],
)
def test_bad_pauses_are_refused_and_change_nothing(sql: Conn, args: list[Any], sqlstate: str) -> None:
    create(sql, "api", 5)
    create(sql, "tenant:*", 2)
    expect_error(sql, sqlstate, "SELECT pgslots.pause(%s, %s, %s)", args)


def test_a_key_of_a_template_is_paused_alone_and_is_not_idle_while_paused(sql: Conn) -> None:
    create(sql, "tenant:*", 2)
    pause(sql, "tenant:acme", 20, "acme's upstream said 429")
    assert status(sql, "tenant:acme")["template"] == "tenant:*"
    assert not acquire(sql, ["tenant:acme"], lease_seconds=60)["granted"]
    assert acquire(sql, ["tenant:bolt"], lease_seconds=60)["granted"]
    one(sql, "SELECT pgslots.sweep() AS n")
    assert status(sql, "tenant:acme")["paused_until"] is not None, "a paused key is not idle"
    advance_clock(sql, 21)
    assert acquire(sql, ["tenant:acme"], lease_seconds=60)["granted"]


def test_two_plain_roles_may_pause_within_the_bound_and_only_an_admin_resumes(roles: Roles) -> None:
    with psycopg.connect(roles.owner, autocommit=True) as owner:
        create(owner, "shared", 2)
        create(owner, "tenant:*", 1)
    with psycopg.connect(roles.victim, autocommit=True) as victim, psycopg.connect(roles.attacker, autocommit=True) as attacker:
        assert acquire(victim, ["tenant:victim"], lease_seconds=60)["granted"]
        # Any role may pause any limit it may use, never beyond max_pause_seconds, however often.
        for _ in range(3):
            until = pause(attacker, "tenant:victim", 300)
        with psycopg.connect(roles.owner, autocommit=True) as owner:
            left = one(owner, "SELECT extract(epoch FROM %s::timestamptz - pgslots._now())::float8 AS s", [until])["s"]
        assert left <= 300 + 1
        with pytest.raises(psycopg.Error) as too_long:
            pause(attacker, "shared", 3600)
        assert too_long.value.sqlstate == "PS011"
        for conn in (attacker, victim):
            with pytest.raises(psycopg.Error) as denied:
                one(conn, "SELECT pgslots.resume('tenant:victim') AS r")
            assert denied.value.sqlstate == "42501"
            with pytest.raises(psycopg.Error) as direct:
                conn.execute("UPDATE pgslots.limits SET paused_until = NULL")
            assert direct.value.sqlstate == "42501"
        assert status(victim, "tenant:victim")["paused_until"] == until  # both roles read it
        # What is reclaimable reads only: any id, or none, from any role.
        for arg in (None, uuid.uuid4(), status(victim, "tenant:victim")["id"]):
            assert one(attacker, "SELECT pgslots.reclaimable_slots(%s) AS n", [arg])["n"] == 0
    with psycopg.connect(roles.owner, autocommit=True) as owner:
        assert one(owner, "SELECT pgslots.resume('tenant:victim') AS r")["r"] is True
        assert one(owner, "SELECT pgslots.resume('tenant:victim') AS r")["r"] is False
        invariants.check(owner)


def test_the_library_waits_out_a_pause_and_the_cli_shows_it(client: Client, fresh_dsn: str) -> None:
    client.create_limit("upstream", 2)
    client.create_limit("paced", 5, slot_decay_per_second=1)
    until = client.pause("upstream", 1.5, reason="429 from upstream")
    assert client.read_limit("upstream").paused_until == until
    listed = run(fresh_dsn, "ls").output
    assert "paused" in listed and "429 from upstream" in listed
    assert "paused" in run(fresh_dsn, "watch", "--once").output
    assert "paused" in run(fresh_dsn, "inspect", "upstream").output
    assert 'pgslots_paused_seconds{limit="upstream"}' in metrics.read(client)
    started = time.monotonic()
    done: list[float] = []

    def waiter() -> None:
        with concurrency("upstream", timeout_seconds=10, client=client):
            done.append(time.monotonic() - started)

    thread = threading.Thread(target=waiter)
    thread.start()
    rate_limit("paced", client=client)  # not paused: at once
    thread.join(15)
    assert done and 1.3 <= done[0] < 4.0, done  # waited for the pause, woken soon after it ended
    with pytest.raises(pgslots.InvalidArgumentError):
        client.pause("upstream", -1)
    result = run(fresh_dsn, "pause", "upstream", "400")
    assert result.exit_code == 1 and "max_pause_seconds" in result.output
    assert run(fresh_dsn, "pause", "upstream", "30", "--reason", "quota").exit_code == 0
    assert "Resumed 'upstream'" in run(fresh_dsn, "resume", "upstream").output
    assert "was not paused" in run(fresh_dsn, "resume", "upstream").output
