"""The invariant checker any test can call: for every limit, the counted leased slots equal the
sum of its lease rows, and the slots occupied now (leases plus decayed rate-limit slots) never
exceed the limit."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.rows import dict_row

QUERY = """
SELECT l.name, l."limit", l.active, l.leased_slots,
       coalesce((SELECT sum(x.slots) FROM pgslots.leases x WHERE x.limit_id = l.id), 0) AS lease_sum,
       s.active_slots
FROM pgslots.limits l JOIN pgslots.status s ON s.id = l.id
"""


def problems(conn: psycopg.Connection[Any], lowered: tuple[str, ...] = ()) -> list[str]:
    """Everything wrong now; `lowered` names limits whose limit was cut below their holders on purpose."""
    found = []
    with conn.cursor(row_factory=dict_row) as cur:
        for row in cur.execute(QUERY).fetchall():
            if row["leased_slots"] != row["lease_sum"]:
                found.append(f"{row['name']}: counts {row['leased_slots']} leased slots, lease rows hold {row['lease_sum']}")
            if row["active_slots"] > row["limit"] + 1e-9 and row["name"] not in lowered:
                found.append(f"{row['name']}: {row['active_slots']} slots occupied on a limit of {row['limit']}")
            if row["leased_slots"] < 0 or row["active_slots"] < -1e-9:
                found.append(f"{row['name']}: negative count")
    return found


def check(dsn_or_conn: str | psycopg.Connection[Any], lowered: tuple[str, ...] = ()) -> None:
    if isinstance(dsn_or_conn, str):
        with psycopg.connect(dsn_or_conn, autocommit=True) as conn:
            found = problems(conn, lowered)
    else:
        found = problems(dsn_or_conn, lowered)
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
