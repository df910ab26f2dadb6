"""Waiting: pushed wake-ups, first-come service, lease renewal and expiry, cancellation; most of it
with real OS processes. Measured figures are printed (run with -s to see them)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgslots
from conftest import set_min_lease
from pgslots import LeaseRenewalFailedError
from pgslots import asyncio as pa
from pgslots.client import Client, configure
from pgslots.sync import concurrency, rate_limit

CTX = mp.get_context("fork")


def _count_backends(dsn: str, application_name: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [application_name]).fetchone()
        assert row is not None
        return int(row[0])


# ---- fairness -------------------------------------------------------------------------------


def _small_requests(dsn: str, stop_at: float, done: Any) -> None:
    configure(dsn)
    while time.time() < stop_at and not done.is_set():
        with concurrency("fair", occupy=1):
            time.sleep(0.02)


@pytest.mark.processes
def test_big_request_is_not_starved_by_small_ones(client: Client, fresh_dsn: str) -> None:
    client.create_limit("fair", 5)
    stop_at = time.time() + 12
    done = CTX.Event()
    procs = [CTX.Process(target=_small_requests, args=(fresh_dsn, stop_at, done)) for _ in range(6)]
    for p in procs:
        p.start()
    try:
        # The small requests keep the limit (nearly) full.
        deadline = time.monotonic() + 5
        while client.read_limit("fair").active_slots < 4:
            assert time.monotonic() < deadline, "the small requests never filled the limit"
            time.sleep(0.01)
        start = time.monotonic()
        with concurrency("fair", occupy=5, timeout_seconds=8):
            waited = time.monotonic() - start
            assert client.read_limit("fair").active_slots == 5
        print(f"\noccupy=5 among 6 looping occupy=1 processes: granted after {waited * 1000:.0f} ms")
        assert waited < 5
    finally:
        done.set()
        for p in procs:
            p.join(20)
    assert all(p.exitcode == 0 for p in procs)


# ---- hand-off -------------------------------------------------------------------------------


def _waiter(dsn: str, ready: Any, times: Any, rounds: int) -> None:
    configure(dsn)
    for _ in range(rounds):
        ready.wait()
        with concurrency("baton"):
            times.put(time.time())
            time.sleep(0.01)


@pytest.mark.processes
def test_hand_off_to_a_waiter_in_another_process_is_pushed(client: Client, fresh_dsn: str) -> None:
    client.create_limit("baton", 1)
    rounds = 15
    ready = CTX.Event()
    times: Any = CTX.Queue()
    proc = CTX.Process(target=_waiter, args=(fresh_dsn, ready, times, rounds))
    proc.start()
    latencies = []
    try:
        for _ in range(rounds):
            with concurrency("baton"):
                ready.set()
                # Wait until the other process is queued behind us, then let go.
                deadline = time.monotonic() + 10
                while client.read_limit("baton").waiters < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                ready.clear()
                released_at = time.time()
            got_at = times.get(timeout=10)
            latencies.append(got_at - released_at)
            time.sleep(0.03)  # the waiter's body ends; the slot is free again
    finally:
        proc.join(20)
    median_ms = statistics.median(latencies) * 1000
    print(f"\nhand-off release -> waiter holds the slot: median {median_ms:.1f} ms, max {max(latencies) * 1000:.1f} ms")
    assert median_ms < 50, latencies


def _queue_behind(client: Client, name: str, waiter: Any) -> threading.Thread:
    """Starts `waiter` in a thread and returns once it is queued on the limit."""
    thread = threading.Thread(target=waiter)
    thread.start()
    deadline = time.monotonic() + 10
    while client.read_limit(name).waiters < 1:
        assert time.monotonic() < deadline, "the waiter never queued"
        time.sleep(0.01)
    return thread


def _spy_acquires(client: Client) -> list[Any]:
    """Counts the acquire calls the client makes (patched on this client only)."""
    seen: list[Any] = []
    sync_call, async_call = client._connections.call, client._connections.acall

    def call(query: Any, params: Any = None, **kw: Any) -> Any:
        seen.append(query)
        return sync_call(query, params, **kw)

    async def acall(query: Any, params: Any = None, **kw: Any) -> Any:
        seen.append(query)
        return await async_call(query, params, **kw)

    client._connections.call, client._connections.acall = call, acall  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("api", ["sync", "async"])
def test_the_release_hands_the_slot_to_the_waiter(client: Client, fresh_dsn: str, api: str) -> None:
    """The waiter gets its lease from the release itself (no second acquire), and the engine
    renews that lease past its short first term (2 x waiter_ttl_seconds) to the full duration."""
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("UPDATE pgslots.settings SET waiter_ttl_seconds = 1.5")  # first term 3 s
    client.create_limit("handed", 1)
    assert client._connections.engine.ensure_listening()  # else the first refusal looks once more after LISTEN
    calls = _spy_acquires(client)
    got: dict[str, Any] = {}

    def body(lease: Any) -> None:
        got["lease"] = lease
        time.sleep(3.5)  # past the first term: only a renewal keeps the lease
        got["listed"] = client.list_leases("handed")

    def waiter() -> None:
        if api == "sync":
            with concurrency("handed", lease_duration=60) as lease:
                body(lease)
        else:

            async def main() -> None:
                async with pa.concurrency("handed", lease_duration=60) as lease:
                    await asyncio.to_thread(body, lease)

            asyncio.run(main())

    with concurrency("handed"):
        thread = _queue_behind(client, "handed", waiter)
    thread.join(20)
    assert not thread.is_alive()
    # Ours, and the waiter's refused one that queued it: the waiter never asked a second time.
    assert len([c for c in calls if "pgslots.acquire(" in str(c)]) == 2
    (listed,) = got["listed"]
    assert listed.lease_id == got["lease"].lease_id and not listed.expired
    assert listed.fencing_token == got["lease"].fencing_token
    assert (listed.expires_at - listed.acquired_at).total_seconds() > 30  # renewed to the full 60 s
    assert client.read_limit("handed").active_slots == 0


def test_a_lost_hand_off_notification_costs_one_heartbeat(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every notification is lost: the heartbeat sees the ticket left the queue (it was handed its
    lease), the waiter asks again and gets that very lease, renewed; no slot is lost or doubled."""
    import pgslots._engine

    monkeypatch.setattr(pgslots._engine, "parse_notification", lambda payload: [])
    client.create_limit("lost", 1)
    assert client._connections.engine.ensure_listening()
    got: dict[str, Any] = {}

    def waiter() -> None:
        with concurrency("lost", lease_duration=60) as lease:
            got["at"] = time.monotonic()
            got["lease"] = lease
            got["listed"] = client.list_leases("lost")

    with concurrency("lost"):
        thread = _queue_behind(client, "lost", waiter)
        released_at = time.monotonic()
    thread.join(10)
    assert not thread.is_alive()
    assert got["at"] - released_at < 2.5  # one heartbeat (about a second) and one call
    (listed,) = got["listed"]
    assert listed.lease_id == got["lease"].lease_id
    assert (listed.expires_at - listed.acquired_at).total_seconds() > 30  # renewed to the full 60 s
    assert client.read_limit("lost").active_slots == 0


def _woken(pid: int) -> int:
    """How often a server process has gone to sleep and been woken (voluntary context switches)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("voluntary_ctxt_switches:")))


def _woken_by_notifies(dsn: str, pid: int, notifies: int = 200) -> int:
    """How often the server process `pid` was woken while another session sent `notifies` NOTIFYs on
    a channel nobody listens to: PostgreSQL wakes every backend listening in the database for each."""
    before = _woken(pid)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(notifies):
            conn.execute("NOTIFY pgslots_test_nobody")
    time.sleep(0.2)
    return _woken(pid) - before


def _served_after_release(client: Client, name: str) -> float:
    """Seconds from a release to the waiter it hands the slot to (queued in a thread of this process)."""
    got: dict[str, float] = {}

    def waiter() -> None:
        with concurrency(name, client=client):
            got["at"] = time.monotonic()

    with concurrency(name, client=client):
        thread = _queue_behind(client, name, waiter)
        released_at = time.monotonic()
    thread.join(10)
    assert not thread.is_alive()
    return got["at"] - released_at


def test_a_process_listens_only_while_it_may_wait(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that holds and releases without waiting does not LISTEN, so the NOTIFYs of other
    processes' hand-offs do not wake its backend; its first wait LISTENs, hand-offs reach it at once,
    and once no waiter has been seen for LISTEN_IDLE_SECONDS it stops listening again."""
    import pgslots._engine

    monkeypatch.setattr(pgslots._engine, "LISTEN_IDLE_SECONDS", 1.0)
    client.create_limit("heard", 1)
    engine = client._connections.engine
    with concurrency("heard", client=client):
        deadline = time.monotonic() + 10
        while engine._conn is None:  # the worker connects to renew the lease
            assert time.monotonic() < deadline, "the worker never connected"
            time.sleep(0.01)
    pid = engine._conn.info.backend_pid
    assert not engine.listening
    assert _woken_by_notifies(client.dsn, pid) < 50

    assert _served_after_release(client, "heard") < 0.5
    assert engine.listening
    assert _woken_by_notifies(client.dsn, pid) >= 100

    deadline = time.monotonic() + 10
    while engine.listening:
        assert time.monotonic() < deadline, "the worker kept listening with nobody waiting"
        time.sleep(0.05)
    assert engine._conn is not None and engine._conn.info.backend_pid == pid
    assert _woken_by_notifies(client.dsn, pid) < 50

    # The worker sleeping without LISTEN is woken for the next waiter, not left to its sleep's end.
    monkeypatch.setattr(pgslots._engine, "IDLE_POLL_SECONDS", 5.0)
    time.sleep(0.5)
    started = time.monotonic()
    assert engine.ensure_listening()
    assert time.monotonic() - started < 1.0
    monkeypatch.setattr(pgslots._engine, "LISTEN_IDLE_SECONDS", 60.0)
    assert _served_after_release(client, "heard") < 0.5
    assert client.read_limit("heard").active_slots == 0


# ---- connections while waiting --------------------------------------------------------------


def test_200_waiting_tasks_use_at_most_3_connections(client: Client, fresh_dsn: str) -> None:
    client.create_limit("crowd", 1)
    waiter_client = Client(fresh_dsn + " application_name=crowd")

    async def main() -> int:
        async with pa.concurrency("crowd", client=waiter_client):
            done = 0

            async def task() -> None:
                nonlocal done
                async with pa.concurrency("crowd", client=waiter_client):
                    done += 1

            tasks = [asyncio.create_task(task()) for _ in range(200)]
            deadline = time.monotonic() + 20
            while client.read_limit("crowd").waiters < 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            in_use = await asyncio.to_thread(_count_backends, fresh_dsn, "crowd")
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert done == 200
        return in_use

    in_use = asyncio.run(main())
    print(f"\n200 waiting tasks: {in_use} connections")
    assert in_use <= 3
    waiter_client.close()


# ---- expiry of a killed holder --------------------------------------------------------------


def _holder(dsn: str, holding: Any) -> None:
    configure(dsn)
    with concurrency("fragile", lease_duration=2):
        holding.set()
        time.sleep(3600)


@pytest.mark.processes
def test_killed_holder_slots_come_back_at_lease_expiry(client: Client, fresh_dsn: str) -> None:
    set_min_lease(fresh_dsn, 1)
    client.create_limit("fragile", 1)
    holding = CTX.Event()
    proc = CTX.Process(target=_holder, args=(fresh_dsn, holding))
    proc.start()
    assert holding.wait(10)
    time.sleep(1.8)  # its renewal (every 1.5 s) has run: the lease is alive because it is kept alive
    assert client.read_limit("fragile").expired_leases == 0
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(5)
    killed_at = time.monotonic()
    with concurrency("fragile", timeout_seconds=10):
        waited = time.monotonic() - killed_at
    print(f"\nslots of a SIGKILLed holder (lease 2 s) came back after {waited:.2f} s, no sweeper running")
    assert waited < 6


# ---- rate accuracy --------------------------------------------------------------------------


def _saturate(dsn: str, stop_at: float, grants: Any) -> None:
    configure(dsn)
    while True:
        rate_limit("paced", timeout_seconds=max(0.0, stop_at - time.time()) + 1)
        now = time.time()
        if now > stop_at:
            return
        grants.put(now)


@pytest.mark.processes
def test_rate_accuracy_with_saturating_processes(client: Client, fresh_dsn: str) -> None:
    client.create_limit("paced", 5, slot_decay_per_second=20)
    stop_at = time.time() + 4
    grants: Any = CTX.Queue()
    procs = [CTX.Process(target=_saturate, args=(fresh_dsn, stop_at, grants)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    stamps = []
    while not grants.empty():
        stamps.append(grants.get())
    stamps.sort()
    stamps = stamps[8:]  # past the burst of 5 and the processes' start
    achieved = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    print(f"\nrate limit 20/s, 3 saturating processes: achieved {achieved:.2f}/s ({achieved / 20:.4f} x)")
    assert abs(achieved / 20 - 1) < 0.03


# ---- cancellation ---------------------------------------------------------------------------


def test_cancelled_waiter_leaks_nothing(client: Client) -> None:
    client.create_limit("cancel", 2)

    async def main() -> None:
        async with pa.concurrency("cancel", occupy=2):
            for _ in range(5):
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(pa.concurrency("cancel").__aenter__(), 0.2)
            assert client.read_limit("cancel").active_slots == 2

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while client.read_limit("cancel").waiters or client._connections.engine.pending_cleanup():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    info = client.read_limit("cancel")
    assert info.active_slots == 0 and info.leases == 0


def test_cancellation_racing_a_grant_releases_it(client: Client) -> None:
    """Cancel acquires at random moments while slots are free: every grant that raced is released."""
    client.create_limit("race", 3)

    async def main() -> None:
        for i in range(40):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pa.concurrency("race").__aenter__(), 0.0005 * (i % 8))

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while client._connections.engine.pending_cleanup():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Uncancelled acquires never exited (we only entered): count what the cancelled ones left.
    leases = client.list_leases("race")
    assert client.read_limit("race").active_slots == len(leases) <= 3


def test_keyboard_interrupt_while_waiting_leaks_nothing(client: Client) -> None:
    client.create_limit("kbd", 1)
    assert threading.current_thread() is threading.main_thread()

    def interrupt() -> None:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C

    with concurrency("kbd"):
        threading.Thread(target=interrupt).start()
        with pytest.raises(KeyboardInterrupt), concurrency("kbd"):
            pass
    deadline = time.monotonic() + 5
    while client.read_limit("kbd").waiters or client._connections.engine.pending_cleanup():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.read_limit("kbd").active_slots == 0


# ---- leases kept alive ----------------------------------------------------------------------


def test_lease_is_renewed_while_the_body_runs(client: Client, fresh_dsn: str) -> None:
    set_min_lease(fresh_dsn, 1)
    client.create_limit("long", 1)
    with concurrency("long", lease_duration=1.2) as lease:
        assert lease is not None
        time.sleep(3.5)  # three lease durations
        (listed,) = client.list_leases("long")
        assert not listed.expired
        with pytest.raises(pgslots.AcquireConcurrencySlotTimeoutError), concurrency("long", timeout_seconds=0.2):
            pass
    assert client.read_limit("long").active_slots == 0


def test_the_leases_of_a_process_are_renewed_together_in_one_call(fresh_dsn: str) -> None:
    """Five bodies hold leases of 2 s for 4 s: each lease needs two renewals, and the engine sends
    them in a few renew_leases calls (ten renew calls, one per lease, before)."""
    set_min_lease(fresh_dsn, 1)
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("ALTER DATABASE {} SET track_functions = 'pl'").format(psycopg.sql.Identifier(conn.info.dbname)))
    own = Client(fresh_dsn)
    try:
        own.create_limit("batch", 5)
        started = threading.Barrier(5)
        lost: list[BaseException] = []

        def body() -> None:
            try:
                with concurrency("batch", lease_duration=2, client=own, raise_on_lease_renewal_failure=True):
                    started.wait(5)
                    time.sleep(4)
            except BaseException as exc:  # a lost lease interrupts the body
                lost.append(exc)

        threads = [threading.Thread(target=body) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert lost == [] and own.read_limit("batch").active_slots == 0
    finally:
        own.close()  # its connections end, and their counts reach the statistics
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 5
        while True:
            calls: dict[str, int] = dict(
                conn.execute("SELECT funcname, calls FROM pg_stat_user_functions WHERE schemaname = 'pgslots'").fetchall()
            )
            if calls.get("renew_leases") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert calls.get("renew", 0) == 0
    assert 1 <= calls.get("renew_leases", 0) <= 4, calls


def test_renewal_continues_while_the_event_loop_is_blocked(client: Client, fresh_dsn: str) -> None:
    set_min_lease(fresh_dsn, 1)
    client.create_limit("cpu", 1)

    async def main() -> None:
        async with pa.concurrency("cpu", lease_duration=1.2):
            time.sleep(3.0)  # CPU-bound work that never yields to the loop
            (listed,) = client.list_leases("cpu")
            assert not listed.expired

    asyncio.run(main())


def test_lost_lease_interrupts_a_sync_body(client: Client, fresh_dsn: str) -> None:
    set_min_lease(fresh_dsn, 1)
    client.create_limit("lost", 1)
    with pytest.raises(LeaseRenewalFailedError), concurrency("lost", lease_duration=1.2, strict=True) as lease:
        assert lease is not None and lease.lease_id is not None
        client.release(lease.lease_id)  # an operator force-releases it under the running body
        for _ in range(100):
            time.sleep(0.05)
    assert isinstance(LeaseRenewalFailedError(), pgslots.LeaseLostError)


def test_lost_lease_cancels_an_async_body(client: Client, fresh_dsn: str) -> None:
    set_min_lease(fresh_dsn, 1)
    client.create_limit("lost", 1)

    async def main() -> None:
        async with pa.concurrency("lost", lease_duration=1.2, raise_on_lease_renewal_failure=True) as lease:
            assert lease is not None and lease.lease_id is not None
            client.release(lease.lease_id)
            await asyncio.sleep(5)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())


def test_lost_lease_warns_when_not_strict(client: Client, fresh_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    set_min_lease(fresh_dsn, 1)
    client.create_limit("lost", 1)
    finished = False
    with concurrency("lost", lease_duration=1.2) as lease:
        assert lease is not None and lease.lease_id is not None
        client.release(lease.lease_id)
        time.sleep(2.0)
        finished = True
    assert finished
    assert "Lease renewal failed" in caplog.text and "was lost" in caplog.text


def _child_uses_parents_client(client: Client, out: Any) -> None:
    try:
        with concurrency("forked", client=client, timeout_seconds=10):
            out.put("held")
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        out.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.processes
def test_a_client_made_before_fork_works_in_the_child(client: Client) -> None:
    client.create_limit("forked", 1)
    other = Client(client.dsn)
    with concurrency("forked", client=other):
        # The parent's client waits once, so its listener thread runs and its pool is open.
        with pytest.raises(pgslots.AcquireConcurrencySlotTimeoutError), concurrency("forked", client=client, timeout_seconds=0.3):
            pass
        assert client._connections.engine.listening
        out: Any = CTX.Queue()
        child = CTX.Process(target=_child_uses_parents_client, args=(client, out))
        child.start()
        time.sleep(0.5)
    assert out.get(timeout=15) == "held"  # woken through the child's own listener, not the dead copy
    child.join(10)
    other.close()
