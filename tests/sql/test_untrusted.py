"""Untrusted callers: a hostile role granted pgslots_user, against another role's waiters and holders.

Every test logs in as two different plain roles, both members of pgslots_user: the victim (using
the library, or the SQL API like any other program) and the attacker (calling the SQL functions with
whatever arguments suit it). What the attacker passes must never let a limit admit more than its
size, take over or move a place in the queue, remove or keep alive another's waiter, or make the
victim fail with anything but pgslots' own errors; and a blocked call gives up within its timeout.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import queue
import random
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from invariants import check
from psycopg import sql as pgsql

import pgslots
from pgslots._flow import RELEASE_WAIT_SECONDS
from pgslots.sync import concurrency
from sqlhelp import Roles, acquire, create, grant_note, handed, one, rows, snapshot, status

Conn = psycopg.Connection[Any]
QUEUE_LOCK_CLASS = 1885827953  # sql/functions/10_decision.sql: _lock_queue


def _conn(dsn: str) -> Conn:
    return psycopg.connect(dsn, autocommit=True)


def _waiter_rows(owner: Conn, name: str) -> list[dict[str, Any]]:
    return rows(
        owner,
        "SELECT w.id, w.client_id, w.lease_id, w.owner::text AS owner, w.expires_at FROM pgslots.waiters w"
        " JOIN pgslots.limits l ON l.id = w.limit_id WHERE l.name = %s ORDER BY w.id",
        [name],
    )


def _listen(dsn: str, client_id: uuid.UUID) -> Conn:
    conn = _conn(dsn)
    conn.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(f"pgslots:{client_id}")))
    return conn


def _role_name(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["user"])


# ---- the queue: tickets, places, named leases -----------------------------------------------------


def test_another_roles_ticket_is_a_new_arrival_not_a_takeover(roles: Roles) -> None:
    """Case 1: the attacker passes the victim's ticket with its own client and lease. The victim's
    place, client and named lease stay as they were; the release hands the slot to the victim's
    lease, notified on the victim's channel only; the attacker's asking again gets nothing."""
    with _conn(roles.owner) as owner, _conn(roles.victim) as victim, _conn(roles.attacker) as attacker:
        create(owner, "one", 1)
        held = acquire(owner, ["one"], lease_seconds=60)
        victim_client, victim_lease = uuid.uuid4(), uuid.uuid4()
        ticket = acquire(victim, ["one"], lease_seconds=60, queue_client=victim_client, new_lease_id=victim_lease)["waiter"]
        attacker_client, attacker_lease = uuid.uuid4(), uuid.uuid4()
        hijack = acquire(attacker, ["one"], lease_seconds=60, ticket=ticket, queue_client=attacker_client, new_lease_id=attacker_lease)
        assert not hijack["granted"] and hijack["waiter"] > ticket  # queued behind, with a ticket of its own
        places = _waiter_rows(owner, "one")
        assert [(w["id"], w["client_id"], w["lease_id"], w["owner"]) for w in places] == [
            (ticket, victim_client, victim_lease, _role_name(roles.victim)),
            (hijack["waiter"], attacker_client, attacker_lease, _role_name(roles.attacker)),
        ]
        with _listen(roles.owner, victim_client) as victim_ears, _listen(roles.owner, attacker_client) as attacker_ears:
            assert one(owner, "SELECT pgslots.release(%s) AS r", [held["lease_id"]])["r"] is True
            [note] = [n.payload for n in victim_ears.notifies(timeout=2, stop_after=1)]
            assert (handed(note)["ticket"], handed(note)["lease_id"]) == (ticket, str(victim_lease))
            assert list(attacker_ears.notifies(timeout=0.3)) == []
        again = acquire(attacker, ["one"], lease_seconds=60, ticket=ticket, queue_client=attacker_client, new_lease_id=attacker_lease)
        assert not again["granted"]
        assert [r["id"] for r in rows(owner, "SELECT id FROM pgslots.leases")] == [victim_lease]
        check(owner)


def test_a_made_up_ticket_cannot_jump_the_queue(roles: Roles) -> None:
    """Case 2: ticket -1 (or any number that is not the caller's own) queues at the back."""
    with _conn(roles.owner) as owner, _conn(roles.victim) as victim, _conn(roles.attacker) as attacker:
        create(owner, "line", 1)
        held = acquire(owner, ["line"], lease_seconds=60)
        victim_lease = uuid.uuid4()
        first = acquire(victim, ["line"], lease_seconds=60, queue_client=uuid.uuid4(), new_lease_id=victim_lease)["waiter"]
        jumper = uuid.uuid4()
        for made_up in (-1, 0, first - 1, 2**62):
            got = acquire(attacker, ["line"], lease_seconds=60, ticket=made_up, queue_client=jumper, new_lease_id=uuid.uuid4())
            assert not got["granted"] and got["waiter"] > first
        one(owner, "SELECT pgslots.release(%s)", [held["lease_id"]])
        assert [r["id"] for r in rows(owner, "SELECT id FROM pgslots.leases")] == [victim_lease]  # the head got it
        check(owner)


def test_planted_tickets_make_no_other_call_fail(roles: Roles) -> None:
    """Case 3: passing the next 200 ticket numbers plants nothing: each call gets a ticket from the
    sequence, so the victim's queueing goes on without a driver error."""
    with _conn(roles.owner) as owner, _conn(roles.victim) as victim:
        create(owner, "plant", 1)
        acquire(owner, ["plant"], lease_seconds=60)
        probe = acquire(victim, ["plant"], lease_seconds=60, queue_client=uuid.uuid4())["waiter"]
        with _conn(roles.attacker) as attacker:
            planter = uuid.uuid4()
            given = [
                acquire(attacker, ["plant"], lease_seconds=60, ticket=probe + k, queue_client=planter)["waiter"] for k in range(1, 201)
            ]
        assert len(set(given)) == 200 and min(given) > probe  # fresh tickets, never the numbers asked for
        mine = [acquire(victim, ["plant"], lease_seconds=60, queue_client=uuid.uuid4(), new_lease_id=uuid.uuid4()) for _ in range(20)]
        assert all(not m["granted"] and m["waiter"] > max(given) for m in mine)


def test_only_the_owner_removes_or_keeps_alive_a_waiter(roles: Roles) -> None:
    """Case 4: leave_queue and heartbeat of another role's tickets change nothing, even with the
    victim's client id; the victim's own leave_queue works."""
    with _conn(roles.owner) as owner, _conn(roles.victim) as victim, _conn(roles.attacker) as attacker:
        create(owner, "stay", 1)
        acquire(owner, ["stay"], lease_seconds=60)
        victim_client = uuid.uuid4()
        ticket = acquire(victim, ["stay"], lease_seconds=60, queue_client=victim_client)["waiter"]
        [before] = _waiter_rows(owner, "stay")
        for client in (uuid.uuid4(), victim_client):
            for t in range(1, ticket + 400):
                one(attacker, "SELECT pgslots.leave_queue(%s, %s)", [t, client])
            assert one(attacker, "SELECT pgslots.heartbeat(%s, %s) AS t", [client, list(range(1, ticket + 5))])["t"] is not None
            assert one(attacker, "SELECT pgslots.heartbeat(%s) AS t", [client])["t"] == []
        assert _waiter_rows(owner, "stay") == [before]  # still queued, its expiry not extended by the attacker
        assert status(owner, "stay")["waiters"] == 1
        assert one(victim, "SELECT pgslots.leave_queue(%s, %s) AS left", [ticket, victim_client])["left"] is True
        assert _waiter_rows(owner, "stay") == []


def test_a_lease_id_names_one_lease(roles: Roles) -> None:
    """A caller reusing a lease id, its own or one it learnt, gets pgslots' own error and changes
    nothing: no two leases share an id, whatever limits each counts on, so releasing one never
    counts for another."""
    with _conn(roles.owner) as owner, _conn(roles.victim) as victim, _conn(roles.attacker) as attacker:
        create(owner, "a", 2)
        create(owner, "b", 2)
        create(owner, "c", 2)
        taken = acquire(victim, ["a"], lease_seconds=60)["lease_id"]
        both = acquire(victim, ["b", "c"], lease_seconds=60)["lease_id"]
        for names, lease in ((["a"], taken), (["b"], taken), (["b", "c"], taken), (["a"], both), (["a", "b"], both)):
            before = snapshot(owner)
            with pytest.raises(psycopg.Error) as caught:
                acquire(attacker, names, lease_seconds=60, new_lease_id=lease)
            assert caught.value.sqlstate == "PS013" and "already in use" in str(caught.value)
            assert snapshot(owner) == before
        mine = uuid.uuid4()
        assert acquire(attacker, ["a"], lease_seconds=60, new_lease_id=mine)["granted"]
        with pytest.raises(psycopg.Error, match="already in use"):
            acquire(attacker, ["b"], lease_seconds=60, new_lease_id=mine)
        assert one(attacker, "SELECT pgslots.release(%s) AS r", [mine])["r"] is True
        assert [status(owner, n)["leased_slots"] for n in ("a", "b", "c")] == [1, 1, 1]
        check(owner)
    attacking = pgslots.Client(roles.attacker)
    try:
        with pytest.raises(pgslots.InvalidArgumentError, match="already in use"):
            attacking._connections.call(
                pgslots._queries.ACQUIRE,
                {
                    "names": ["a"],
                    "slots": 1,
                    "lease_seconds": 60,
                    "holder": None,
                    "strict": False,
                    "ticket": None,
                    "queue_client": None,
                    "new_lease_id": taken,
                    "wait_seconds": None,
                    "session": None,
                    "priority": 0,
                    "fairness_key": None,
                },
            )
    finally:
        attacking.close()


def test_a_forged_hand_off_changes_nothing(roles: Roles) -> None:
    """A notification on the victim's channel that grants a lease the victim did not name (an
    attacker who learnt the channel) does not let the body run; the real hand-off still does."""
    with _conn(roles.owner) as owner:
        create(owner, "forge", 1)
        held = acquire(owner, ["forge"], lease_seconds=60)
    victim = pgslots.Client(roles.victim)
    entered = threading.Event()

    def wait_for_slot() -> None:
        with concurrency("forge", timeout_seconds=20, lease_duration=60, client=victim):
            entered.set()

    waiter = threading.Thread(target=wait_for_slot)
    try:
        waiter.start()
        with _conn(roles.owner) as owner:
            deadline = time.monotonic() + 10
            while not _waiter_rows(owner, "forge") and time.monotonic() < deadline:
                time.sleep(0.02)
            [place] = _waiter_rows(owner, "forge")
            with _conn(roles.attacker) as attacker:
                channel = f"pgslots:{place['client_id']}"
                for forged in (
                    grant_note(place["id"], uuid.uuid4(), 99999, time.time() + 300, 300),
                    grant_note(place["id"], "not-a-uuid", 1, time.time() + 300, 300),
                    json.dumps({"grant": {"ticket": place["id"], "fencing_token": 77}}),  # no lease id
                    f"{place['id']}:{uuid.uuid4()}:99999:{time.time() + 300}:300",  # not JSON
                ):
                    one(attacker, "SELECT pg_notify(%s, %s) IS NULL AS sent", [channel, forged])
            assert not entered.wait(1.0), "the body ran on a forged grant"
            assert _waiter_rows(owner, "forge") != []  # still queued: it asked again and was refused
            one(owner, "SELECT pgslots.release(%s)", [held["lease_id"]])
            assert entered.wait(10), "the real hand-off did not reach the waiter"
        waiter.join(10)
        with _conn(roles.owner) as owner:
            check(owner)
    finally:
        waiter.join(20)
        victim.close()


# ---- blocked calls: an open transaction, a held advisory lock -------------------------------------


def _wait_until(predicate: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def _leases_of(owner_dsn: str, name: str) -> int:
    with _conn(owner_dsn) as owner:
        return int(status(owner, name)["leases"])


def _blocked_calls_stay_within_bounds(roles: Roles, name: str, block: Any, unblock: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The victim holds one slot of two; the attacker blocks the limit; the body's exit is held up at
    most RELEASE_WAIT_SECONDS (the release goes on in the background), an acquire with a timeout
    fails in time with the usual error, and once the attacker lets go the release completes."""
    victim = pgslots.Client(roles.victim)
    attacker = psycopg.connect(roles.attacker)
    try:
        with concurrency(name, lease_duration=60, client=victim):
            block(attacker)
            started = time.monotonic()
            with (
                pytest.raises(pgslots.AcquireConcurrencySlotTimeoutError, match="timed out after 2 second"),
                concurrency(name, occupy=2, timeout_seconds=2, client=victim),
            ):
                pytest.fail("granted while the limit was full")
            assert time.monotonic() - started < 2 + 1.5
            with caplog.at_level(logging.WARNING, logger="pgslots"):
                exiting = time.monotonic()
        assert time.monotonic() - exiting < RELEASE_WAIT_SECONDS + 1.5
        assert "retrying in the background" in caplog.text
        assert _leases_of(roles.owner, name) == 1  # the release could not run yet, and changed nothing
        unblock(attacker)
        assert _wait_until(lambda: _leases_of(roles.owner, name) == 0, 15), "the background release never finished"
        with concurrency(name, occupy=2, timeout_seconds=5, client=victim):
            pass
        check(roles.owner)
    finally:
        attacker.close()
        victim.close()


def test_an_open_transaction_delays_a_limit_only_within_the_timeouts(roles: Roles, caplog: pytest.LogCaptureFixture) -> None:
    """Case 5: BEGIN; SELECT pgslots.acquire(...) and never commit (the row lock stays held)."""
    with _conn(roles.owner) as owner:
        create(owner, "open", 2)

    def block(attacker: Conn) -> None:
        attacker.execute("SELECT * FROM pgslots.acquire('{open}', 1, 60)")  # granted, never committed

    _blocked_calls_stay_within_bounds(roles, "open", block, lambda attacker: attacker.rollback(), caplog)


def test_a_held_queue_lock_delays_a_limit_only_within_the_timeouts(roles: Roles, caplog: pytest.LogCaptureFixture) -> None:
    """Case 6: the attacker holds the limit's advisory queue lock (its id is in status)."""
    with _conn(roles.owner) as owner:
        create(owner, "advisory", 2)

    def block(attacker: Conn) -> None:
        attacker.autocommit = True
        limit_id = one(attacker, "SELECT id FROM pgslots.status WHERE name = 'advisory'")["id"]
        attacker.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", [QUEUE_LOCK_CLASS, str(limit_id)])

    def unblock(attacker: Conn) -> None:
        attacker.execute("SELECT pg_advisory_unlock_all()")

    _blocked_calls_stay_within_bounds(roles, "advisory", block, unblock, caplog)


REVOKE_ADVISORY_LOCKS = """
REVOKE EXECUTE ON FUNCTION pg_advisory_lock(bigint), pg_advisory_lock(integer, integer),
    pg_advisory_lock_shared(bigint), pg_advisory_lock_shared(integer, integer),
    pg_advisory_xact_lock(bigint), pg_advisory_xact_lock(integer, integer),
    pg_advisory_xact_lock_shared(bigint), pg_advisory_xact_lock_shared(integer, integer),
    pg_try_advisory_lock(bigint), pg_try_advisory_lock(integer, integer) FROM PUBLIC
"""


def test_with_advisory_locks_revoked_as_security_md_says_pgslots_still_queues_and_hands_off(roles: Roles) -> None:
    """The statement SECURITY.md gives operators: plain roles can no longer take a queue lock,
    while pgslots' functions (running as the schema owner) queue, release and hand off as before."""
    with _conn(roles.owner) as owner:
        create(owner, "revoked", 1)
        owner.execute(REVOKE_ADVISORY_LOCKS)
    with _conn(roles.victim) as victim, _conn(roles.attacker) as attacker:
        limit_id = one(attacker, "SELECT id FROM pgslots.status WHERE name = 'revoked'")["id"]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            attacker.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", [QUEUE_LOCK_CLASS, str(limit_id)])
        held = acquire(attacker, ["revoked"], lease_seconds=60)
        client, named = uuid.uuid4(), uuid.uuid4()
        queued = acquire(victim, ["revoked"], lease_seconds=60, queue_client=client, new_lease_id=named)
        assert not queued["granted"] and queued["waiter"] is not None
        assert one(attacker, "SELECT pgslots.release(%s) AS r", [held["lease_id"]])["r"] is True
        again = acquire(victim, ["revoked"], lease_seconds=60, ticket=queued["waiter"], queue_client=client, new_lease_id=named)
        assert again["granted"] and again["lease_id"] == named  # handed over by the release
    check(roles.owner)


def test_wait_seconds_bounds_sql_calls_and_changes_nothing(roles: Roles) -> None:
    """The SQL API: every call that may wait for another session's lock takes wait_seconds; past it
    the call fails with SQLSTATE 55P03 and leaves everything as it was."""
    with _conn(roles.owner) as owner, _conn(roles.victim) as victim:
        create(owner, "bounded", 2)
        create(owner, "paced", 2, decay=1)
        lease = acquire(victim, ["bounded"], lease_seconds=60)["lease_id"]
        client = uuid.uuid4()
        attacker = psycopg.connect(roles.attacker)
        try:
            attacker.execute("SELECT * FROM pgslots.acquire('{bounded}', 1, 60)")
            attacker.execute("SELECT * FROM pgslots.rate_limit('{paced}')")
            before = snapshot(owner)
            calls = [
                ("SELECT * FROM pgslots.acquire('{bounded}', 1, 60, wait_seconds => 0.3)", []),
                ("SELECT * FROM pgslots.acquire('{bounded}', 1, 60, queue_client => %s, wait_seconds => 0.3)", [client]),
                ("SELECT * FROM pgslots.acquire('{bounded,paced}', 1, 60, wait_seconds => 0.3)", []),
                ("SELECT * FROM pgslots.rate_limit('{paced}', wait_seconds => 0.3)", []),
                ("SELECT pgslots.release(%s, wait_seconds => 0.3)", [lease]),
                ("SELECT pgslots.release(%s, false, 0.3)", [lease]),
            ]
            for query, params in calls:
                started = time.monotonic()
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    victim.execute(query, params)
                assert time.monotonic() - started < 1.5, query
            assert snapshot(owner) == before
            # The bound is the call's own: the session's lock_timeout is as it was afterwards.
            assert one(victim, "SELECT current_setting('lock_timeout') AS t")["t"] == "0"
            with pytest.raises(psycopg.Error, match="wait_seconds must be"):
                victim.execute("SELECT * FROM pgslots.acquire('{bounded}', 1, 60, wait_seconds => -1)")
        finally:
            attacker.close()
        assert one(victim, "SELECT pgslots.release(%s, wait_seconds => 0.3) AS r", [lease])["r"] is True
        with victim.transaction():
            acquire(victim, ["bounded"], lease_seconds=60, wait_seconds=5)
            assert one(victim, "SELECT current_setting('lock_timeout') AS t")["t"] == "0"
        check(owner)


def test_a_bad_lock_bound_is_refused_and_the_hot_paths_helpers_are_not_callable(roles: Roles) -> None:
    """release sets its lock bound through inlined helpers: a negative, NaN or infinite bound is
    refused (PS012) by each plain role, changing nothing, a huge one is clamped, the session's
    lock_timeout is as it was after every call; and the helpers themselves, which write lease rows
    and settings, cannot be called by a plain role."""
    with _conn(roles.owner) as owner, _conn(roles.victim) as victim, _conn(roles.attacker) as attacker:
        create(owner, "bound", 3)
        lease = acquire(victim, ["bound"], lease_seconds=60)["lease_id"]
        for conn in (victim, attacker):
            before = snapshot(owner)
            for bad in (-1.0, float("nan"), float("inf"), float("-inf")):
                for query in ("SELECT pgslots.release(%s, false, %s)", "SELECT pgslots.release(%s, true, %s)"):
                    with pytest.raises(psycopg.Error) as caught:
                        conn.execute(query, [lease, bad])
                    assert caught.value.sqlstate == "PS012" and "wait_seconds must be" in str(caught.value)
                with pytest.raises(psycopg.Error) as caught:
                    conn.execute("SELECT * FROM pgslots.acquire('{bound}', 1, 60, wait_seconds => %s)", [bad])
                assert caught.value.sqlstate == "PS012"
            assert snapshot(owner) == before
            assert one(conn, "SELECT current_setting('lock_timeout') AS t")["t"] == "0"
            made_up = uuid.uuid4()
            assert one(conn, "SELECT pgslots.release(%s, false, 1e300) AS r", [made_up])["r"] is False
            assert one(conn, "SELECT current_setting('lock_timeout') AS t")["t"] == "0"
        assert one(victim, "SELECT pgslots.release(%s, false, 1e300) AS r", [lease])["r"] is True
        # Inside a transaction: a durable release puts the session's lock_timeout back at once; one
        # that is not (its own transaction, by contract) leaves its bound until that transaction ends.
        with victim.transaction():
            assert one(victim, "SELECT pgslots.release(%s, true, 0.5) AS r", [uuid.uuid4()])["r"] is False
            assert one(victim, "SELECT current_setting('lock_timeout') AS t")["t"] == "0"
            assert one(victim, "SELECT pgslots.release(%s, false, 0.5) AS r", [uuid.uuid4()])["r"] is False
            assert one(victim, "SELECT current_setting('lock_timeout') AS t")["t"] == "500ms"
        assert one(victim, "SELECT current_setting('lock_timeout') AS t")["t"] == "0"
        decision = "ROW(true, gen_random_uuid(), 1, now() + interval '1 hour', NULL, '{}', NULL, NULL, %s)::pgslots.decision"
        limit_id = status(owner, "bound")["id"]
        for query, params in (
            (f"SELECT pgslots._write_lease({decision}, 1, 60, NULL, NULL)", [[limit_id]]),
            ("SELECT pgslots._set_lock_timeout(1, 'x')", None),
            ("SELECT pgslots._reset_lock_timeout('1ms')", None),
            ("SELECT pgslots._lease_id_in_use(gen_random_uuid())", None),
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                attacker.execute(query, params)
        assert status(owner, "bound")["leases"] == 0
        check(owner)


# ---- all of it at once, under load ----------------------------------------------------------------

LIMIT = 2
SECONDS = 4.0


def _count_body(holding: Any, peak: Any) -> None:
    with holding.get_lock():
        holding.value += 1
        peak.value = max(peak.value, holding.value)


def _victim(dsn: str, leaked: Any, holding: Any, peak: Any, done: Any, deadline: float) -> None:
    """Waits for the limit through the library, counting its bodies outside the database."""
    rng = random.Random()
    client = pgslots.Client(dsn)
    try:
        with concurrency("shared", timeout_seconds=30, lease_duration=60, client=client):
            pass  # starts the engine, whose channel the attacker then learns
        leaked.put(str(client._connections.engine.session_id))
        while time.time() < deadline:
            with concurrency("shared", timeout_seconds=30, lease_duration=60, client=client):
                _count_body(holding, peak)
                time.sleep(rng.uniform(0.002, 0.02))
                with holding.get_lock():
                    holding.value -= 1
            with done.get_lock():
                done.value += 1
    finally:
        client.close()


def _attacker(dsn: str, leaked: Any, holding: Any, peak: Any, done: Any, deadline: float) -> None:
    """Every trick of cases 1-4 and forged hand-offs, in a loop; whatever it is granted counts as a body."""
    victims: list[str] = []
    me = uuid.uuid4()
    with psycopg.connect(dsn, autocommit=True) as conn:

        def attempt(lease: uuid.UUID | None = None, **kw: Any) -> int | None:
            """One acquire as the attacker likes it; returns its ticket when it stays queued (a lease given)."""
            stay, lease = lease is not None, lease or uuid.uuid4()
            got = acquire(conn, ["shared"], lease_seconds=60, queue_client=me, new_lease_id=lease, **kw)
            if got["granted"]:
                _count_body(holding, peak)
                time.sleep(0.002)
                with holding.get_lock():
                    holding.value -= 1
            if stay and not got["granted"] and got["waiter"] is not None:
                return int(got["waiter"])  # (no waiter: room appeared as it looked, it was told to ask again)
            leave(got["waiter"], lease)
            return None

        def leave(ticket: int | None, lease: uuid.UUID) -> None:
            if ticket is not None:
                conn.execute("SELECT pgslots.leave_queue(%s, %s)", [ticket, me])
            conn.execute("SELECT pgslots.release(%s)", [lease])  # granted, or handed over meanwhile

        mine = 1
        while time.time() < deadline:
            while True:
                try:
                    victims.append(leaked.get_nowait())
                except queue.Empty:
                    break
            kept = uuid.uuid4()
            queued = attempt(kept)
            mine = queued or mine
            near = list(range(max(1, mine - 6), mine + 3))
            for t in near:
                attempt(ticket=t)
            attempt(ticket=-1)
            for client in [str(me), *victims]:
                conn.execute("SELECT pgslots.heartbeat(%s, %s)", [client, near])
                for t in near:
                    conn.execute("SELECT pgslots.leave_queue(%s, %s)", [t, client])
                    forged = grant_note(t, uuid.uuid4(), 2**40, time.time() + 300, 300)
                    conn.execute("SELECT pg_notify(%s, %s)", [f"pgslots:{client}", forged])
            leave(queued, kept)
            time.sleep(0.01)


def test_a_hostile_role_under_load_never_over_admits(roles: Roles) -> None:
    """4 victim processes of one role wait on a limit of 2 through the library; 2 attacker processes
    of another role hijack, jump, plant, remove and forge all the while. An independent count of
    bodies never exceeds the limit, every victim finishes without an error, nothing leaks."""
    with _conn(roles.owner) as owner:
        create(owner, "shared", LIMIT)
    ctx = mp.get_context("fork")
    leaked = ctx.Queue()
    holding, peak, done = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
    deadline = time.time() + SECONDS
    procs = [ctx.Process(target=_victim, args=(roles.victim, leaked, holding, peak, done, deadline)) for _ in range(4)]
    procs += [ctx.Process(target=_attacker, args=(roles.attacker, leaked, holding, peak, done, deadline)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(SECONDS + 60)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    assert peak.value <= LIMIT, f"{peak.value} bodies at once on a limit of {LIMIT}"
    assert done.value >= 8, f"the victims finished only {done.value} bodies"
    check(roles.owner)
    with _conn(roles.owner) as owner:
        assert _wait_until(lambda: status(owner, "shared")["leases"] == 0, 10)


# A real interpreter (multiprocessing's children leave with os._exit, skipping what runs at exit).
HOLD_THEN_EXIT = """
import sys
import pgslots
from pgslots.sync import concurrency

client = pgslots.Client(sys.argv[1])
with concurrency("leaving", lease_duration=60, client=client):
    print("holding", flush=True)
    sys.stdin.readline()
print("body done", flush=True)  # the release could not finish in time: it is pending in the background
# ... and the interpreter exits here, without closing the client.
"""


def test_a_release_blocked_at_exit_is_finished_before_the_interpreter_exits(roles: Roles) -> None:
    """The release at the end of the body gives up after 2 s (another session holds the limit's
    row); the process then exits normally, and before it does, the background release goes
    through once the lock is let go: a clean exit leaves no slot held."""
    with _conn(roles.owner) as owner:
        create(owner, "leaving", 1)
    child = subprocess.Popen([sys.executable, "-c", HOLD_THEN_EXIT, roles.victim], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    attacker = psycopg.connect(roles.attacker)
    try:
        assert child.stdout.readline().strip() == "holding"
        refused = one(attacker, "SELECT * FROM pgslots.acquire('{leaving}', 1, 60)")  # locks the row, never commits
        assert not refused["granted"]
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "body done"
        time.sleep(1.0)
        assert child.poll() is None  # still finishing its release
        attacker.rollback()
        assert child.wait(15) == 0
        assert _leases_of(roles.owner, "leaving") == 0  # released before the process was gone
    finally:
        attacker.close()
        if child.poll() is None:
            child.kill()
            child.wait(5)
