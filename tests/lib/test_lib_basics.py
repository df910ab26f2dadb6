"""The Python API's behaviour as a Prefect user knows it, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import threading
import time
import uuid
import weakref
from typing import Any

import psycopg
import pytest

import pgslots
from pgslots import asyncio as pa
from pgslots.client import Client, connections_of
from pgslots.sync import concurrency, rate_limit


def held(client: Client, name: str) -> float:
    return client.read_limit(name).active_slots


def test_body_runs_and_slots_return(client: Client) -> None:
    client.create_limit("db", 2)
    with concurrency("db", occupy=2) as lease:
        assert lease is not None and lease.lease_id is not None and lease.fencing_token
        assert held(client, "db") == 2
    assert held(client, "db") == 0


def test_slots_return_when_the_body_raises(client: Client) -> None:
    client.create_limit("db", 1)
    with pytest.raises(ZeroDivisionError), concurrency("db"):
        1 / 0  # noqa: B018
    assert held(client, "db") == 0


def test_async_body_and_exceptions(client: Client) -> None:
    client.create_limit("db", 1)

    async def main() -> None:
        async with pa.concurrency("db") as lease:
            assert lease is not None
            assert held(client, "db") == 1
        with pytest.raises(KeyError):
            async with pa.concurrency("db"):
                raise KeyError("x")

    asyncio.run(main())
    assert held(client, "db") == 0


def test_occupy_over_limit_fails_at_once(client: Client) -> None:
    client.create_limit("small", 2)
    start = time.monotonic()
    with pytest.raises(pgslots.ConcurrencySlotAcquisitionError) as info, concurrency("small", occupy=3):
        pass
    assert time.monotonic() - start < 1
    assert str(info.value).startswith("Unable to acquire concurrency slots on ['small']: slots requested is greater")


def test_timeout_message_and_type(client: Client) -> None:
    client.create_limit("busy", 1)
    with concurrency("busy"):
        start = time.monotonic()
        with pytest.raises(pgslots.AcquireConcurrencySlotTimeoutError) as info, concurrency("busy", timeout_seconds=0.5):
            pass
        assert 0.45 < time.monotonic() - start < 3
    assert isinstance(info.value, TimeoutError)
    assert str(info.value) == "Attempt to acquire concurrency slots timed out after 0.5 second(s)"
    assert held(client, "busy") == 0
    _until(lambda: client.read_limit("busy").waiters == 0)


def test_async_timeout(client: Client) -> None:
    client.create_limit("busy", 1)

    async def main() -> None:
        async with pa.concurrency("busy"):
            with pytest.raises(pgslots.AcquireConcurrencySlotTimeoutError):
                async with pa.concurrency("busy", timeout_seconds=0.3):
                    pass

    asyncio.run(main())
    assert held(client, "busy") == 0


def test_max_retries(client: Client) -> None:
    client.create_limit("busy", 1)
    with concurrency("busy"):
        with pytest.raises(pgslots.ConcurrencySlotAcquisitionError) as info, concurrency("busy", max_retries=2):
            pass
        assert "max_retries=2" in str(info.value)
        assert str(info.value).startswith("Unable to acquire concurrency slots on ['busy']")
    assert client.read_limit("busy").denied_slots == 3  # N + 1 attempts


def test_max_retries_zero_is_one_attempt(client: Client) -> None:
    client.create_limit("busy", 1)
    with concurrency("busy"), pytest.raises(pgslots.ConcurrencySlotAcquisitionError), concurrency("busy", max_retries=0):
        pass
    assert client.read_limit("busy").denied_slots == 1


def test_missing_limits_warn_and_run(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pgslots")
    ran = False
    with concurrency(["ghost", "ghoul"]) as lease:
        ran = True
        assert lease is not None and lease.lease_id is None
    assert ran
    assert "Concurrency limits ['ghost', 'ghoul'] do not exist - skipping acquisition." in caplog.text


def test_partial_misses_are_named_and_the_rest_enforced(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pgslots")
    client.create_limit("real", 1)
    with concurrency(["real", "ghost"]) as lease:
        assert lease is not None and lease.missing == ("ghost",)
        assert held(client, "real") == 1
    assert "Concurrency limits ['ghost'] do not exist - skipping acquisition." in caplog.text


def test_missing_limits_strict(client: Client) -> None:
    client.create_limit("real", 1)
    with pytest.raises(pgslots.MissingLimitsError) as info, concurrency(["real", "ghost"], strict=True):
        pass
    assert str(info.value) == "Concurrency limits ['ghost'] must be created before acquiring slots"
    assert isinstance(info.value, pgslots.ConcurrencySlotAcquisitionError)
    assert held(client, "real") == 0


def test_empty_names_touch_nothing() -> None:
    unreachable = Client("host=127.0.0.1 port=1 dbname=nothing connect_timeout=1")
    with concurrency([], client=unreachable) as lease:
        assert lease is None
    with concurrency(None, client=unreachable):
        pass
    rate_limit([], client=unreachable)
    asyncio.run(pa.rate_limit(None, client=unreachable))


def test_unreachable_database_is_a_configuration_error() -> None:
    unreachable = Client("host=127.0.0.1 port=1 dbname=nothing connect_timeout=1")
    with pytest.raises(pgslots.ConfigurationError) as info, concurrency("x", client=unreachable, timeout_seconds=3):
        pass
    assert "Cannot reach the database" in str(info.value)
    unreachable.close()


def test_rate_limit_needs_decay(client: Client) -> None:
    client.create_limit("plain", 5)
    with pytest.raises(pgslots.RateLimitWithoutDecayError) as info:
        rate_limit("plain")
    assert str(info.value) == (
        "Only concurrency limits with slot decay can be used for rate limiting. "
        "The following limits do not have a decay configured: 'plain'"
    )


def test_rate_limit_sleeps_the_exact_wait(client: Client) -> None:
    client.create_limit("api", 2, slot_decay_per_second=5, margin_seconds=0)  # exact: no margin
    start = time.monotonic()
    for _ in range(2 + 5):
        rate_limit("api")
    elapsed = time.monotonic() - start
    assert 0.95 < elapsed < 2.0  # burst of 2, then 5 more at 5/s (never sooner; later only if the machine is busy)
    assert client.read_limit("api").denied_slots <= 6  # one refusal per wait: no polling


def test_async_rate_limit_timeout(client: Client) -> None:
    client.create_limit("slow", 1, slot_decay_per_second=0.1)

    async def main() -> None:
        await pa.rate_limit("slow")
        with pytest.raises(pgslots.AcquireConcurrencySlotTimeoutError):
            await pa.rate_limit("slow", timeout_seconds=0.3)

    asyncio.run(main())


def test_multi_name_acquire(client: Client) -> None:
    client.create_limit("a", 2)
    client.create_limit("b", 1)
    with concurrency(["a", "b"]):
        assert held(client, "a") == 1 and held(client, "b") == 1
        with pytest.raises(pgslots.AcquireConcurrencySlotTimeoutError), concurrency(["a", "b"], timeout_seconds=0.2):
            pass
        assert held(client, "a") == 1
    assert held(client, "a") == 0 and held(client, "b") == 0


ARRAY_LITERAL_NAMES = ['a"b', "c\\d", "{e,f}", "NULL", " sp ", "ü,x", "x'y", 'q\\"']


def test_names_that_need_quoting_in_an_array_reach_their_own_limits(client: Client) -> None:
    """The library sends limit names as a text-array literal it writes itself: quotes, backslashes,
    braces, commas, spaces and the word NULL must each name their own limit, from both faces."""
    for name in ARRAY_LITERAL_NAMES:
        client.create_limit(name, 2)
    for name in ARRAY_LITERAL_NAMES:
        with concurrency(name, client=client):
            assert [n for n in ARRAY_LITERAL_NAMES if held(client, n)] == [name]
    with concurrency(ARRAY_LITERAL_NAMES, client=client) as lease:
        assert lease is not None and lease.missing == ()
        assert all(held(client, n) == 1 for n in ARRAY_LITERAL_NAMES)
        (listed,) = {tuple(sorted(x.limit_names)) for x in client.list_leases()}
        assert listed == tuple(sorted(ARRAY_LITERAL_NAMES))

    async def main() -> None:
        for name in ARRAY_LITERAL_NAMES:
            async with pa.concurrency(name, client=client):
                assert [n for n in ARRAY_LITERAL_NAMES if held(client, n)] == [name]

    asyncio.run(main())
    assert not any(held(client, n) for n in ARRAY_LITERAL_NAMES)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"occupy": 0},
        {"occupy": -1},
        {"occupy": 1.5},
        {"timeout_seconds": math.nan},
        {"timeout_seconds": -1},
        {"max_retries": -1},
        {"lease_duration": math.inf},
        {"holder": "me"},
        {"holder": {"since": object()}},
        {"holder": {"n": math.nan}},
        {"occupy": 2**40},
    ],
)
def test_bad_arguments(client: Client, kwargs: dict[str, Any]) -> None:
    client.create_limit("x", 3)
    with pytest.raises(pgslots.InvalidArgumentError), concurrency("x", **kwargs):
        pass
    assert held(client, "x") == 0


def test_lease_duration_below_the_minimum(client: Client) -> None:
    client.create_limit("x", 3)
    with pytest.raises(pgslots.InvalidArgumentError) as info, concurrency("x", lease_duration=5):
        pass
    assert "between 60 and 86400" in str(info.value)


def test_bad_names_from_python(client: Client) -> None:
    with pytest.raises(pgslots.InvalidLimitNameError):
        client.create_limit("a/b", 1)
    with pytest.raises(pgslots.InvalidLimitNameError), concurrency("50%"):
        pass
    with pytest.raises(pgslots.InvalidLimitNameError, match="NUL"), concurrency(["ok", "a\x00b"]):
        pass
    with pytest.raises(pgslots.InvalidLimitNameError, match="NUL"):
        rate_limit("a\x00b")


def test_holder_recorded(client: Client) -> None:
    client.create_limit("h", 1)
    with concurrency("h", holder={"type": "flow_run", "id": "42"}):
        (lease,) = client.list_leases("h")
        assert lease.holder is not None and lease.holder["type"] == "flow_run"
        assert lease.pid is not None and lease.host
        assert lease.application_name and lease.application_name.startswith("pgslots:")


def test_decorators(client: Client) -> None:
    client.create_limit("deco", 1)

    @concurrency("deco")
    def work(x: int) -> int:
        assert held(client, "deco") == 1
        return x * 2

    @pa.concurrency("deco")
    async def awork(x: int) -> int:
        assert held(client, "deco") == 1
        return x * 3

    async def twice() -> int:
        return await awork(2)

    assert work(2) == 4 and work(3) == 6
    assert asyncio.run(twice()) == 6
    assert held(client, "deco") == 0


def test_acquire_inside_the_callers_transaction(client: Client, fresh_dsn: str) -> None:
    client.create_limit("tx", 1)
    with psycopg.connect(fresh_dsn) as conn:
        with concurrency("tx", connection=conn) as lease:
            assert lease is not None
        conn.rollback()  # the lease and its release vanish with the caller's work
        assert held(client, "tx") == 0
        with conn.transaction():
            conn.execute("CREATE TABLE work (n int)")
            ctx = concurrency("tx", connection=conn)
            ctx.__enter__()
        # Committed with the table: another caller sees the slot taken.
        assert held(client, "tx") == 1
        with pytest.raises(pgslots.AcquireConcurrencySlotTimeoutError), concurrency("tx", timeout_seconds=0.3):
            pass
        ctx.__exit__(None, None, None)
        conn.commit()
    assert held(client, "tx") == 0


def test_admin_calls(client: Client) -> None:
    info = client.create_limit("adm", 3, slot_decay_per_second=0.5)
    assert info.limit == 3 and info.slot_decay_per_second == 0.5
    with pytest.raises(pgslots.LimitExistsError):
        client.create_limit("adm", 3)
    with pytest.raises(pgslots.InvalidArgumentError):
        client.create_limit("neg", -1)
    with pytest.raises(pgslots.InvalidArgumentError):
        client.create_limit("nan", 1, slot_decay_per_second=math.nan)
    assert client.update_limit("adm", limit=5, active=False).limit == 5
    assert [x.name for x in client.read_limits()] == ["adm"]
    with concurrency("adm"):
        pass
    client.update_limit("adm", active=True)
    with concurrency("adm") as lease:
        assert lease is not None and lease.lease_id is not None
        (listed,) = client.list_leases()
        assert listed.lease_id == lease.lease_id
        assert client.release(str(lease.lease_id)) is True
        assert client.release(lease.lease_id) is False
    assert client.sweep() == 0
    with pytest.raises(pgslots.InvalidArgumentError):
        client.release("not-a-uuid")
    client.delete_limit("adm")
    with pytest.raises(pgslots.LimitNotFoundError):
        client.read_limit("adm")
    with pytest.raises(pgslots.LimitNotFoundError):
        client.delete_limit("adm")


def test_schema_not_installed(empty_dsn: str) -> None:
    c = Client(empty_dsn)
    with pytest.raises(pgslots.SchemaNotInstalledError) as info, concurrency("x", client=c):
        pass
    assert "pgslots migrate" in str(info.value)
    assert c.migrate()
    with concurrency("x", client=c):
        pass
    c.close()


def test_one_worker_thread_serves_every_lease(client: Client) -> None:
    client.create_limit("threads", 10)
    with concurrency("threads"):
        pass
    before = threading.active_count()
    for _ in range(50):
        with concurrency("threads"):
            pass
    assert threading.active_count() == before


def test_acquire_and_release_are_one_commit_each(client: Client, fresh_dsn: str) -> None:
    client.create_limit("lean", 2)
    with concurrency("lean"):
        pass
    dbname = psycopg.conninfo.conninfo_to_dict(fresh_dsn)["dbname"]

    def commits() -> int:
        time.sleep(1.2)  # backends flush their counters about once a second when idle
        with psycopg.connect(fresh_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", [dbname]).fetchone()
            assert row is not None
            return int(row[0])

    start = commits()
    for _ in range(100):
        with concurrency("lean"):
            pass
    spent = commits() - start
    assert spent <= 2 * 100 + 3, spent  # +3: the counting connections themselves


def _until(check: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_lease_ids_are_unguessable(client: Client) -> None:
    client.create_limit("u", 5)
    with concurrency("u") as a, concurrency("u") as b:
        assert a is not None and b is not None
        assert isinstance(a.lease_id, uuid.UUID) and a.lease_id.version == 4 and a.lease_id != b.lease_id


def test_no_connection_outlives_its_event_loop(client: Client, fresh_dsn: str) -> None:
    client.create_limit("loops", 1)
    own = Client(psycopg.conninfo.make_conninfo(fresh_dsn, application_name="loopcheck"))

    async def once() -> None:
        async with pa.concurrency("loops", client=own):
            pass

    for _ in range(10):
        asyncio.run(once())
    with psycopg.connect(fresh_dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'loopcheck'").fetchone()
    own.close()
    assert row is not None and row[0] <= 1  # at most the engine's connection, never one per loop


def test_a_finished_event_loop_is_not_kept(client: Client) -> None:
    """A program that calls asyncio.run() again and again (a Celery task, a sync view with an async
    helper) must not keep every finished loop, with its closed pool, for ever."""
    client.create_limit("runs", 1)
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def once() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        async with pa.concurrency("runs", client=client):
            pass

    runs = 100
    for _ in range(runs):
        asyncio.run(once())
    gc.collect()
    db = connections_of(client)
    assert not db._apools and not db._owners
    # The leases' renewals keep a dropped lease's callback (which names its task and loop) until
    # they sweep it out with the others dropped since: a bounded number, never one per run.
    assert sum(loop() is not None for loop in loops) < runs // 2


def test_after_aclose_the_same_loop_opens_a_new_pool(client: Client) -> None:
    client.create_limit("reopened", 1)

    async def main() -> None:
        async with pa.concurrency("reopened", client=client) as first:
            assert first is not None
        await client.aclose()
        async with pa.concurrency("reopened", client=client) as second:  # not the closed pool
            assert second is not None and second.lease_id != first.lease_id

    asyncio.run(main())


def test_statements_one_after_another_keep_one_connection_out_of_the_pool(client: Client, fresh_dsn: str) -> None:
    """A loop's statements sent one after another reuse the connection the last one used, without
    the pool's get and put; it is closed with the pool, by aclose() or as the loop ends."""
    client.create_limit("kept", 1)
    own = Client(fresh_dsn)
    db = connections_of(own)
    kept: list[psycopg.AsyncConnection[Any] | None] = []

    async def main(close: bool) -> int:
        async with pa.concurrency("kept", client=own):
            pass
        pool = await db.apool()
        before = pool.get_stats()["requests_num"]
        for _ in range(50):
            async with pa.concurrency("kept", client=own):
                pass
        asked = pool.get_stats()["requests_num"] - before
        assert db._last_apool is not None
        kept.append(db._last_apool.kept)
        if close:
            await own.aclose()
            assert kept[-1] is not None and kept[-1].closed
        return asked

    try:
        assert asyncio.run(main(close=False)) == 0  # 100 statements, none through the pool
        assert kept[-1] is not None and kept[-1].closed  # closed as its loop ended
        assert asyncio.run(main(close=True)) == 0
    finally:
        own.close()


def test_a_kept_connection_never_keeps_a_statement_waiting_for_the_pool(client: Client, fresh_dsn: str) -> None:
    """With one pooled connection, releases and acquires of many tasks overlap: a statement that
    ends while another waits for a connection gives its connection back to the pool."""
    client.create_limit("one-connection", 1000)
    own = Client(fresh_dsn, max_connections=1)

    async def main() -> float:
        async def one(i: int) -> None:
            for _ in range(5):
                async with pa.concurrency("one-connection", client=own):
                    await asyncio.sleep(0.001 * (i % 3))

        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(20))), 20)
        return time.monotonic() - started

    try:
        took = asyncio.run(main())
    finally:
        own.close()
    assert took < 10, f"100 cycles of 20 tasks on one connection took {took:.1f} s"
    assert held(client, "one-connection") == 0


def test_sync_statements_one_after_another_keep_one_connection_out_of_the_pool(client: Client, fresh_dsn: str) -> None:
    """The sync face keeps the last statement's connection too; a transaction (apply) and close()
    give it back, so neither waits for it."""
    client.create_limit("kept-sync", 1)
    own = Client(fresh_dsn, max_connections=1)
    db = connections_of(own)
    try:
        with concurrency("kept-sync", client=own):
            pass
        pool = db.pool()
        before = pool.get_stats()["requests_num"]
        for _ in range(50):
            with concurrency("kept-sync", client=own):
                pass
        assert pool.get_stats()["requests_num"] - before == 0  # 100 statements, none through the pool
        kept = db._keeper.kept
        assert kept is not None and not kept.closed
        started = time.monotonic()
        assert own.apply({"kept-sync": {"limit": 2}}).change  # its transaction takes the one connection
        assert time.monotonic() - started < 5
        with concurrency("kept-sync", client=own):
            pass
        kept = db._keeper.kept
    finally:
        own.close()
    assert kept is not None and kept.closed


def test_threads_on_one_pooled_connection_never_wait_for_a_kept_one(client: Client, fresh_dsn: str) -> None:
    client.create_limit("one-connection-sync", 1000)
    own = Client(fresh_dsn, max_connections=1)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            for _ in range(10):
                with concurrency("one-connection-sync", client=own, timeout_seconds=20):
                    time.sleep(0.001)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(16)]
    started = time.monotonic()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        own.close()
    took = time.monotonic() - started
    assert not errors and took < 10, f"{errors[:1]} after {took:.1f} s"
    assert held(client, "one-connection-sync") == 0


def test_concurrent_first_calls_share_one_pool(client: Client, fresh_dsn: str) -> None:
    client.create_limit("first", 100)
    own = Client(psycopg.conninfo.make_conninfo(fresh_dsn, application_name="firstcheck"))

    async def main() -> int:
        async def one() -> None:
            async with pa.concurrency("first", client=own):
                await asyncio.sleep(0.05)

        await asyncio.gather(*(one() for _ in range(50)))
        with psycopg.connect(fresh_dsn) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'firstcheck'").fetchone()
        assert row is not None
        return int(row[0])

    assert asyncio.run(main()) <= 3  # the pool (2), and the probe connection may still be leaving
    own.close()


def test_without_listen_waiting_falls_back_to_polling(client: Client, fresh_dsn: str) -> None:
    """Behind PgBouncer in transaction mode there is no LISTEN: waiters poll at the retry hint."""
    client.create_limit("nolisten", 1)
    polling = Client(fresh_dsn, listen=False)
    got: list[float] = []

    def waiter() -> None:
        with concurrency("nolisten", client=polling, timeout_seconds=10):
            got.append(time.monotonic())

    with concurrency("nolisten"):
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.5)
        released = time.monotonic()
    thread.join(15)
    assert got and got[0] - released < 2.5  # the next poll, at most a second or so later
    assert not polling._connections.engine.listening
    polling.close()


def test_configure_with_a_pool(fresh_dsn: str) -> None:
    from psycopg_pool import ConnectionPool

    pool: ConnectionPool[Any] = ConnectionPool(fresh_dsn, min_size=1, max_size=2, kwargs={"autocommit": True}, open=True)
    try:
        c = pgslots.configure(pool=pool)
        assert c._connections.pool() is pool
        c.create_limit("pooled", 1)
        with concurrency("pooled"):
            assert c.read_limit("pooled").active_slots == 1
        c.close()
        assert not pool.closed  # a pool we were given stays the caller's to close
    finally:
        pgslots.client._default = None
        pool.close()


def test_an_unconfigured_client_finds_its_server_on_first_use_and_off_the_event_loop(
    fresh_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing configured and the embedded server opted in, making a client starts nothing; the
    first async use finds (and would start) the embedded server in a worker thread, so the event
    loop keeps running."""
    found: list[bool] = []

    def slow_embedded(explicit: str | None, *, embedded: bool | None = None) -> str:
        assert embedded is True
        found.append(threading.current_thread() is threading.main_thread())
        time.sleep(0.5)  # as long as starting a server may take, and more
        return fresh_dsn

    monkeypatch.setattr("pgslots._connections.configured_dsn", lambda explicit: None)
    monkeypatch.setattr("pgslots._connections.resolve_dsn", slow_embedded)
    own = Client(embedded=True)
    assert found == []

    async def main() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        async with pa.concurrency("nowhere", client=own):  # no such limit: runs unthrottled
            pass
        ticker.cancel()
        return ticks

    ticks = asyncio.run(main())
    own.close()
    assert found == [False]  # resolved once, in a worker thread
    assert ticks >= 10  # the loop ran while the server was being found


def test_with_nothing_configured_the_library_starts_no_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No PGSLOTS_DSN, DATABASE_URL or PG* variable: the first call raises ConfigurationError saying
    what to do, and no server is created or started; PGSLOTS_EMBEDDED=1 is the opt-in."""
    for var in ("PGSLOTS_DSN", "DATABASE_URL", "PGHOST", "PGDATABASE", "PGPORT", "PGUSER", "PGSERVICE", "PGHOSTADDR", "PGSLOTS_EMBEDDED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PGSLOTS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("pgslots.embedded._cached_dsn", None)
    own = Client()
    try:
        for call in (own.read_limits, lambda: concurrency("x", client=own).__enter__()):
            with pytest.raises(pgslots.ConfigurationError) as refused:
                call()
            assert "PGSLOTS_DSN" in str(refused.value) and "pgslots embedded start" in str(refused.value)
        with pytest.raises(pgslots.ConfigurationError):
            pgslots.migrate()
        assert not (tmp_path / "home").exists()
    finally:
        own.close()
    from pgslots._config import embedded_wanted

    monkeypatch.setenv("PGSLOTS_EMBEDDED", "1")
    assert embedded_wanted() and not embedded_wanted(False) and embedded_wanted(True)


def test_setup_from_python_is_idempotent_with_exist_ok_and_apply(client: Client) -> None:
    first = client.create_limit("setup", 3)
    again = client.create_limit("setup", 5, exist_ok=True)
    assert (again.id, again.limit) == (first.id, 3)  # left as it is
    with pytest.raises(pgslots.LimitExistsError):
        client.create_limit("setup", 5)
    config: dict[str, dict[str, Any]] = {
        "setup": {"limit": 5},
        "tenant:*": {"limit": 2},
        "api": {"limit": 10, "slot_decay_per_second": 1.0},
    }
    plan = client.apply(config)
    assert sorted(d.name for d in plan.create) == ["api", "tenant:*"]
    assert [(d.name, changes) for d, changes in plan.change] == [("setup", {"limit": (3, 5)})]
    assert client.read_limit("setup").limit == 5 and client.read_limit("api").slot_decay_per_second == 1.0
    assert client.apply(config).empty  # every worker may run it at start
    with pytest.raises(pgslots.InvalidArgumentError, match=r"Client.apply\(\): \[bad\]: limit must be a whole number >= 0"):
        client.apply({"setup": {"limit": 9}, "bad": {"limit": -1}})
    with pytest.raises(pgslots.InvalidArgumentError, match="must map limit names to tables"):
        client.apply([("setup", 9)])  # type: ignore[arg-type]
    dry = client.apply({"setup": {"limit": 7}}, prune=True, dry_run=True)
    assert [c for _, c in dry.change] == [{"limit": (5, 7)}] and sorted(dry.delete) == ["api", "tenant:*"]
    assert client.read_limit("setup").limit == 5 and len(client.read_limits()) == 3  # nothing changed
