"""Liveness: a dead holder's slots come back within liveness_seconds + 1 s, while a live one that
loses its connection for a moment, or has its backends terminated, keeps them; one cut off for
longer gives them up before anyone else can be granted them."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from invariants import PeakWatcher, check

import pgslots
from pgslots._flow import RELEASE_WAIT_SECONDS
from pgslots.sync import concurrency
from sqlhelp import acquire, advance_clock, create, login_role, one, status

CTX = mp.get_context("fork")


def _set_liveness(dsn: str, seconds: float) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE pgslots.settings SET liveness_seconds = %s", [seconds])


def _gone(admin: psycopg.Connection[Any], pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone() is None:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def user_dsns(fresh_dsn: str) -> Iterator[tuple[str, str]]:
    first, second = login_role(fresh_dsn, "pgslots_user"), login_role(fresh_dsn, "pgslots_user")
    try:
        yield next(first), next(second)
    finally:
        next(first, None)
        next(second, None)


# ---- the SQL: keep_alive and what makes a session's lease dead --------------------------------------


@pytest.mark.parametrize("bind", [True, False], ids=["bound", "unbound"])
def test_a_session_lease_dies_when_its_session_is_silent_and_its_backend_gone(
    fresh_dsn: str, user_dsns: tuple[str, str], bind: bool
) -> None:
    """Bound to its backend, a session's lease lives while that backend does, however long it is
    silent (a paused process); once the backend is gone and liveness_seconds have passed, the next
    caller that needs the slot takes it back. Unbound (kept alive through a pooler), time alone
    decides. A lease taken without a session keeps its expiry whatever happens."""
    holder_dsn, other_dsn = user_dsns
    with psycopg.connect(fresh_dsn, autocommit=True) as admin, psycopg.connect(other_dsn, autocommit=True) as other:
        create(admin, "live", 1)
        create(admin, "plain", 1)
        session = uuid.uuid4()
        keeper = psycopg.connect(holder_dsn, autocommit=True)
        row = one(keeper, "SELECT * FROM pgslots.keep_alive(%s, bind => %s)", [session, bind])
        assert row["liveness_seconds"] == 10 and row["lost"] == []
        with psycopg.connect(holder_dsn, autocommit=True) as holder:
            assert acquire(holder, ["live"], lease_seconds=300, session=session)["granted"]
            assert acquire(holder, ["plain"], lease_seconds=300)["granted"]
        advance_clock(admin, 11)
        if bind:  # silent for longer than liveness_seconds, but its backend is there: kept
            assert not acquire(other, ["live"], lease_seconds=60)["granted"]
        pid = keeper.info.backend_pid
        keeper.close()
        assert _gone(admin, pid)
        assert acquire(other, ["live"], lease_seconds=60)["granted"]  # taken back by the one who needed it
        assert not acquire(other, ["plain"], lease_seconds=60)["granted"]  # no session: only its expiry counts
        check(admin)


def test_a_session_kept_alive_keeps_its_lease_and_hears_of_lost_ones(fresh_dsn: str, user_dsns: tuple[str, str]) -> None:
    holder_dsn, other_dsn = user_dsns
    with psycopg.connect(fresh_dsn, autocommit=True) as admin, psycopg.connect(other_dsn, autocommit=True) as other:
        create(admin, "kept", 2)
        session = uuid.uuid4()
        with psycopg.connect(holder_dsn, autocommit=True) as holder:
            one(holder, "SELECT * FROM pgslots.keep_alive(%s)", [session])
            a = acquire(holder, ["kept"], lease_seconds=300, session=session)["lease_id"]
            b = acquire(holder, ["kept"], lease_seconds=300, session=session)["lease_id"]
        pid = int(one(admin, "SELECT backend_pid FROM pgslots.sessions WHERE id = %s", [session])["backend_pid"])
        assert _gone(admin, pid)  # its backend is gone, but it was seen just now
        assert not acquire(other, ["kept"], lease_seconds=60)["granted"]
        with psycopg.connect(holder_dsn, autocommit=True) as holder:
            advance_clock(admin, 8)
            assert one(holder, "SELECT * FROM pgslots.keep_alive(%s, %s)", [session, [a, b]])["lost"] == []  # rebinds
            advance_clock(admin, 8)
            assert not acquire(other, ["kept"], lease_seconds=60)["granted"]  # its new backend is alive
            one(admin, "SELECT pgslots.release(%s)", [b])  # an operator releases one
            assert one(holder, "SELECT * FROM pgslots.keep_alive(%s, %s)", [session, [a, b]])["lost"] == [b]
        check(admin)


def test_a_new_lease_of_a_session_long_silent_is_not_dead_at_once(fresh_dsn: str, user_dsns: tuple[str, str]) -> None:
    """A process idle between two leases does not keep its session alive; its next lease still
    lives liveness_seconds from its grant, by which time its keep-alive has resumed."""
    holder_dsn, other_dsn = user_dsns
    with psycopg.connect(fresh_dsn, autocommit=True) as admin, psycopg.connect(other_dsn, autocommit=True) as other:
        create(admin, "idle", 1)
        session = uuid.uuid4()
        with psycopg.connect(holder_dsn, autocommit=True) as keeper:
            one(keeper, "SELECT * FROM pgslots.keep_alive(%s, bind => false)", [session])
        advance_clock(admin, 60)  # silent for a minute, its backend long gone
        with psycopg.connect(holder_dsn, autocommit=True) as holder:
            got = acquire(holder, ["idle"], lease_seconds=300, session=session)
            assert got["granted"] and got["liveness_seconds"] == 10
        assert not acquire(other, ["idle"], lease_seconds=60)["granted"]
        advance_clock(admin, 10)
        assert acquire(other, ["idle"], lease_seconds=60)["granted"]  # and no keep-alive came: dead now


def test_keep_alive_names_the_orphans_of_its_session(fresh_dsn: str) -> None:
    """A lease of the session that the caller no longer names (its release was lost) is reported as
    an orphan once it is older than liveness_seconds, so the client releases it instead of keeping
    it alive until it expires; the Python client does so."""
    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        create(admin, "orphan", 2)
        session = uuid.uuid4()
        with psycopg.connect(fresh_dsn, autocommit=True) as holder:
            one(holder, "SELECT * FROM pgslots.keep_alive(%s)", [session])
            kept = acquire(holder, ["orphan"], lease_seconds=300, session=session)["lease_id"]
            forgotten = acquire(holder, ["orphan"], lease_seconds=300, session=session)["lease_id"]
            assert one(holder, "SELECT * FROM pgslots.keep_alive(%s, %s)", [session, [kept]])["orphans"] == []  # too young
            advance_clock(admin, 11)
            row = one(holder, "SELECT * FROM pgslots.keep_alive(%s, %s)", [session, [kept]])
            assert row["lost"] == [] and row["orphans"] == [forgotten]
            assert one(holder, "SELECT * FROM pgslots.keep_alive(%s)", [session])["orphans"] is None  # no list, no orphans
    _set_liveness(fresh_dsn, 1.0)
    client = pgslots.Client(fresh_dsn)
    try:
        with concurrency("orphan", lease_duration=300, client=client) as lease:
            engine = client._connections.engine
            with psycopg.connect(fresh_dsn, autocommit=True) as admin:
                # A lease of this process's session it does not hold (as if its release had been lost).
                stray = acquire(admin, ["orphan"], lease_seconds=300, session=engine.session_id)["lease_id"]
                deadline = time.monotonic() + 10
                while one(admin, "SELECT count(*) AS n FROM pgslots.leases WHERE id = %s", [stray])["n"]:
                    assert time.monotonic() < deadline, "the orphan was never released"
                    time.sleep(0.1)
                assert lease is not None
                assert one(admin, "SELECT count(*) AS n FROM pgslots.leases WHERE id = %s", [lease.lease_id])["n"] == 1
    finally:
        client.close()


def test_a_session_belongs_to_the_role_that_first_kept_it_alive(fresh_dsn: str, user_dsns: tuple[str, str]) -> None:
    victim_dsn, attacker_dsn = user_dsns
    session = uuid.uuid4()
    with psycopg.connect(victim_dsn, autocommit=True) as victim, psycopg.connect(attacker_dsn, autocommit=True) as attacker:
        one(victim, "SELECT * FROM pgslots.keep_alive(%s)", [session])
        with pytest.raises(psycopg.Error) as caught:
            attacker.execute("SELECT * FROM pgslots.keep_alive(%s)", [session])
        assert caught.value.sqlstate == "PS014"
        with pytest.raises(psycopg.Error) as caught:
            attacker.execute("SELECT * FROM pgslots.keep_alive(NULL)")
        assert caught.value.sqlstate == "PS011"
    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        row = one(admin, "SELECT owner::text AS owner, backend_pid FROM pgslots.sessions WHERE id = %s", [session])
        assert row["owner"] == psycopg.conninfo.conninfo_to_dict(victim_dsn)["user"]


def test_sweep_reclaims_dead_sessions_and_forgets_them(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        create(admin, "swept", 2)
        session = uuid.uuid4()
        with psycopg.connect(fresh_dsn, autocommit=True) as holder:
            one(holder, "SELECT * FROM pgslots.keep_alive(%s, bind => false)", [session])
            acquire(holder, ["swept"], lease_seconds=300, session=session)
        assert one(admin, "SELECT pgslots.sweep() AS n")["n"] == 0
        advance_clock(admin, 11)
        assert one(admin, "SELECT pgslots.sweep() AS n")["n"] == 1
        assert status(admin, "swept")["leases"] == 0
        assert one(admin, "SELECT count(*) AS n FROM pgslots.sessions")["n"] == 0


# ---- processes ----------------------------------------------------------------------------------


def _hold_forever(dsn: str, holding: Any) -> None:
    client = pgslots.Client(dsn)
    with concurrency("mortal", lease_duration=300, client=client):
        with holding.get_lock():
            holding.value += 1
        time.sleep(3600)


def _wait_for_slot(dsn: str, got: Any, started: Any) -> None:
    client = pgslots.Client(dsn)
    try:
        started.set()
        with concurrency("mortal", timeout_seconds=30, lease_duration=300, client=client):
            got.put(time.time())
    finally:
        client.close()


@pytest.mark.parametrize("liveness", [2.0, 10.0])
def test_sigkilled_holders_slots_come_back_within_liveness_plus_one_second(fresh_dsn: str, liveness: float) -> None:
    """3 holders in their own processes fill a limit of 3 with the default 300 s lease; 3 waiters in
    other processes wait. All holders are SIGKILLed at once: every waiter holds a slot within
    liveness_seconds + 1 s, with no sweeper running."""
    _set_liveness(fresh_dsn, liveness)
    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        create(admin, "mortal", 3)
    holding = CTX.Value("i", 0)
    holders = [CTX.Process(target=_hold_forever, args=(fresh_dsn, holding)) for _ in range(3)]
    for p in holders:
        p.start()
    deadline = time.monotonic() + 15
    while holding.value < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(1.0)  # their sessions have been kept alive a few times
    got: Any = CTX.Queue()
    waiters = []
    for _ in range(3):
        started = CTX.Event()
        waiters.append(CTX.Process(target=_wait_for_slot, args=(fresh_dsn, got, started)))
        waiters[-1].start()
        assert started.wait(10)
    time.sleep(0.5)
    killed_at = time.time()
    for p in holders:
        assert p.pid is not None
        os.kill(p.pid, signal.SIGKILL)
    granted = sorted(got.get(timeout=liveness + 10) - killed_at for _ in range(3))
    for p in holders + waiters:
        p.join(10)
    print(f"\nliveness_seconds {liveness:g}: 3 SIGKILLed holders' slots held again after {[round(g, 2) for g in granted]} s")
    assert granted[-1] < liveness + 1.0 + 0.5  # + 0.5: the kill, and the waiters' processes, on 2 shared cores
    assert granted[0] > liveness - 1.0  # not before their sessions could be silent for liveness_seconds
    check(fresh_dsn)


def _hold_and_report(dsn: str, holding: Any, released: Any, seconds: float) -> None:
    client = pgslots.Client(dsn)
    with concurrency("survivor", lease_duration=300, client=client, raise_on_lease_renewal_failure=True):
        holding.set()
        time.sleep(seconds)
    released.set()
    client.close()


def test_terminated_backends_of_a_live_holder_lose_no_lease(fresh_dsn: str) -> None:
    """pg_terminate_backend on every connection of a live holder, again and again for longer than
    liveness_seconds: its engine reconnects and keeps its session alive, so nobody else is granted
    its slot and its body is never interrupted."""
    _set_liveness(fresh_dsn, 2.0)
    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        create(admin, "survivor", 1)
        holding, released = CTX.Event(), CTX.Event()
        holder_dsn = psycopg.conninfo.make_conninfo(fresh_dsn, application_name="liveness-holder")
        holder = CTX.Process(target=_hold_and_report, args=(holder_dsn, holding, released, 6.0))
        holder.start()
        assert holding.wait(15)
        waiter = pgslots.Client(fresh_dsn)
        terminated = 0
        try:
            stop = time.monotonic() + 5.0
            while time.monotonic() < stop:
                terminated += len(
                    admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND application_name = 'liveness-holder'"
                    ).fetchall()
                )
                with (
                    pytest.raises(pgslots.AcquireConcurrencySlotTimeoutError),
                    concurrency("survivor", timeout_seconds=0.3, client=waiter),
                ):
                    pytest.fail("granted a slot its live holder still holds")
        finally:
            waiter.close()
        holder.join(20)
        assert holder.exitcode == 0 and released.is_set()  # the body ran to its end, uninterrupted
        assert terminated >= 5
        check(admin)
        assert status(admin, "survivor")["leases"] == 0


class _Proxy:
    """A loopback TCP proxy to the test server's unix socket, which the test can cut: its
    connections are closed, and new ones are accepted but never answered (a black-holed network)."""

    def __init__(self, dsn: str) -> None:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
        self.target = os.path.join(str(info["host"]), f".s.PGSQL.{info.get('port', 5432)}")
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.dsn = psycopg.conninfo.make_conninfo(dsn, host="127.0.0.1", port=str(self.port))
        self.sockets: list[socket.socket] = []
        self.forwarding = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            if not self.forwarding:
                continue  # parked: never answered
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.target)
            self.sockets.append(server)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.forwarding = False
        for s in list(self.sockets):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.cut()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for s in self.sockets:
            s.close()


def test_a_holder_cut_off_gives_up_its_lease_before_anyone_else_gets_it(fresh_dsn: str) -> None:
    """Every connection of the holder (through a proxy) is cut for good, as by a network that drops
    its packets. Within liveness_seconds - 1 s of its last keep-alive the holder interrupts its body
    (raise_on_lease_renewal_failure), and the body's exit is not held up; only after that does a
    waiter in another process get the slot, once the database has not heard from the holder for
    liveness_seconds."""
    _set_liveness(fresh_dsn, 3.0)
    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        create(admin, "island", 1)
    proxy = _Proxy(fresh_dsn)
    holder_client = pgslots.Client(proxy.dsn)
    interrupted: list[float] = []
    exited: list[float] = []
    holding = threading.Event()

    def body() -> None:
        try:
            with concurrency("island", lease_duration=300, client=holder_client, raise_on_lease_renewal_failure=True):
                holding.set()
                for _ in range(400):
                    time.sleep(0.05)
        except pgslots.LeaseRenewalFailedError:
            interrupted.append(time.time())
        exited.append(time.time())

    thread = threading.Thread(target=body)
    thread.start()
    got: Any = CTX.Queue()
    try:
        assert holding.wait(10)
        time.sleep(1.0)  # keep-alives have run through the proxy
        started = CTX.Event()
        waiter = CTX.Process(target=_wait_for_slot_named, args=(fresh_dsn, "island", got, started))
        waiter.start()
        assert started.wait(10)
        cut_at = time.time()
        proxy.cut()
        granted_at = got.get(timeout=20)
        thread.join(20)
        waiter.join(10)
        assert interrupted, "the cut-off holder's body was never told"
        print(
            f"\ncut off: body interrupted after {interrupted[0] - cut_at:.2f} s, "
            f"the waiter granted after {granted_at - cut_at:.2f} s (liveness_seconds 3)"
        )
        assert interrupted[0] < granted_at
        assert interrupted[0] - cut_at < 3.0
        assert exited[0] - interrupted[0] < 2 * RELEASE_WAIT_SECONDS  # its release went to the background
    finally:
        proxy.close()
        holder_client.close()
    check(fresh_dsn)


def _wait_for_slot_named(dsn: str, name: str, got: Any, started: Any) -> None:
    client = pgslots.Client(dsn)
    try:
        started.set()
        with concurrency(name, timeout_seconds=30, lease_duration=300, client=client):
            got.put(time.time())
    finally:
        client.close()


def _hold_for(dsn: str, holding: Any, index: int, seconds: float, out: Any) -> None:
    client = pgslots.Client(dsn)
    try:
        with concurrency("restart5", lease_duration=300, raise_on_lease_renewal_failure=True, timeout_seconds=60, client=client):
            with holding.get_lock():
                holding[index] = 1
            end = time.time() + seconds
            while time.time() < end:
                time.sleep(0.05)
            with holding.get_lock():
                holding[index] = 0
        out.put("held")
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        with holding.get_lock():
            holding[index] = 0
        out.put(f"{type(exc).__name__}: {exc}")
    finally:
        client.close()


def test_an_immediate_restart_under_5_holders_loses_nothing_and_over_admits_nothing(fresh_dsn: str, pg_server: dict[str, Any]) -> None:
    """5 holders fill a limit of 5 (300 s leases, bodies interrupted if a lease is lost), 3 waiters
    queue behind them, and the server restarts with -m immediate: every holder keeps its lease
    through the restart (back well within liveness_seconds), nobody is over-admitted (an
    independent count), every waiter is served afterwards."""
    if pg_server["cluster"] is None:
        pytest.skip("needs the local test cluster to restart it")
    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        create(admin, "restart5", 5)
    holding = CTX.Array("i", 8)
    out: Any = CTX.Queue()
    holders = [CTX.Process(target=_hold_for, args=(fresh_dsn, holding, i, 5.0, out)) for i in range(5)]
    for p in holders:
        p.start()
    deadline = time.monotonic() + 15
    while sum(holding[:5]) < 5:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    waiters = [CTX.Process(target=_hold_for, args=(fresh_dsn, holding, i, 0.3, out)) for i in range(5, 8)]
    for p in waiters:
        p.start()
    with PeakWatcher(lambda: sum(holding[:]), 5) as bodies:
        time.sleep(1.0)
        pg_server["cluster"].restart(mode="immediate")
        results = [out.get(timeout=60) for _ in range(8)]
    for p in holders + waiters:
        p.join(10)
    print(f"\nrestart -m immediate under 5 holders: {results.count('held')}/8 held, peak {bodies.peak}/5")
    assert results == ["held"] * 8, results
    assert bodies.peak <= 5
    check(fresh_dsn)
    with psycopg.connect(fresh_dsn, autocommit=True) as admin:
        assert status(admin, "restart5")["leases"] == 0


# ---- who holds what, honestly ---------------------------------------------------------------------


def _hold_two_forever(dsn: str, holding: Any) -> None:
    client = pgslots.Client(dsn)
    with concurrency("honest", occupy=2, lease_duration=300, client=client):
        with holding.get_lock():
            holding.value += 1
        time.sleep(3600)


def test_slots_of_killed_holders_show_as_reclaimable_not_in_use(fresh_dsn: str, user_dsns: tuple[str, str]) -> None:
    """A SIGKILLed holder's slots are never shown as in use: status, ls, watch, metrics and the
    page's JSON show them as reclaimable (a plain role reads that too), and the next caller that
    needs them takes them at once."""
    from clihelp import run
    from pgslots import metrics

    _set_liveness(fresh_dsn, 1)
    client = pgslots.Client(fresh_dsn)
    try:
        client.create_limit("honest", 3)
        holding = CTX.Value("i", 0)
        holder = CTX.Process(target=_hold_two_forever, args=(fresh_dsn, holding))
        holder.start()
        deadline = time.monotonic() + 20
        while holding.value < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert holding.value == 1
        assert client.read_limit("honest").reclaimable_slots == 0  # alive: held, not reclaimable
        assert [lease.gone for lease in client.list_leases("honest")] == [False]
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        while client.read_limit("honest").reclaimable_slots < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        info = client.read_limit("honest")
        assert (info.active_slots, info.leased_slots, info.reclaimable_slots) == (2, 2, 2)
        ls = run(fresh_dsn, "ls").output
        assert "0 +2 reclaimable" in ls, ls
        assert "reclaimable 2 (holders gone)" in run(fresh_dsn, "watch", "--once").output
        assert 'pgslots_reclaimable_slots{limit="honest"} 2' in metrics.read(client)
        assert '"reclaimable_slots": 2' in run(fresh_dsn, "inspect", "honest", "-o", "json").output
        assert [lease.gone for lease in client.list_leases("honest")] == [True]
        assert "holder gone: reclaimable" in run(fresh_dsn, "leases", "honest").output
        with psycopg.connect(user_dsns[0], autocommit=True) as reader:
            assert status(reader, "honest")["reclaimable_slots"] == 2
        with concurrency("honest", occupy=3, timeout_seconds=1, client=client):  # taken back at once
            assert client.read_limit("honest").reclaimable_slots == 0
    finally:
        client.close()


EXIT_SCRIPT = """
import sys, threading, time
import pgslots
from pgslots.sync import concurrency

pgslots.configure(sys.argv[1])
ready = threading.Event()

def body():
    with concurrency("at-exit", occupy=2):
        ready.set()
        time.sleep(3600)

threading.Thread(target=body, daemon=True).start()
assert ready.wait(30)
print("holding", flush=True)
"""


def test_leases_still_held_at_a_normal_exit_are_released_before_it(fresh_dsn: str) -> None:
    """The main thread returns while a daemon thread is inside its with block: the interpreter's
    exit releases the lease (liveness_seconds is 10 s: nothing else could free it this soon)."""
    import subprocess
    import sys

    client = pgslots.Client(fresh_dsn)
    try:
        client.create_limit("at-exit", 2)
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, fresh_dsn], capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
        assert done.returncode == 0 and done.stdout.strip() == "holding", done.stderr
        info = client.read_limit("at-exit")
        assert (info.active_slots, info.leases) == (0, 0), "released before the process exited"
        assert took < 15, took
    finally:
        client.close()
