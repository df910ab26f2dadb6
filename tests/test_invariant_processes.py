"""Many OS processes hammer one limit through the SQL API; an independent count checks the limit."""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from typing import Any

import psycopg
import pytest

from sqlhelp import create, one, status

LIMIT = 3
PROCESSES = 8
SECONDS = 4.0


def _hammer(dsn: str, holding: Any, peak: Any, grants: Any, deadline: float) -> None:
    rng = random.Random()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.time() < deadline:
            got = one(conn, "SELECT * FROM pgslots.acquire('{inv}', 1, 60)")
            if not got["granted"]:
                time.sleep(rng.uniform(0, 0.003))
                continue
            # Between the grant and the release: count ourselves in shared memory, not in the database.
            with holding.get_lock():
                holding.value += 1
                peak.value = max(peak.value, holding.value)
            grants.value += 1
            time.sleep(rng.uniform(0, 0.004))
            with holding.get_lock():
                holding.value -= 1
            one(conn, "SELECT pgslots.release(%s)", [got["lease_id"]])


@pytest.mark.processes
def test_no_more_than_the_limit_ever_hold(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        create(conn, "inv", LIMIT)
    ctx = mp.get_context("fork")
    holding = ctx.Value("i", 0)
    peak = ctx.Value("i", 0)
    grants = ctx.Value("i", 0, lock=True)
    deadline = time.time() + SECONDS
    procs = [ctx.Process(target=_hammer, args=(fresh_dsn, holding, peak, grants, deadline)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(SECONDS + 30)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert peak.value <= LIMIT, f"{peak.value} holders at once on a limit of {LIMIT}"
    assert peak.value == LIMIT, "the test never filled the limit; it proves nothing"
    assert grants.value > 100
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        row = status(conn, "inv")
        assert row["active_slots"] == 0 and row["leases"] == 0


def _library_worker(dsn: str, holding: Any, peak: Any, grants: Any, handed: Any, deadline: float) -> None:
    from pgslots.client import configure
    from pgslots.sync import concurrency

    client = configure(dsn)
    plain_call = client.call
    last_acquire_granted = True

    def counting_call(query: Any, params: Any = None, **kw: Any) -> Any:
        nonlocal last_acquire_granted
        result = plain_call(query, params, **kw)
        if "pgslots.acquire(" in str(query):
            last_acquire_granted = result[0]["granted"]
        return result

    client.call = counting_call  # type: ignore[method-assign]
    rng = random.Random()
    while time.time() < deadline:
        with concurrency("lib", lease_duration=60, timeout_seconds=30):
            with holding.get_lock():
                holding.value += 1
                peak.value = max(peak.value, holding.value)
            with grants.get_lock():
                grants.value += 1
                handed.value += not last_acquire_granted  # its last acquire was refused: a release handed it over
            time.sleep(rng.uniform(0, 0.004))
            with holding.get_lock():
                holding.value -= 1
    client.close()


@pytest.mark.processes
def test_library_waiters_and_hand_offs_never_exceed_the_limit(fresh_dsn: str) -> None:
    """The same check through pgslots.sync.concurrency, where queued waiters are handed their slots
    by the releases of other processes."""
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        create(conn, "lib", LIMIT)
    ctx = mp.get_context("fork")
    holding, peak = ctx.Value("i", 0), ctx.Value("i", 0)
    grants, handed = ctx.Value("i", 0), ctx.Value("i", 0)
    deadline = time.time() + SECONDS
    args = (fresh_dsn, holding, peak, grants, handed, deadline)
    procs = [ctx.Process(target=_library_worker, args=args) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(SECONDS + 60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert peak.value <= LIMIT, f"{peak.value} holders at once on a limit of {LIMIT}"
    assert peak.value == LIMIT, "the test never filled the limit; it proves nothing"
    assert grants.value > 100 and handed.value > 0
    print(f"\n{grants.value} grants through the library, {handed.value} of them handed over by a release")
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        row = status(conn, "lib")
        assert row["active_slots"] == 0 and row["leases"] == 0 and row["waiters"] == 0
