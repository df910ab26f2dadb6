"""PgBouncer in transaction mode, in front of the test server: several processes of two plain
pgslots_user roles wait on one limit through it, waking by LISTEN on a direct connection or by
polling through the bouncer. No error, no leak, never more bodies than the limit.

Needs the `pgbouncer` binary (Debian's package; .ci/run installs it). Under CI its absence fails
the test instead of skipping it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from invariants import check

import pgslots
from pgslots._cluster import server_user
from pgslots.sync import concurrency
from sqlhelp import create, login_role, status

LIMIT = 2
PROCESSES = 4
CYCLES = 60


def _binary() -> str:
    found = shutil.which("pgbouncer") or next((p for p in ("/usr/sbin/pgbouncer",) if os.path.exists(p)), None)
    if found is None:
        message = "pgbouncer is not installed (apt-get install pgbouncer)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def bouncer(fresh_dsn: str) -> Iterator[dict[str, str]]:
    """{'bounced': DSN through PgBouncer, 'direct': the same role straight to the server, and the
    same two for a second role ('bounced2', 'direct2'), 'version': ...}."""
    binary = _binary()
    roles = [login_role(fresh_dsn, "pgslots_user"), login_role(fresh_dsn, "pgslots_user")]
    direct, direct2 = (next(r) for r in roles)
    server = psycopg.conninfo.conninfo_to_dict(direct)
    home = Path(tempfile.mkdtemp(prefix="pgslots-bouncer-"))
    port = _free_port()
    users = [psycopg.conninfo.conninfo_to_dict(d)["user"] for d in (direct, direct2)]
    (home / "users.txt").write_text("".join(f'"{u}" ""\n' for u in users))
    (home / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={server.get('host', '127.0.0.1')} port={server.get('port', 5432)}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {home / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 3\nmax_client_conn = 200\n"
        f"logfile = {home / 'pgbouncer.log'}\npidfile = {home / 'pgbouncer.pid'}\n"
    )
    command = [binary, str(home / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer will not run as root
        user = server_user()
        assert user is not None
        shutil.chown(home, user)
        for f in home.iterdir():
            shutil.chown(f, user)
        command[1:1] = ["-u", user]
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout.split("\n")[0]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    bounced = psycopg.conninfo.make_conninfo(direct, host="127.0.0.1", port=str(port))
    bounced2 = psycopg.conninfo.make_conninfo(direct2, host="127.0.0.1", port=str(port))
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with psycopg.connect(bounced, connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (home / "pgbouncer.log").read_text() if (home / "pgbouncer.log").exists() else ""
                    pytest.fail(f"PgBouncer did not start: {proc.stderr.read().decode() if proc.stderr else ''} {log}")
                time.sleep(0.1)
        yield {"bounced": bounced, "direct": direct, "bounced2": bounced2, "direct2": direct2, "version": version}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(home, ignore_errors=True)
        for r in roles:
            next(r, None)


def _worker(bounced: str, direct: str, listen: bool, holding: Any, peak: Any, errors: Any, done: Any) -> None:
    rng = random.Random()
    client = pgslots.Client(bounced, listen_dsn=direct if listen else None, listen=listen)
    try:
        for _ in range(CYCLES):
            try:
                with concurrency("bounce", timeout_seconds=60, lease_duration=60, client=client):
                    with holding.get_lock():
                        holding.value += 1
                        peak.value = max(peak.value, holding.value)
                    time.sleep(rng.uniform(0, 0.01))
                    with holding.get_lock():
                        holding.value -= 1
            except Exception as exc:  # counted, and the process carries on: the test shows them all
                with errors.get_lock():
                    errors.value += 1
                print(f"worker error: {type(exc).__name__}: {exc}", flush=True)
            with done.get_lock():
                done.value += 1
    finally:
        client.close()


@pytest.mark.parametrize("listen", [True, False], ids=["listen_dsn", "polling"])
def test_processes_through_pgbouncer_in_transaction_mode(fresh_dsn: str, bouncer: dict[str, str], listen: bool) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as owner:
        create(owner, "bounce", LIMIT)
    ctx = mp.get_context("fork")
    holding, peak, errors, done = (ctx.Value("i", 0) for _ in range(4))
    # Half the processes log in as one role, half as the other.
    procs = [
        ctx.Process(target=_worker, args=(bouncer[f"bounced{suffix}"], bouncer[f"direct{suffix}"], listen, holding, peak, errors, done))
        for suffix in ("", "2")
        for _ in range(PROCESSES // 2)
    ]
    started = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    elapsed = time.monotonic() - started
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * PROCESSES, f"{bouncer['version']}: workers did not finish"
    assert errors.value == 0, f"{errors.value} errors through {bouncer['version']} (see the captured output)"
    assert done.value == PROCESSES * CYCLES
    assert peak.value <= LIMIT
    assert elapsed < 60, f"{PROCESSES * CYCLES} cycles took {elapsed:.0f} s"
    with psycopg.connect(fresh_dsn, autocommit=True) as owner:
        check(owner)
        assert status(owner, "bounce")["leases"] == 0  # nothing leaked


def test_a_pooler_in_between_turns_prepared_statements_off(bouncer: dict[str, str]) -> None:
    """The client sees the server's own port differ from the one it connected to, and sends every
    statement unprepared (no server connection behind the bouncer has one of pgslots' prepared
    statements); straight to the server it prepares them."""
    for dsn, expected in ((bouncer["bounced"], None), (bouncer["direct"], 5)):
        client = pgslots.Client(dsn)
        try:
            for _ in range(8):
                with concurrency("anything", client=client):
                    pass
            conn = client._connections._keeper.kept  # the connection that ran them, kept for the next statement
            assert conn is not None and conn.prepare_threshold == expected
            prepared = conn.execute("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgslots\\_%'").fetchone()
            assert prepared is not None and (prepared[0] > 0) == (expected is not None)
        finally:
            client.close()
