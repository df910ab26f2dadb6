"""A limit per key: templates (`tenant:*`), their instances created on first use, overrides, and
what changing or deleting a template does to keys in use."""

from __future__ import annotations

import multiprocessing as mp
import random
import select
import time
import uuid
from collections.abc import Iterator
from typing import Any

import invariants
import psycopg
import pytest

from sqlhelp import acquire, advance_clock, create, expect_error, login_role, one, rate_limit, rows, snapshot, status, woken

Conn = psycopg.Connection[Any]


def instances(conn: Conn, template: str) -> list[str]:
    return [r["name"] for r in rows(conn, "SELECT name FROM pgslots.get_instances(%s)", [template])]


def release(conn: Conn, lease_id: Any) -> bool:
    return bool(one(conn, "SELECT pgslots.release(%s) AS r", [lease_id])["r"])


# ---- instances ----------------------------------------------------------------------------------


def test_each_key_gets_a_limit_of_its_own_on_first_use(sql: Conn) -> None:
    create(sql, "tenant:*", 2)
    a1, a2, a3 = (acquire(sql, ["tenant:acme"]) for _ in range(3))
    assert a1["granted"] and a2["granted"] and not a3["granted"]
    assert a3["blocked_by"] == ["tenant:acme"] and a1["missing"] == []
    assert acquire(sql, ["tenant:beta"])["granted"], "keys never share slots"
    assert instances(sql, "tenant:*") == ["tenant:acme", "tenant:beta"]
    acme = status(sql, "tenant:acme")
    assert (acme["template"], acme["limit"], acme["active_slots"], acme["is_template"]) == ("tenant:*", 2, 2, False)
    template = status(sql, "tenant:*")
    assert (template["is_template"], template["instances"], template["template"]) == (True, 2, None)
    listed = [r["name"] for r in rows(sql, "SELECT name FROM pgslots.get_limits(NULL, false)")]
    assert listed == ["tenant:*"], "a listing without instances shows the template, not its keys"
    invariants.check(sql)


def test_the_longest_prefix_wins_and_an_override_wins_over_every_template(sql: Conn) -> None:
    create(sql, "tenant:*", 2)
    create(sql, "tenant:vip:*", 5)
    create(sql, "tenant:acme", 1)  # an override
    assert [acquire(sql, ["tenant:vip:x"])["granted"] for _ in range(6)] == [True] * 5 + [False]
    assert [acquire(sql, ["tenant:acme"])["granted"] for _ in range(2)] == [True, False]
    assert [acquire(sql, ["tenant:other"])["granted"] for _ in range(3)] == [True, True, False]
    assert status(sql, "tenant:vip:x")["template"] == "tenant:vip:*"
    assert status(sql, "tenant:acme")["template"] is None
    # A name ending in * is never a key, and the bare prefix is not one either.
    assert acquire(sql, ["tenant:x*"])["missing"] == ["tenant:x*"]
    assert acquire(sql, ["tenant:"])["missing"] == ["tenant:"]


def test_strict_counts_a_key_of_a_template_as_existing(sql: Conn) -> None:
    create(sql, "tenant:*", 1)
    assert acquire(sql, ["tenant:a"], strict=True)["granted"]
    expect_error(sql, "PS008", "SELECT * FROM pgslots.acquire(ARRAY['tenant:b', 'nothing'], strict => true)")
    got = acquire(sql, ["tenant:b", "nothing"])
    assert got["granted"] and got["missing"] == ["nothing"]


def test_rate_limits_on_keys_take_the_templates_decay(sql: Conn) -> None:
    create(sql, "calls:*", 2, decay=1.0)
    assert [rate_limit(sql, ["calls:u1"])["granted"] for _ in range(3)] == [True, True, False]
    assert rate_limit(sql, ["calls:u2"])["granted"]
    advance_clock(sql, 1.0)
    assert rate_limit(sql, ["calls:u1"])["granted"], "one slot decayed in a second"


def test_a_mixed_acquire_is_all_or_nothing(sql: Conn) -> None:
    create(sql, "openai", 3)
    create(sql, "tenant:*", 1)
    held = acquire(sql, ["openai", "tenant:acme"])
    assert held["granted"]
    refused = acquire(sql, ["openai", "tenant:acme"])
    assert not refused["granted"] and refused["blocked_by"] == ["tenant:acme"]
    assert status(sql, "openai")["active_slots"] == 1, "the refused request took nothing from the global limit"
    assert acquire(sql, ["tenant:beta", "openai"])["granted"]
    assert status(sql, "openai")["active_slots"] == 2
    invariants.check(sql)


# ---- following the template -----------------------------------------------------------------


def test_changing_a_template_changes_every_key_and_raising_it_wakes_their_waiters(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn, psycopg.connect(fresh_dsn, autocommit=True) as listener:
        create(conn, "tenant:*", 1)
        for key in ("tenant:a", "tenant:b"):
            assert acquire(conn, [key])["granted"]
        client = uuid.uuid4()
        listener.execute(f'LISTEN "pgslots:{client}"')
        queued = acquire(conn, ["tenant:a"], queue_client=client)
        assert not queued["granted"] and queued["waiter"] is not None
        one(conn, "SELECT pgslots.update_limit('tenant:*', 2, 0.5) AS id")
        for key in ("tenant:a", "tenant:b"):
            row = status(conn, key)
            assert (row["limit"], row["slot_decay_per_second"]) == (2, 0.5)
        assert select.select([listener.fileno()], [], [], 5)[0], "raising the template woke the key's waiter"
        notes = [woken(n.payload) for n in listener.notifies(timeout=1, stop_after=1)]
        assert notes == [[queued["waiter"]]]
        again = acquire(conn, ["tenant:a"], ticket=queued["waiter"], queue_client=client)
        assert again["granted"]
        one(conn, "SELECT pgslots.update_limit('tenant:*', active => false) AS id")
        assert status(conn, "tenant:b")["active"] is False
        assert acquire(conn, ["tenant:a"])["granted"], "a disabled template's keys enforce nothing"
        invariants.check(conn, lowered=())


def test_a_key_follows_its_template_and_only_an_override_gives_it_its_own_size(sql: Conn) -> None:
    create(sql, "tenant:*", 1)
    held = acquire(sql, ["tenant:acme"])
    message = expect_error(sql, "PS016", "SELECT pgslots.update_limit('tenant:acme', 5)")
    assert "key of template 'tenant:*'" in message
    # The key in use becomes an override: its holder stays, its size is its own from now on.
    create(sql, "tenant:acme", 3)
    row = status(sql, "tenant:acme")
    assert (row["template"], row["limit"], row["leased_slots"]) == (None, 3, 1)
    assert acquire(sql, ["tenant:acme"])["granted"] and acquire(sql, ["tenant:acme"])["granted"]
    assert release(sql, held["lease_id"])
    one(sql, "SELECT pgslots.update_limit('tenant:*', 10) AS id")
    assert status(sql, "tenant:acme")["limit"] == 3, "an override does not follow the template"
    invariants.check(sql)


def test_a_nested_template_created_later_takes_over_the_keys_it_matches_best(sql: Conn) -> None:
    create(sql, "tenant:*", 1)
    held = acquire(sql, ["tenant:vip:x"])
    assert status(sql, "tenant:vip:x")["template"] == "tenant:*"
    create(sql, "tenant:vip:*", 4)
    row = status(sql, "tenant:vip:x")
    assert (row["template"], row["limit"], row["leased_slots"]) == ("tenant:vip:*", 4, 1)
    assert acquire(sql, ["tenant:vip:x"])["granted"]
    assert release(sql, held["lease_id"])
    invariants.check(sql)


def test_deleting_a_template_makes_its_names_missing_and_removes_keys_once_idle(sql: Conn) -> None:
    create(sql, "tenant:*", 1)
    held = acquire(sql, ["tenant:busy"])
    acquire(sql, ["tenant:idle"])["lease_id"]
    assert release(sql, acquire(sql, ["tenant:gone"])["lease_id"])
    one(sql, "SELECT pgslots.delete_limit('tenant:*') AS id")
    names = [r["name"] for r in rows(sql, "SELECT name FROM pgslots.limits ORDER BY name")]
    assert names == ["tenant:busy", "tenant:idle"], "the idle key went at once, those held stay"
    got = acquire(sql, ["tenant:busy"])
    assert got["granted"] and got["missing"] == ["tenant:busy"], "its name is missing again"
    expect_error(sql, "PS008", "SELECT * FROM pgslots.acquire(ARRAY['tenant:busy'], strict => true)")
    assert release(sql, held["lease_id"]), "holders release as usual"
    one(sql, "SELECT pgslots.sweep() AS n")
    assert [r["name"] for r in rows(sql, "SELECT name FROM pgslots.limits ORDER BY name")] == ["tenant:idle"]
    # A new template takes the remaining key over.
    create(sql, "tenant:*", 2)
    assert status(sql, "tenant:idle")["template"] == "tenant:*"
    assert acquire(sql, ["tenant:idle"])["granted"]


# ---- idle keys go away ------------------------------------------------------------------------


def test_idle_keys_are_removed_by_sweep_and_by_new_keys(sql: Conn) -> None:
    one(sql, "SELECT pgslots.create_limit('user:*', 1, max_keys => 100) AS id")
    create(sql, "calls:*", 1, decay=1.0)
    leases = [acquire(sql, [f"user:{i}"])["lease_id"] for i in range(30)]
    assert all(release(sql, lease) for lease in leases)
    assert len(instances(sql, "user:*")) == 30
    # Below half its max_keys, a template keeps its idle keys for sweep; past it, each new key
    # takes up to four idle ones away.
    first = acquire(sql, ["user:first"])
    assert first["granted"] and len(instances(sql, "user:*")) == 31
    assert release(sql, first["lease_id"])
    one(sql, "SELECT pgslots.update_limit('user:*', max_keys => 50) AS id")
    assert acquire(sql, ["user:new"])["granted"]
    assert len(instances(sql, "user:*")) == 28
    assert rate_limit(sql, ["calls:x"])["granted"]
    held = acquire(sql, ["user:held"])
    one(sql, "SELECT pgslots.sweep() AS n")
    assert instances(sql, "user:*") == ["user:held", "user:new"], "sweep removed every idle key"
    assert instances(sql, "calls:*") == ["calls:x"], "a key with a rate slot not yet decayed is not idle"
    advance_clock(sql, 1.5)
    one(sql, "SELECT pgslots.sweep() AS n")
    assert instances(sql, "calls:*") == []
    assert release(sql, held["lease_id"])
    assert status(sql, "user:*")["instances"] == 2


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "params", "sqlstate", "words"),
    [
        ("SELECT pgslots.create_limit('*', 1)", None, "PS016", "needs a prefix"),
        ("SELECT pgslots.create_limit('tenant:**', 1)", None, "PS016", "more than one *"),
        ("SELECT pgslots.create_limit('tenant:*', 1, 0, true, 1)", None, "PS002", "holds no slots"),
        ("SELECT * FROM pgslots.acquire(ARRAY['t:*'])", None, "PS016", "is a template"),
        ("SELECT * FROM pgslots.rate_limit(ARRAY['t:*'])", None, "PS016", "is a template"),
        ("SELECT pgslots.update_limit('t:*', new_name => 'u:*')", None, "PS016", "keep their names"),
        ("SELECT pgslots.update_limit('plain', new_name => 'plain*')", None, "PS016", "cannot become a template"),
        ("SELECT pgslots.update_limit('t:*', active_slots => 1)", None, "PS002", "holds no slots"),
        ("SELECT * FROM pgslots.acquire(%s)", [["t:" + "k" * 1_000_000]], "PS001", "255 characters"),
        ("SELECT pgslots.create_limit(%s, 1)", ["k" * 1_000_000 + "*"], "PS001", "255 characters"),
    ],
)
def test_bad_template_input_is_refused_and_changes_nothing(sql: Conn, query: str, params: Any, sqlstate: str, words: str) -> None:
    create(sql, "t:*", 2)
    create(sql, "plain", 2)
    assert acquire(sql, ["t:live"])["granted"]
    assert words in expect_error(sql, sqlstate, query, params)


def test_template_errors_reach_python_as_template_errors(client: Any) -> None:
    import pgslots
    from pgslots.sync import concurrency

    client.create_limit("tenant:*", 2)
    with pytest.raises(pgslots.TemplateError, match="is a template"), concurrency("tenant:*", client=client, timeout_seconds=2):
        pass
    with pytest.raises(pgslots.TemplateError, match="needs a prefix"):
        client.create_limit("*", 1)
    with concurrency("tenant:acme", client=client, timeout_seconds=2) as lease:
        assert lease is not None and lease.lease_id is not None
        assert [i.name for i in client.read_instances("tenant:*")] == ["tenant:acme"]
        info = client.read_limit("tenant:*")
        assert info.is_template and info.instances == 1
    assert [i.name for i in client.read_limits(instances=False)] == ["tenant:*"]


# ---- two plain roles ----------------------------------------------------------------------------


@pytest.fixture
def two_roles(fresh_dsn: str) -> Iterator[tuple[str, str]]:
    victim = login_role(fresh_dsn, "pgslots_user")
    attacker = login_role(fresh_dsn, "pgslots_user")
    yield next(victim), next(attacker)
    for gen in (victim, attacker):
        next(gen, None)


def test_a_plain_role_uses_keys_but_cannot_change_templates_or_others_keys(fresh_dsn: str, two_roles: tuple[str, str]) -> None:
    victim_dsn, attacker_dsn = two_roles
    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        create(admin, "tenant:*", 1)
    with psycopg.connect(victim_dsn, autocommit=True) as victim, psycopg.connect(attacker_dsn, autocommit=True) as attacker:
        held = acquire(victim, ["tenant:victim"])
        assert held["granted"]
        before = snapshot_of(fresh_dsn)
        for query, params in [
            ("SELECT pgslots.update_limit('tenant:*', 100)", None),
            ("SELECT pgslots.create_limit('tenant:victim', 100)", None),
            ("SELECT pgslots.delete_limit('tenant:*')", None),
            ("SELECT pgslots.sweep()", None),
        ]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege), attacker.transaction():
                attacker.execute(query, params)
        for query, params, sqlstate in [
            ("SELECT * FROM pgslots.acquire(ARRAY['tenant:*'])", None, "PS016"),
            ("SELECT * FROM pgslots.acquire(ARRAY['tenant:victim'], priority => 1000)", None, "PS015"),
            ("SELECT * FROM pgslots.acquire(ARRAY['tenant:victim'], fairness_key => %s)", ["k" * 1_000_000], "PS015"),
        ]:
            with pytest.raises(psycopg.Error) as caught, attacker.transaction():
                attacker.execute(query, params)
            assert caught.value.sqlstate == sqlstate
        with pytest.raises(psycopg.Error) as caught, attacker.transaction():
            attacker.execute("SELECT * FROM pgslots.get_instances('tenant:*', -1)")
        assert caught.value.sqlstate == "PS011"
        assert snapshot_of(fresh_dsn) == before
        # Both roles may read a template's keys (names and occupancy, never lease ids).
        assert [r["name"] for r in rows(attacker, "SELECT name FROM pgslots.get_instances('tenant:*', 2147483647)")] == ["tenant:victim"]
        # The attacker's own keys are its own: using them takes nothing from the victim's key.
        assert all(acquire(attacker, [f"tenant:attacker{i}"])["granted"] for i in range(20))
        assert not acquire(attacker, ["tenant:victim"])["granted"]
        assert release(victim, held["lease_id"])
    invariants.check(fresh_dsn)


def snapshot_of(dsn: str) -> list[Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return snapshot(conn)


# ---- many processes on many keys --------------------------------------------------------------

KEYS = 50
PER_KEY = 2
OVERRIDE = "tenant:k7"  # its own size: 1
GLOBAL = 6
PROCESSES = 8
SECONDS = 5.0


def _worker(dsn: str, held: Any, peaks: Any, total: Any, total_peak: Any, bodies: Any, deadline: float) -> None:
    from pgslots import Client
    from pgslots.sync import concurrency

    rng = random.Random()
    client = Client(dsn)
    try:
        while time.time() < deadline:
            k = rng.randrange(KEYS)
            with concurrency(["openai", f"tenant:k{k}"], client=client, timeout_seconds=30):
                with held.get_lock():
                    held[k] += 1
                    peaks[k] = max(peaks[k], held[k])
                    total.value += 1
                    total_peak.value = max(total_peak.value, total.value)
                    bodies.value += 1
                # Bodies long against a hand-off (a few ms on a busy machine), so that the global
                # limit does fill up with 8 processes, whatever the scheduling.
                time.sleep(rng.uniform(0.005, 0.03))
                with held.get_lock():
                    held[k] -= 1
                    total.value -= 1
    finally:
        client.close()


def test_processes_on_fifty_keys_never_exceed_a_key_or_the_global_limit(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        create(conn, "tenant:*", PER_KEY)
        create(conn, OVERRIDE, 1)
        create(conn, "openai", GLOBAL)
    ctx = mp.get_context("fork")
    held, peaks = ctx.Array("i", KEYS), ctx.Array("i", KEYS, lock=False)
    total, total_peak, bodies = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
    deadline = time.time() + SECONDS
    procs = [ctx.Process(target=_worker, args=(fresh_dsn, held, peaks, total, total_peak, bodies, deadline)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(SECONDS + 60)
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    assert total_peak.value <= GLOBAL, f"{total_peak.value} bodies at once on a global limit of {GLOBAL}"
    assert total_peak.value == GLOBAL, "the global limit was filled at some point"
    over = {k: peaks[k] for k in range(KEYS) if peaks[k] > (1 if f"tenant:k{k}" == OVERRIDE else PER_KEY)}
    assert not over, f"keys above their own limit: {over}"
    assert bodies.value > 200
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        assert len(instances(conn, "tenant:*")) <= KEYS - 1
        assert one(conn, "SELECT count(*) AS n FROM pgslots.leases")["n"] == 0
        one(conn, "SELECT pgslots.sweep() AS n")
        assert instances(conn, "tenant:*") == [], "every key is idle once the work is done"
    invariants.check(fresh_dsn)


def _first_use(dsn: str, key: str, barrier: Any, out: Any, i: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        barrier.wait(10)
        out[i] = 1 if acquire(conn, [key])["granted"] else 0


def test_processes_using_a_new_key_at_once_get_one_instance(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        create(conn, "tenant:*", 3)
    ctx = mp.get_context("fork")
    for round_ in range(5):
        key = f"tenant:new{round_}"
        barrier, out = ctx.Barrier(8), ctx.Array("i", 8)
        procs = [ctx.Process(target=_first_use, args=(fresh_dsn, key, barrier, out, i)) for i in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0] * 8
        assert sum(out[:]) == 3, f"{sum(out[:])} of 8 first users granted on a key of 3 slots"
        with psycopg.connect(fresh_dsn, autocommit=True) as conn:
            assert one(conn, "SELECT count(*) AS n FROM pgslots.limits WHERE name = %s", [key])["n"] == 1
    invariants.check(fresh_dsn)
