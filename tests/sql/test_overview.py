"""One read model: a template's gauges summed by the database, the overview (every limit, each
template's busiest keys) and bounded holders, the kept count of a template's keys, and who may read
what."""

from __future__ import annotations

import uuid
from typing import Any

import invariants
import psycopg
import pytest

from pgslots.client import Client
from sqlhelp import Roles, acquire, advance_clock, create, one, rate_limit, rows, status

Conn = psycopg.Connection[Any]
GAUGES = ("active_slots", "leased_slots", "unleased_slots", "held_slots", "reclaimable_slots", "leases", "expired_leases", "waiters")


def test_a_templates_gauges_are_its_keys_summed(sql: Conn) -> None:
    create(sql, "tenant:*", 3, decay=0.001)
    one(sql, "SELECT pgslots.create_limit('sms:*', 4, window_seconds => 60, margin_seconds => 0) AS id")
    expired = acquire(sql, ["tenant:b"], lease_seconds=60)
    advance_clock(sql, 61)  # that lease expired: reclaimable, not yet taken back
    for key, n in (("tenant:a", 3), ("tenant:b", 1)):
        for _ in range(n):
            assert acquire(sql, [key], lease_seconds=300)["granted"]
    assert rate_limit(sql, ["tenant:c"], 2)["granted"]
    assert rate_limit(sql, ["sms:x"], 3)["granted"] and rate_limit(sql, ["sms:y"])["granted"]
    waiter = acquire(sql, ["tenant:a"], lease_seconds=60, queue_client=uuid.uuid4(), priority=5)
    assert not waiter["granted"]
    advance_clock(sql, 1)
    one(sql, "SELECT pgslots.pause('tenant:c', 30) AS until")
    keys = rows(sql, "SELECT * FROM pgslots.status WHERE template = 'tenant:*'")
    template = status(sql, "tenant:*")
    for gauge in GAUGES:
        assert template[gauge] == pytest.approx(sum(k[gauge] for k in keys), abs=1e-3), gauge  # read moments apart
    assert template["active_slots"] == pytest.approx(3 + 2 + 2, abs=0.01)  # a: 3 leased, b: 2 leased, c: 2 rate slots
    assert (template["reclaimable_slots"], template["expired_leases"], template["held_slots"]) == (1, 1, pytest.approx(6, abs=0.01))
    assert (template["waiters"], template["waiter_priorities"], template["instances"], template["paused_keys"]) == (1, [5], 3, 1)
    assert template["oldest_waiter_seconds"] >= 1
    assert status(sql, "sms:*")["active_slots"] == 4, "window keys: the grants in their windows"
    assert status(sql, "tenant:a")["paused_keys"] is None, "a key is no template"
    assert expired["granted"]
    invariants.check(sql)


def test_the_overview_is_every_limit_then_each_templates_busiest_keys(sql: Conn) -> None:
    create(sql, "db", 2)
    create(sql, "tenant:*", 5, decay=0.001)
    create(sql, "tenant:vip", 9)  # an override: a limit of its own
    for i in range(8):
        for _ in range(i % 5):
            acquire(sql, [f"tenant:k{i}"], lease_seconds=60)
        rate_limit(sql, [f"tenant:k{i}"], 1)  # every key in use
    seen = rows(sql, "SELECT name, template, active_slots FROM pgslots.get_overview(NULL, 3)")
    assert [r["name"] for r in seen[:3]] == ["db", "tenant:*", "tenant:vip"]
    assert [r["template"] for r in seen[:3]] == [None, None, None]
    busiest = seen[3:]
    assert [r["template"] for r in busiest] == ["tenant:*"] * 3
    assert [r["active_slots"] for r in busiest] == pytest.approx([5, 4, 3], abs=0.01)  # k4, k3, then k2 or k7
    named = rows(sql, "SELECT name FROM pgslots.get_overview(ARRAY['db', 'tenant:k1'], 2)")
    assert [r["name"] for r in named] == ["db", "tenant:k1"]
    assert rows(sql, "SELECT name FROM pgslots.get_overview(NULL, 0)") == [{"name": "db"}, {"name": "tenant:*"}, {"name": "tenant:vip"}]
    for bad in (-1, 1001, None):
        with pytest.raises(psycopg.Error) as refused, sql.transaction():
            sql.execute("SELECT * FROM pgslots.get_overview(NULL, %s)", [bad])
        assert refused.value.sqlstate == "PS011"


def test_holders_are_bounded_per_limit_and_name_what_they_hold(sql: Conn) -> None:
    create(sql, "wide", 50)
    create(sql, "narrow", 1)
    held = [acquire(sql, ["wide"], lease_seconds=60)["lease_id"] for _ in range(30)]
    both = acquire(sql, ["narrow", "wide"], lease_seconds=60)["lease_id"]
    found = rows(sql, "SELECT * FROM pgslots.list_holders(ARRAY['wide', 'narrow', 'missing'], 10)")
    by_name = {n: [r for r in found if r["name"] == n] for n in ("wide", "narrow")}
    assert len(by_name["wide"]) == 10 and [r["lease_id"] for r in by_name["wide"]] == held[:10], "the oldest ten"
    assert [(r["lease_id"], r["limit_names"]) for r in by_name["narrow"]] == [(both, ["narrow", "wide"])]
    for names, per_limit in ((["wide"], 0), (["wide"], 1001), (None, 5)):
        with pytest.raises(psycopg.Error) as refused, sql.transaction():
            sql.execute("SELECT * FROM pgslots.list_holders(%s, %s)", [names, per_limit])
        assert refused.value.sqlstate == "PS011"


def test_a_templates_key_count_follows_every_way_a_key_comes_and_goes(sql: Conn) -> None:
    create(sql, "t:*", 2, decay=1.0)
    create(sql, "t:deep:*", 2, decay=1.0)
    for name in ("t:a", "t:b", "t:c", "t:deep:x", "t:deep:y"):
        rate_limit(sql, [name])
    invariants.check(sql)
    create(sql, "t:a", 5)  # an override leaves its template
    one(sql, "SELECT pgslots.delete_limit('t:b') AS id")  # a key deleted
    one(sql, "SELECT pgslots.delete_limit('t:deep:*') AS id")  # its keys follow t:*
    assert status(sql, "t:*")["instances"] == 3
    invariants.check(sql)
    create(sql, "t:deep:*", 3, decay=1.0)  # and come back
    advance_clock(sql, 10)  # every rate slot decayed: every key idle
    one(sql, "SELECT pgslots.sweep() AS n")
    assert status(sql, "t:*")["instances"] == 0 and status(sql, "t:deep:*")["instances"] == 0
    invariants.check(sql)
    sql.execute("UPDATE pgslots.settings SET max_keys_per_template = 3")
    for i in range(3):
        acquire(sql, [f"t:k{i}"], lease_seconds=60)
    with pytest.raises(psycopg.Error) as full, sql.transaction():
        sql.execute("SELECT * FROM pgslots.acquire(ARRAY['t:k3'], 1, 60)")
    assert full.value.sqlstate == "PS016", "the kept count enforces max_keys"
    invariants.check(sql)


def test_plain_roles_read_the_overview_but_not_its_holders(roles: Roles) -> None:
    with psycopg.connect(roles.owner, autocommit=True) as owner:
        create(owner, "shared", 2)
        create(owner, "tenant:*", 2)
    for dsn in (roles.victim, roles.attacker):
        with psycopg.connect(dsn, autocommit=True) as conn:
            acquire(conn, ["tenant:mine"], lease_seconds=60)
            assert [r["name"] for r in rows(conn, "SELECT name FROM pgslots.get_overview(NULL, 5)")][:2] == ["shared", "tenant:*"]
            with pytest.raises(psycopg.Error) as refused:
                conn.execute("SELECT * FROM pgslots.list_holders(ARRAY['tenant:mine'], 5)")
            assert refused.value.sqlstate == "42501"
        client = Client(dsn)
        try:
            seen = client.overview(holders=5)
            assert seen.holders == {} and seen.holders_error is not None and "Holders are not shown" in seen.holders_error
            assert [k.name for k in seen.busiest["tenant:*"]] == ["tenant:mine"]
        finally:
            client.close()
    # A template's gauges answer for any id, and only read: nothing to learn beyond the status view.
    with psycopg.connect(roles.attacker, autocommit=True) as conn:
        template_id = rows(conn, "SELECT id FROM pgslots.status WHERE name = 'tenant:*'")[0]["id"]
        gauges = rows(conn, "SELECT (pgslots.template_gauges(%s)).*", [template_id])[0]
        assert (gauges["instances"], gauges["leased"], gauges["leases"]) == (1, 2, 2)
        for other in (None, uuid.uuid4(), rows(conn, "SELECT id FROM pgslots.status WHERE name = 'shared'")[0]["id"]):
            assert rows(conn, "SELECT (pgslots.template_gauges(%s)).instances AS n", [other])[0]["n"] == 0
        for bad in ("SELECT * FROM pgslots.get_overview(NULL, 100000)", "SELECT * FROM pgslots.list_holders(ARRAY['shared'], 5)"):
            with pytest.raises(psycopg.Error) as refused:
                conn.execute(bad)
            assert refused.value.sqlstate in ("PS011", "42501")
    admin = Client(roles.owner)
    try:
        seen = admin.overview(busiest=1, holders=5)
        assert seen.holders_error is None and len(seen.holders["tenant:mine"]) == 2
        assert next(i for i in seen.limits if i.name == "tenant:*").held_slots == 2
    finally:
        admin.close()
