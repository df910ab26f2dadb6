"""The sync face's batches with a real database: many threads of one process, and several processes
of many threads, on one limit: never more bodies at once than the limit (counted outside the
database), every thread its own lease and fencing token, an error in one request reaching only its
thread, and a thread interrupted while its batch is on its way holding nothing afterwards."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import invariants
import psycopg
import pytest

import pgslots
import pgslots.client
from pgslots._engine import interrupt_thread
from pgslots.sync import concurrency

CTX = mp.get_context("fork")


def _cycle_threads(name: str, threads: int, seconds: float, log: Path | None = None) -> dict[str, Any]:
    lock = threading.Lock()
    seen: dict[str, Any] = {"inside": 0, "most": 0, "tokens": [], "done": 0, "errors": []}
    stop = time.perf_counter() + seconds

    def worker() -> None:
        try:
            while time.perf_counter() < stop:
                with concurrency(name, timeout_seconds=30) as lease:
                    assert lease is not None
                    with lock:
                        seen["tokens"].append(lease.fencing_token)
                        seen["inside"] += 1
                        seen["most"] = max(seen["most"], seen["inside"])
                    started = time.time()
                    time.sleep(0.002)
                    with lock:
                        seen["inside"] -= 1
                    if log is not None:
                        with lock, open(log, "a", encoding="utf-8") as f:
                            f.write(f"{started:.6f} {time.time():.6f}\n")
                with lock:
                    seen["done"] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            seen["errors"].append(exc)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    return seen


def _function_calls(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT funcname, calls FROM pg_stat_user_functions WHERE schemaname = 'pgslots'").fetchall()
    return {name: calls for name, calls in rows}


def _stacks(threads: list[threading.Thread]) -> str:
    frames = sys._current_frames()
    return "\n".join("".join(traceback.format_stack(frames[t.ident])) for t in threads if t.ident in frames)


def _batcher_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pgslots-batch-")]


def test_many_threads_share_a_limit_through_batches(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:  # counts each function's calls (for new sessions)
        dbname = conn.info.dbname
        conn.execute(f"ALTER DATABASE \"{dbname}\" SET track_functions = 'pl'")
    client = pgslots.client.configure(fresh_dsn)
    try:
        client.create_limit("api", 10)
        seen = _cycle_threads("api", 40, 2.0)
        assert seen["errors"] == []
        assert seen["most"] == 10  # the limit was full, never more
        assert len(set(seen["tokens"])) == len(seen["tokens"]) == seen["done"] > 100
        info = client.read_limit("api")
        assert info.leased_slots == 0 and info.grants_total == seen["done"]
    finally:
        client.close()  # the pooled sessions end, and their counts reach the statistics
        pgslots.client._default = None
    deadline = time.monotonic() + 10
    calls = _function_calls(fresh_dsn)
    while time.monotonic() < deadline and not calls.get("release_each"):
        time.sleep(0.2)
        calls = _function_calls(fresh_dsn)
    # Batches were sent: fewer calls than cycles carried every acquire and release.
    assert calls.get("acquire_each", 0) > 0 and calls.get("release_each", 0) > 0, calls
    assert calls["acquire_each"] + calls.get("acquire", 0) < 2 * seen["done"], (calls, seen["done"])
    # Each kind's sender thread ends once it has had nothing to send for a while.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _batcher_threads():
        time.sleep(0.1)
    assert _batcher_threads() == []


def _process(dsn: str, log: str) -> None:
    pgslots.configure(dsn)
    seen = _cycle_threads("shared", 16, 2.0, Path(log))
    assert seen["errors"] == [], seen["errors"]


def test_several_processes_of_many_threads_never_exceed_the_limit(fresh_dsn: str, client: pgslots.Client, tmp_path: Path) -> None:
    client.create_limit("shared", 10)
    # The parent's threads first: its children are forked with a batcher (and sender threads) of its
    # own, which they must not use.
    assert _cycle_threads("shared", 16, 0.5)["errors"] == []
    bodies, most = invariants.bodies_of_processes(_process, fresh_dsn, tmp_path / "bodies")
    assert bodies > 100 and most <= 10, most
    assert client.read_limit("shared").leased_slots == 0


def test_an_error_in_one_request_of_a_batch_reaches_only_its_thread(client: pgslots.Client) -> None:
    client.create_limit("api", 50)
    start = threading.Barrier(21)
    got: list[Any] = [None] * 21

    def one(i: int, name: str, strict: bool) -> None:
        start.wait()
        try:
            with concurrency(name, strict=strict):
                time.sleep(0.01)
            got[i] = name
        except Exception as exc:  # noqa: BLE001 - looked at below
            got[i] = exc

    workers = [threading.Thread(target=one, args=(i, "not-there" if i == 10 else "api", i == 10)) for i in range(21)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert isinstance(got[10], pgslots.MissingLimitsError)
    assert got[:10] + got[11:] == ["api"] * 20
    assert client.read_limit("api").leased_slots == 0, client.list_leases("api")


@pytest.mark.parametrize("interrupt_after", [0.0, 0.002, 0.005, 0.01])
def test_threads_whose_lease_was_lost_while_their_batch_was_on_its_way_hold_nothing(client: pgslots.Client, interrupt_after: float) -> None:
    """What the engine does to a body whose lease (of an enclosing block, here) was lost, done to
    threads in the middle of their acquires: each hears it, and none keeps a lease."""
    client.create_limit("api", 5)
    start = threading.Barrier(21)
    ended: list[str] = []

    def hold() -> None:
        try:
            start.wait()
            with concurrency("api"):
                for _ in range(1000):  # short sleeps: an interruption reaches the thread between them
                    time.sleep(0.01)
            ended.append("body ran to its end")
        except pgslots.LeaseRenewalFailedError:
            ended.append("interrupted")

    workers = [threading.Thread(target=hold) for _ in range(20)]
    for w in workers:
        w.start()
    start.wait()
    time.sleep(interrupt_after)
    for w in workers:
        assert w.ident is not None
        interrupt_thread(w.ident)(RuntimeError("the test interrupts it"))
    for w in workers:
        w.join(30)
    stuck = [w for w in workers if w.is_alive()]
    assert not stuck, _stacks(stuck)
    assert ended == ["interrupted"] * 20
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and client.read_limit("api").leased_slots:
        time.sleep(0.1)
    assert client.read_limit("api").leased_slots == 0, client.list_leases("api")


def _interrupted_main_thread(dsn: str, go: Any, out: Any) -> None:
    """A process whose main thread acquires among 19 other threads of it, and is stopped by Ctrl-C
    (SIGINT from the test) on its way: its answer, whatever it was, is given back; the other threads'
    leases stay. Puts (what the main thread saw, lease ids left in the database that no thread holds)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    client = pgslots.client.configure(dsn)
    start = threading.Barrier(20)
    stop = threading.Event()
    held: list[str] = []

    def hold() -> None:
        start.wait()
        with concurrency("api") as lease:
            assert lease is not None
            held.append(str(lease.lease_id))
            stop.wait(60)

    workers = [threading.Thread(target=hold, daemon=True) for _ in range(19)]
    for w in workers:
        w.start()
    seen = "body ran"
    try:
        start.wait()
        go.set()  # the test sends SIGINT now, or after a delay
        with concurrency("api"):
            for _ in range(500):
                time.sleep(0.01)
    except KeyboardInterrupt:
        seen = "interrupted"
    # Settled: given back in the background, then a queued thread handed the freed slot.
    leftover: list[str] = []
    for _ in range(50):
        time.sleep(0.1)
        leftover = [str(info.lease_id) for info in client.list_leases("api") if str(info.lease_id) not in held]
        if not leftover and len(held) == 5:
            break
    out.put((seen, leftover, len(held)))
    stop.set()
    for w in workers:
        w.join(10)
    client.close()


@pytest.mark.parametrize("interrupt_after", [0.0, 0.001, 0.003, 0.006])
def test_ctrl_c_while_the_main_threads_acquire_is_on_its_way_leaves_no_lease(client: pgslots.Client, interrupt_after: float) -> None:
    client.create_limit("api", 5)
    go, out = CTX.Event(), CTX.Queue()
    child = CTX.Process(target=_interrupted_main_thread, args=(client.dsn, go, out))
    child.start()
    assert go.wait(30)
    time.sleep(interrupt_after)
    assert child.pid is not None
    os.kill(child.pid, signal.SIGINT)
    seen, leftover, holding = out.get(timeout=60)
    child.join(30)
    assert child.exitcode == 0
    assert seen == "interrupted"
    assert leftover == [] and holding == 5  # nothing of the main thread's left; the slot it won went on


def test_a_request_behind_a_blocked_call_keeps_its_own_timeout(client: pgslots.Client) -> None:
    """One thread's acquire is blocked on the limit's row (another session holds it); a second thread's
    acquire, waiting behind it for the next batch, still times out at its own timeout_seconds."""
    client.create_limit("api", 5)
    got: dict[str, Any] = {}
    with psycopg.connect(client.dsn) as blocker:
        blocker.execute("SET LOCAL idle_in_transaction_session_timeout = '5s'")  # a bound, should the test fail
        blocker.execute("SELECT 1 FROM pgslots.limits WHERE name = 'api' FOR UPDATE")

        def patient() -> None:
            with concurrency("api") as lease:
                got["patient"] = lease

        first = threading.Thread(target=patient)
        first.start()
        time.sleep(0.3)  # its acquire waits for the row lock now
        started = time.monotonic()
        with pytest.raises(pgslots.AcquireConcurrencySlotTimeoutError), concurrency("api", timeout_seconds=0.5):
            pass
        assert time.monotonic() - started < 2.0
        assert "patient" not in got
        blocker.rollback()  # the blocked acquire goes on
    first.join(10)
    assert got["patient"] is not None
    assert client.read_limit("api").leased_slots == 0, client.list_leases("api")
