"""Untrusted callers, round two: what one plain role can do to another is bounded.

Each test logs in as two plain roles of pgslots_user, a victim and an attacker, and replays an
attack found against an earlier version with its numbers: late refunds, fail-open while the database
answers, debts, tables grown without bound, fresh fairness keys, high priorities, a reused backend
PID, borrowed sessions. (Terminals, the page and the CLI are in test_untrusted_output.py.)
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from invariants import check
from psycopg import sql as pgsql

import pgslots
from pgslots.sync import concurrency
from sqlhelp import Roles, acquire, advance_clock, create, one, rate_limit, rows, status

Conn = psycopg.Connection[Any]


def _conn(dsn: str) -> Conn:
    return psycopg.connect(dsn, autocommit=True)


def _settings(owner: str, **values: Any) -> None:
    with _conn(owner) as conn:
        for key, value in values.items():
            conn.execute(pgsql.SQL("UPDATE pgslots.settings SET {} = %s").format(pgsql.Identifier(key)), [value])


def _role(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["user"])


def _reserve(conn: Conn, name: str, slots: int) -> dict[str, Any]:
    return one(conn, "SELECT * FROM pgslots.reserve(%s, %s)", [[name], slots])


def _settle(conn: Conn, reservation: Any, actual: float) -> bool:
    return bool(one(conn, "SELECT pgslots.settle(%s, %s) AS changed", [reservation, actual])["changed"])


def _error(conn: Conn, sqlstate: str, query: str, params: Any = None) -> str:
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(query, params)
    assert caught.value.sqlstate == sqlstate, (caught.value.sqlstate, str(caught.value))
    return str(caught.value)


def _grants_until_refused(conn: Conn, name: str, most: int = 1000) -> int:
    granted = 0
    while granted < most and rate_limit(conn, [name])["granted"]:
        granted += 1
    return granted


# ---- 1. a late refund gives back only what has not decayed ----------------------------------------


def test_a_late_refund_never_gives_back_decayed_slots(roles: Roles) -> None:
    """The attack: keep reservations until their slots decayed, let others fill the bucket, then
    settle them at 0. It took 40 grants in 0.04 s from a bucket of 10 refilling 2/s (it allows 10.1).
    Now the old reservations refund nothing, and the victim's fresh grants stay counted."""
    with _conn(roles.owner) as owner:
        create(owner, "bucket", 10, decay=2.0)
    with _conn(roles.attacker) as attacker, _conn(roles.victim) as victim:
        kept = [_reserve(attacker, "bucket", 1)["reservation_id"] for _ in range(10)]
        assert not rate_limit(victim, ["bucket"])["granted"], "the attacker filled the bucket"
        with _conn(roles.owner) as owner:
            advance_clock(owner, 5.0)  # 10 slots decayed at 2/s
        assert _grants_until_refused(victim, "bucket") == 10, "the victim fills it again"
        for reservation in kept:
            _settle(attacker, reservation, 0)  # the refunds of slots long gone
        extra = _grants_until_refused(attacker, "bucket")
        assert extra == 0, f"{extra} grants from refunds of decayed slots"
        with _conn(roles.owner) as owner:
            assert status(owner, "bucket")["active_slots"] == pytest.approx(10, abs=0.5)  # less what decayed meanwhile
            check(owner)


def test_an_early_refund_gives_back_what_is_still_in_the_bucket(roles: Roles) -> None:
    """Honest callers keep their refunds: settled at once, the difference comes back in full; settled
    after some decay, what of the reservation is still in the bucket."""
    with _conn(roles.owner) as owner:
        create(owner, "tokens", 100, decay=1.0)
    with _conn(roles.victim) as victim, _conn(roles.owner) as owner:
        prompt = _reserve(victim, "tokens", 60)["reservation_id"]
        assert _settle(victim, prompt, 20)
        assert status(owner, "tokens")["active_slots"] == pytest.approx(20, abs=0.3), "40 refunded at once"
        later = _reserve(victim, "tokens", 50)["reservation_id"]
        advance_clock(owner, 30.0)  # 30 slots decayed: 40 of the bucket's 70 remain, 20 of them this reservation's
        assert _settle(victim, later, 0)
        assert status(owner, "tokens")["active_slots"] == pytest.approx(20, abs=0.3), "refund of the 20 still held"
        assert _settle(victim, later, 5), "a debt after a refund counts"
        assert status(owner, "tokens")["active_slots"] == pytest.approx(25, abs=0.3)
        check(owner)


# ---- 2. fail-open only when the database cannot be reached ----------------------------------------


def test_a_lock_held_by_another_role_never_fails_open(roles: Roles) -> None:
    """The attack: another role's open transaction holds the limit's row lock; two of the victim's
    threads block on it holding both pooled connections, and two more found no connection and ran
    their bodies without a slot after 5 s (3 bodies on a limit of 1). Now a busy pool is no outage."""
    with _conn(roles.owner) as owner:
        create(owner, "one", 1)
        holder = acquire(owner, ["one"])
        assert holder["granted"]
    attacker = psycopg.connect(roles.attacker)  # not autocommit: its transaction stays open
    client = pgslots.Client(roles.victim, max_connections=2, fail_open=True, fail_open_after_seconds=1.0)
    bodies, errors = [], []

    def work() -> None:
        try:
            with concurrency("one", timeout_seconds=5, client=client):
                bodies.append(1)
        except pgslots.PgSlotsError as exc:
            errors.append(exc)

    try:
        refused = one(attacker, "SELECT * FROM pgslots.acquire('{one}', 1, 60)")  # locks the row, never commits
        assert not refused["granted"]
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert bodies == [], f"{len(bodies)} bodies ran without a slot while the database answered"
        assert len(errors) == 4 and all(isinstance(e, pgslots.AcquireConcurrencySlotTimeoutError) for e in errors), errors
    finally:
        attacker.rollback()
        attacker.close()
        client.close()
    with _conn(roles.owner) as owner:
        check(owner)


def test_a_role_out_of_connections_never_fails_open(roles: Roles) -> None:
    """The attack: the server's connections used up (56 idle ones of one role), and a new process
    ran its body while the limit was full. "Too many connections" is an answer, not an outage: the
    call waits out its timeout. Here the victim's own role is out of connections."""
    with _conn(roles.owner) as owner:
        create(owner, "one", 1)
        assert acquire(owner, ["one"])["granted"]
        owner.execute(pgsql.SQL("ALTER ROLE {} CONNECTION LIMIT 2").format(pgsql.Identifier(_role(roles.victim))))
    idle = [psycopg.connect(roles.victim) for _ in range(2)]
    client = pgslots.Client(roles.victim, fail_open=True, fail_open_after_seconds=0.5)
    ran = False
    try:
        started = time.monotonic()
        with pytest.raises(pgslots.PgSlotsError) as caught, concurrency("one", timeout_seconds=3, client=client):
            ran = True
        assert not ran, "the body ran without a slot"
        assert isinstance(caught.value, (pgslots.AcquireConcurrencySlotTimeoutError, pgslots.DatabaseUnavailableError))
        assert time.monotonic() - started < 20
    finally:
        for conn in idle:
            conn.close()
        client.close()


def test_an_unreachable_database_still_fails_open() -> None:
    """What fail-open is for: nothing listens on the port, the body runs after fail_open_after_seconds."""
    client = pgslots.Client(
        "host=127.0.0.1 port=9 user=nobody dbname=nothing connect_timeout=1", fail_open=True, fail_open_after_seconds=0.5
    )
    try:
        with concurrency("anything", timeout_seconds=10, client=client) as lease:
            assert lease is not None and lease.failed_open
    finally:
        client.close()


# ---- 3. debts are bounded, an admin clears them, deletion deletes ---------------------------------


def test_a_debt_is_bounded_and_an_admin_clears_it(roles: Roles) -> None:
    """The attack: settle(reservation, 1e9) on another tenant's key closed it for 31.7 years. Now a
    debt stops at twice the limit (closed for at most 2 x limit / rate), and clear_debt reopens it."""
    with _conn(roles.owner) as owner:
        create(owner, "tenant:*", 10, decay=1.0)
    with _conn(roles.attacker) as attacker, _conn(roles.victim) as victim:
        reservation = _reserve(attacker, "tenant:bob", 1)["reservation_id"]
        assert _settle(attacker, reservation, 1e9)
        refused = rate_limit(victim, ["tenant:bob"])
        assert not refused["granted"]
        assert refused["retry_after"] <= 2 * 10 / 1.0 + 1, refused["retry_after"]
        with _conn(roles.owner) as owner:
            assert status(owner, "tenant:bob")["active_slots"] <= 20 + 1e-6
            cleared = one(owner, "SELECT pgslots.clear_debt('tenant:*') AS n")["n"]
            assert cleared == pytest.approx(20, abs=0.1)
        assert rate_limit(victim, ["tenant:bob"])["granted"], "open again at once"
        _error(attacker, "42501", "SELECT pgslots.clear_debt('tenant:*')")  # an admin's tool only
    with _conn(roles.owner) as owner:
        _error(owner, "PS004", "SELECT pgslots.clear_debt(NULL)")
        _error(owner, "PS004", "SELECT pgslots.clear_debt('tenant:nobody-uses-this')")


def test_a_window_debt_is_bounded_too(roles: Roles) -> None:
    with _conn(roles.owner) as owner:
        one(owner, "SELECT pgslots.create_limit('yearly', 100, window_seconds => 1e8) AS id")
    with _conn(roles.attacker) as attacker, _conn(roles.owner) as owner:
        reservation = _reserve(attacker, "yearly", 1)["reservation_id"]
        _settle(attacker, reservation, 1e9)
        assert status(owner, "yearly")["active_slots"] == pytest.approx(200)
        one(owner, "SELECT pgslots.clear_debt('yearly') AS n")
        assert status(owner, "yearly")["active_slots"] == 0
        assert rows(owner, "SELECT 1 FROM pgslots.window_grants") == []


def test_deleting_a_template_deletes_its_keys_in_debt(roles: Roles) -> None:
    """The attack: 2,000 keys put in debt survived sweep and the deletion of their template, and a
    re-created template adopted them with their debts."""
    with _conn(roles.owner) as owner:
        create(owner, "tenant:*", 5, decay=0.001)
    with _conn(roles.attacker) as attacker:
        for i in range(200):
            reservation = _reserve(attacker, f"tenant:k{i}", 1)["reservation_id"]
            _settle(attacker, reservation, 1e9)
    with _conn(roles.owner) as owner:
        assert one(owner, "SELECT pgslots.sweep() AS n")["n"] == 0
        assert one(owner, "SELECT count(*) AS n FROM pgslots.limits WHERE template_id IS NOT NULL")["n"] == 200, "in use: kept"
        one(owner, "SELECT pgslots.delete_limit('tenant:*') AS id")
        assert one(owner, "SELECT count(*) AS n FROM pgslots.limits")["n"] == 0, "deletion deletes"
        create(owner, "tenant:*", 5, decay=0.001)
    with _conn(roles.victim) as victim:
        assert rate_limit(victim, ["tenant:k7"], 5)["granted"], "a fresh key, no debt adopted"


# ---- 4. tables one role can grow are bounded ------------------------------------------------------


def test_a_reserve_that_counts_nothing_stores_nothing(roles: Roles) -> None:
    """The attack: reserve on a name with no limit stored a reservation anyway, 2,039 a second."""
    with _conn(roles.attacker) as attacker, _conn(roles.owner) as owner:
        for _ in range(200):
            got = _reserve(attacker, "no-such-limit", 1)
            assert got["granted"] and got["reservation_id"] is None
        assert one(owner, "SELECT count(*) AS n FROM pgslots.reservations")["n"] == 0


def test_reservations_are_bounded_per_role(roles: Roles) -> None:
    """A role past max_reservations_per_role loses its oldest (they can no longer be settled, their
    estimates stay); another role's reservations are untouched."""
    _settings(roles.owner, max_reservations_per_role=50)
    with _conn(roles.owner) as owner:
        create(owner, "big", 1_000_000, decay=1.0)
    with _conn(roles.victim) as victim, _conn(roles.attacker) as attacker, _conn(roles.owner) as owner:
        mine = [_reserve(victim, "big", 1)["reservation_id"] for _ in range(10)]
        for _ in range(400):
            _reserve(attacker, "big", 1)
        counts = {
            r["owner"]: r["n"] for r in rows(owner, "SELECT owner::text AS owner, count(*) AS n FROM pgslots.reservations GROUP BY owner")
        }
        assert counts[_role(roles.attacker)] <= 50 + 8, counts
        assert counts[_role(roles.victim)] == 10
        assert all(_settle(victim, r, 0) for r in mine), "the victim's still settle"


def test_sessions_are_bounded_per_role(roles: Roles) -> None:
    """The attack: keep_alive with a fresh session id per call, 5,017 rows a second, removed only by
    an admin's sweep. Now a role has at most max_sessions_per_role; quiet ones make room."""
    _settings(roles.owner, max_sessions_per_role=20)
    with _conn(roles.attacker) as attacker, _conn(roles.victim) as victim, _conn(roles.owner) as owner:
        for _ in range(20):
            one(attacker, "SELECT * FROM pgslots.keep_alive(%s, '{}', false)", [uuid.uuid4()])
        message = _error(attacker, "PS019", "SELECT * FROM pgslots.keep_alive(%s, '{}', false)", [uuid.uuid4()])
        assert "max_sessions_per_role" in message
        one(victim, "SELECT * FROM pgslots.keep_alive(%s, '{}', false)", [uuid.uuid4()])  # another role: unaffected
        advance_clock(owner, 11)  # the attacker's sessions went quiet for liveness_seconds
        one(attacker, "SELECT * FROM pgslots.keep_alive(%s, '{}', false)", [uuid.uuid4()])
        n = one(owner, "SELECT count(*) AS n FROM pgslots.sessions WHERE owner = %s", [_role(roles.attacker)])["n"]
        assert n <= 20


def test_round_robin_history_is_bounded(roles: Roles) -> None:
    """The attack: a new fairness key per grant while someone waits: 8,749 served_keys rows in 20 s,
    never pruned while anyone waits."""
    _settings(roles.owner, waiter_ttl_seconds=600, priority_aging_seconds=0)
    with _conn(roles.owner) as owner:
        create(owner, "api", 1)
    with _conn(roles.victim) as victim, _conn(roles.attacker) as attacker, _conn(roles.owner) as owner:
        held = acquire(victim, ["api"])["lease_id"]
        # A waiter at a low priority: everyone else goes first, and it waits throughout.
        assert not acquire(victim, ["api"], queue_client=uuid.uuid4(), priority=-5, fairness_key="victim")["granted"]
        one(victim, "SELECT pgslots.release(%s) AS r", [held])
        for i in range(1400):
            got = acquire(attacker, ["api"], fairness_key=f"k{i}")
            if got["granted"]:
                one(attacker, "SELECT pgslots.release(%s) AS r", [got["lease_id"]])
        n = one(owner, "SELECT count(*) AS n FROM pgslots.served_keys")["n"]
        assert 1000 <= n <= 1024 + 4, n


def test_a_window_log_stays_bounded_under_zero_and_fractional_settles(roles: Roles) -> None:
    """The attack: reserve + settle(0) left a 0-slot row per cycle in a window limit's log: 22,677
    rows in 30 s on a limit of 100, and another role's refused rate_limit took 23 ms instead of 0.68."""
    with _conn(roles.owner) as owner:
        one(owner, "SELECT pgslots.create_limit('minute', 100, window_seconds => 60) AS id")
    with _conn(roles.attacker) as attacker, _conn(roles.victim) as victim, _conn(roles.owner) as owner:
        for i in range(1500):
            reservation = _reserve(attacker, "minute", 1)["reservation_id"]
            if reservation is not None:
                _settle(attacker, reservation, 0 if i % 2 else 0.01)
        n = one(owner, "SELECT count(*) AS n FROM pgslots.window_grants")["n"]
        assert n <= 100 + 1, n
        assert status(owner, "minute")["active_slots"] <= 100
        assert rate_limit(victim, ["minute"])["granted"]
        check(owner)


def test_a_template_caps_its_keys_and_new_keys_stay_cheap(roles: Roles) -> None:
    """The attack: 100,000 keys of one template made a new key's acquire 347 ms for everyone. A
    template's max_keys bounds them; a key beyond it is refused with PS016, and the victim's keys
    in use go on."""
    with _conn(roles.owner) as owner:
        one(owner, "SELECT pgslots.create_limit('tenant:*', 1, max_keys => 30) AS id")
        assert status(owner, "tenant:*")["max_keys"] == 30
    with _conn(roles.victim) as victim, _conn(roles.attacker) as attacker, _conn(roles.owner) as owner:
        mine = acquire(victim, ["tenant:victim"])
        assert mine["granted"]
        for i in range(29):
            assert acquire(attacker, [f"tenant:a{i}"])["granted"]  # held: not idle
        message = _error(attacker, "PS016", "SELECT * FROM pgslots.acquire('{tenant:one-too-many}')")
        assert "30 live keys" in message
        assert one(victim, "SELECT pgslots.release(%s) AS r", [mine["lease_id"]])["r"]
        assert acquire(victim, ["tenant:victim"])["granted"], "a key in use stays usable"
        one(owner, "SELECT pgslots.update_limit('tenant:*', max_keys => 0) AS id")
        assert status(owner, "tenant:*")["max_keys"] == 10000, "back to the setting"
        _error(owner, "PS002", "SELECT pgslots.create_limit('plain', 1, max_keys => 5)")
        _error(owner, "PS002", "SELECT pgslots.update_limit('tenant:*', max_keys => -1)")
        # Beyond an integer, PostgreSQL itself finds no such function; Python and the CLI check first.
        _error(owner, "42883", "SELECT pgslots.create_limit('big:*', 1, max_keys => 2147483648)")
        _error(attacker, "42501", "SELECT pgslots.update_limit('tenant:*', max_keys => 1000000)")


# ---- 5 and 6. the queue: no reward for new keys, no starvation by priority ------------------------


def _body_loop(dsn: str, key: str | None, fresh: bool, priority: int, counts: Any, index: int, deadline: float) -> None:
    client = pgslots.Client(dsn)
    try:
        n = 0
        while time.time() < deadline:
            fairness_key = f"{key}-{n}" if fresh else key
            n += 1
            try:
                with concurrency("gpu", client=client, fairness_key=fairness_key, priority=priority, timeout_seconds=30):
                    time.sleep(0.05)
            except pgslots.AcquireConcurrencySlotTimeoutError:
                continue
            with counts.get_lock():
                counts[index] += 1
    finally:
        client.close()


def test_a_fresh_fairness_key_per_request_does_not_jump_the_queue(roles: Roles) -> None:
    """The attack: a key never served sorted first, so a role with a new key per request left
    another role 1 body in 20 s. Now a new key goes by its arrival: the victim's one process gets
    about a third of the bodies against the attacker's two."""
    with _conn(roles.owner) as owner:
        create(owner, "gpu", 1)
    ctx = mp.get_context("fork")
    counts = ctx.Array("i", 3)
    deadline = time.time() + 8
    procs = [ctx.Process(target=_body_loop, args=(roles.victim, "victim", False, 0, counts, 0, deadline))]
    procs += [ctx.Process(target=_body_loop, args=(roles.attacker, f"a{i}", True, 0, counts, i + 1, deadline)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    victim, attacker = counts[0], counts[1] + counts[2]
    print(f"fresh keys: victim {victim} bodies, attacker {attacker} bodies in 8 s")
    assert victim >= 0.2 * (victim + attacker), (victim, attacker)


def test_the_highest_priority_a_role_may_use_cannot_starve_priority_zero(roles: Roles) -> None:
    """The attack: one role at priority 100 kept another role's priority-0 waiters waiting 60 s and
    timing out. Now priorities stop at max_priority (10) and waiters age a level every
    priority_aging_seconds (2): a priority-0 waiter is overtaken only by waiters that arrive within
    max_priority x priority_aging_seconds after it. With aging at 0.3 s here that is 3 s, so the
    victim is served within a few seconds although the attacker saturates the limit."""
    with _conn(roles.owner) as owner:
        settings = one(owner, "SELECT max_priority, priority_aging_seconds FROM pgslots.settings")
        assert (settings["max_priority"], settings["priority_aging_seconds"]) == (10, 2)
        create(owner, "gpu", 1)
    with _conn(roles.attacker) as attacker:
        _error(attacker, "PS015", "SELECT * FROM pgslots.acquire('{gpu}', priority => 11)")
    _settings(roles.owner, priority_aging_seconds=0.3)
    ctx = mp.get_context("fork")
    counts = ctx.Array("i", 3)
    deadline = time.time() + 10
    procs = [ctx.Process(target=_body_loop, args=(roles.attacker, "hi", False, 10, counts, i + 1, deadline)) for i in range(2)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # the attacker saturates the limit
    client = pgslots.Client(roles.victim)
    try:
        waits = []
        for _ in range(3):
            started = time.monotonic()
            with concurrency("gpu", client=client, priority=0, timeout_seconds=8):
                waits.append(time.monotonic() - started)
    finally:
        client.close()
        for p in procs:
            p.join(60)
    print(f"priority 0 against a saturating stream at priority 10: waited {[round(w, 2) for w in waits]} s")
    assert max(waits) < 3 + 4, waits  # the bound (3 s) plus scheduling on a busy machine; before: timeouts
    assert counts[1] + counts[2] > 20, "the attacker did saturate the limit"


# ---- 7. a reused backend PID does not keep a dead holder alive ------------------------------------


def test_a_reused_backend_pid_does_not_keep_a_dead_holder_alive(roles: Roles) -> None:
    """The attack: after 32,411 connections, another role's backend got the dead holder's PID, and
    the dead lease stayed counted until its expiry. Here the reuse is made directly: the dead
    session's row names a live backend of the attacker."""
    with _conn(roles.owner) as owner:
        create(owner, "one", 1)
    session = uuid.uuid4()
    holder = _conn(roles.victim)
    one(holder, "SELECT * FROM pgslots.keep_alive(%s)", [session])
    lease = acquire(holder, ["one"], lease_seconds=300, session=session)
    assert lease["granted"]
    holder.close()  # the holder dies: its connection closes
    with _conn(roles.attacker) as attacker, _conn(roles.owner) as owner, _conn(roles.victim) as victim:
        live_pid = attacker.info.backend_pid
        owner.execute("UPDATE pgslots.sessions SET backend_pid = %s WHERE id = %s", [live_pid, session])
        advance_clock(owner, 11)  # liveness_seconds (10) + 1 without a keep_alive
        got = acquire(victim, ["one"])
        assert got["granted"], "the dead holder's slot came back although its PID lives on in another connection"


# ---- 10. sessions cannot be borrowed, lease ids are not confirmed ---------------------------------


def test_another_roles_session_cannot_be_borrowed(roles: Roles) -> None:
    with _conn(roles.owner) as owner:
        create(owner, "api", 5)
    session = uuid.uuid4()
    with _conn(roles.victim) as victim, _conn(roles.attacker) as attacker:
        one(victim, "SELECT * FROM pgslots.keep_alive(%s)", [session])
        mine = acquire(victim, ["api"], session=session)["lease_id"]
        _error(attacker, "PS014", "SELECT * FROM pgslots.acquire('{api}', session => %s)", [session])
        _error(attacker, "PS014", "SELECT * FROM pgslots.keep_alive(%s)", [session])
        # Asking about the victim's lease id answers exactly as for a made-up one: gone.
        probe = one(attacker, "SELECT * FROM pgslots.keep_alive(%s, %s)", [uuid.uuid4(), [mine, uuid.uuid4()]])
        assert len(probe["lost"]) == 2
        own = one(victim, "SELECT * FROM pgslots.keep_alive(%s, %s)", [session, [mine]])
        assert own["lost"] == [] and own["orphans"] == []


def test_renew_leases_as_two_plain_roles(roles: Roles) -> None:
    """Each role renews its own leases in one call; another role's guesses (unknown ids, the most
    a call may name) renew nothing of the victim's and change nothing."""
    with psycopg.connect(roles.owner, autocommit=True) as owner:
        create(owner, "shared", 2)
    with psycopg.connect(roles.victim, autocommit=True) as victim, psycopg.connect(roles.attacker, autocommit=True) as attacker:
        mine = acquire(victim, ["shared"], lease_seconds=60)["lease_id"]
        theirs = acquire(attacker, ["shared"], lease_seconds=60)["lease_id"]
        assert one(victim, "SELECT pgslots.renew_leases(%s, %s) AS lost", [[mine], [600.0]])["lost"] == []
        with psycopg.connect(roles.owner, autocommit=True) as owner:
            before = rows(owner, "SELECT id, expires_at FROM pgslots.leases WHERE id = %s", [mine])
        guesses = [uuid.uuid4() for _ in range(10000)]
        lost = one(attacker, "SELECT pgslots.renew_leases(%s, %s) AS lost", [[*guesses[:9999], theirs], [60.0] * 10000])["lost"]
        assert len(lost) == 9999 and theirs not in lost
        with pytest.raises(psycopg.Error) as too_many:
            one(attacker, "SELECT pgslots.renew_leases(%s, %s)", [[*guesses, theirs], [60.0] * 10001])
        assert too_many.value.sqlstate == "PS011"
        with psycopg.connect(roles.owner, autocommit=True) as owner:
            assert rows(owner, "SELECT id, expires_at FROM pgslots.leases WHERE id = %s", [mine]) == before
            check(owner)
