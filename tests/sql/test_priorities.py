"""Priorities, aging and fairness keys in the queue: in SQL (the order a release hands slots over)
and with real waiting processes."""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid
from typing import Any

import invariants
import psycopg
import pytest

from sqlhelp import acquire, create, expect_error, one, rate_limit, rows, status

Conn = psycopg.Connection[Any]


def queue(conn: Conn, name: str, priority: int = 0, key: str | None = None, client: uuid.UUID | None = None) -> uuid.UUID:
    """Queues one request (which names its lease, so a release hands it over); returns the lease id."""
    lease = uuid.uuid4()
    got = acquire(conn, [name], queue_client=client or uuid.uuid4(), new_lease_id=lease, priority=priority, fairness_key=key)
    assert not got["granted"] and got["waiter"] is not None
    return lease


def served_order(conn: Conn, first: Any, leases: dict[uuid.UUID, str]) -> list[str]:
    """Releases the held lease, then each lease handed over in turn; returns the labels in grant order."""
    order: list[str] = []
    current = first
    while True:
        one(conn, "SELECT pgslots.release(%s) AS r", [current])
        granted = [r["id"] for r in rows(conn, "SELECT DISTINCT id FROM pgslots.leases")]
        if not granted:
            return order
        assert len(granted) == 1, "a limit of one slot handed over one lease"
        current = granted[0]
        order.append(leases[current])


@pytest.fixture
def long_waits(sql: Conn) -> Conn:
    """Waiters keep their place without heartbeats for the length of a test; priorities up to 100."""
    sql.execute("UPDATE pgslots.settings SET waiter_ttl_seconds = 600, max_priority = 100")
    return sql


def test_higher_priority_is_served_first_then_first_come(long_waits: Conn) -> None:
    sql = long_waits
    create(sql, "gpu", 1)
    held = acquire(sql, ["gpu"])["lease_id"]
    labels = {}
    for label, priority in [("p0-a", 0), ("p5-a", 5), ("m5", -5), ("p5-b", 5), ("p0-b", 0), ("p100", 100)]:
        labels[queue(sql, "gpu", priority)] = label
    assert served_order(sql, held, labels) == ["p100", "p5-a", "p5-b", "p0-a", "p0-b", "m5"]
    invariants.check(sql)


def test_a_caller_that_does_not_queue_never_overtakes_those_served_before_it(long_waits: Conn) -> None:
    sql = long_waits
    create(sql, "gpu", 2)
    held = acquire(sql, ["gpu"])["lease_id"]
    acquire(sql, ["gpu"])
    queue(sql, "gpu", priority=5)
    one(sql, "SELECT pgslots.release(%s) AS r", [held])  # handed to the waiter
    queue(sql, "gpu", priority=5)
    assert not acquire(sql, ["gpu"], priority=5)["granted"], "behind an equal priority waiter"
    assert not acquire(sql, ["gpu"])["granted"]
    assert status(sql, "gpu")["waiters"] == 1


def test_a_high_priority_caller_goes_before_lower_waiters(long_waits: Conn) -> None:
    sql = long_waits
    create(sql, "gpu", 2)
    acquire(sql, ["gpu"])
    acquire(sql, ["gpu"], slots=2, queue_client=uuid.uuid4(), new_lease_id=uuid.uuid4())  # waits for 2
    assert not acquire(sql, ["gpu"])["granted"], "an equal priority caller comes after the waiter"
    assert acquire(sql, ["gpu"], priority=5)["granted"], "a higher one is served before it"
    invariants.check(sql)


def test_aging_lifts_a_waiter_one_level_per_aging_period(long_waits: Conn) -> None:
    sql = long_waits
    sql.execute("UPDATE pgslots.settings SET priority_aging_seconds = 10")
    create(sql, "gpu", 1)
    held = acquire(sql, ["gpu"])["lease_id"]
    labels = {queue(sql, "gpu", priority=-2): "old low"}
    sql.execute("UPDATE pgslots.settings SET clock_offset = clock_offset + interval '25 seconds'")
    labels[queue(sql, "gpu", priority=0)] = "new normal"
    labels[queue(sql, "gpu", priority=1)] = "new high"
    # 25 s at 10 s per level: -2 + 2 = 0, level with "new normal" and before it (it came first);
    # "new high" at 1 is still ahead.
    assert served_order(sql, held, labels) == ["new high", "old low", "new normal"]


def test_no_aging_when_it_is_off(long_waits: Conn) -> None:
    sql = long_waits
    sql.execute("UPDATE pgslots.settings SET priority_aging_seconds = 0")
    create(sql, "gpu", 1)
    held = acquire(sql, ["gpu"], lease_seconds=3600)["lease_id"]
    labels = {queue(sql, "gpu", priority=-1): "old low"}
    sql.execute("UPDATE pgslots.settings SET clock_offset = clock_offset + interval '500 seconds'")
    labels[queue(sql, "gpu", priority=0)] = "new normal"
    assert served_order(sql, held, labels) == ["new normal", "old low"]


def test_round_robin_serves_a_small_tenant_among_the_first_grants(long_waits: Conn) -> None:
    sql = long_waits
    create(sql, "api", 1)
    held = acquire(sql, ["api"])["lease_id"]
    labels = {}
    a = uuid.uuid4()
    for i in range(100):
        labels[queue(sql, "api", key="tenant-a", client=a)] = f"A{i}"
    b = uuid.uuid4()
    for i in range(5):
        labels[queue(sql, "api", key="tenant-b", client=b)] = f"B{i}"
    order = served_order(sql, held, labels)
    assert len(order) == 105
    assert [x for x in order if x.startswith("B")] == ["B0", "B1", "B2", "B3", "B4"], "first come within a key"
    assert all(order.index(f"B{i}") < 10 for i in range(5)), order[:12]
    assert [x for x in order if x.startswith("A")] == [f"A{i}" for i in range(100)]


def test_waiters_without_a_key_are_one_group_in_the_round_robin(long_waits: Conn) -> None:
    sql = long_waits
    create(sql, "api", 1)
    held = acquire(sql, ["api"])["lease_id"]
    labels = {}
    for i in range(3):
        labels[queue(sql, "api")] = f"none{i}"
    for i in range(2):
        labels[queue(sql, "api", key="k")] = f"k{i}"
    # Round 1: the no-key group's first, then k's first; round 2 likewise; then the rest.
    assert served_order(sql, held, labels) == ["none0", "k0", "none1", "k1", "none2"]


def test_the_key_served_least_recently_starts_a_round(long_waits: Conn) -> None:
    sql = long_waits
    create(sql, "api", 1)
    held = acquire(sql, ["api"])["lease_id"]
    labels = {queue(sql, "api", key="a"): "a0", queue(sql, "api", key="a"): "a1"}
    one(sql, "SELECT pgslots.release(%s) AS r", [held])  # a0 is served now
    current = next(lid for lid, label in labels.items() if label == "a0")
    labels[queue(sql, "api", key="b")] = "b0"
    # a1 (round 1 now, queued before b0) and b0 tie on the round. b was never served: it goes by its
    # first waiter's arrival, after a was served, so a1 first (a new key is not a way to the front).
    labels[queue(sql, "api", key="c")] = "c0"
    labels[queue(sql, "api", key="b")] = "b1"
    # Then b0 (arrived before c0), c0, and b1 last: b was served after c0 arrived.
    assert served_order(sql, current, labels) == ["a1", "b0", "c0", "b1"]


def test_a_large_request_at_the_head_blocks_those_behind_it(long_waits: Conn) -> None:
    sql = long_waits
    create(sql, "db", 3)
    holds = [acquire(sql, ["db"])["lease_id"] for _ in range(3)]
    big = uuid.uuid4()
    acquire(sql, ["db"], slots=3, queue_client=uuid.uuid4(), new_lease_id=big, priority=10)
    small = queue(sql, "db", priority=0)
    one(sql, "SELECT pgslots.release(%s) AS r", [holds[0]])
    assert not rows(sql, "SELECT 1 FROM pgslots.leases WHERE id = %s", [small]), "the small one did not overtake"
    assert not acquire(sql, ["db"], priority=0)["granted"]
    for lease in holds[1:]:
        one(sql, "SELECT pgslots.release(%s) AS r", [lease])
    assert rows(sql, "SELECT 1 FROM pgslots.leases WHERE id = %s", [big])


def test_rate_limit_waiters_are_ordered_by_priority_too(long_waits: Conn) -> None:
    sql = long_waits
    create(sql, "calls", 1, decay=1.0)
    assert rate_limit(sql, ["calls"])["granted"]
    low_client, high_client = uuid.uuid4(), uuid.uuid4()
    low = rate_limit(sql, ["calls"], queue_client=low_client, priority=-1)
    high = rate_limit(sql, ["calls"], queue_client=high_client, priority=1)
    assert not low["granted"] and not high["granted"]
    sql.execute("UPDATE pgslots.settings SET clock_offset = clock_offset + interval '1.01 seconds'")
    assert not rate_limit(sql, ["calls"], ticket=low["waiter"], queue_client=low_client)["granted"]
    assert rate_limit(sql, ["calls"], ticket=high["waiter"], queue_client=high_client)["granted"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"priority": 101}, "from -100 to 100"),
        ({"priority": -101}, "from -100 to 100"),
        ({"priority": None}, "from -100 to 100"),
        ({"fairness_key": ""}, "1 to 255 characters"),
        ({"fairness_key": "k" * 256}, "1 to 255 characters"),
        ({"fairness_key": "k" * 1_000_000}, "1 to 255 characters"),
    ],
)
def test_bad_priorities_and_keys_are_refused_and_change_nothing(sql: Conn, args: dict[str, Any], words: str) -> None:
    create(sql, "api", 1)
    acquire(sql, ["api"])
    named = ", ".join(f"{k} => %({k})s" for k in args)
    for function in ("acquire", "rate_limit"):
        query = f"SELECT * FROM pgslots.{function}(ARRAY['api'], queue_client => %(c)s, {named})"
        assert words in expect_error(sql, "PS015", query, {"c": uuid.uuid4(), **args})


def test_a_fairness_key_that_is_not_text_is_refused(sql: Conn) -> None:
    create(sql, "api", 1)
    expect_error(sql, "42883", "SELECT * FROM pgslots.acquire(ARRAY['api'], fairness_key => 42)")


def test_python_checks_priority_and_fairness_key(client: Any) -> None:
    import pgslots
    from pgslots.sync import concurrency, rate_limit

    client.create_limit("api", 1, slot_decay_per_second=1)
    bad_values: list[dict[str, Any]] = [
        {"priority": 101},
        {"priority": True},
        {"priority": 1.5},
        {"fairness_key": 42},
        {"fairness_key": ""},
        {"fairness_key": "x" * 256},
    ]
    for bad in bad_values:
        with pytest.raises(pgslots.InvalidArgumentError), concurrency("api", client=client, **bad):
            pass
        with pytest.raises(pgslots.InvalidArgumentError):
            rate_limit("api", client=client, **bad)
    with concurrency("api", client=client, priority=7, fairness_key="tenant-a", timeout_seconds=5) as lease:
        assert lease is not None
    rate_limit("api", client=client, priority=-3, fairness_key="tenant-b", timeout_seconds=5)


# ---- real waiting processes -------------------------------------------------------------------


def _wait_for_slot(dsn: str, priority: int, key: str | None, log: Any, lock: Any, label: int) -> None:
    from pgslots import Client
    from pgslots.sync import concurrency

    client = Client(dsn)
    try:
        with concurrency("gpu", client=client, priority=priority, fairness_key=key, timeout_seconds=60):
            with lock:
                log.append(label)
            time.sleep(0.05)
    finally:
        client.close()


def _queued(dsn: str, count: int) -> None:
    deadline = time.time() + 20
    with psycopg.connect(dsn, autocommit=True) as conn:
        while status(conn, "gpu")["waiters"] < count:
            assert time.time() < deadline, "the processes did not queue"
            time.sleep(0.02)


def test_waiting_processes_are_served_by_priority_with_aging(fresh_dsn: str) -> None:
    """Processes queue one by one on a full limit; a release serves them by priority, and a low
    priority waiter that has waited two aging periods goes before a later normal one."""
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("UPDATE pgslots.settings SET priority_aging_seconds = 1.5")
        create(conn, "gpu", 1)
        held = acquire(conn, ["gpu"])["lease_id"]
    ctx = mp.get_context("fork")
    manager = ctx.Manager()
    log, lock = manager.list(), manager.Lock()
    procs = []
    # label: priority. The -2 waiter queues first and then ages for 3.5 s (two levels: it is at 0).
    for n, (label, priority) in enumerate([(1, -2), (2, 0), (3, 5), (4, -1), (5, 3)]):
        p = ctx.Process(target=_wait_for_slot, args=(fresh_dsn, priority, None, log, lock, label))
        p.start()
        procs.append(p)
        _queued(fresh_dsn, n + 1)
        if label == 1:
            time.sleep(3.5)
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        one(conn, "SELECT pgslots.release(%s) AS r", [held])
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 5
    # 5 and 3 first; then the aged -2 (now level 1 or 2) before 0 (level 0 after under 3 s) and -1.
    assert list(log) == [3, 5, 1, 2, 4], list(log)
    manager.shutdown()
    invariants.check(fresh_dsn)


def _tenant_loop(dsn: str, key: str, counts: Any, index: int, deadline: float) -> None:
    from pgslots import Client
    from pgslots.sync import concurrency

    client = Client(dsn)
    try:
        while time.time() < deadline:
            with concurrency("gpu", client=client, fairness_key=key, timeout_seconds=30):
                with counts.get_lock():
                    counts[index] += 1
                time.sleep(0.01)
    finally:
        client.close()


def test_a_tenant_with_one_process_gets_half_the_slots_against_one_with_three(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        create(conn, "gpu", 1)
    ctx = mp.get_context("fork")
    counts = ctx.Array("i", 2)
    deadline = time.time() + 4.0
    procs = [ctx.Process(target=_tenant_loop, args=(fresh_dsn, "big", counts, 0, deadline)) for _ in range(3)]
    procs.append(ctx.Process(target=_tenant_loop, args=(fresh_dsn, "small", counts, 1, deadline)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    big, small = counts[0], counts[1]
    assert big + small > 50
    # First come first served would give the one process about a quarter; round-robin about half.
    assert small / (big + small) > 0.38, (big, small)
    invariants.check(fresh_dsn)
