"""acquire_each and release_each: many requests in one call and one transaction, decided in order
as if sent one after another (all-or-nothing per request, no request overtaking one queued before
it), each grant with its own lease and fencing token; their bounds and hostile input, as two plain
roles."""

from __future__ import annotations

import json
import uuid
from typing import Any

import invariants
import psycopg
from psycopg.types.json import Jsonb

from sqlhelp import Roles, acquire, create, expect_error, one, rows

Conn = psycopg.Connection[Any]


def each(conn: Conn, requests: list[dict[str, Any]], wait_seconds: float | None = None) -> list[dict[str, Any]]:
    return rows(conn, "SELECT * FROM pgslots.acquire_each(%s::jsonb, %s)", [json.dumps(requests), wait_seconds])


def test_requests_are_decided_in_order_each_with_its_own_lease(sql: Conn) -> None:
    create(sql, "api", 3)
    create(sql, "db", 10)
    got = each(sql, [{"names": ["api", "db"], "lease_seconds": 60} for _ in range(4)] + [{"names": ["db"], "slots": 2}])
    assert [r["granted"] for r in got] == [True, True, True, False, True]
    assert got[3]["blocked_by"] == ["api"] and got[3]["retry_after"] is not None
    leases = [r["lease_id"] for r in got if r["granted"]]
    tokens = [r["fencing_token"] for r in got if r["granted"]]
    assert len(set(leases)) == 4 and tokens == sorted(tokens) and len(set(tokens)) == 4
    assert one(sql, "SELECT leased_slots FROM pgslots.limits WHERE name = 'db'")["leased_slots"] == 5
    released = rows(sql, "SELECT * FROM pgslots.release_each(%s, NULL)", [[*leases[:2], uuid.uuid4()]])
    assert [r["released"] for r in released] == [True, True, False]
    assert [r["lease_id"] for r in released][:2] == leases[:2]
    assert one(sql, "SELECT leased_slots FROM pgslots.limits WHERE name = 'api'")["leased_slots"] == 1
    invariants.check(sql)


def test_a_later_request_never_overtakes_one_queued_before_it(sql: Conn) -> None:
    create(sql, "two", 2)
    held = acquire(sql, ["two"], lease_seconds=60)
    queue = str(uuid.uuid4())
    got = each(
        sql,
        [
            {"names": ["two"], "slots": 2, "queue_client": queue, "new_lease_id": str(uuid.uuid4())},  # needs both: queued
            {"names": ["two"], "slots": 1, "queue_client": queue, "new_lease_id": str(uuid.uuid4())},  # would fit, but behind it
        ],
    )
    assert [r["granted"] for r in got] == [False, False]
    assert got[0]["waiter"] is not None and got[1]["waiter"] is not None and got[0]["waiter"] < got[1]["waiter"]
    # The holder's release hands the two slots to the head of the queue, the big request.
    assert one(sql, "SELECT pgslots.release(%s) AS r", [held["lease_id"]])["r"] is True
    assert one(sql, "SELECT count(*) AS n FROM pgslots.leases WHERE slots = 2")["n"] == 1
    invariants.check(sql)


def _typed(request: dict[str, Any]) -> dict[str, Any]:
    """A batch's JSON request as acquire's arguments."""
    ids = {"queue_client", "new_lease_id", "session"}
    return {k: uuid.UUID(v) if k in ids else Jsonb(v) if k == "holder" else v for k, v in request.items()}


def _queued(sql: Conn, name: str) -> list[Any]:
    """A limit's queue and refusal counts, without what differs from one limit to another."""
    return [
        rows(
            sql,
            "SELECT w.slots, w.lease_id, w.lease_seconds, w.holder, w.session_id, w.client_id, w.refused"
            " FROM pgslots.waiters w JOIN pgslots.limits l ON l.id = w.limit_id WHERE l.name = %s ORDER BY w.id",
            [name],
        ),
        rows(
            sql,
            "SELECT r.denied_slots, r.refusals_total FROM pgslots.refusals r JOIN pgslots.limits l ON l.id = r.limit_id WHERE l.name = %s",
            [name],
        ),
    ]


def test_a_run_of_refusals_on_one_limit_is_decided_as_acquire_decides_each(sql: Conn) -> None:
    # After a plain request on a full limit is refused and queued, the batch's next plain requests
    # on it take the queued refusal stage straight away: the answers and the queue must be those of
    # acquire called for each in turn (on a twin limit).
    session = str(uuid.uuid4())
    one(sql, "SELECT pgslots.keep_alive(%s)", [session])
    queue = str(uuid.uuid4())
    requests: list[dict[str, Any]] = [
        {"slots": 2, "holder": {"job": "a"}},  # refused: 1 slot free, queued
        {"slots": 1, "holder": {"job": "b"}},  # 1 free, but behind the queue: refused
        {"slots": 3, "lease_seconds": 90},  # refused
        {"slots": 1, "session": session},  # refused, with a session
    ]
    answers = {}
    for tag, batch in (("twin", False), ("run", True)):
        create(sql, tag, 3)
        acquire(sql, [tag], 2, lease_seconds=60)
        asked: list[dict[str, Any]] = [{"names": [tag], "queue_client": queue, "new_lease_id": str(uuid.uuid4()), **r} for r in requests]
        got = each(sql, asked) if batch else [acquire(sql, **{"lease_seconds": 300, **_typed(r)}) for r in asked]
        assert [g["granted"] for g in got] == [False] * 4
        tickets = [g["waiter"] for g in got]
        assert tickets == sorted(tickets) and None not in tickets
        queued, counted = _queued(sql, tag)
        assert [w["lease_id"] for w in queued] == [uuid.UUID(r["new_lease_id"]) for r in asked]
        answers[tag] = (
            [([tag] == g["blocked_by"], g["missing"], g["liveness_seconds"], round(g["retry_after"], 1)) for g in got],
            [{**w, "lease_id": None} for w in queued],
            counted,
        )
    assert answers["run"] == answers["twin"]
    invariants.check(sql)


def test_a_run_of_refusals_still_checks_each_request(roles: Roles) -> None:
    # A request in a run is checked as acquire checks it: another role's session, more slots than
    # the limit, a lease too short: the whole batch fails with acquire's error, and nothing stays.
    with psycopg.connect(roles.owner, autocommit=True) as owner:
        create(owner, "run", 2)
    with psycopg.connect(roles.victim, autocommit=True) as victim:
        theirs = str(uuid.uuid4())
        one(victim, "SELECT pgslots.keep_alive(%s)", [theirs])
        assert each(victim, [{"names": ["run"], "slots": 2, "lease_seconds": 60}])[0]["granted"]
    with psycopg.connect(roles.owner, autocommit=True) as owner, psycopg.connect(roles.attacker, autocommit=True) as attacker:
        mine = str(uuid.uuid4())
        one(attacker, "SELECT pgslots.keep_alive(%s)", [mine])
        first = {"names": ["run"], "queue_client": str(uuid.uuid4()), "session": mine}
        for bad, sqlstate in (({"session": theirs}, "PS014"), ({"slots": 3}, "PS006"), ({"lease_seconds": 1}, "PS007")):
            later = {**first, "new_lease_id": str(uuid.uuid4()), **bad}
            refused(attacker, owner, sqlstate, "SELECT * FROM pgslots.acquire_each(%s::jsonb)", [json.dumps([first, later])])
        invariants.check(owner)


def _released_with(sql: Conn, tag: str, together: bool) -> dict[str, Any]:
    """Two single-limit leases and a two-limit one on a full limit of 3, two requests queued behind
    them (2 slots, then 1); the three released with release_each (an id named twice, one of
    nothing) or one release after another. What the queue and the counts show after."""
    create(sql, f"{tag}_pool", 3)
    create(sql, f"{tag}_other", 5)
    a, b = (acquire(sql, [f"{tag}_pool"], lease_seconds=60)["lease_id"] for _ in range(2))
    m = acquire(sql, [f"{tag}_pool", f"{tag}_other"], lease_seconds=60)["lease_id"]
    queue = str(uuid.uuid4())
    named = [str(uuid.uuid4()), str(uuid.uuid4())]
    for slots, lease_id in zip((2, 1), named, strict=True):
        assert not acquire(sql, [f"{tag}_pool"], slots, lease_seconds=60, queue_client=queue, new_lease_id=lease_id)["granted"]
    if together:
        # The two-limit lease first (released as release does it), then the two on one limit
        # together: their two slots must reach the queue in that call.
        assert [r["released"] for r in rows(sql, "SELECT * FROM pgslots.release_each(%s)", [[m]])] == [True]
        assert one(sql, "SELECT count(*) AS n FROM pgslots.leases WHERE id = ANY (%s)", [named])["n"] == 0
        got = rows(sql, "SELECT * FROM pgslots.release_each(%s)", [[a, a, uuid.uuid4(), b]])
        assert [r["released"] for r in got] == [True, False, False, True]
        assert [r["lease_id"] for r in got][:2] == [a, a]
    else:
        assert [one(sql, "SELECT pgslots.release(%s) AS r", [x])["r"] for x in (m, a, b)] == [True, True, True]
    invariants.check(sql)
    return {
        "pool": one(sql, "SELECT leased_slots, grants_total FROM pgslots.limits WHERE name = %s", [f"{tag}_pool"]),
        "other": one(sql, "SELECT leased_slots FROM pgslots.limits WHERE name = %s", [f"{tag}_other"])["leased_slots"],
        "handed": [one(sql, "SELECT slots FROM pgslots.leases WHERE id = %s", [x]) for x in named],
        "queued": one(
            sql, "SELECT count(*) AS n FROM pgslots.waiters w JOIN pgslots.limits l ON l.id = w.limit_id WHERE l.name = %s", [f"{tag}_pool"]
        )["n"],
    }


def test_leases_released_together_give_the_queue_what_releases_one_by_one_give(sql: Conn) -> None:
    # release_each gives back the leases of one limit together, with one hand-off: the queue must
    # be served exactly as by one release after another (the head's 2 slots first, then 1).
    together = _released_with(sql, "batch", together=True)
    one_by_one = _released_with(sql, "single", together=False)
    assert together == one_by_one
    assert together["handed"] == [{"slots": 2}, {"slots": 1}] and together["queued"] == 0
    assert together["pool"]["leased_slots"] == 3 and together["other"] == 0


def refused(conn: Conn, owner: Conn, sqlstate: str, query: str, params: Any = None) -> str:
    """A call by a plain role that must fail with `sqlstate` and change nothing (seen by the owner)."""
    return expect_error(conn, sqlstate, query, params, seen_by=owner)


def test_bounds_and_hostile_input_change_nothing(roles: Roles) -> None:
    with psycopg.connect(roles.owner, autocommit=True) as owner:
        create(owner, "api", 2)
    with psycopg.connect(roles.owner, autocommit=True) as owner, psycopg.connect(roles.attacker, autocommit=True) as attacker:
        for bad in ("null", '{"names": ["api"]}', '"api"', json.dumps([{"names": ["api"]}] * 1001), '[{"names": "api"}]', "[3]"):
            message = refused(attacker, owner, "PS002", "SELECT * FROM pgslots.acquire_each(%s::jsonb)", [bad])
            assert "request" in message
        refused(attacker, owner, "PS002", "SELECT * FROM pgslots.release_each(%s)", [[uuid.uuid4()] * 1001])
        refused(attacker, owner, "PS002", "SELECT * FROM pgslots.release_each(NULL)")
        # One bad request fails the whole batch, and nothing of it stays.
        one_bad = json.dumps([{"names": ["api"]}, {"names": ["a/b"]}])
        refused(attacker, owner, "PS001", "SELECT * FROM pgslots.acquire_each(%s::jsonb)", [one_bad])
        mine = each(attacker, [{"names": ["api"], "lease_seconds": 60}])
        assert mine[0]["granted"]
    with psycopg.connect(roles.victim, autocommit=True) as victim:
        # Another role's batch cannot release a lease it does not know; with its id it can, as release can.
        assert [r["released"] for r in rows(victim, "SELECT * FROM pgslots.release_each(%s)", [[uuid.uuid4()]])] == [False]
        got = each(victim, [{"names": ["api"], "lease_seconds": 60}, {"names": ["api"], "lease_seconds": 60}])
        assert [r["granted"] for r in got] == [True, False]  # the attacker holds one of the two slots
    with psycopg.connect(roles.owner, autocommit=True) as owner:
        invariants.check(owner)


def _waiting_for_advisory_lock(admin: Conn, pid: int) -> bool:
    found = one(admin, "SELECT count(*) AS n FROM pg_locks WHERE pid = %s AND locktype = 'advisory' AND NOT granted", [pid])
    return bool(found["n"])


def test_a_batch_of_acquires_and_one_of_releases_never_deadlock(fresh_dsn: str) -> None:
    """A batch holds what each of its requests took until it commits: a refusal's queue lock (held
    shared) must not be followed by a row lock that a release holds while it waits for that queue
    lock. Here the release takes the limit's row and waits for the queue lock behind the batch; the
    batch then reaches a request that needs the row. Each batch locks its limits' rows first, in
    id order, so one waits for the other instead of both waiting for the deadlock detector."""
    import threading
    import time

    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        limit_id = create(admin, "one", 1)
        held = acquire(admin, ["one"], lease_seconds=60)
        client = uuid.uuid4()
        ticket = acquire(admin, ["one"], lease_seconds=60, queue_client=client)["waiter"]
        assert held["granted"] and ticket is not None
        outcomes: dict[str, Any] = {}

        def run(name: str, query: str, params: list[Any]) -> None:
            try:
                with psycopg.connect(fresh_dsn, autocommit=True) as conn:
                    outcomes[name + "_pid"] = conn.info.backend_pid
                    outcomes[name] = conn.execute(query, params).fetchall()
            except psycopg.Error as exc:
                outcomes[name] = exc

        requests = [
            {"names": ["one"], "queue_client": str(uuid.uuid4()), "new_lease_id": str(uuid.uuid4())},  # refused: queued
            {"names": ["one"], "ticket": ticket, "queue_client": str(client)},  # asks again: the full decision
        ]
        with psycopg.connect(fresh_dsn) as blocker:  # holds the limit's queue lock until told to let go
            blocker.execute("SELECT pg_advisory_xact_lock(1885827953, hashtext(%s::text))", [limit_id])
            batch = threading.Thread(target=run, args=("batch", "SELECT * FROM pgslots.acquire_each(%s::jsonb)", [json.dumps(requests)]))
            batch.start()
            deadline = time.monotonic() + 10
            while not (outcomes.get("batch_pid") and _waiting_for_advisory_lock(admin, outcomes["batch_pid"])):
                assert time.monotonic() < deadline and batch.is_alive(), outcomes
                time.sleep(0.02)
            release = threading.Thread(target=run, args=("release", "SELECT * FROM pgslots.release_each(%s)", [[held["lease_id"]]]))
            release.start()
            deadline = time.monotonic() + 10
            while not (
                outcomes.get("release_pid")
                and (
                    not release.is_alive()
                    or one(admin, "SELECT count(*) AS n FROM pg_locks WHERE pid = %s AND NOT granted", [outcomes["release_pid"]])["n"]
                )
            ):
                assert time.monotonic() < deadline, outcomes
                time.sleep(0.02)
            time.sleep(0.2)
            blocker.rollback()
        batch.join(15)
        release.join(15)
        assert not isinstance(outcomes["batch"], psycopg.Error), outcomes["batch"]
        assert not isinstance(outcomes["release"], psycopg.Error), outcomes["release"]
        assert [r[0] for r in outcomes["release"]] == [held["lease_id"]]
        invariants.check(admin)


def test_a_deadlock_is_an_answer_to_try_again_not_an_outage(fresh_dsn: str) -> None:
    """A call the server rolled back to break a deadlock (or a serialization failure) changed
    nothing and may be sent again: it is not a lost connection, so it never counts towards failing
    open, and its message says so."""
    import threading

    from pgslots._translate import translate
    from pgslots.errors import DatabaseUnavailableError

    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        admin.execute("CREATE TABLE pair (id int PRIMARY KEY)")
        admin.execute("INSERT INTO pair VALUES (1), (2)")
    caught: list[psycopg.Error] = []
    both = threading.Barrier(2)

    def lock(first: int, second: int) -> None:
        with psycopg.connect(fresh_dsn) as conn:
            try:
                conn.execute("SELECT 1 FROM pair WHERE id = %s FOR UPDATE", [first])
                both.wait(10)
                conn.execute("SELECT 1 FROM pair WHERE id = %s FOR UPDATE", [second])
            except psycopg.Error as exc:
                caught.append(exc)

    threads = [threading.Thread(target=lock, args=order) for order in ((1, 2), (2, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(caught) == 1 and caught[0].sqlstate == "40P01", caught
    mapped = translate(caught[0])
    assert isinstance(mapped, DatabaseUnavailableError) and mapped.answered
    assert str(mapped).startswith("The database rolled this call back (deadlock detected)") and "try again" in str(mapped)
