"""The server's instructions per call of the hot path's SQL, counted, not timed.

Timings on a shared machine move by more than a change of a few percent in the server's work; the
number of instructions a backend executes for the same calls on the same data does not (the same
version counts the same within 0.5%). This script makes a throwaway cluster, migrates a database
with the pgslots found on the import path, and defines loop procedures in schema public that call
the SQL functions N times, each call in a transaction of its own. It then runs each loop in a
single-user server (`postgres --single`) under valgrind's callgrind, counting only the CALL, twice
(300 and 600 calls): the difference over 300 is one call's steady-state count, without the first
calls' planning and caching.

    python benchmarks/instructions.py                      # this checkout's SQL
    PYTHONPATH=/path/to/other/src python benchmarks/instructions.py   # another version's

Needs valgrind (`apt-get install valgrind`) and the PostgreSQL server binaries. About a minute.
Prints one line per loop: the instructions of one call (an acquire + release cycle counts as one).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

import pgslots
from pgslots._cluster import LocalCluster, find_bindir, server_user

LOOPS = {
    # An uncontended cycle as the benchmarks' SQL-alone row sends it (release without the WAL flush).
    "acquire_release": """
        SELECT x.lease_id INTO l FROM pgslots.acquire('{solo}', 1, 300, '{"host": "bench", "pid": 1}', false, NULL, NULL,
                                                    gen_random_uuid()) x;
        COMMIT;
        PERFORM pgslots.release(l, false);
        COMMIT;""",
    "rate_limit": """
        PERFORM pgslots.rate_limit('{bucket}');
        COMMIT;""",
    "reserve": """
        PERFORM pgslots.reserve('{bucket}');
        COMMIT;""",
}


def _define(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pgslots.create_limit('solo', 1000000)")
        conn.execute("SELECT pgslots.create_limit('bucket', 1000000, slot_decay_per_second => 100000)")
        for name, body in LOOPS.items():
            conn.execute(
                f"CREATE PROCEDURE public.loop_{name}(n integer) LANGUAGE plpgsql AS $p$\n"
                f"DECLARE l uuid;\nBEGIN\n    FOR i IN 1..n LOOP{body}\n    END LOOP;\nEND\n$p$"
            )
        conn.execute("VACUUM")


def _count(bindir: Path, cluster: LocalCluster, workdir: Path, name: str, calls: int) -> int:
    out = workdir / f"callgrind.{name}.{calls}"
    args = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        "--toggle-collect=ExecuteCallStmt",
        str(bindir / "postgres"),
        "--single",
        "-D",
        str(cluster.datadir),
        "-c",
        "synchronous_commit=off",
        "-c",
        "fsync=off",
        "bench",
    ]
    done = subprocess.run(
        args, input=f"CALL public.loop_{name}({calls});\n", user=cluster.user, capture_output=True, text=True, timeout=900
    )
    found = re.search(r"^summary: (\d+)", out.read_text() if out.exists() else "", re.MULTILINE)
    if done.returncode != 0 or not found:
        sys.exit(f"callgrind of loop_{name} failed: {done.stderr.strip()[-2000:]}")
    return int(found[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated loops: " + ", ".join(LOOPS))
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(LOOPS)
    unknown = [n for n in names if n not in LOOPS]
    if unknown:
        sys.exit(f"Unknown loop(s): {', '.join(unknown)}. Choose from: {', '.join(LOOPS)}.")
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed: install it (apt-get install valgrind) and run this again.")
    bindir = find_bindir()
    if bindir is None:
        sys.exit("No PostgreSQL server binaries found: install them.")
    root = Path(tempfile.mkdtemp(prefix="pgslots-instructions-"))
    cluster = LocalCluster(root=root, bindir=bindir, user=server_user())
    try:
        cluster.init(durable=False)
        cluster.start()
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE bench")
        pgslots.migrate(cluster.dsn("bench"))
        _define(cluster.dsn("bench"))
        cluster.stop()
        print(f"pgslots from {Path(pgslots.__file__).parent}; instructions per call (callgrind, steady state)")
        for name in names:
            few, more = (_count(bindir, cluster, root, name, n) for n in (300, 600))
            print(f"{name:16s} {(more - few) / 300:12,.0f}", flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
