"""pgslots benchmarks: every figure next to the ceiling PostgreSQL itself reaches in the same run.

    python benchmarks/run.py [--dsn DSN] [--seconds S] [--out benchmarks/results]

Without --dsn (or PGSLOTS_BENCH_DSN) it starts a throwaway cluster with default, durable settings
from the server binaries on this machine. It writes <out>/latest.json, latest.md and latest.png.
Each scenario runs for a bounded time and cleans up after itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pgsql

import pgslots
from pgslots import _queries as q
from pgslots._cluster import LocalCluster, find_bindir, server_user
from pgslots.client import Client, configure, connections_of

try:
    from pgslots.types import DEFAULT_MARGIN_SECONDS
except ImportError:  # a version before margins, measured for comparison (scenarios without margins)
    DEFAULT_MARGIN_SECONDS = 0.05

CTX = mp.get_context("fork")
HERE = Path(__file__).resolve().parent


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# ---- database setup -----------------------------------------------------------------------------


class Server:
    def __init__(self, dsn: str | None) -> None:
        self.cluster: LocalCluster | None = None
        self.root: Path | None = None
        if dsn:
            self.dsn = dsn
            bindir = find_bindir()
        else:
            bindir = find_bindir()
            if bindir is None:
                sys.exit("No PostgreSQL server binaries found: install them, or pass --dsn.")
            self.root = Path(tempfile.mkdtemp(prefix="pgslots-bench-"))
            self.cluster = LocalCluster(root=self.root, bindir=bindir, user=server_user())
            self.cluster.init(durable=True)
            self.cluster.start()
            self.dsn = self.cluster.dsn()
        self.pgbench = str(bindir / "pgbench") if bindir and (bindir / "pgbench").exists() else shutil.which("pgbench")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            self.version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            settings = dict(
                conn.execute(
                    "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'shared_buffers')"
                ).fetchall()
            )
        self.settings = settings

    def database(self, name: str) -> str:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))
            conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
        return psycopg.conninfo.make_conninfo(self.dsn, dbname=name)

    def drop(self, name: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


# ---- 1. ceilings --------------------------------------------------------------------------------


def pgbench(server: Server, dsn: str, script: str, clients: int, seconds: float, transactions: int = 0) -> float:
    """Runs `script` for `seconds` (or `transactions` per client); returns transactions per second."""
    assert server.pgbench, "pgbench not found"
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
        path = f.name
    os.chmod(path, 0o644)
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    length = ["-t", str(transactions)] if transactions else ["-T", str(int(seconds))]
    args = [server.pgbench, "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)), *length, "-f", path]
    for flag, key in (("-h", "host"), ("-p", "port"), ("-U", "user")):
        if params.get(key):
            args += [flag, str(params[key])]
    args.append(str(params.get("dbname", "postgres")))
    done = subprocess.run(args, capture_output=True, text=True, timeout=(seconds or 600) + 60)
    os.unlink(path)
    match = re.search(r"tps = ([0-9.]+)", done.stdout)
    if not match:
        raise RuntimeError(f"pgbench failed: {done.stdout}\n{done.stderr}")
    return float(match.group(1))


def _raw_semaphore(dsn: str, seconds: float, limit_id: int, body: float, out: Any) -> None:
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
        cycles = 0
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            got = conn.execute("UPDATE sem SET used = used + 1 WHERE id = %s AND used + 1 <= lim RETURNING used", [limit_id]).fetchone()
            if got is None:
                time.sleep(0.001)  # busy retry every 1 ms
                continue
            if body:
                time.sleep(body)
            conn.execute("UPDATE sem SET used = used - 1 WHERE id = %s", [limit_id])
            cycles += 1
        out.put(cycles)


def raw_semaphore(dsn: str, processes: int, limit: int, seconds: float, body: float = 0.0) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS sem; CREATE TABLE sem (id int PRIMARY KEY, used int NOT NULL, lim int NOT NULL)")
        conn.execute("INSERT INTO sem VALUES (1, 0, %s)", [limit])
    return sum(run_processes(_raw_semaphore, processes, dsn, seconds, 1, body)) / seconds


def run_processes(target: Callable[..., None], n: int, *args: Any) -> list[Any]:
    out: Any = CTX.Queue()
    procs = [CTX.Process(target=target, args=(*args, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    return results


def ceilings(server: Server, seconds: float) -> dict[str, float]:
    dsn = server.database("bench_ceiling")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE hot (id int PRIMARY KEY, n bigint NOT NULL); INSERT INTO hot VALUES (1, 0)")
    update = "UPDATE hot SET n = n + 1 WHERE id = 1;\n"
    result = {
        "pgbench_hot_update_1_client_tps": pgbench(server, dsn, update, 1, seconds),
        "pgbench_hot_update_16_clients_tps": pgbench(server, dsn, update, 16, seconds),
        "pgbench_select1_1_client_tps": pgbench(server, dsn, "SELECT 1;\n", 1, seconds),
        "raw_semaphore_1_process_cycles_per_s": raw_semaphore(dsn, 1, 1_000_000, seconds),
        "raw_semaphore_16_processes_cycles_per_s": raw_semaphore(dsn, 16, 1_000_000, seconds),
        "raw_semaphore_16_on_4_body_1ms_cycles_per_s": raw_semaphore(dsn, 16, 4, seconds, body=0.001),
    }
    server.drop("bench_ceiling")
    return result


# ---- pgslots scenarios --------------------------------------------------------------------------


def fresh(server: Server, name: str) -> str:
    dsn = server.database(name)
    pgslots.migrate(dsn)
    return dsn


def _raw_round(conn: psycopg.Connection[Any], seconds: float) -> int:
    """The raw two-UPDATE semaphore in this process, on this connection, for `seconds`."""
    cycles = 0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        conn.execute("UPDATE sem SET used = used + 1 WHERE id = 1 AND used + 1 <= lim RETURNING used").fetchone()
        conn.execute("UPDATE sem SET used = used - 1 WHERE id = 1")
        cycles += 1
    return cycles


async def _raw_round_async(conn: psycopg.AsyncConnection[Any], seconds: float) -> int:
    """The raw two-UPDATE semaphore sent with async psycopg: the floor of a task on an event loop,
    which pays the loop's round for every statement as the async face does."""
    cycles = 0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        await (await conn.execute("UPDATE sem SET used = used + 1 WHERE id = 1 AND used + 1 <= lim RETURNING used")).fetchone()
        await conn.execute("UPDATE sem SET used = used - 1 WHERE id = 1")
        cycles += 1
    return cycles


def _summary(
    acquire: list[float], release: list[float], elapsed: float, raw_cycles: int, raw_elapsed: float, plain_cycles: int, plain_elapsed: float
) -> dict[str, Any]:
    return {
        "cycles_per_s": len(acquire) / elapsed,
        "acquire_p50_ms": ms(pct(acquire, 0.5)),
        "acquire_p99_ms": ms(pct(acquire, 0.99)),
        "release_p50_ms": ms(pct(release, 0.5)),
        "release_p99_ms": ms(pct(release, 0.99)),
        # The raw semaphore again, in the same process, in rounds alternating with these: the ratio
        # then compares like with like, free of drift between scenarios minutes apart.
        "raw_semaphore_cycles_per_s": raw_cycles / raw_elapsed,
        # The library's own two statements, with its parameters, sent with plain psycopg on one
        # connection, in the same alternating rounds: the cycle without the library's Python layers.
        "plain_psycopg_cycles_per_s": plain_cycles / plain_elapsed,
    }


def _plain_params(session: uuid.UUID) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parameters the library sends for an uncontended acquire and release, built by its own
    flow (see _flow.Attempts.query and _flow.release)."""
    from pgslots._faces import CLOCK
    from pgslots._flow import RELEASE_WAIT_SECONDS, Attempts, Request, release_params

    request = Request.for_concurrency("solo", slots=1)
    assert request is not None
    query, acquire = Attempts(request, session, listening=True, clock=CLOCK).query()
    assert query is q.ACQUIRE
    if isinstance(acquire["holder"], dict):  # the library before 2026-12-05 sent a dict, as jsonb
        from psycopg.types.json import Jsonb

        acquire["holder"] = Jsonb(acquire["holder"])
    return acquire, release_params(uuid.uuid4(), RELEASE_WAIT_SECONDS)


def _plain_round(conn: psycopg.Connection[Any], session: uuid.UUID, seconds: float) -> int:
    """The library's acquire and release statements through plain psycopg, for `seconds`."""
    acquire, release = _plain_params(session)
    cycles = 0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        acquire["new_lease_id"] = uuid.uuid4()
        row = conn.execute(q.ACQUIRE, acquire).fetchone()
        assert row is not None and row[0], "the plain acquire was refused"
        release["lease_id"] = row[1]
        conn.execute(q.RELEASE_FAST, release).fetchone()
        cycles += 1
    return cycles


async def _plain_round_async(conn: psycopg.AsyncConnection[Any], session: uuid.UUID, seconds: float) -> int:
    acquire, release = _plain_params(session)
    cycles = 0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        acquire["new_lease_id"] = uuid.uuid4()
        row = await (await conn.execute(q.ACQUIRE, acquire)).fetchone()
        assert row is not None and row[0], "the plain acquire was refused"
        release["lease_id"] = row[1]
        await (await conn.execute(q.RELEASE_FAST, release)).fetchone()
        cycles += 1
    return cycles


def uncontended(dsn: str, seconds: float) -> dict[str, Any]:
    from pgslots.asyncio import concurrency as aconcurrency
    from pgslots.sync import concurrency

    client = Client(dsn)
    client.create_limit("solo", 1)
    raw = psycopg.connect(dsn, autocommit=True, prepare_threshold=0)
    raw.execute("CREATE TABLE sem (id int PRIMARY KEY, used int NOT NULL, lim int NOT NULL)")
    raw.execute("INSERT INTO sem VALUES (1, 0, 1000000)")
    rounds = max(2, round(seconds))
    result: dict[str, Any] = {}
    for _ in range(50):  # warm up: connections, prepared statements
        with concurrency("solo", client=client):
            pass
        _raw_round(raw, 0)
    session = connections_of(client).engine.session_id  # what the library names as its session
    plain = psycopg.connect(dsn, autocommit=True)  # psycopg's defaults: prepared after 5 runs, as the library's pool
    _plain_round(plain, session, 0.2)
    acquire, release = [], []
    elapsed = raw_elapsed = plain_elapsed = 0.0
    raw_cycles = plain_cycles = 0
    for _ in range(rounds):
        t = time.perf_counter()
        raw_cycles += _raw_round(raw, seconds / rounds)
        raw_elapsed += time.perf_counter() - t
        t = time.perf_counter()
        plain_cycles += _plain_round(plain, session, seconds / rounds)
        plain_elapsed += time.perf_counter() - t
        start = time.perf_counter()
        stop = start + seconds / rounds
        while time.perf_counter() < stop:
            cm = concurrency("solo", client=client)
            t0 = time.perf_counter()
            cm.__enter__()
            t1 = time.perf_counter()
            cm.__exit__(None, None, None)
            t2 = time.perf_counter()
            acquire.append(t1 - t0)
            release.append(t2 - t1)
        elapsed += time.perf_counter() - start
    result["sync"] = _summary(acquire, release, elapsed, raw_cycles, raw_elapsed, plain_cycles, plain_elapsed)
    plain.close()

    async def run_async() -> dict[str, Any]:
        for _ in range(50):
            async with aconcurrency("solo", client=client):
                pass
        aplain = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        await _plain_round_async(aplain, session, 0.2)
        araw = await psycopg.AsyncConnection.connect(dsn, autocommit=True, prepare_threshold=0)
        await _raw_round_async(araw, 0.2)
        acq, rel = [], []
        elapsed = raw_elapsed = plain_elapsed = araw_elapsed = 0.0
        raw_cycles = plain_cycles = araw_cycles = 0
        for _ in range(rounds):
            t = time.perf_counter()
            raw_cycles += _raw_round(raw, seconds / rounds)  # blocks the loop: nothing else runs on it
            raw_elapsed += time.perf_counter() - t
            t = time.perf_counter()
            araw_cycles += await _raw_round_async(araw, seconds / rounds)
            araw_elapsed += time.perf_counter() - t
            t = time.perf_counter()
            plain_cycles += await _plain_round_async(aplain, session, seconds / rounds)
            plain_elapsed += time.perf_counter() - t
            start = time.perf_counter()
            stop = start + seconds / rounds
            while time.perf_counter() < stop:
                cm = aconcurrency("solo", client=client)
                t0 = time.perf_counter()
                await cm.__aenter__()
                t1 = time.perf_counter()
                await cm.__aexit__(None, None, None)
                t2 = time.perf_counter()
                acq.append(t1 - t0)
                rel.append(t2 - t1)
            elapsed += time.perf_counter() - start
        await aplain.close()
        await araw.close()
        summary = _summary(acq, rel, elapsed, raw_cycles, raw_elapsed, plain_cycles, plain_elapsed)
        # The same floor as an asyncio program meets it: what of the gap is the event loop's, not ours.
        summary["raw_semaphore_async_psycopg_cycles_per_s"] = araw_cycles / araw_elapsed
        return summary

    result["async"] = asyncio.run(run_async())
    raw.close()
    client.close()
    return result


def server_side(server: Server, seconds: float) -> dict[str, Any]:
    """The SQL alone, from pgbench (C, prepared, one client): a pgslots acquire + release cycle
    against the raw two-UPDATE semaphore, on the same server, in alternating rounds."""
    dsn = fresh(server, "bench_sql")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pgslots.create_limit('solo', 1000000)")
        conn.execute("CREATE TABLE sem (id int PRIMARY KEY, used int NOT NULL, lim int NOT NULL)")
        conn.execute("INSERT INTO sem VALUES (1, 0, 1000000)")
    raw = "UPDATE sem SET used = used + 1 WHERE id = 1 AND used + 1 <= lim RETURNING used;\nUPDATE sem SET used = used - 1 WHERE id = 1;\n"
    cycle = (
        'SELECT lease_id AS l FROM pgslots.acquire(\'{solo}\', 1, 300, \'{"host": "bench", "pid": 1}\', false, NULL, NULL,'
        " gen_random_uuid()) \\gset\nSELECT pgslots.release(:l, false);\n"
    )
    rounds = 2
    raw_tps = cycle_tps = 0.0
    for _ in range(rounds):
        raw_tps += pgbench(server, dsn, raw, 1, seconds / rounds) / rounds
        cycle_tps += pgbench(server, dsn, cycle, 1, seconds / rounds) / rounds
    server.drop("bench_sql")
    return {"raw_semaphore_cycles_per_s": raw_tps, "pgslots_cycles_per_s": cycle_tps, "ratio": cycle_tps / raw_tps}


def _contender(dsn: str, seconds: float, body: float, fair: bool, out: Any) -> None:
    """One of the contending processes; `fair`: each call with a random priority (-1, 0 or 1) and
    one of 4 tenants' fairness keys, so the queue is ordered by priority and round-robin."""
    import random

    from pgslots.sync import concurrency

    configure(dsn)
    rng = random.Random(os.getpid())
    tenant = f"tenant-{os.getpid() % 4}"
    waits, held, cycles = [], 0.0, 0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        queue_args: dict[str, Any] = {"priority": rng.choice((-1, 0, 1)), "fairness_key": tenant} if fair else {}
        with concurrency("shared", timeout_seconds=60, **queue_args):
            t1 = time.perf_counter()
            time.sleep(body)
            held += time.perf_counter() - t1
        waits.append(t1 - t0)
        cycles += 1
    out.put((cycles, held, waits))


def contended(dsn: str, seconds: float, body: float, processes: int = 16, limit: int = 4, fair: bool = False) -> dict[str, Any]:
    client = Client(dsn)
    client.delete_limit("shared") if client.read_limits(["shared"]) else None
    client.create_limit("shared", limit)
    client.close()
    results = run_processes(_contender, processes, dsn, seconds, body, fair)
    cycles = sum(r[0] for r in results)
    held = sum(r[1] for r in results)
    waits = [w for r in results for w in r[2]]
    return {
        "processes": processes,
        "limit": limit,
        "body_ms": body * 1000,
        "cycles_per_s": cycles / seconds,
        "utilisation": held / (seconds * limit),
        "wait_p50_ms": ms(pct(waits, 0.5)),
        "wait_p99_ms": ms(pct(waits, 0.99)),
    }


def _server_pids(dsn: str) -> list[int]:
    """The server's processes on this machine: the postmaster (the parent of this connection's
    backend) and every child of it (backends, WAL writer, checkpointer, ...)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert backend is not None
        # Read while the connection is open: its backend ends with it.
        postmaster = int(Path(f"/proc/{backend[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    pids.append(int(entry.name))
    return pids


def _server_cpu_seconds(dsn: str) -> float:
    """CPU seconds (user + system) the server has used: its processes alive now, and (through the
    postmaster's cutime and cstime) the backends that have ended."""
    tick = os.sysconf("SC_CLK_TCK")
    postmaster, *children = _server_pids(dsn)
    total = 0
    for pid in (postmaster, *children):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            if pid == postmaster:
                total += int(fields[13]) + int(fields[14])
    return total / tick


def _cpu_of(dsn: str, work: Callable[[], int]) -> tuple[float, int]:
    """Runs `work` (which returns the cycles it made); the server's CPU seconds it cost, and its cycles."""
    before = _server_cpu_seconds(dsn)
    cycles = work()
    return _server_cpu_seconds(dsn) - before, cycles


def server_cpu(server: Server, seconds: float) -> dict[str, Any]:
    """The CPU a limiter costs the database: the server's CPU time (all its processes, from /proc)
    per cycle of pgslots (the library) against the raw two-UPDATE semaphore, uncontended (one
    process) and contended (16 processes on 4 slots, 1 ms body; the raw semaphore busy-retries every
    1 ms). Needs the server on this machine."""
    from pgslots.sync import concurrency

    dsn = fresh(server, "bench_cpu")
    client = Client(dsn)
    client.create_limit("solo", 1_000_000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE sem (id int PRIMARY KEY, used int NOT NULL, lim int NOT NULL); INSERT INTO sem VALUES (1, 0, 1000000)")
    raw = psycopg.connect(dsn, autocommit=True, prepare_threshold=0)

    def library_round() -> int:
        cycles = 0
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            with concurrency("solo", client=client):
                pass
            cycles += 1
        return cycles

    for _ in range(50):
        with concurrency("solo", client=client):
            pass
    raw_cpu, raw_cycles = _cpu_of(dsn, lambda: _raw_round(raw, seconds))
    lib_cpu, lib_cycles = _cpu_of(dsn, library_round)
    raw.close()
    client.close()
    contended_raw_cpu, contended_raw = _cpu_of(dsn, lambda: round(raw_semaphore(dsn, 16, 4, seconds, body=0.001) * seconds))
    holder: dict[str, Any] = {}

    def contended_round() -> int:
        holder.update(contended(dsn, seconds, 0.001))
        return round(holder["cycles_per_s"] * seconds)

    contended_cpu, contended_cycles = _cpu_of(dsn, contended_round)
    server.drop("bench_cpu")
    us = 1e6
    return {
        "uncontended_us_per_cycle": lib_cpu / max(1, lib_cycles) * us,
        "uncontended_raw_us_per_cycle": raw_cpu / max(1, raw_cycles) * us,
        "uncontended_vs_raw": (lib_cpu / max(1, lib_cycles)) / max(1e-12, raw_cpu / max(1, raw_cycles)),
        "contended_us_per_cycle": contended_cpu / max(1, contended_cycles) * us,
        "contended_raw_us_per_cycle": contended_raw_cpu / max(1, contended_raw) * us,
        "contended_vs_raw": (contended_cpu / max(1, contended_cycles)) / max(1e-12, contended_raw_cpu / max(1, contended_raw)),
    }


def _idle_process(dsn: str, flavour: str, seconds: float) -> None:
    """One process that used a limit once, then idles (or holds a lease, for "holding")."""
    import asyncio as aio

    from pgslots.asyncio import concurrency as aconcurrency
    from pgslots.sync import concurrency

    configure(dsn)
    if flavour == "async":

        async def main() -> None:
            async with aconcurrency("db"):
                pass
            await aio.sleep(seconds)

        aio.run(main())
        return
    with concurrency("db"):
        if flavour == "holding":
            time.sleep(seconds)
    time.sleep(seconds)


def idle(server: Server, seconds: float = 20.0) -> dict[str, Any]:
    """Idle chatter: the transactions per second one process sends to the database after using a
    limit once and then doing nothing (sync and async), and while it holds one lease (keep-alives).
    Counted by the database (pg_stat_database) over `seconds`, after 12 s of settling (a backend
    reports its counts within 10 s of going idle)."""
    result: dict[str, Any] = {}
    admin = server.dsn
    for flavour in ("sync", "async", "holding"):
        name = f"bench_idle_{flavour}"
        dsn = fresh(server, name)
        c = Client(dsn)
        c.create_limit("db", 5)
        c.close()
        proc = CTX.Process(target=_idle_process, args=(dsn, flavour, seconds + 30))
        proc.start()

        def counted(db: str = name) -> int:
            with psycopg.connect(admin, autocommit=True) as conn:
                row = conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", [db]).fetchone()
            return int(row[0]) if row else 0

        time.sleep(12)
        first, t0 = counted(), time.perf_counter()
        time.sleep(seconds)
        result[f"{flavour}_transactions_per_s"] = (counted() - first) / (time.perf_counter() - t0)
        proc.kill()
        proc.join(10)
        server.drop(name)
    return result


def idle_listeners(server: Server, processes: int = 16, notifies: int = 10000) -> dict[str, Any]:
    """What idle processes cost a busy database: the server's CPU per NOTIFY (each hand-off sends
    one) with `processes` processes that used a limit once and now idle, against the same database
    with none. PostgreSQL wakes every backend LISTENing in the database for each NOTIFY."""
    name = "bench_listeners"
    dsn = fresh(server, name)
    c = Client(dsn)
    c.create_limit("db", 5)
    c.close()

    def per_notify() -> float:
        with psycopg.connect(dsn, autocommit=True) as conn:

            def send() -> int:
                for _ in range(notifies):
                    conn.execute("NOTIFY bench_nobody_listens")
                return notifies

            spent, _ = _cpu_of(dsn, send)
        return spent / notifies

    alone = per_notify()
    procs = [CTX.Process(target=_idle_process, args=(dsn, "sync", 60.0)) for _ in range(processes)]
    for proc in procs:
        proc.start()
    time.sleep(5)  # each has used the limit and gone idle
    with_idle = per_notify()
    for proc in procs:
        proc.kill()
        proc.join(10)
    server.drop(name)
    return {"processes": processes, "notify_us_alone": alone * 1e6, "notify_us_with_idle": with_idle * 1e6, "ratio": with_idle / alone}


def batching(dsn: str, seconds: float, tasks: int = 200, limit: int = 50, body: float = 0.001) -> dict[str, Any]:
    """Many tasks of one process on one limit: `tasks` asyncio tasks cycling on a limit of `limit`
    with a `body` s body, in alternating rounds against the raw two-UPDATE semaphore used by as many
    tasks on one connection (a full semaphore retried after 1 ms). The async face batches the
    tasks' concurrent acquires and releases into one call each."""
    from pgslots.asyncio import concurrency as aconcurrency

    client = Client(dsn)
    client.create_limit("shared_by_tasks", limit)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE sem (id int PRIMARY KEY, used int NOT NULL, lim int NOT NULL)")
        conn.execute("INSERT INTO sem VALUES (1, 0, %s)", [limit])

    async def raw_round(span: float) -> int:
        done = 0
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            stop = time.perf_counter() + span

            async def worker() -> None:
                nonlocal done
                while time.perf_counter() < stop:
                    cur = await conn.execute("UPDATE sem SET used = used + 1 WHERE id = 1 AND used + 1 <= lim RETURNING used")
                    if await cur.fetchone() is None:
                        await asyncio.sleep(0.001)
                        continue
                    await asyncio.sleep(body)
                    await conn.execute("UPDATE sem SET used = used - 1 WHERE id = 1")
                    done += 1

            await asyncio.gather(*(worker() for _ in range(tasks)))
        return done

    async def pgslots_round(span: float) -> tuple[int, int]:
        done, inside, most = 0, 0, 0
        stop = time.perf_counter() + span

        async def worker() -> None:
            nonlocal done, inside, most
            while time.perf_counter() < stop:
                async with aconcurrency("shared_by_tasks", client=client):
                    inside += 1
                    most = max(most, inside)
                    await asyncio.sleep(body)
                    inside -= 1
                done += 1

        await asyncio.gather(*(worker() for _ in range(tasks)))
        return done, most

    async def rounds() -> dict[str, Any]:
        raw = lib = 0
        most = 0
        n = max(2, round(seconds))
        await pgslots_round(0.5)  # warm up: the pool, the listener
        for _ in range(n):
            raw += await raw_round(seconds / n)
            done, peak = await pgslots_round(seconds / n)
            lib += done
            most = max(most, peak)
        return {"cycles_per_s": lib / seconds, "raw_semaphore_cycles_per_s": raw / seconds, "most_held": most}

    result = asyncio.run(rounds())
    client.close()
    result.update(tasks=tasks, limit=limit, body_ms=body * 1000, ratio=result["cycles_per_s"] / result["raw_semaphore_cycles_per_s"])
    return result


def thread_batching(dsn: str, seconds: float, threads: int = 200, limit: int = 50, body: float = 0.001) -> dict[str, Any]:
    """Many threads of one process on one limit: `threads` threads cycling on a limit of `limit` with
    a `body` s body, in alternating rounds against the raw two-UPDATE semaphore used by as many
    threads on one connection (taken in turn under a lock; a full semaphore retried after 1 ms). The
    sync face batches the threads' concurrent acquires and releases into one call each."""
    import threading

    from pgslots.sync import concurrency

    client = Client(dsn)
    client.create_limit("shared_by_threads", limit)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE sem (id int PRIMARY KEY, used int NOT NULL, lim int NOT NULL)")
        conn.execute("INSERT INTO sem VALUES (1, 0, %s)", [limit])

    def in_threads(work: Callable[[float], int], span: float) -> int:
        stop = time.perf_counter() + span
        counts: list[int] = []
        workers = [threading.Thread(target=lambda: counts.append(work(stop))) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return sum(counts)

    def raw_round(span: float) -> int:
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
            turn = threading.Lock()

            def work(stop: float) -> int:
                done = 0
                while time.perf_counter() < stop:
                    with turn:
                        got = conn.execute("UPDATE sem SET used = used + 1 WHERE id = 1 AND used + 1 <= lim RETURNING used").fetchone()
                    if got is None:
                        time.sleep(0.001)
                        continue
                    time.sleep(body)
                    with turn:
                        conn.execute("UPDATE sem SET used = used - 1 WHERE id = 1")
                    done += 1
                return done

            return in_threads(work, span)

    most = 0
    inside = 0
    count = threading.Lock()

    def library(stop: float) -> int:
        nonlocal most, inside
        done = 0
        while time.perf_counter() < stop:
            with concurrency("shared_by_threads", client=client):
                with count:
                    inside += 1
                    most = max(most, inside)
                time.sleep(body)
                with count:
                    inside -= 1
            done += 1
        return done

    in_threads(library, 0.5)  # warm up: the pool, the listener
    raw = lib = 0
    n = max(2, round(seconds))
    for _ in range(n):
        raw += raw_round(seconds / n)
        lib += in_threads(library, seconds / n)
    client.close()
    return {
        "cycles_per_s": lib / seconds,
        "raw_semaphore_cycles_per_s": raw / seconds,
        "most_held": most,
        "threads": threads,
        "limit": limit,
        "body_ms": body * 1000,
        "ratio": (lib / seconds) / (raw / seconds),
    }


def _handoff_waiter(dsn: str, rounds: int, go: Any, out: Any) -> None:
    from pgslots.sync import concurrency

    configure(dsn)
    stamps = []
    for _ in range(rounds):
        go.wait()
        with concurrency("baton", timeout_seconds=30):
            stamps.append(time.time())
    out.put(stamps)


def handoff(dsn: str, rounds: int) -> dict[str, Any]:
    from pgslots.sync import concurrency

    client = Client(dsn)
    client.create_limit("baton", 1)
    go = CTX.Event()
    out: Any = CTX.Queue()
    proc = CTX.Process(target=_handoff_waiter, args=(dsn, rounds, go, out))
    proc.start()
    released = []
    for _ in range(rounds):
        with concurrency("baton", client=client):
            go.set()
            while client.read_limit("baton").waiters < 1:
                time.sleep(0.001)
            go.clear()
            released.append(time.time())
        time.sleep(0.01)  # the waiter holds the slot briefly and lets go
        while client.read_limit("baton").active_slots:
            time.sleep(0.001)
    stamps = out.get(timeout=60)
    proc.join(10)
    client.close()
    lat = [s - r for s, r in zip(stamps, released, strict=True)]
    return {"rounds": rounds, "p50_ms": ms(pct(lat, 0.5)), "p99_ms": ms(pct(lat, 0.99)), "max_ms": ms(max(lat))}


def _library_holder(dsn: str, holding: Any) -> None:
    from pgslots.sync import concurrency

    with concurrency("mortal", lease_duration=300, client=Client(dsn)):
        holding.set()
        time.sleep(3600)


def _sql_holder(dsn: str, holding: Any, lease_seconds: float) -> None:
    """A holder from plain SQL (no session): only its lease's expiry gives its slot back."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT * FROM pgslots.acquire('{mortal}', 1, %s)", [lease_seconds])
        holding.set()
        time.sleep(3600)


def _kill_and_wait(dsn: str, settle: float, target: Callable[..., None], *args: Any) -> float:
    """Seconds from SIGKILL of a holder (in its own process, `settle` + 0.5 s after its grant) to a
    waiter in another process holding its slot."""
    holding = CTX.Event()
    holder = CTX.Process(target=target, args=(dsn, holding, *args))
    holder.start()
    holding.wait(30)
    time.sleep(settle)
    got: Any = CTX.Queue()
    waiter = CTX.Process(target=_recovery_waiter, args=(dsn, got))
    waiter.start()
    time.sleep(0.5)  # queued
    killed = time.time()
    os.kill(holder.pid, signal.SIGKILL)
    waited = float(got.get(timeout=120)) - killed
    holder.join(10)
    waiter.join(10)
    return waited


def _recovery_waiter(dsn: str, got: Any) -> None:
    from pgslots.sync import concurrency

    client = Client(dsn)
    with concurrency("mortal", timeout_seconds=100, client=client):
        got.put(time.time())
    client.close()


def recovery(server: Server) -> dict[str, Any]:
    """Time from SIGKILL of a holder to a waiter in another process holding its slot: library
    holders (session liveness) at the default liveness_seconds and at 2, next to a holder whose
    lease only expires (plain SQL, a 5 s lease: the shortest the settings allow here)."""
    result: dict[str, Any] = {}
    for key, liveness, settle, target, args in (
        ("liveness_10s", 10.0, 1.0, _library_holder, ()),
        ("liveness_2s", 2.0, 1.0, _library_holder, ()),
        ("lease_expiry_5s", 10.0, 0.0, _sql_holder, (5.0,)),
    ):
        dsn = fresh(server, "bench_recovery")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE pgslots.settings SET liveness_seconds = %s, min_lease_seconds = 1", [liveness])
            conn.execute("SELECT pgslots.create_limit('mortal', 1)")
        result[key] = _kill_and_wait(dsn, settle, target, *args)
        server.drop("bench_recovery")
    return result


def _rater(dsn: str, stop_at: float, name: str, out: Any) -> None:
    from pgslots.sync import rate_limit

    configure(dsn)
    stamps = []
    while True:
        rate_limit(name, timeout_seconds=60)
        now = time.time()
        if now > stop_at:
            break
        stamps.append(now)
    out.put(stamps)


def rate_accuracy(dsn: str, seconds: float, rate: float = 50.0, limit: int = 10) -> dict[str, Any]:
    client = Client(dsn)
    client.create_limit("paced", limit, slot_decay_per_second=rate)
    client.close()
    stop_at = time.time() + seconds + 0.5
    stamps = sorted(s for r in run_processes(_rater, 4, dsn, stop_at, "paced") for s in r)
    steady = stamps[limit:]  # after the initial burst
    achieved = (len(steady) - 1) / (steady[-1] - steady[0])
    return {"configured_per_s": rate, "achieved_per_s": achieved, "ratio": achieved / rate, "seconds": seconds}


def _most_in_window(stamps: list[float], window: float) -> int:
    """The most stamps inside any half-open span of `window` seconds: what a sliding-window
    downstream of that length counts."""
    most, first = 0, 0
    for i, t in enumerate(stamps):
        while stamps[first] <= t - window:
            first += 1
        most = max(most, i - first + 1)
    return most


def _fullest_bucket(stamps: list[float], rate: float) -> float:
    """The fullest a token bucket draining at `rate` gets when each stamp adds one: what a
    downstream token bucket of that rate must hold to accept them all."""
    level, most, last = 0.0, 0.0, stamps[0]
    for t in stamps:
        level = max(0.0, level - rate * (t - last)) + 1
        most, last = max(most, level), t
    return most


def margins(server: Server, seconds: float) -> dict[str, Any]:
    """Window and bucket accuracy on the callers' clock (the time each caller sees its grant), 4
    processes saturating each limit, without a margin and with the default, alternating two rounds
    each: the most grants in any window of the limit's length (a strict sliding-window downstream
    accepts them all only if this is at most the limit), the fullest same-rate bucket (likewise), and
    the rate admitted."""
    dsn = fresh(server, "bench_margins")
    client = Client(dsn)
    found: dict[str, list[float]] = {}
    for round_ in range(2):
        for margin in (0.0, DEFAULT_MARGIN_SECONDS):
            tag = "margin" if margin else "exact"
            window, bucket = f"window-{tag}-{round_}", f"bucket-{tag}-{round_}"
            client.create_limit(window, 50, window_seconds=1.0, margin_seconds=margin)
            client.create_limit(bucket, 10, slot_decay_per_second=50.0, margin_seconds=margin)
            for name in (window, bucket):
                stop_at = time.time() + seconds + 0.5
                stamps = sorted(x for r in run_processes(_rater, 4, dsn, stop_at, name) for x in r)
                if name == bucket:  # after its first burst
                    rate = (len(stamps) - 11) / (stamps[-1] - stamps[10])
                else:  # bursts of 50: from the first burst's start to the last whole burst's start
                    last = (len(stamps) // 50 - 1) * 50
                    rate = last / (stamps[last] - stamps[0])
                found.setdefault(f"{name.split('-')[0]}_{tag}_rate", []).append(rate)
                most = _most_in_window(stamps, 1.0) / 50 if name == window else _fullest_bucket(stamps, 50.0) / 10
                found.setdefault(f"{name.split('-')[0]}_{tag}_fullest", []).append(most)
    client.close()
    server.drop("bench_margins")
    return {
        "margin_seconds": DEFAULT_MARGIN_SECONDS,
        **found,
        "window_fullest_with_margin": max(found["window_margin_fullest"]),
        "window_fullest_exact": max(found["window_exact_fullest"]),
        "bucket_fullest_with_margin": max(found["bucket_margin_fullest"]),
        "bucket_fullest_exact": max(found["bucket_exact_fullest"]),
        "window_rate_cost": statistics.mean(found["window_margin_rate"]) / statistics.mean(found["window_exact_rate"]),
        "bucket_rate_cost": statistics.mean(found["bucket_margin_rate"]) / statistics.mean(found["bucket_exact_rate"]),
    }


def scale(server: Server, seconds: float) -> dict[str, Any]:
    from pgslots.sync import concurrency

    def sample(client: Client, name: str, seconds: float, into: list[float]) -> None:
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            cm = concurrency(name, client=client)
            t0 = time.perf_counter()
            cm.__enter__()
            into.append(time.perf_counter() - t0)
            cm.__exit__(None, None, None)

    empty = fresh(server, "bench_scale_empty")
    full = fresh(server, "bench_scale_full")
    started = time.perf_counter()
    with psycopg.connect(full, autocommit=True) as conn:
        conn.execute("SELECT pgslots.create_limit('l' || i, 1000000) FROM generate_series(0, 9999) AS i")
        conn.execute("SELECT pgslots.acquire(ARRAY['l' || (i % 10000)], 1, 86400) FROM generate_series(1, 100000) AS i")
        conn.execute("VACUUM ANALYZE pgslots.limits, pgslots.leases")
        leases = conn.execute("SELECT count(*) FROM pgslots.leases").fetchone()[0]  # type: ignore[index]
    setup = time.perf_counter() - started
    Client(empty).create_limit("l0", 1_000_000)
    clients = {empty: Client(empty), full: Client(full)}
    for c in clients.values():
        sample(c, "l0", 0.5, [])  # warm up
    base: list[float] = []
    loaded: list[float] = []
    # Alternate short rounds so that drift on a shared machine hits both cases alike.
    for _ in range(10):
        sample(clients[empty], "l0", seconds / 10, base)
        sample(clients[full], "l0", seconds / 10, loaded)
    for c in clients.values():
        c.close()
    server.drop("bench_scale_empty")
    server.drop("bench_scale_full")
    b, lo = pct(base, 0.5), pct(loaded, 0.5)
    return {
        "limits": 10_000,
        "live_leases": leases,
        "setup_s": round(setup, 1),
        "acquire_p50_empty_ms": ms(b),
        "acquire_p50_loaded_ms": ms(lo),
        "ratio": lo / b,
    }


def waiters(dsn: str, tasks: int = 1000, idle_seconds: float = 10.0) -> dict[str, Any]:
    from pgslots.asyncio import concurrency

    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    holder = Client(dsn)
    holder.create_limit("crowded", 1)
    crowd = Client(psycopg.conninfo.make_conninfo(dsn, application_name="bench-crowd"))

    def xacts() -> int:
        time.sleep(2.5)  # busy backends flush their counters about once a second
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", [dbname]).fetchone()
            return int(row[0])  # type: ignore[index]

    async def main() -> dict[str, Any]:
        from pgslots.sync import concurrency as sync_concurrency

        hold = sync_concurrency("crowded", client=holder)
        hold.__enter__()

        async def task() -> None:
            async with concurrency("crowded", client=crowd):
                pass

        running = [asyncio.create_task(task()) for _ in range(tasks)]
        while holder.read_limit("crowded").waiters < tasks:
            await asyncio.sleep(0.1)
        # Let the pool shrink back after the arrival burst, and every backend flush its counters
        # (an idle backend reports within 10 s).
        await asyncio.sleep(12)
        before = await asyncio.to_thread(xacts)
        t0 = time.perf_counter()
        await asyncio.sleep(idle_seconds)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conns = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'bench-crowd'").fetchone()[0]  # type: ignore[index]
        after = await asyncio.to_thread(xacts)
        elapsed = time.perf_counter() - t0
        # Our own measuring transactions: two stats reads and the connection count.
        qps = max(0, after - before - 3) / elapsed
        hold.__exit__(None, None, None)
        t1 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*running), 300)
        drain = time.perf_counter() - t1
        return {"tasks": tasks, "connections": conns, "queries_per_s_idle": qps, "drain_s": drain}

    result = asyncio.run(main())
    holder.close()
    crowd.close()
    return result


def _cycle(client: Client, name: str) -> float:
    """One acquire + release through the library; returns the acquire's seconds."""
    from pgslots.sync import concurrency

    cm = concurrency(name, client=client)
    t0 = time.perf_counter()
    cm.__enter__()
    t1 = time.perf_counter()
    cm.__exit__(None, None, None)
    return t1 - t0


def keys(server: Server, seconds: float, used_once: int = 100_000) -> dict[str, Any]:
    """A template's key against a plain limit (alternating rounds in one process), the first use of
    new keys, and `used_once` distinct keys used once each (pgbench, 2 clients) then swept."""
    dsn = fresh(server, "bench_keys")
    client = Client(dsn)
    client.create_limit("plain", 1_000_000)
    client.create_limit("tenant:*", 1_000_000)
    client.create_limit("user:*", 1)
    for _ in range(50):
        _cycle(client, "plain")
        _cycle(client, "tenant:hot")
    plain, key, first, plain_vs_first = [], [], [], []
    counter = 0
    rounds = max(2, round(seconds))
    for _ in range(rounds):
        for into, name in ((plain, "plain"), (key, "tenant:hot")):
            stop = time.perf_counter() + seconds / rounds / 2
            while time.perf_counter() < stop:
                into.append(_cycle(client, name))
        for _ in range(200):
            counter += 1
            first.append(_cycle(client, f"tenant:new-{counter}"))
            plain_vs_first.append(_cycle(client, "plain"))
    client.close()
    script = (
        "\\set k random(1, 1000000000000)\n"
        "SELECT lease_id AS l FROM pgslots.acquire(ARRAY['user:' || :k], 1, 300) \\gset\n"
        "SELECT pgslots.release(:l, false);\n"
    )
    started = time.perf_counter()
    tps = pgbench(server, dsn, script, 2, 0, transactions=used_once // 2)
    elapsed = time.perf_counter() - started
    with psycopg.connect(dsn, autocommit=True) as conn:
        count = "SELECT count(*) FROM pgslots.limits WHERE template_id IS NOT NULL"
        size = "SELECT pg_total_relation_size('pgslots.limits')"
        before = conn.execute(count).fetchone()[0]  # type: ignore[index]
        size_before = conn.execute(size).fetchone()[0]  # type: ignore[index]
        conn.execute("SELECT pgslots.sweep()")
        after = conn.execute(count).fetchone()[0]  # type: ignore[index]
        conn.execute("VACUUM pgslots.limits")
        size_after = conn.execute(size).fetchone()[0]  # type: ignore[index]
    server.drop("bench_keys")
    return {
        "plain_acquire_p50_ms": ms(pct(plain, 0.5)),
        "key_acquire_p50_ms": ms(pct(key, 0.5)),
        "key_vs_plain": pct(key, 0.5) / pct(plain, 0.5),
        "key_cycles_vs_plain": len(key) / len(plain),
        "first_use_acquire_p50_ms": ms(pct(first, 0.5)),
        "first_use_vs_plain": pct(first, 0.5) / pct(plain_vs_first, 0.5),
        "used_once": used_once,
        "used_once_per_s": tps,
        "used_once_seconds": elapsed,
        "instances_before_sweep": before,
        "instances_after_sweep": after,
        "limits_table_bytes_before_sweep": size_before,
        "limits_table_bytes_after_sweep_and_vacuum": size_after,
    }


def _median_seconds(call: Callable[[], Any], times: int = 3) -> float:
    return statistics.median(_timed(call) for _ in range(times))


def _cli_seconds(dsn: str, *args: str) -> float:
    """The median wall time of a `pgslots` command run in this process (click's test runner)."""
    from click.testing import CliRunner

    from pgslots_cli.main import cli

    def once() -> None:
        result = CliRunner().invoke(cli, ["--dsn", dsn, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output

    return _median_seconds(once)


def _page_seconds(dsn: str, path: str) -> float:
    """The median time of GET `path` from a `pgslots ui` started for it (read-only, loopback)."""
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "pgslots_cli", "--dsn", dsn, "ui", "--port", "0", "--interval", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert found, f"pgslots ui said: {line!r}"
        url = f"http://127.0.0.1:{found.group(1)}{path}"
        return _median_seconds(lambda: urllib.request.urlopen(url, timeout=120).read())
    finally:
        proc.terminate()
        proc.wait(30)


def _new_keys(dsn: str, count: int, out: Any) -> None:
    """Uses `count` keys never used before, one rate_limit call each."""
    prefix = f"tenant:p{os.getpid()}-{uuid.uuid4().hex[:6]}-"
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(count):
            conn.execute("SELECT * FROM pgslots.rate_limit(ARRAY[%s])", [f"{prefix}{i}"]).fetchone()
    out.put(count)


def many_keys(server: Server, keys_live: int = 100_000) -> dict[str, Any]:
    """A template with `keys_live` live keys (each holding a rate slot that decays over hours, so
    none is idle; put in place by one INSERT as the schema owner): how fast new keys are created
    through the API, a new key's first acquire and first rate limit against a plain limit's
    (alternating, one process), and how long `pgslots ls`, `pgslots metrics`, `watch --once` and the
    page's /api/limits and /metrics take."""
    from pgslots.sync import rate_limit

    dsn = fresh(server, "bench_many_keys")
    client = Client(dsn)
    client.create_limit("tenant:*", 5, slot_decay_per_second=0.0001, max_keys=keys_live + 100_000)
    client.create_limit("plain", 1_000_000, slot_decay_per_second=1_000_000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            'INSERT INTO pgslots.limits (name, "limit", slot_decay_per_second, unleased_slots, decayed_at, created, updated,'
            " template_id) SELECT 'tenant:k' || i, 5, 0.0001, 1, now(), now(), now(), t.id"
            " FROM generate_series(1, %s) AS i, pgslots.limits t WHERE t.name = 'tenant:*'",
            [keys_live],
        )
        conn.execute("ANALYZE pgslots.limits")
    # New keys through the API, one call each: one connection, then 4 and 8 processes at once.
    with psycopg.connect(dsn, autocommit=True) as conn:
        t0 = time.perf_counter()
        for i in range(500):
            conn.execute("SELECT * FROM pgslots.rate_limit(ARRAY[%s])", [f"tenant:one{i}"]).fetchone()
        created_per_s = 500 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    run_processes(_new_keys, 4, dsn, 500)
    created_4_per_s = 2000 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    run_processes(_new_keys, 8, dsn, 250)
    created_8_per_s = 2000 / (time.perf_counter() - t0)
    first_acquire: list[float] = []
    plain_acquire: list[float] = []
    first_rate: list[float] = []
    plain_rate: list[float] = []
    for i in range(200):
        first_acquire.append(_cycle(client, f"tenant:acq{i}"))
        plain_acquire.append(_cycle(client, "plain"))
        first_rate.append(_timed(lambda n=f"tenant:rate{i}": rate_limit(n, client=client)))  # type: ignore[misc]
        plain_rate.append(_timed(lambda: rate_limit("plain", client=client)))
    client.close()
    result = {
        "keys_live": keys_live,
        "keys_created_per_s": created_per_s,
        "keys_created_4_processes_per_s": created_4_per_s,
        "keys_created_8_processes_per_s": created_8_per_s,
        "first_acquire_p50_ms": ms(pct(first_acquire, 0.5)),
        "plain_acquire_p50_ms": ms(pct(plain_acquire, 0.5)),
        "first_acquire_vs_plain": pct(first_acquire, 0.5) / pct(plain_acquire, 0.5),
        "first_rate_limit_p50_ms": ms(pct(first_rate, 0.5)),
        "plain_rate_limit_p50_ms": ms(pct(plain_rate, 0.5)),
        "first_rate_limit_vs_plain": pct(first_rate, 0.5) / pct(plain_rate, 0.5),
        "ls_s": _cli_seconds(dsn, "ls"),
        "metrics_s": _cli_seconds(dsn, "metrics"),
        "watch_once_s": _cli_seconds(dsn, "watch", "--once"),
        "page_api_limits_s": _page_seconds(dsn, "/api/limits"),
        "page_metrics_s": _page_seconds(dsn, "/metrics"),
    }
    server.drop("bench_many_keys")
    return result


def fairness(server: Server, seconds: float) -> dict[str, Any]:
    """16 processes on 4 slots, 1 ms body: plain first-come-first-served against the same load with
    priorities and 4 tenants' fairness keys, in alternating rounds."""
    plain, fair = [], []
    for _ in range(2):
        plain.append(contended(fresh(server, "bench_fair"), seconds / 2, 0.001))
        server.drop("bench_fair")
        fair.append(contended(fresh(server, "bench_fair"), seconds / 2, 0.001, fair=True))
        server.drop("bench_fair")
    plain_cps = sum(r["cycles_per_s"] for r in plain) / len(plain)
    fair_cps = sum(r["cycles_per_s"] for r in fair) / len(fair)
    return {
        "fifo_cycles_per_s": plain_cps,
        "fair_cycles_per_s": fair_cps,
        "ratio": fair_cps / plain_cps,
        "fifo_wait_p99_ms": max(r["wait_p99_ms"] for r in plain),
        "fair_wait_p99_ms": max(r["wait_p99_ms"] for r in fair),
    }


def _timed(call: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def real_apis(server: Server, seconds: float) -> dict[str, Any]:
    """Reserve + settle against rate_limit (alternating rounds, one process, a limit that never
    refuses); window accuracy (4 processes saturating 50 per 1 s); a limit of 10,000 per hour
    holding 9,000 grants in its window against one holding none."""
    from pgslots.sync import rate_limit, reserve

    dsn = fresh(server, "bench_apis")
    client = Client(dsn)
    client.create_limit("bucket", 1_000_000_000, slot_decay_per_second=1_000_000)
    client.create_limit("hourly-empty", 10_000, window_seconds=3600)
    client.create_limit("hourly-full", 10_000, window_seconds=3600)

    def settled() -> None:
        reserve("bucket", occupy=100, client=client).settle(37)

    for _ in range(50):
        rate_limit("bucket", client=client)
        settled()
    plain: list[float] = []
    cycle: list[float] = []
    rounds = max(2, round(seconds))
    for _ in range(rounds):
        for into, call in ((plain, lambda: rate_limit("bucket", client=client)), (cycle, settled)):
            stop = time.perf_counter() + seconds / rounds / 2
            while time.perf_counter() < stop:
                into.append(_timed(call))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM generate_series(1, 9000) AS i, LATERAL pgslots.rate_limit(ARRAY['hourly-full'], 1 + 0 * i) AS r")
        log_rows = conn.execute("SELECT count(*) FROM pgslots.window_grants").fetchone()[0]  # type: ignore[index]
    empty: list[float] = []
    full: list[float] = []
    for _ in range(rounds):
        for into, name in ((empty, "hourly-empty"), (full, "hourly-full")):
            for _ in range(100):  # 100 grants a round each: the full one reaches 9,000 + 100 x rounds
                into.append(_timed(lambda n=name: rate_limit(n, client=client)))  # type: ignore[misc]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT count(*) FROM generate_series(1, 10000) AS i, LATERAL pgslots.rate_limit(ARRAY['hourly-full'], 1 + 0 * i) AS r"
        )
        # Refusals of the full window against refusals of a full token bucket, alternating.
        conn.execute("SELECT pgslots.create_limit('bucket-full', 10000, 0.0001)")
        conn.execute("SELECT count(*) FROM generate_series(1, 10000) AS i, LATERAL pgslots.rate_limit(ARRAY['bucket-full'], 1 + 0 * i)")
        refused: list[float] = []
        bucket_refused: list[float] = []
        for _ in range(200):
            for into, name in ((refused, "hourly-full"), (bucket_refused, "bucket-full")):
                into.append(_timed(lambda n=name: conn.execute("SELECT * FROM pgslots.rate_limit(ARRAY[%s])", [n]).fetchone()))  # type: ignore[misc]
        held = conn.execute("SELECT active_slots FROM pgslots.status WHERE name = 'hourly-full'").fetchone()[0]  # type: ignore[index]
        log_size = conn.execute("SELECT pg_total_relation_size('pgslots.window_grants')").fetchone()[0]  # type: ignore[index]
    # Window accuracy: 4 processes saturating 50 per 1 s.
    client.create_limit("windowed", 50, window_seconds=1.0, margin_seconds=0)  # exact on the database's clock
    client.close()
    stop_at = time.time() + 2 * seconds + 0.5
    stamps = sorted(x for r in run_processes(_rater, 4, dsn, stop_at, "windowed") for x in r)
    first = stamps[0]
    windows = int((stamps[-1] - first) // 1.0)
    in_windows = sum(1 for t in stamps if t < first + windows)
    server.drop("bench_apis")
    return {
        "rate_limit_p50_ms": ms(pct(plain, 0.5)),
        "reserve_settle_p50_ms": ms(pct(cycle, 0.5)),
        "reserve_settle_vs_rate_limit": pct(cycle, 0.5) / pct(plain, 0.5),
        "window_empty_grant_p50_ms": ms(pct(empty, 0.5)),
        "window_9000_grant_p50_ms": ms(pct(full, 0.5)),
        "window_9000_vs_empty": pct(full, 0.5) / pct(empty, 0.5),
        "window_full_refusal_p50_ms": ms(pct(refused, 0.5)),
        "bucket_full_refusal_p50_ms": ms(pct(bucket_refused, 0.5)),
        "window_vs_bucket_refusal": pct(refused, 0.5) / pct(bucket_refused, 0.5),
        "window_full_slots_held": held,
        "window_log_rows_after_9000": log_rows,
        "window_log_bytes_full": log_size,
        "window_configured_per_s": 50.0,
        "window_achieved_per_s": in_windows / windows,
        "window_ratio": in_windows / windows / 50.0,
        "window_seconds_measured": windows,
    }


# ---- report -------------------------------------------------------------------------------------


def _at_least(bound: float) -> Callable[[float], bool]:
    return lambda v: v >= bound


def _at_most(bound: float) -> Callable[[float], bool]:
    return lambda v: v <= bound


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    c = r["ceiling"]
    k = r["many_keys"]
    rows = [
        (
            "uncontended sync cycles/s vs raw two-UPDATE semaphore (1 process, alternating rounds)",
            r["uncontended"]["sync"]["cycles_per_s"] / r["uncontended"]["sync"]["raw_semaphore_cycles_per_s"],
            ">= 0.75",
            lambda v: v >= 0.75,
        ),
        (
            "uncontended async cycles/s vs raw two-UPDATE semaphore (1 process, alternating rounds)",
            r["uncontended"]["async"]["cycles_per_s"] / r["uncontended"]["async"]["raw_semaphore_cycles_per_s"],
            ">= 0.75",
            lambda v: v >= 0.75,
        ),
        *[
            (
                f"uncontended {face}: the library's two statements sent with plain psycopg vs raw semaphore (same rounds)",
                u["plain_psycopg_cycles_per_s"] / u["raw_semaphore_cycles_per_s"],
                "(reported)",
                None,
            )
            for face, u in r["uncontended"].items()
            if "plain_psycopg_cycles_per_s" in u
        ],
        *[
            (
                "uncontended async vs the raw semaphore sent with async psycopg (same rounds; its own loop's floor)",
                u["cycles_per_s"] / u["raw_semaphore_async_psycopg_cycles_per_s"],
                "(reported)",
                None,
            )
            for u in [r["uncontended"]["async"]]
            if "raw_semaphore_async_psycopg_cycles_per_s" in u  # runs before 2026-12-05 lack it
        ],
        (
            "SQL alone (pgbench): acquire + release cycle vs raw two-UPDATE semaphore",
            r["server_side"]["ratio"],
            ">= 0.75",
            lambda v: v >= 0.75,
        ),
        (
            "contended 16 on 4, body 1 ms: cycles/s vs raw semaphore busy-retrying every 1 ms",
            r["contended_1ms"]["cycles_per_s"] / c["raw_semaphore_16_on_4_body_1ms_cycles_per_s"],
            ">= 1.0",
            lambda v: v >= 1.0,
        ),
        ("contended 16 on 4, body 20 ms: utilisation", r["contended_20ms"]["utilisation"], ">= 0.9", lambda v: v >= 0.9),
        ("hand-off p50 (ms)", r["handoff"]["p50_ms"], "<= 2", lambda v: v <= 2),
        ("hand-off p99 (ms)", r["handoff"]["p99_ms"], "<= 10", lambda v: v <= 10),
        ("rate accuracy: achieved / configured (50/s)", r["rate"]["ratio"], "within 1%", lambda v: abs(v - 1) <= 0.01),
        (
            "margin 0.05 s: most grants in any 1 s of the callers' clock / limit (50 per 1 s window, 4 processes)",
            r["margins"]["window_fullest_with_margin"],
            "<= 1.0",
            lambda v: v <= 1.0,
        ),
        ("no margin: the same", r["margins"]["window_fullest_exact"], "(reported)", None),
        (
            "margin 0.05 s: fullest 10-slot bucket at 50/s on the callers' clock / limit (4 processes)",
            r["margins"]["bucket_fullest_with_margin"],
            "<= 1.0",
            lambda v: v <= 1.0,
        ),
        ("no margin: the same", r["margins"]["bucket_fullest_exact"], "(reported)", None),
        ("margin 0.05 s: rate admitted / without (window 50 per 1 s)", r["margins"]["window_rate_cost"], "(reported)", None),
        ("margin 0.05 s: rate admitted / without (bucket 50/s)", r["margins"]["bucket_rate_cost"], "(reported)", None),
        ("scale: acquire p50 with 10k limits, 100k leases vs empty", r["scale"]["ratio"], "<= 1.2", lambda v: v <= 1.2),
        ("100,000 live keys: new keys created per second (one connection)", k["keys_created_per_s"], "(reported)", None),
        ("100,000 live keys: new keys created per second (4 processes)", k["keys_created_4_processes_per_s"], "(reported)", None),
        ("100,000 live keys: new keys created per second (8 processes)", k["keys_created_8_processes_per_s"], ">= 1000", _at_least(1000)),
        ("100,000 live keys: a new key's first acquire p50 vs a plain limit's", k["first_acquire_vs_plain"], "<= 2", _at_most(2)),
        ("100,000 live keys: a new key's first rate limit p50 vs a plain's", k["first_rate_limit_vs_plain"], "<= 2", _at_most(2)),
        ("100,000 live keys: pgslots ls (s)", k["ls_s"], "< 0.5", lambda v: v < 0.5),
        ("100,000 live keys: the page's /api/limits (s)", k["page_api_limits_s"], "< 0.5", lambda v: v < 0.5),
        ("100,000 live keys: pgslots metrics (s)", k["metrics_s"], "< 1", lambda v: v < 1),
        ("100,000 live keys: pgslots watch --once (s)", k["watch_once_s"], "(reported)", None),
        ("waiters: connections for 1,000 waiting tasks", r["waiters"]["connections"], "<= 2", lambda v: v <= 2),
        ("waiters: queries/s while idle", r["waiters"]["queries_per_s_idle"], "<= 20", lambda v: v <= 20),
        ("SIGKILLed holder to waiter holding (s), liveness_seconds 10", r["recovery"]["liveness_10s"], "<= 11", lambda v: v <= 11),
        ("SIGKILLed holder to waiter holding (s), liveness_seconds 2", r["recovery"]["liveness_2s"], "<= 3", lambda v: v <= 3),
        ("SIGKILLed holder to waiter holding (s), no session, 5 s lease", r["recovery"]["lease_expiry_5s"], "(reported)", None),
        (
            "keys: acquire p50 on a template's key vs a plain limit (alternating rounds)",
            r["keys"]["key_vs_plain"],
            "<= 1.2",
            lambda v: v <= 1.2,
        ),
        ("keys: acquire p50 of a key's first use (creates it) vs a plain limit", r["keys"]["first_use_vs_plain"], "(reported)", None),
        (
            f"keys: {r['keys']['used_once']:,} keys used once, then swept: keys left",
            r["keys"]["instances_after_sweep"],
            "0",
            lambda v: v == 0,
        ),
        (
            "fair queue (priorities, 4 tenants) 16 on 4, 1 ms body: cycles/s vs first-come-first-served",
            r["fairness"]["ratio"],
            "(reported)",
            None,
        ),
        (
            "reserve + settle cycle p50 vs rate_limit p50 (alternating rounds, one process)",
            r["real_apis"]["reserve_settle_vs_rate_limit"],
            "(reported)",
            None,
        ),
        (
            "window accuracy: granted per 1 s window / limit (50 per 1 s, 4 processes)",
            r["real_apis"]["window_ratio"],
            "within 1%",
            lambda v: abs(v - 1) <= 0.01,
        ),
        (
            "window 10,000 per hour: grant p50 with 9,000 grants in the window vs none",
            r["real_apis"]["window_9000_vs_empty"],
            "<= 1.2",
            lambda v: v <= 1.2,
        ),
        (
            "window 10,000 per hour, full: refusal p50 vs a full token bucket's (SQL, alternating)",
            r["real_apis"]["window_vs_bucket_refusal"],
            "(reported)",
            None,
        ),
    ]
    cpu, idle_, batch, threads = r.get("server_cpu"), r.get("idle"), r.get("batching"), r.get("thread_batching")
    if batch:
        rows.append(
            (
                "200 asyncio tasks of one process on a limit of 50, 1 ms body: cycles/s vs the raw semaphore on one connection",
                batch["ratio"],
                ">= 2",
                _at_least(2),
            )
        )
    if threads:
        rows.append(
            (
                f"{threads['threads']} threads of one process on a limit of {threads['limit']}, 1 ms body: cycles/s vs the raw "
                "semaphore on one connection",
                threads["ratio"],
                ">= 2",
                _at_least(2),
            )
        )
    if cpu:
        rows += [
            ("server CPU per cycle, uncontended: pgslots vs raw semaphore", cpu["uncontended_vs_raw"], "(reported)", None),
            ("server CPU per cycle, 16 on 4 with 1 ms body: pgslots vs raw semaphore", cpu["contended_vs_raw"], "(reported)", None),
        ]
    if idle_:
        rows += [
            ("idle chatter: transactions/s of a process holding nothing (sync)", idle_["sync_transactions_per_s"], "<= 1", _at_most(1)),
            ("idle chatter: transactions/s of a process holding nothing (async)", idle_["async_transactions_per_s"], "<= 1", _at_most(1)),
            ("idle chatter: transactions/s of a process holding one lease", idle_["holding_transactions_per_s"], "(reported)", None),
        ]
    listeners = r.get("idle_listeners")
    if listeners:
        rows.append(
            (
                f"idle processes: server CPU per NOTIFY (a hand-off's) with {listeners['processes']} processes that used a limit "
                "once and idle vs none",
                listeners["ratio"],
                "(reported)",
                None,
            )
        )
    return [{"metric": m, "value": v, "target": t, "met": None if f is None else bool(f(v))} for m, v, t, f in rows]


def markdown(r: dict[str, Any]) -> str:
    c = r["ceiling"]
    lines = [
        f"Benchmarks of {r['date']} on {r['machine']} (PostgreSQL {r['postgres']}, "
        f"fsync={r['settings'].get('fsync')}, synchronous_commit={r['settings'].get('synchronous_commit')}).",
        "",
        "| metric | value | target | met |",
        "|---|---|---|---|",
    ]
    for t in r["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['metric']} | {t['value']:.3g} | {t['target']} | {met} |")
    lines += [
        "",
        "| ceiling (same server, same run) | per second |",
        "|---|---|",
        *[f"| {k} | {v:,.0f} |" for k, v in c.items()],
        "",
        "| pgslots | figures |",
        "|---|---|",
        f"| uncontended sync | {r['uncontended']['sync']['cycles_per_s']:,.0f} cycles/s, acquire p50/p99 "
        f"{r['uncontended']['sync']['acquire_p50_ms']}/{r['uncontended']['sync']['acquire_p99_ms']} ms, release p50/p99 "
        f"{r['uncontended']['sync']['release_p50_ms']}/{r['uncontended']['sync']['release_p99_ms']} ms "
        f"(raw semaphore in the alternating rounds: {r['uncontended']['sync']['raw_semaphore_cycles_per_s']:,.0f}/s) |",
        f"| uncontended async | {r['uncontended']['async']['cycles_per_s']:,.0f} cycles/s, acquire p50/p99 "
        f"{r['uncontended']['async']['acquire_p50_ms']}/{r['uncontended']['async']['acquire_p99_ms']} ms, release p50/p99 "
        f"{r['uncontended']['async']['release_p50_ms']}/{r['uncontended']['async']['release_p99_ms']} ms "
        f"(raw semaphore in the alternating rounds: {r['uncontended']['async']['raw_semaphore_cycles_per_s']:,.0f}/s) |",
        f"| SQL alone, pgbench, 1 client | acquire + release {r['server_side']['pgslots_cycles_per_s']:,.0f} cycles/s, "
        f"raw two-UPDATE semaphore {r['server_side']['raw_semaphore_cycles_per_s']:,.0f}/s (alternating rounds) |",
        f"| 16 processes on 4 slots, body 1 ms | {r['contended_1ms']['cycles_per_s']:,.0f} cycles/s, utilisation "
        f"{r['contended_1ms']['utilisation']:.2f}, wait p99 {r['contended_1ms']['wait_p99_ms']} ms |",
        f"| 16 processes on 4 slots, body 20 ms | {r['contended_20ms']['cycles_per_s']:,.0f} cycles/s, utilisation "
        f"{r['contended_20ms']['utilisation']:.2f}, wait p99 {r['contended_20ms']['wait_p99_ms']} ms |",
        f"| hand-off to another process | p50 {r['handoff']['p50_ms']} ms, p99 {r['handoff']['p99_ms']} ms "
        f"({r['handoff']['rounds']} rounds) |",
        f"| rate limit 50/s, limit 10, 4 processes | achieved {r['rate']['achieved_per_s']:.2f}/s |",
        f"| 10k limits, {r['scale']['live_leases']:,} live leases | acquire p50 {r['scale']['acquire_p50_loaded_ms']} ms "
        f"vs {r['scale']['acquire_p50_empty_ms']} ms empty |",
        f"| 1,000 waiting asyncio tasks | {r['waiters']['connections']} connections, "
        f"{r['waiters']['queries_per_s_idle']:.1f} queries/s idle, all served in {r['waiters']['drain_s']:.1f} s |",
        f"| SIGKILL of a holder to a waiter in another process holding | {r['recovery']['liveness_10s']:.2f} s "
        f"(liveness_seconds 10), {r['recovery']['liveness_2s']:.2f} s (liveness_seconds 2); a holder without a "
        f"session, lease 5 s, killed 0.5 s after its grant: {r['recovery']['lease_expiry_5s']:.2f} s |",
        f"| a template's key vs a plain limit | acquire p50 {r['keys']['key_acquire_p50_ms']} ms vs "
        f"{r['keys']['plain_acquire_p50_ms']} ms; a key's first use {r['keys']['first_use_acquire_p50_ms']} ms |",
        f"| {r['keys']['used_once']:,} keys used once (pgbench, 2 clients) | {r['keys']['used_once_per_s']:,.0f}/s; "
        f"{r['keys']['instances_before_sweep']:,} keys left before sweep "
        f"({r['keys']['limits_table_bytes_before_sweep'] / 1e6:.1f} MB), {r['keys']['instances_after_sweep']} after "
        f"({r['keys']['limits_table_bytes_after_sweep_and_vacuum'] / 1e6:.1f} MB after VACUUM) |",
        f"| 16 processes on 4 slots, 1 ms body, priorities and 4 tenants | {r['fairness']['fair_cycles_per_s']:,.0f} "
        f"cycles/s vs {r['fairness']['fifo_cycles_per_s']:,.0f} first-come-first-served (alternating rounds); wait p99 "
        f"{r['fairness']['fair_wait_p99_ms']} ms vs {r['fairness']['fifo_wait_p99_ms']} ms |",
    ]
    if r.get("idle_listeners"):
        heard = r["idle_listeners"]
        lines.append(
            f"| {heard['processes']} idle processes that used a limit once | a NOTIFY (one per hand-off) costs the server "
            f"{heard['notify_us_with_idle']:.0f} us of CPU, {heard['notify_us_alone']:.0f} us without them |"
        )
    if r.get("comparison"):
        lines += comparison_lines(r["comparison"])
    lines += ["", "## Findings of this run", "", *[f"- {n}" for n in findings(r)]]
    if r.get("history"):
        lines += ["", "## History of earlier runs (figures from those runs, not this one)", "", *r["history"]]
    return "\n".join(lines) + "\n"


def findings(r: dict[str, Any]) -> list[str]:
    """What this run's figures say, written from them: nothing here is fixed text about a number."""
    out = []
    for t in r["targets"]:
        if t["met"] is None:
            out.append(f"{t['metric']}: {t['value']:.3g} (reported, no target).")
        else:
            out.append(f"{t['metric']}: {t['value']:.3g} (target {t['target']}): {'met' if t['met'] else 'missed'}.")
    solo, sql = r.get("uncontended", {}).get("sync"), r.get("server_side")
    if solo and sql:
        python_ms = 1000 / solo["cycles_per_s"] - 1000 / sql["pgslots_cycles_per_s"]
        raw_python_ms = 1000 / solo["raw_semaphore_cycles_per_s"] - 1000 / sql["raw_semaphore_cycles_per_s"]
        out.append(
            f"Where the uncontended cycle goes: the SQL alone runs {sql['pgslots_cycles_per_s']:,.0f} cycles/s under pgbench "
            f"({sql['ratio']:.2f}x of the two bare UPDATEs), so the Python client adds about {python_ms:.2f} ms a cycle, "
            f"against {raw_python_ms:.2f} ms for the raw semaphore's client."
        )
    for face, u in r.get("uncontended", {}).items():
        if "plain_psycopg_cycles_per_s" in u:
            layers_us = 1e6 / u["cycles_per_s"] - 1e6 / u["plain_psycopg_cycles_per_s"]
            out.append(
                f"The {face} library's layers: its two statements sent with plain psycopg (a cursor) run "
                f"{u['plain_psycopg_cycles_per_s'] / u['raw_semaphore_cycles_per_s']:.2f}x of the raw semaphore in the same "
                f"rounds, the library {u['cycles_per_s'] / u['raw_semaphore_cycles_per_s']:.2f}x: its Python layers "
                f"(flow, pool, batcher, lease keeping), less what it saves by sending its statements without a cursor, "
                f"cost about {layers_us:.0f} us a cycle."
            )
        if "raw_semaphore_async_psycopg_cycles_per_s" in u:
            loop_us = 1e6 / u["raw_semaphore_async_psycopg_cycles_per_s"] - 1e6 / u["raw_semaphore_cycles_per_s"]
            out.append(
                f"The raw semaphore sent with async psycopg runs "
                f"{u['raw_semaphore_async_psycopg_cycles_per_s'] / u['raw_semaphore_cycles_per_s']:.2f}x of the blocking one "
                f"(the event loop's rounds cost about {loop_us:.0f} us a cycle before any library); the {face} library runs "
                f"{u['cycles_per_s'] / u['raw_semaphore_async_psycopg_cycles_per_s']:.2f}x of it."
            )
    busy = r.get("contended_1ms")
    if busy:
        raw = r["ceiling"]["raw_semaphore_16_on_4_body_1ms_cycles_per_s"]
        out.append(
            f"Contended, 16 processes on 4 slots with a 1 ms body: {busy['cycles_per_s']:,.0f} cycles/s against "
            f"{raw:,.0f} for the raw semaphore busy-retrying, utilisation {busy['utilisation']:.2f}, waits p50/p99 "
            f"{busy['wait_p50_ms']}/{busy['wait_p99_ms']} ms."
        )
    hand = r.get("handoff")
    if hand:
        out.append(f"Hand-off from a release to a waiter in another process: p50 {hand['p50_ms']} ms, p99 {hand['p99_ms']} ms.")
    return out


# ---- against the previous run ------------------------------------------------------------------

_NOT_ROWS = {"date", "machine", "postgres", "settings", "seconds_per_scenario", "targets", "history", "comparison"}
SPREAD = HERE / "spread.json"


def rows(report: dict[str, Any]) -> dict[str, float]:
    """Every figure of a report as one flat row each ("uncontended.sync.cycles_per_s": 853.6)."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            out[prefix] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    for key, value in report.items():
        if key not in _NOT_ROWS:
            walk(key, value)
    return out


def measure_spread(pairs: list[Path]) -> dict[str, float]:
    """Each row's run-to-run spread: the largest relative difference between two runs of the same
    code on one server (`pairs`: result directories or JSON files, two by two)."""
    spread: dict[str, float] = {}
    loaded = [rows(json.loads((p / "partial.json" if p.is_dir() else p).read_text())) for p in pairs]
    for a, b in zip(loaded[::2], loaded[1::2], strict=True):
        for key in a.keys() & b.keys():
            low, high = sorted((abs(a[key]), abs(b[key])))
            if high > 0:
                spread[key] = max(spread.get(key, 0.0), (high - low) / high)
    return spread


def merge_spread(known: dict[str, float], measured: dict[str, float]) -> dict[str, float]:
    """The spreads kept so far with those measured now: each row keeps the largest seen for it."""
    return {**known, **{k: max(v, known.get(k, 0.0)) for k, v in measured.items()}}


# Two runs can agree closely by chance: no measured row is judged against a spread below this.
MIN_SPREAD = 0.02


def compare(previous: dict[str, Any], report: dict[str, Any], spread: dict[str, float]) -> dict[str, Any]:
    """Each row against the previous run's: how much it moved, and whether that is more than its
    run-to-run spread, at least MIN_SPREAD (rows without a measured spread are listed apart, not judged)."""
    before, now = rows(previous), rows(report)
    moved, within, unjudged = [], 0, []
    for key in sorted(before.keys() & now.keys()):
        old, new = before[key], now[key]
        change = (new - old) / abs(old) if old else (0.0 if new == old else float("inf"))
        if key not in spread:
            unjudged.append(key)
        elif abs(change) > max(spread[key], MIN_SPREAD):
            moved.append({"row": key, "before": old, "now": new, "change": change, "spread": max(spread[key], MIN_SPREAD)})
        else:
            within += 1
    # The rows that are ratios to this run's own ceiling (the targets' table), side by side: they
    # move less with the machine than absolute rows, whose ceiling moves too.
    earlier = {t["metric"]: t["value"] for t in previous.get("targets", []) if isinstance(t.get("value"), (int, float))}
    ratios = [
        {"metric": t["metric"], "before": earlier[t["metric"]], "now": t["value"]}
        for t in report.get("targets", [])
        if t["metric"] in earlier and isinstance(t.get("value"), (int, float))
    ]
    return {
        "previous_date": previous.get("date"),
        "ratios": ratios,
        "moved": moved,
        "within_spread": within,
        "not_judged": len(unjudged),
        "new_rows": sorted(now.keys() - before.keys()),
        "gone_rows": sorted(before.keys() - now.keys()),
    }


def comparison_lines(c: dict[str, Any]) -> list[str]:
    lines = ["", f"## Against the previous run ({c['previous_date']})", ""]
    lines.append(
        f"{len(c['moved'])} row(s) moved more than their run-to-run spread (at least {MIN_SPREAD:.0%}), "
        f"{c['within_spread']} stayed within it, "
        f"{c['not_judged']} have no measured spread (not judged); {len(c['new_rows'])} row(s) are new, "
        f"{len(c['gone_rows'])} gone."
    )
    if c["moved"]:
        lines += ["", "| row | previous | now | change | spread |", "|---|---|---|---|---|"]
        for m in c["moved"]:
            lines.append(f"| {m['row']} | {m['before']:.4g} | {m['now']:.4g} | {m['change']:+.1%} | {m['spread']:.1%} |")
    if c.get("ratios"):
        lines += ["", "The targets' rows (ratios to each run's own ceiling), previous and now:", ""]
        lines += ["| metric | previous | now |", "|---|---|---|"]
        lines += [f"| {r['metric']} | {r['before']:.3g} | {r['now']:.3g} |" for r in c["ratios"]]
    return lines


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = r["ceiling"]
    labels = [
        "pgbench hot UPDATE\n1 client",
        "raw semaphore\n1 process",
        "pgslots sync\n1 process",
        "pgslots async\n1 process",
        "raw semaphore\n16 on 4, 1 ms",
        "pgslots\n16 on 4, 1 ms",
    ]
    values = [
        c["pgbench_hot_update_1_client_tps"],
        c["raw_semaphore_1_process_cycles_per_s"],
        r["uncontended"]["sync"]["cycles_per_s"],
        r["uncontended"]["async"]["cycles_per_s"],
        c["raw_semaphore_16_on_4_body_1ms_cycles_per_s"],
        r["contended_1ms"]["cycles_per_s"],
    ]
    colors = ["#999999", "#999999", "#2b6cb0", "#2b6cb0", "#999999", "#2b6cb0"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar(labels, values, color=colors)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("transactions or cycles per second")
    ax.set_title(f"pgslots against the PostgreSQL ceiling ({r['date'][:10]}, {r['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default=os.environ.get("PGSLOTS_BENCH_DSN"))
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed scenario")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--report-only", action="store_true", help="rebuild latest.md and latest.png from latest.json")
    parser.add_argument("--only", help="comma-separated scenarios to run (the ceiling always runs too); writes only those figures")
    parser.add_argument(
        "--compare", type=Path, help="the run to compare with (default: the latest.json in --out, i.e. the previous committed run)"
    )
    parser.add_argument(
        "--spread",
        type=Path,
        nargs="+",
        help="result directories of runs of the same code, two by two: add each row's run-to-run spread to spread.json "
        "(a row keeps the largest spread measured for it; delete the file to start afresh)",
    )
    args = parser.parse_args()
    if args.spread:
        measured = measure_spread(args.spread)
        known: dict[str, float] = json.loads(SPREAD.read_text()) if SPREAD.exists() else {}
        merged = merge_spread(known, measured)
        SPREAD.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")
        wider = sum(1 for k, v in measured.items() if v > known.get(k, 0.0))
        print(
            f"Wrote {SPREAD}: the run-to-run spread of {len(merged)} rows ({len(measured)} measured now, "
            f"{len(set(measured) - set(known))} of them new, {wider} wider than before)"
        )
        return
    if args.report_only:
        report = json.loads((args.out / "latest.json").read_text())
        write_report(report, args.out, json.loads(args.compare.read_text()) if args.compare else None)
        return
    # A SIGTERM (e.g. from `timeout`) still stops the throwaway server in the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = Server(args.dsn)
    s = args.seconds
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release().split('-')[0]}",
        "postgres": server.version,
        "settings": server.settings,
        "seconds_per_scenario": s,
    }
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("ceiling", lambda: ceilings(server, s)),
        ("uncontended", lambda: uncontended(fresh(server, "bench_solo"), s)),
        ("server_side", lambda: server_side(server, s)),
        ("contended_1ms", lambda: contended(fresh(server, "bench_c1"), s, 0.001)),
        ("contended_20ms", lambda: contended(fresh(server, "bench_c20"), s, 0.020)),
        ("handoff", lambda: handoff(fresh(server, "bench_handoff"), 200)),
        ("rate", lambda: rate_accuracy(fresh(server, "bench_rate"), 2 * s)),
        ("margins", lambda: margins(server, s)),
        ("scale", lambda: scale(server, s)),
        ("waiters", lambda: waiters(fresh(server, "bench_waiters"))),
        ("recovery", lambda: recovery(server)),
        ("keys", lambda: keys(server, s)),
        ("many_keys", lambda: many_keys(server)),
        ("fairness", lambda: fairness(server, 2 * s)),
        ("real_apis", lambda: real_apis(server, s)),
        ("batching", lambda: batching(fresh(server, "bench_batch"), s)),
        ("thread_batching", lambda: thread_batching(fresh(server, "bench_threads"), s)),
        ("server_cpu", lambda: server_cpu(server, s)),
        ("idle", lambda: idle(server)),
        ("idle_listeners", lambda: idle_listeners(server)),
    ]
    if args.only:
        wanted = {"ceiling", *args.only.split(",")}
        steps = [(n, f) for n, f in steps if n in wanted]
    try:
        for name, step in steps:
            started = time.perf_counter()
            print(f"== {name}", flush=True)
            report[name] = step()
            print(f"   {json.dumps(report[name])} ({time.perf_counter() - started:.0f} s)", flush=True)
    finally:
        for db in (
            "bench_solo",
            "bench_sql",
            "bench_c1",
            "bench_c20",
            "bench_handoff",
            "bench_rate",
            "bench_waiters",
            "bench_recovery",
            "bench_keys",
            "bench_fair",
            "bench_apis",
            "bench_margins",
            "bench_many_keys",
            "bench_cpu",
            "bench_batch",
            "bench_threads",
            "bench_idle_sync",
            "bench_idle_async",
            "bench_idle_holding",
        ):
            with contextlib.suppress(psycopg.Error):
                server.drop(db)
        server.close()
    if args.only:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "partial.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"Wrote {args.out / 'partial.json'} (a partial run does not replace latest.*)")
        return
    previous_path = args.compare or args.out / "latest.json"
    previous = json.loads(previous_path.read_text()) if previous_path.exists() else None
    write_report(report, args.out, previous)


def write_report(report: dict[str, Any], out: Path, previous: dict[str, Any] | None = None) -> None:
    report["targets"] = targets(report)
    if previous is not None:
        spread = json.loads(SPREAD.read_text()) if SPREAD.exists() else {}
        report["comparison"] = compare(previous, report, spread)
    history = HERE / "HISTORY.md"
    lines = history.read_text().splitlines() if history.exists() else []
    # Its dated sections (## headings) and their notes, shown after this run's own findings.
    dated = [line for line in lines if line.startswith(("## ", "- "))]
    report["history"] = [line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in dated]
    report.pop("notes", None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "latest.md").write_text(markdown(report))
    plot(report, out / "latest.png")
    print(markdown(report))
    print(f"Wrote {out / 'latest.json'}, latest.md and latest.png")


if __name__ == "__main__":
    main()
