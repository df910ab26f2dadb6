"""SQL API: the hot path's plans stay lookups by key, whatever vacuum leaves the tables' statistics
saying (migration 0018 and the release's statements)."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from sqlhelp import acquire, advance_clock, create, one

Conn = psycopg.Connection[Any]
CYCLES = 6_000


def _churn(conn: Conn, name: str, cycles: int) -> None:
    """Leases acquired and released, each in its own transaction, sent in a pipeline (without
    waiting for each answer)."""
    with conn.pipeline():
        for _ in range(cycles):
            lease = uuid.uuid4()
            conn.execute("SELECT pgslots.acquire(%s, 1, 60, new_lease_id => %s)", [[name], lease])
            conn.execute("SELECT pgslots.release(%s, false)", [lease])


def _busy_then_vacuumed(conn: Conn, name: str) -> int:
    """The leases table as a busy limiter leaves it: thousands of leases come and gone, then vacuumed
    and analyzed with none live. Returns the table's size in pages."""
    _churn(conn, name, CYCLES)
    conn.execute("VACUUM ANALYZE pgslots.leases")
    return int(one(conn, "SELECT pg_relation_size('pgslots.leases') / 8192 AS pages")["pages"])


def _blocks_read(conn: Conn) -> int:
    """Blocks of the leases table and its indexes this database has read so far (hit or not)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    row = one(
        conn,
        "SELECT heap_blks_hit + heap_blks_read + coalesce(idx_blks_hit, 0) + coalesce(idx_blks_read, 0) AS n"
        " FROM pg_statio_user_tables WHERE relid = 'pgslots.leases'::regclass",
    )
    return int(row["n"])


def _cycle(conn: Conn, name: str) -> None:
    lease = acquire(conn, [name], lease_seconds=60)["lease_id"]
    assert one(conn, "SELECT pgslots.release(%s, false) AS released", [lease])["released"]


def test_vacuum_keeps_the_pages_of_a_busy_leases_table(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        create(conn, "busy", 10)
        pages = _busy_then_vacuumed(conn, "busy")
        # Thousands of dead rows filled dozens of pages; truncated, the empty table would have none.
        assert pages > 15
        options = one(conn, "SELECT reloptions FROM pg_class WHERE oid = 'pgslots.waiters'::regclass")["reloptions"]
        assert "vacuum_truncate=false" in options


def test_a_release_reads_a_few_pages_after_a_vacuum_of_a_busy_table(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        create(conn, "busy", 10)
        _busy_then_vacuumed(conn, "busy")
    # A new session plans the statements against the vacuumed table: few live rows, many pages.
    # PL/pgSQL keeps a generic plan of a statement once it costs no more than the custom ones:
    # forced here, so that the test does not depend on that choice. The plans made now are kept
    # while the leases come and go and their index entries pile up until the next vacuum.
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        for _ in range(8):
            _cycle(conn, "busy")
        _churn(conn, "busy", CYCLES)
        index_pages = one(conn, "SELECT pg_relation_size('pgslots.leases_limit_expiry') / 8192 AS n")["n"]
        before = _blocks_read(conn)
        for _ in range(20):
            _cycle(conn, "busy")
        per_cycle = (_blocks_read(conn) - before) / 20
    # By their keys, an acquire and a release read about 10 blocks of leases and its indexes (the
    # new row and its two index entries, then the row found, updated and deleted by its key); a
    # plan that scanned the table or an index would read at least as many as that index has pages.
    assert per_cycle < 20 < index_pages, (per_cycle, index_pages)


def _pages(conn: Conn, relation: str) -> int:
    return int(one(conn, "SELECT pg_relation_size(%s::regclass) / 8192 AS n", [relation])["n"])


def _scans_of_leases(conn: Conn) -> int:
    conn.execute("SELECT pg_stat_force_next_flush()")
    return int(one(conn, "SELECT seq_scan AS n FROM pg_stat_user_tables WHERE relid = 'pgslots.leases'::regclass")["n"])


def _key_priced_above_a_scan(dsn: str) -> None:
    """Three leases live since the start (on the limit "busy"), thousands come and go, then a vacuum
    truncates the table to the page of the three: the indexes, grown by the churn, are priced above
    a scan of the table (PostgreSQL prices a lookup at an index's pages divided by the live rows)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        create(conn, "busy", 10)
        for _ in range(3):
            acquire(conn, ["busy"], lease_seconds=600)
        _churn(conn, "busy", CYCLES)
        conn.execute("VACUUM (TRUNCATE, ANALYZE) pgslots.leases")
        assert _pages(conn, "pgslots.leases") <= 2 < 20 < _pages(conn, "pgslots.leases_pkey")
        assert _pages(conn, "pgslots.leases_limit_expiry") > 20


def test_a_refused_acquire_probes_the_limits_leases_by_key_when_the_key_is_priced_above_a_scan(fresh_dsn: str) -> None:
    """A queued caller refused by a full limit first looks for leases of that limit to take back
    (expired, or of a dead session), by the index on (limit_id, expires_at): acquire runs with
    enable_seqscan off, so that probe reads no page of the table whatever its statistics say."""
    _key_priced_above_a_scan(fresh_dsn)
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("SELECT pgslots.update_limit(%s, %s)", ["busy", 3])  # the three live leases fill it
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        scans = _scans_of_leases(conn)
        for _ in range(8):
            refused = acquire(conn, ["busy"], lease_seconds=60, queue_client=uuid.uuid4())
            assert not refused["granted"] and refused["blocked_by"] == ["busy"]
        assert _scans_of_leases(conn) == scans, "a refused acquire scanned the leases table"


def test_a_release_finds_its_lease_by_key_when_the_key_is_priced_above_a_scan(fresh_dsn: str) -> None:
    """PostgreSQL prices a lookup by primary key at the index's pages divided by the table's live
    rows. Three leases live since the start, thousands come and go, then a vacuum truncates the
    table to the page of the three: the index, grown by the churn, is priced above a scan of the
    table. A session that plans then keeps its plans while the table grows again; a release must
    still find its lease by key (release runs with enable_seqscan off), not read every page twice."""
    _key_priced_above_a_scan(fresh_dsn)
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")  # see the test above
        scans = _scans_of_leases(conn)
        for _ in range(8):
            _cycle(conn, "busy")
        assert _scans_of_leases(conn) == scans, "a release scanned the leases table"
        _churn(conn, "busy", CYCLES)
        pages = _pages(conn, "pgslots.leases")
        before = _blocks_read(conn)
        for _ in range(20):
            _cycle(conn, "busy")
        per_cycle = (_blocks_read(conn) - before) / 20
    assert per_cycle < 20 < pages, (per_cycle, pages)


def test_keep_alive_finds_its_sessions_leases_by_key(fresh_dsn: str) -> None:
    """keep_alive, which every process holding leases calls twice a second, names the leases of its
    session that the caller no longer holds (orphans). It finds them by the index on the leases'
    session (migration 0019), reading no page of the table whatever other sessions hold: before,
    each call read all of it (8 ms with 100,000 live leases)."""
    mine = uuid.uuid4()
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        create(conn, "many", 100_000)
        with conn.pipeline():
            for _ in range(3_000):
                conn.execute("SELECT pgslots.acquire('{many}', 1, 600, session => %s)", [uuid.uuid4()])
        held = acquire(conn, ["many"], lease_seconds=600, session=mine)["lease_id"]
        orphan = acquire(conn, ["many"], lease_seconds=600, session=mine)["lease_id"]
        conn.execute("ANALYZE pgslots.leases")
        advance_clock(conn, 60)  # an orphan is a lease older than liveness_seconds
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        pages = _pages(conn, "pgslots.leases")
        one(conn, "SELECT * FROM pgslots.keep_alive(%s, %s)", [mine, [held]])  # its session's row, its plans
        before = _blocks_read(conn)
        for _ in range(3):
            answer = one(conn, "SELECT * FROM pgslots.keep_alive(%s, %s)", [mine, [held]])
            assert answer["lost"] == [] and answer["orphans"] == [orphan]
        per_call = (_blocks_read(conn) - before) / 3
    # The held lease by its id, the session's two by the index: a few blocks, where a scan of the
    # table (or of a whole index) reads every page.
    assert per_call < 20 < pages, (per_call, pages)
