"""The invariant checker any test can call: for every limit, the counted leased slots equal the
sum of its lease rows, the slots occupied now (leases plus decayed rate-limit slots, or the slots
granted in a window limit's window) never exceed the limit, and a window limit's count equals the
sum of its grant log. A shadow limit may exceed its limit (it grants everything), as may a limit
that a settled reservation left in debt (named in `owing`). A template's count of its keys (kept
in shards as keys come and go) equals the keys it has."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

QUERY = """
SELECT l.name, l."limit", l.active, l.leased_slots, l.is_template,
       (SELECT count(*) FROM pgslots.limits k WHERE k.template_id = l.id) AS keys,
       (SELECT coalesce(sum(c.keys), 0) FROM pgslots.template_keys c WHERE c.template_id = l.id) AS keys_counted,
       coalesce((SELECT sum(x.slots) FROM pgslots.leases x WHERE x.limit_id = l.id), 0) AS lease_sum,
       s.active_slots, l.shadow, l.window_seconds, l.unleased_slots,
       (SELECT coalesce(sum(g.slots), 0) FROM pgslots.window_grants g WHERE g.limit_id = l.id) AS log_sum
FROM pgslots.limits l JOIN pgslots.status s ON s.id = l.id
"""


def problems(conn: psycopg.Connection[Any], lowered: tuple[str, ...] = (), owing: tuple[str, ...] = ()) -> list[str]:
    """Everything wrong now; `lowered` names limits whose limit was cut below their holders on
    purpose, `owing` limits that settled reservations may have put in debt."""
    found = []
    with conn.cursor(row_factory=dict_row) as cur:
        for row in cur.execute(QUERY).fetchall():
            if row["leased_slots"] != row["lease_sum"]:
                found.append(f"{row['name']}: counts {row['leased_slots']} leased slots, lease rows hold {row['lease_sum']}")
            if row["window_seconds"] > 0 and abs(row["unleased_slots"] - row["log_sum"]) > 1e-6:
                found.append(f"{row['name']}: counts {row['unleased_slots']} window slots, its grant log holds {row['log_sum']}")
            if row["keys"] != row["keys_counted"]:
                found.append(f"{row['name']}: has {row['keys']} keys, counted {row['keys_counted']}")
            if row["is_template"]:
                continue  # its gauges are its keys' summed: each key is checked on its own row
            if row["active_slots"] > row["limit"] + 1e-9 and not row["shadow"] and row["name"] not in lowered + owing:
                found.append(f"{row['name']}: {row['active_slots']} slots occupied on a limit of {row['limit']}")
            if row["leased_slots"] < 0 or row["active_slots"] < -1e-9:
                found.append(f"{row['name']}: negative count")
    return found


def check(dsn_or_conn: str | psycopg.Connection[Any], lowered: tuple[str, ...] = (), owing: tuple[str, ...] = ()) -> None:
    if isinstance(dsn_or_conn, str):
        with psycopg.connect(dsn_or_conn, autocommit=True) as conn:
            found = problems(conn, lowered, owing)
    else:
        found = problems(dsn_or_conn, lowered, owing)
    assert not found, found


class PeakWatcher:
    """Samples a count of running bodies, kept outside the database (shared memory), every 2 ms in a
    thread while the block runs: ``peak`` is the most seen at once, ``over`` the seconds spent above
    ``limit``."""

    def __init__(self, count: Callable[[], int], limit: int) -> None:
        self.count, self.limit = count, limit
        self.peak, self.over = 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            now, seen = time.monotonic(), self.count()
            self.peak = max(self.peak, seen)
            if seen > self.limit:
                self.over += now - last
            last = now
            time.sleep(0.002)

    def __enter__(self) -> PeakWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def most_at_once(log: Path) -> tuple[int, int]:
    """(bodies, the most that ran at once) from a log of bodies, one "start end" line each (wall
    clock seconds), written by the processes of a test as their bodies end."""
    spans = [tuple(map(float, line.split())) for line in log.read_text().splitlines()]
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return len(spans), most


def bodies_of_processes(target: Callable[[str, str], None], dsn: str, log: Path, processes: int = 3) -> tuple[int, int]:
    """Runs `target(dsn, log)` in `processes` forked processes, each ending with exit code 0, and
    returns most_at_once of the bodies they logged."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=target, args=(dsn, str(log))) for _ in range(processes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, p.exitcode
    return most_at_once(log)
