"""Replays the attacks of a plain role against another, with real time, and prints what they achieve.

    python benchmarks/attacks.py [--dsn ADMIN_DSN] [--keys 100000]

Without --dsn it starts a throwaway cluster from the server binaries on this machine. Each attack
runs in a database of its own, as a plain role of pgslots_user, for a few seconds at most; the
figures are what the attacker got (grants beyond a limit, rows stored, time a limit stays closed,
time another caller waits). The tests in tests/test_untrusted_bounds.py assert the bounds; this
prints the numbers.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql as pgsql
from run import Server  # benchmarks/run.py, beside this file

from pgslots.migrate import migrate


@contextmanager
def plain_role(server: Server, name: str) -> Iterator[tuple[str, str]]:
    """A fresh migrated database and a plain login role in it: (admin DSN, plain DSN)."""
    admin = server.database(name)
    migrate(admin)
    role = f"attacker_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE ROLE {} LOGIN IN ROLE pgslots_user").format(pgsql.Identifier(role)))
    try:
        yield admin, psycopg.conninfo.make_conninfo(admin, user=role)
    finally:
        server.drop(name)
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP ROLE IF EXISTS {}").format(pgsql.Identifier(role)))


def value(conn: psycopg.Connection[Any], query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def late_refunds(server: Server) -> str:
    """Keeps 10 reservations of a bucket of 10 refilling 2/s until they decayed, lets the bucket
    fill again, settles them at 0 and counts the grants that follow at once."""
    with plain_role(server, "attack_refunds") as (admin, plain), psycopg.connect(plain, autocommit=True) as conn:
        with psycopg.connect(admin, autocommit=True) as a:
            a.execute("SELECT pgslots.create_limit('bucket', 10, 2.0)")
        kept = [value(conn, "SELECT reservation_id FROM pgslots.reserve('{bucket}', 1)") for _ in range(10)]
        time.sleep(5.0)
        refill = sum(1 for _ in range(20) if value(conn, "SELECT granted FROM pgslots.rate_limit('{bucket}')"))
        started = time.monotonic()
        for r in kept:
            conn.execute("SELECT pgslots.settle(%s, 0)", [r])
        extra = sum(1 for _ in range(40) if value(conn, "SELECT granted FROM pgslots.rate_limit('{bucket}')"))
        took = time.monotonic() - started
        return (
            f"late refunds: {refill} grants to refill, then {extra} grants from 10 refunds settled 5 s late "
            f"in {took:.2f} s (bucket of 10, 2/s)"
        )


def debts(server: Server) -> str:
    with plain_role(server, "attack_debts") as (admin, plain), psycopg.connect(plain, autocommit=True) as conn:
        with psycopg.connect(admin, autocommit=True) as a:
            a.execute("SELECT pgslots.create_limit('tenant:*', 10, 1.0)")
            a.execute("SELECT pgslots.create_limit('yearly', 100, window_seconds => 1e8)")
        r = value(conn, "SELECT reservation_id FROM pgslots.reserve('{tenant:bob}', 1)")
        conn.execute("SELECT pgslots.settle(%s, 1e9)", [r])
        closed = value(conn, "SELECT retry_after FROM pgslots.rate_limit('{tenant:bob}')")
        r = value(conn, "SELECT reservation_id FROM pgslots.reserve('{yearly}', 1)")
        conn.execute("SELECT pgslots.settle(%s, 1e9)", [r])
        with psycopg.connect(admin, autocommit=True) as a:
            used = value(a, "SELECT active_slots FROM pgslots.status WHERE name = 'yearly'")
            a.execute("SELECT pgslots.clear_debt('tenant:*')")
        reopened = value(conn, "SELECT granted FROM pgslots.rate_limit('{tenant:bob}')")
        return (
            f"debts: settle(1e9) closes tenant:bob (10, 1/s) for {closed:.1f} s; a 1e8 s window of 100 holds {used:g} slots; "
            f"after clear_debt granted again: {reopened}"
        )


def rows_stored(server: Server, seconds: float) -> list[str]:
    out = []
    with (
        plain_role(server, "attack_rows") as (admin, plain),
        psycopg.connect(plain, autocommit=True) as conn,
        psycopg.connect(admin, autocommit=True) as a,
    ):
        a.execute("SELECT pgslots.create_limit('minute', 100, window_seconds => 60)")
        a.execute("SELECT pgslots.create_limit('api', 1)")
        a.execute("UPDATE pgslots.settings SET waiter_ttl_seconds = 600, priority_aging_seconds = 0")

        def count(table: str) -> int:
            return int(value(a, pgsql.SQL("SELECT count(*) FROM {}").format(pgsql.Identifier("pgslots", table))))

        calls, stop = 0, time.monotonic() + seconds
        while time.monotonic() < stop:
            conn.execute("SELECT * FROM pgslots.reserve('{no-such-limit}', 1)")
            calls += 1
        out.append(f"reserve on a name without a limit: {calls / seconds:,.0f} calls/s, {count('reservations')} rows stored")

        calls, refused, stop = 0, 0, time.monotonic() + seconds
        while time.monotonic() < stop:
            try:
                conn.execute("SELECT * FROM pgslots.keep_alive(%s, '{}', false)", [uuid.uuid4()])
            except psycopg.Error:
                refused += 1
            calls += 1
        out.append(
            f"keep_alive with a fresh session per call: {calls / seconds:,.0f} calls/s, {count('sessions')} rows stored, {refused} refused"
        )

        calls, stop = 0, time.monotonic() + seconds
        while time.monotonic() < stop:
            r = value(conn, "SELECT reservation_id FROM pgslots.reserve('{minute}', 1)")
            if r is not None:
                conn.execute("SELECT pgslots.settle(%s, 0)", [r])
            calls += 1
        started = time.perf_counter()
        for _ in range(20):
            conn.execute("SELECT * FROM pgslots.rate_limit('{minute}', 100)")
        refusal_ms = (time.perf_counter() - started) / 20 * 1000
        out.append(
            f"reserve + settle(0) on a window of 100: {calls / seconds:,.0f} cycles/s, {count('window_grants')} log rows, "
            f"a refused rate_limit then takes {refusal_ms:.2f} ms"
        )

        lease = value(a, "SELECT lease_id FROM pgslots.acquire('{api}')")
        a.execute("SELECT * FROM pgslots.acquire('{api}', queue_client => %s, priority => -5)", [uuid.uuid4()])
        a.execute("SELECT pgslots.release(%s)", [lease])
        calls, stop = 0, time.monotonic() + seconds
        while time.monotonic() < stop:
            got = conn.execute("SELECT granted, lease_id FROM pgslots.acquire('{api}', fairness_key => %s)", [f"k{calls}"]).fetchone()
            if got and got[0]:
                conn.execute("SELECT pgslots.release(%s)", [got[1]])
            calls += 1
        out.append(f"a new fairness key per grant while someone waits: {calls / seconds:,.0f} grants/s, {count('served_keys')} rows")
    return out


def many_keys(server: Server, keys: int) -> str:
    with plain_role(server, "attack_keys") as (admin, plain), psycopg.connect(plain, autocommit=True) as conn:
        with psycopg.connect(admin, autocommit=True) as a:
            a.execute("SELECT pgslots.create_limit('tenant:*', 1, 1.0, max_keys => %s)", [keys + 100])
            # The keys, in use (a rate slot each): made in bulk, as the attack made them one by one.
            a.execute(
                'INSERT INTO pgslots.limits (name, "limit", slot_decay_per_second, unleased_slots, decayed_at,'
                " created, updated, template_id)"
                " SELECT 'tenant:k' || i, 1, 1.0, 1, now() + interval '1 hour', now(), now(), t.id"
                " FROM generate_series(1, %s) i, pgslots.limits t WHERE t.name = 'tenant:*'",
                [keys],
            )
            a.execute("ANALYZE pgslots.limits")
        times = []
        for i in range(30):
            started = time.perf_counter()
            conn.execute("SELECT * FROM pgslots.acquire(%s)", [[f"tenant:new{i}"]])
            times.append(time.perf_counter() - started)
        times.sort()
        with psycopg.connect(admin, autocommit=True) as a:
            a.execute("SELECT pgslots.update_limit('tenant:*', max_keys => %s)", [keys])
        try:
            conn.execute("SELECT * FROM pgslots.acquire('{tenant:one-more}')")
            capped = "granted"
        except psycopg.Error as exc:
            capped = f"refused ({exc.sqlstate})"
        return (
            f"{keys:,} keys of one template in use: a new key's acquire takes {times[len(times) // 2] * 1000:.2f} ms "
            f"(median of 30); with max_keys at {keys:,}, one more key is {capped}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="an admin DSN of a server to use (default: a throwaway cluster)")
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each table-growth attack")
    args = parser.parse_args()
    server = Server(args.dsn)
    try:
        print(late_refunds(server))
        print(debts(server))
        for line in rows_stored(server, args.seconds):
            print(line)
        print(many_keys(server, args.keys))
    finally:
        server.close()


if __name__ == "__main__":
    main()
