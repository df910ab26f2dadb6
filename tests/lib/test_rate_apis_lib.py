"""Rate limits for real APIs through the library: reserve() and settle, rate limits inside the
caller's transaction, window limits, fail-open; and with real processes, the long-run rate of
settled costs and the window bound."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import invariants
import psycopg
import pytest

import pgslots
from pgslots import Client
from pgslots import asyncio as pa
from pgslots import sync as ps
from pgslots._cluster import LocalCluster, find_bindir, server_user
from pgslots.types import Lease


def test_reserve_and_settle_sync(client: Client) -> None:
    client.create_limit("tokens", 1000, slot_decay_per_second=0.001)
    with ps.reserve("tokens", occupy=600) as r:
        assert r.reservation_id is not None and r.slots == 600 and r.actual is None
        assert client.read_limit("tokens").active_slots == pytest.approx(600, abs=0.1)
        assert r.settle(250) is True and r.actual == 250
        assert r.settle(250) is False
    assert client.read_limit("tokens").active_slots == pytest.approx(250, abs=0.1)
    with ps.reserve("tokens", occupy=100):
        pass  # never settled: the estimate is the cost
    assert client.read_limit("tokens").active_slots == pytest.approx(350, abs=0.1)
    with pytest.raises(pgslots.InvalidArgumentError, match="actual must be a finite number >= 0"):
        r.settle(-1)
    with pytest.raises(pgslots.InvalidArgumentError):
        r.settle(float("nan"))
    with pytest.raises(pgslots.InvalidArgumentError, match="actual must be a number of slots from 0 to 1000000000"):
        r.settle(2e9)
    assert ps.reserve(None).reservation_id is None, "no names, nothing reserved"


def test_reserve_waits_for_a_debt_like_rate_limit(client: Client) -> None:
    client.create_limit("tokens", 10, slot_decay_per_second=20)
    r = ps.reserve("tokens", occupy=5)
    r.settle(15)  # 15 held on a limit of 10: 6 must decay before 1 more fits, 0.3 s
    started = time.monotonic()
    ps.rate_limit("tokens")
    assert 0.25 <= time.monotonic() - started < 1.0


def test_reserve_and_settle_async(client: Client) -> None:
    client.create_limit("tokens", 100, slot_decay_per_second=0.001)

    async def main() -> None:
        async with pa.reserve("tokens", occupy=40) as r:
            assert await r.settle(10) is True
        plain = await pa.reserve("tokens", occupy=5)
        assert plain.reservation_id is not None
        assert await plain.settle(5) is False
        assert await pa.Reservation(None, ("tokens",), 1, None).settle(1) is False, "nothing reserved, nothing to settle"
        unknown = pa.Reservation(Lease(None, None, None, ("tokens",), 1, 300, reservation_id=uuid.uuid4()), ("tokens",), 1, None)
        with pytest.raises(pgslots.ReservationError, match="is unknown"):
            await unknown.settle(1)

    asyncio.run(main())
    assert client.read_limit("tokens").active_slots == pytest.approx(15, abs=0.1)


def test_a_reservation_or_rate_limit_in_a_rolled_back_transaction_leaves_the_limit_as_it_was(client: Client, fresh_dsn: str) -> None:
    client.create_limit("tokens", 100, slot_decay_per_second=0.001)
    client.create_limit("hourly", 5, window_seconds=3600)
    ps.rate_limit("hourly", occupy=2)
    before = {n: client.read_limit(n).active_slots for n in ("tokens", "hourly")}
    with psycopg.connect(fresh_dsn) as conn:
        with conn.transaction(force_rollback=True):
            r = ps.reserve(["tokens", "hourly"], occupy=3, connection=conn)
            r.settle(2)
            ps.rate_limit("hourly", connection=conn)
            inside = conn.execute("SELECT active_slots FROM pgslots.status WHERE name = 'hourly'").fetchone()
            assert inside == (5,), "inside the transaction the slots are taken"
        after = {n: client.read_limit(n).active_slots for n in ("tokens", "hourly")}
        assert after == pytest.approx(before, abs=0.01)
        with pytest.raises(pgslots.ReservationError):
            r.settle(1)  # the reservation rolled back with the rest
        conn.rollback()
        # Committed, the same calls keep their slots.
        with conn.transaction():
            ps.reserve("tokens", occupy=3, connection=conn).settle(2)
        assert client.read_limit("tokens").active_slots == pytest.approx(before["tokens"] + 2, abs=0.01)
    invariants.check(fresh_dsn)


def test_a_refused_rate_limit_in_a_transaction_waits_the_exact_hint(client: Client, fresh_dsn: str) -> None:
    client.create_limit("w", 1, window_seconds=1.0)
    with psycopg.connect(fresh_dsn) as conn:
        started = time.monotonic()
        with conn.transaction():
            ps.rate_limit("w", connection=conn)
        with conn.transaction():
            ps.rate_limit("w", connection=conn, timeout_seconds=5)
        assert 0.95 <= time.monotonic() - started < 1.5
        with conn.transaction(), pytest.raises(pgslots.AcquireConcurrencySlotTimeoutError):
            ps.rate_limit("w", connection=conn, timeout_seconds=0.3)


def test_window_limits_through_the_library(client: Client) -> None:
    info = client.create_limit("per-2s", 3, window_seconds=2)
    assert (info.window_seconds, info.slot_decay_per_second, info.shadow) == (2.0, 0.0, False)
    started = time.monotonic()
    for _ in range(4):
        ps.rate_limit("per-2s")
    assert 1.95 <= time.monotonic() - started < 2.6, "the fourth waited for the first to leave the window"
    with pytest.raises(pgslots.WindowLimitError, match=r"Use rate_limit\(\)"), ps.concurrency("per-2s"):
        pass
    with pytest.raises(pgslots.InvalidLimitValueError, match="not both"):
        client.update_limit("per-2s", slot_decay_per_second=1)
    info = client.update_limit("per-2s", slot_decay_per_second=1, window_seconds=0)
    assert (info.window_seconds, info.slot_decay_per_second) == (0.0, 1.0)
    shadow = client.create_limit("trial", 1, shadow=True)
    assert shadow.shadow
    for _ in range(3):
        with ps.concurrency("trial"):
            pass
    assert client.read_limit("trial").shadow_refusals == 0, "one at a time never exceeds 1"
    with ps.concurrency("trial"), ps.concurrency("trial"):
        pass
    assert client.read_limit("trial").shadow_refusals == 1


# ---- fail-open --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stoppable() -> Any:
    """A server of its own, to stop."""
    bindir = find_bindir()
    if bindir is None:
        pytest.fail("no PostgreSQL server binaries for the fail-open test")
    root = Path(tempfile.mkdtemp(prefix="pgslots-failopen-"))
    root.chmod(0o755)
    cluster = LocalCluster(root=root / "pg", bindir=bindir, user=server_user())
    cluster.init(durable=False)
    cluster.start()
    pgslots.migrate(cluster.dsn())
    try:
        yield cluster
    finally:
        cluster.stop()


def test_fail_open_runs_the_body_with_a_warning_only_when_the_database_is_unreachable(
    stoppable: Any, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = stoppable.dsn()
    Client(dsn).create_limit("full", 1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT * FROM pgslots.acquire(ARRAY['full'], lease_seconds => 600)")
    client = Client(dsn, fail_open=True, fail_open_after_seconds=1.0)
    try:
        # The database answers "full": that is never failed open.
        with pytest.raises(pgslots.AcquireConcurrencySlotTimeoutError), ps.concurrency("full", timeout_seconds=1.5, client=client):
            pass
        stoppable.stop()
        try:
            for per_call in (None, True):
                started = time.monotonic()
                with caplog.at_level(logging.WARNING, logger="pgslots"), ps.concurrency("full", client=client, fail_open=per_call) as lease:
                    ran_after = time.monotonic() - started
                assert lease is not None and lease.failed_open and lease.lease_id is None
                assert 1.0 <= ran_after < 4.0, ran_after
                assert "failing open" in caplog.text
                caplog.clear()
            started = time.monotonic()
            ps.rate_limit("full", client=client)
            r = ps.reserve("full", client=client)
            assert r.failed_open and r.reservation_id is None and r.settle(5) is False
            assert asyncio.run(_async_fail_open(client)) is True
            # A new client, whose first connection is refused at once, retries until the time passed.
            fresh = Client(dsn, fail_open=True, fail_open_after_seconds=0.5)
            started = time.monotonic()
            with ps.concurrency("full", client=fresh) as lease:
                assert lease is not None and lease.failed_open
            assert 0.5 <= time.monotonic() - started < 3.0
            # Turned off for one call, an outage is an error as before (here: the caller's timeout).
            no_fail_open = ps.concurrency("full", client=fresh, fail_open=False, timeout_seconds=1.0)
            with pytest.raises((pgslots.AcquireConcurrencySlotTimeoutError, pgslots.DatabaseUnavailableError)), no_fail_open:
                pytest.fail("the body must not run")
            fresh.close()
        finally:
            stoppable.start()
    finally:
        client.close()


async def _async_fail_open(client: Client) -> bool:
    async with pa.concurrency("full", client=client) as lease:
        return bool(lease and lease.failed_open)


def test_fail_open_arguments_are_checked() -> None:
    with pytest.raises(pgslots.InvalidArgumentError, match="fail_open must be"):
        Client("host=/nonexistent", fail_open="yes")  # type: ignore[arg-type]
    with pytest.raises(pgslots.InvalidArgumentError, match="fail_open_after_seconds"):
        Client("host=/nonexistent", fail_open_after_seconds=-1)
    with pytest.raises(pgslots.InvalidArgumentError, match="fail_open must be"):
        ps.concurrency("x", fail_open=1)  # type: ignore[arg-type]


# ---- processes --------------------------------------------------------------------------------

RATE = 200.0  # slots per second
LIMIT = 20
ESTIMATE = 5
SECONDS = 12.0


def _reserver(dsn: str, seed: int, deadline: float, out: Any) -> None:
    rng = random.Random(seed)
    client = Client(dsn)
    log = []
    try:
        while time.time() < deadline:
            with ps.reserve("llm", occupy=ESTIMATE, client=client, timeout_seconds=30) as r:
                granted = time.time()
                actual = rng.uniform(1, 9)  # known once the call is done: 5 on average, up to 9
                r.settle(actual)
            log.append((granted, actual))
    finally:
        client.close()
    out.put(log)


def test_processes_settling_random_costs_hold_the_rate_of_actual_cost(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("SELECT pgslots.create_limit('llm', %s, %s, margin_seconds => 0)", [LIMIT, RATE])  # the exact rate
    ctx = mp.get_context("fork")
    out: Any = ctx.Queue()
    deadline = time.time() + SECONDS
    procs = [ctx.Process(target=_reserver, args=(fresh_dsn, i, deadline, out)) for i in range(4)]
    for p in procs:
        p.start()
    logs = [out.get(timeout=SECONDS + 60) for _ in procs]
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0] * 4
    grants = sorted(g for log in logs for g in log)
    assert len(grants) > 200
    # After the initial burst, the actual cost granted per second is the decay rate: from the first
    # grant after 1 s to the last, the costs of the grants in between (the last one's not included).
    start = next(i for i, (t, _) in enumerate(grants) if t >= grants[0][0] + 1.0)
    span = grants[-1][0] - grants[start][0]
    cost = sum(actual for _, actual in grants[start:-1])
    achieved = cost / span
    print(f"\n4 processes, estimate {ESTIMATE}, actual 1..9: {achieved:.2f} slots/s of actual cost over {span:.1f} s, rate {RATE}")
    assert achieved == pytest.approx(RATE, rel=0.01)
    invariants.check(fresh_dsn, owing=("llm",))


WINDOW_LIMIT = 10
WINDOW = 2.0


def _window_worker(dsn: str, deadline: float, pause: tuple[float, float], counted: Any) -> None:
    client = Client(dsn)
    try:
        while time.time() < deadline:
            if pause[0] <= time.time() < pause[1]:
                time.sleep(pause[1] - time.time())
                continue
            ps.rate_limit("per-2s", client=client, timeout_seconds=30)
            with counted.get_lock():
                counted.value += 1
    finally:
        client.close()


def test_processes_never_get_an_eleventh_grant_in_any_window(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("SELECT pgslots.create_limit('per-2s', %s, window_seconds => %s)", [WINDOW_LIMIT, WINDOW])
        # Every grant, as the database decided it: an audit trigger on the grant log.
        conn.execute("CREATE TABLE grant_audit (granted_at timestamptz, slots float8)")
        conn.execute(
            "CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "INSERT INTO public.grant_audit VALUES (NEW.granted_at, NEW.slots); RETURN NEW; END $$"
        )
        conn.execute("CREATE TRIGGER audit AFTER INSERT ON pgslots.window_grants FOR EACH ROW EXECUTE FUNCTION audit()")
    ctx = mp.get_context("fork")
    counted = ctx.Value("i", 0)
    now = time.time()
    deadline, pause = now + 9.0, (now + 4.0, now + 6.5)  # saturate, idle 2.5 s, saturate again
    procs = [ctx.Process(target=_window_worker, args=(fresh_dsn, deadline, pause, counted)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 6
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        times = [r[0].timestamp() for r in conn.execute("SELECT granted_at FROM grant_audit ORDER BY granted_at")]
    assert len(times) == counted.value, "every grant a process saw is in the log, and no other"
    # The most grants in any span of 2 s: a span starting at each grant (half-open, [t, t + 2)).
    most, j = 0, 0
    for i, t in enumerate(times):
        while j < len(times) and times[j] < t + WINDOW:
            j += 1
        most = max(most, j - i)
    after_idle = [t for t in times if t >= pause[1] - 0.5]
    burst = sum(1 for t in after_idle if t < after_idle[0] + WINDOW)
    print(
        f"\n6 processes on {WINDOW_LIMIT} per {WINDOW} s: {len(times)} grants in 9 s, at most {most} in any {WINDOW} s, "
        f"{burst} in the first {WINDOW} s after the idle period"
    )
    assert most <= WINDOW_LIMIT, f"{most} grants in one {WINDOW} s span"
    assert most == WINDOW_LIMIT, "saturated"
    assert burst == WINDOW_LIMIT, "after the idle period, a full window and not a token bucket's double burst"
    assert len(times) >= 4 * WINDOW_LIMIT, "windows were filled again as they passed"
    invariants.check(fresh_dsn)
