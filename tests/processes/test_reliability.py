"""Faults with real processes: SIGKILLed holders, PostgreSQL restarts, terminated backends.

Every test is bounded in time, talks to the local test server only, and ends the processes it
started. Run just these with `pytest -m reliability -s` to see the counts."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from typing import Any

import invariants
import psycopg
import pytest

from conftest import set_min_lease
from pgslots.client import Client, configure
from pgslots.sync import concurrency

CTX = mp.get_context("fork")
pytestmark = [pytest.mark.reliability, pytest.mark.processes]


def _chaos_worker(dsn: str, index: int, holding: Any, started: Any, stop: Any) -> None:
    configure(dsn)
    rng = random.Random()
    while not stop.is_set():
        started[index] = time.time()
        with concurrency("chaos", lease_duration=2, timeout_seconds=30):
            holding[index] = 1
            time.sleep(rng.uniform(0, 0.06))
            holding[index] = 0
        time.sleep(rng.uniform(0, 0.005))


def test_sigkill_at_random_moments_keeps_the_limit(client: Client, fresh_dsn: str) -> None:
    set_min_lease(fresh_dsn, 1)
    client.create_limit("chaos", 3)
    n = 8
    holding = CTX.Array("i", n, lock=False)
    started = CTX.Array("d", n, lock=False)
    stop = CTX.Event()

    def spawn(i: int) -> Any:
        holding[i] = 0
        p = CTX.Process(target=_chaos_worker, args=(fresh_dsn, i, holding, started, stop))
        p.start()
        return p

    procs = [spawn(i) for i in range(n)]
    ghosts: list[float] = []  # until when a killed holder's slot may still count in the database
    kills = killed_holding = checks = peak = 0
    rng = random.Random(7)
    began = time.time()
    next_kill = began + 0.3
    try:
        # 8 s of chaos, longer (up to 16 s) until at least 3 kills have hit a holder.
        while time.time() < began + 8 or (killed_holding < 3 and time.time() < began + 16):
            now = time.time()
            live = sum(holding[i] for i in range(n)) + sum(1 for g in ghosts if g > now)
            peak = max(peak, live)
            assert live <= 3, f"{live} holders at once on a limit of 3"
            if now >= next_kill:
                # Half the kills aim at a holder; the rest land anywhere (acquiring, waiting, releasing).
                holders = [j for j in range(n) if holding[j]]
                i = rng.choice(holders) if holders and rng.random() < 0.5 else rng.randrange(n)
                was_holding = holding[i]
                os.kill(procs[i].pid, signal.SIGKILL)
                procs[i].join(5)
                kills += 1
                if was_holding:
                    killed_holding += 1
                    ghosts.append(started[i] + 2)  # its lease expires no earlier than this
                procs[i] = spawn(i)
                next_kill = now + rng.uniform(0.1, 0.4)
            if int(now * 2) % 2 == 0:
                invariants.check(fresh_dsn)
                checks += 1
            time.sleep(0.003)
    finally:
        stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    invariants.check(fresh_dsn)
    # Every killed holder's slots come back at lease expiry: all 3 can be taken at once.
    with concurrency("chaos", occupy=3, timeout_seconds=10, client=client):
        pass
    print(f"\nSIGKILL chaos: {kills} kills ({killed_holding} while holding), peak {peak}/3 holders, {checks} invariant checks, all passed")
    assert kills >= 15 and killed_holding >= 1 and peak == 3
    row = client.read_limit("chaos")
    assert row.active_slots == 0


def _holder(dsn: str, holding: Any, index: int, seconds: float, out: Any) -> None:
    configure(dsn)
    try:
        with concurrency("restart", lease_duration=3, raise_on_lease_renewal_failure=True, timeout_seconds=60):
            holding[index] = 1
            end = time.time() + seconds
            while time.time() < end:
                time.sleep(0.05)
            holding[index] = 0
        out.put(("held", index))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        holding[index] = 0
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def _cluster(pg_server: dict[str, Any]) -> Any:
    if pg_server["cluster"] is None:
        pytest.skip("needs the local test cluster to restart it")
    return pg_server["cluster"]


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_while_holders_hold_and_waiters_wait(client: Client, fresh_dsn: str, pg_server: dict[str, Any], mode: str) -> None:
    cluster = _cluster(pg_server)
    set_min_lease(fresh_dsn, 1)
    client.create_limit("restart", 2)
    holding = CTX.Array("i", 5, lock=False)
    out: Any = CTX.Queue()
    # Two holders for 5 s (renewing every 2.25 s across the restarts), then three waiters.
    procs = [CTX.Process(target=_holder, args=(fresh_dsn, holding, i, 5.0, out)) for i in range(2)]
    for p in procs:
        p.start()
    deadline = time.time() + 10
    while sum(holding[i] for i in range(2)) < 2:
        assert time.time() < deadline
        time.sleep(0.02)
    waiters = [CTX.Process(target=_holder, args=(fresh_dsn, holding, i, 0.3, out)) for i in range(2, 5)]
    for p in waiters:
        p.start()
    with invariants.PeakWatcher(lambda: sum(holding[i] for i in range(5)), 2) as bodies:
        time.sleep(1.0)
        cluster.restart(mode=mode)
        time.sleep(1.5)
        cluster.restart(mode=mode)
        results = [out.get(timeout=60) for _ in range(5)]
    peak = bodies.peak
    for p in procs + waiters:
        p.join(10)
    print(f"\nrestart ({mode}) x2: {results}, peak {peak}/2 holders")
    assert all(kind == "held" for kind, _ in results), results
    assert peak <= 2
    deadline = time.time() + 10
    while True:  # a release the crash forgot comes back at lease expiry
        with psycopg.connect(fresh_dsn, autocommit=True) as conn:
            invariants.check(conn)
            conn.execute("SELECT pgslots.sweep()")
            occupied = conn.execute("SELECT active_slots FROM pgslots.status WHERE name = 'restart'").fetchone()
        if occupied == (0,):
            break
        assert time.time() < deadline, occupied
        time.sleep(0.2)


def test_terminated_backends_are_survived(client: Client, fresh_dsn: str) -> None:
    set_min_lease(fresh_dsn, 1)
    client.create_limit("term", 1)
    holding = CTX.Array("i", 2, lock=False)
    out: Any = CTX.Queue()
    holder = CTX.Process(target=_holder, args=(fresh_dsn, holding, 0, 4.0, out))
    holder.start()
    deadline = time.time() + 10
    while not holding[0]:
        assert time.time() < deadline
        time.sleep(0.02)
    waiter = CTX.Process(target=_holder, args=(fresh_dsn, holding, 1, 0.2, out))
    waiter.start()
    terminated = 0
    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        for _ in range(3):
            time.sleep(0.8)
            rows = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name LIKE 'pgslots:%'"
            ).fetchall()
            terminated += len(rows)
    results = [out.get(timeout=60) for _ in range(2)]
    holder.join(10)
    waiter.join(10)
    print(f"\npg_terminate_backend: {terminated} backends ended under a holder and a waiter; {results}")
    assert terminated >= 3
    assert all(kind == "held" for kind, _ in results), results
    invariants.check(fresh_dsn)
