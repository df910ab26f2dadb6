"""Many OS processes hammer one limit through the SQL API; an independent count checks the limit."""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from typing import Any

import psycopg
import pytest

from sqlhelp import create, one, rows, status

LIMIT = 3
PROCESSES = 8
SECONDS = 4.0


def _hold(holding: Any, peak: Any, grants: Any, rng: random.Random) -> None:
    """The body, between a grant and its release: count ourselves in shared memory, not in the database."""
    with holding.get_lock():
        holding.value += 1
        peak.value = max(peak.value, holding.value)
    with grants.get_lock():
        grants.value += 1
    time.sleep(rng.uniform(0, 0.004))
    with holding.get_lock():
        holding.value -= 1


def _hammer(dsn: str, holding: Any, peak: Any, grants: Any, deadline: float) -> None:
    rng = random.Random()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.time() < deadline:
            got = one(conn, "SELECT * FROM pgslots.acquire('{inv}', 1, 60)")
            if not got["granted"]:
                time.sleep(rng.uniform(0, 0.003))
                continue
            _hold(holding, peak, grants, rng)
            one(conn, "SELECT pgslots.release(%s)", [got["lease_id"]])


def _run_workers(dsn: str, name: str, target: Any, extra: int = 0) -> list[Any]:
    """Runs PROCESSES workers on a new limit of LIMIT slots until the deadline; checks, outside the
    database, that never more than LIMIT held at once and that the limit was filled. Returns the
    shared counters: holding, peak, grants, then `extra` more for the workers' own use."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        create(conn, name, LIMIT)
    ctx = mp.get_context("fork")
    shared = [ctx.Value("i", 0) for _ in range(3 + extra)]
    deadline = time.time() + SECONDS
    procs = [ctx.Process(target=target, args=(dsn, *shared, deadline)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(SECONDS + 60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    peak, grants = shared[1].value, shared[2].value
    assert peak <= LIMIT, f"{peak} holders at once on a limit of {LIMIT}"
    assert peak == LIMIT, "the test never filled the limit; it proves nothing"
    assert grants > 100
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = status(conn, name)
        assert row["active_slots"] == 0 and row["leases"] == 0 and row["waiters"] == 0
    return shared


@pytest.mark.processes
def test_no_more_than_the_limit_ever_hold(fresh_dsn: str) -> None:
    _run_workers(fresh_dsn, "inv", _hammer)


def _library_worker(dsn: str, holding: Any, peak: Any, grants: Any, handed: Any, deadline: float) -> None:
    from pgslots.client import configure
    from pgslots.sync import concurrency

    client = configure(dsn)
    plain_call = client._connections.call
    last_acquire_granted = True

    def counting_call(query: Any, params: Any = None, **kw: Any) -> Any:
        nonlocal last_acquire_granted
        result = plain_call(query, params, **kw)
        if "pgslots.acquire(" in str(query):
            last_acquire_granted = result[0]["granted"]
        return result

    client._connections.call = counting_call  # type: ignore[method-assign]
    rng = random.Random()
    while time.time() < deadline:
        with concurrency("lib", lease_duration=60, timeout_seconds=30):
            with handed.get_lock():
                handed.value += not last_acquire_granted  # its last acquire was refused: a release handed it over
            _hold(holding, peak, grants, rng)
    client.close()


@pytest.mark.processes
def test_library_waiters_and_hand_offs_never_exceed_the_limit(fresh_dsn: str) -> None:
    """The same check through pgslots.sync.concurrency, where queued waiters are handed their slots
    by the releases of other processes."""
    _, _, grants, handed = _run_workers(fresh_dsn, "lib", _library_worker, extra=1)
    assert handed.value > 0, "no slot was ever handed over: the test proves nothing about hand-offs"
    print(f"\n{grants.value} grants through the library, {handed.value} of them handed over by a release")


def _impatient_worker(dsn: str, holding: Any, peak: Any, grants: Any, timeouts: Any, deadline: float) -> None:
    import pgslots
    from pgslots.client import configure
    from pgslots.sync import concurrency

    configure(dsn)
    rng = random.Random()
    while time.time() < deadline:
        try:
            with concurrency("mix", lease_duration=60, timeout_seconds=rng.choice([0.002, 0.01, 0.05, 5])):
                _hold(holding, peak, grants, rng)
        except pgslots.AcquireConcurrencySlotTimeoutError:
            with timeouts.get_lock():
                timeouts.value += 1


def _limit_changer(dsn: str, deadline: float) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not rows(conn, "SELECT 1 FROM pgslots.status WHERE name = 'mix'"):
            time.sleep(0.01)  # the test creates it
        changes = 0
        while time.time() < deadline:
            for size in (2, LIMIT):
                one(conn, "SELECT pgslots.update_limit('mix', %s)", [size])
                changes += 1
                time.sleep(0.03)
        one(conn, "SELECT pgslots.update_limit('mix', %s)", [LIMIT])
        assert changes > 10


@pytest.mark.processes
def test_queueing_timeouts_and_limit_changes_never_deadlock_or_exceed(fresh_dsn: str) -> None:
    """Waiters that give up at random (leaving the queue), releases handing slots over, and the
    limit moving between 2 and 3 underneath them: no deadlock, no error, never more than 3."""
    changer = mp.get_context("fork").Process(target=_limit_changer, args=(fresh_dsn, time.time() + SECONDS))
    changer.start()
    try:
        _, _, grants, timeouts = _run_workers(fresh_dsn, "mix", _impatient_worker, extra=1)
    finally:
        changer.join(SECONDS + 30)
    assert changer.exitcode == 0
    assert timeouts.value > 0, "nobody timed out: the test proves nothing about leaving the queue"
    print(f"\n{grants.value} grants, {timeouts.value} timeouts while the limit moved between 2 and {LIMIT}")
