"""Clean-up: calls that must happen even though their caller could not wait for them (a release
after an interrupted body, leaving a queue after a cancelled wait), run in order until the database
answers; one that finds its lock held goes to the back and is tried again a little later."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg

BLOCKED_RETRY_SECONDS = 1.0  # a call that found its lock held is tried again after this


class Cleanup:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[tuple[Any, dict[str, Any]]] = []
        self._not_before = 0.0

    def add(self, query: Any, params: dict[str, Any]) -> None:
        with self._lock:
            self._calls.append((query, params))

    def pending(self) -> int:
        with self._lock:
            return len(self._calls)

    def run(self, conn: psycopg.Connection[Any]) -> None:
        """Runs the pending calls; a connection error leaves the one at hand queued for the next try."""
        if time.monotonic() < self._not_before:
            return
        for _ in range(self.pending()):
            with self._lock:
                if not self._calls:
                    return
                query, params = self._calls[0]
            try:
                conn.execute(query, params)
            except psycopg.errors.LockNotAvailable:
                # Another session holds a lock it needs: behind the rest, back to renewals and
                # heartbeats first, and again a little later.
                with self._lock:
                    self._calls.append(self._calls.pop(0))
                self._not_before = time.monotonic() + BLOCKED_RETRY_SECONDS
                return
            with self._lock:
                self._calls.pop(0)
