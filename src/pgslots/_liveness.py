"""Liveness: while a process holds leases, its session tells the database it is alive (one call
for all of them), and the process gives its leases up before the database may take them back when
it has not been heard for a while."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg

from . import _queries as q
from ._renewals import HeldLeases
from .errors import LeaseLostError, LeaseRenewalFailedError

logger = logging.getLogger("pgslots")

# How often the session of a process holding leases says it is alive, and how long before the
# database may take a lease back the process gives it up: at most these, less for a short
# liveness_seconds (a fifth and a third of it).
KEEP_ALIVE_SECONDS = 0.5
SILENCE_MARGIN_SECONDS = 1.0


class Liveness:
    def __init__(self, session: uuid.UUID, held: HeldLeases, bind: bool, release_later: Callable[[uuid.UUID], None]) -> None:
        self.session = session
        self.held = held
        # False when the worker reaches the server through a pooler: its backend says nothing about
        # this process, so the session is judged by time alone.
        self.bind = bind
        self._release_later = release_later
        # When the last keep-alive that the database answered was sent (None: never yet).
        self._sent_ok: float | None = None
        self._next = 0.0

    def seconds_to_next(self) -> float | None:
        """How long until the next keep-alive is due (None: nothing held, none due)."""
        if not self.held.by_lease:
            return None
        return max(0.0, self._next - time.monotonic())

    def keep_alive(self, conn: psycopg.Connection[Any]) -> None:
        """While leases are held, says this process is alive (so its leases live on), and hears which
        of them are gone (reclaimed, released by an operator, or missing on a server that took over):
        those are given up at once, even by short bodies."""
        now = time.monotonic()
        held = self.held.snapshot()
        if not held:
            self._next = 0.0  # the next lease is announced at once
            return
        if now < self._next:
            return
        shortest = min((h.liveness for h in held if h.liveness is not None), default=None)
        self._next = now + (KEEP_ALIVE_SECONDS if shortest is None else min(KEEP_ALIVE_SECONDS, shortest / 5))
        row = conn.execute(q.KEEP_ALIVE, {"session": self.session, "leases": [h.lease_id for h in held], "bind": self.bind}).fetchone()
        assert row is not None
        self._sent_ok = now
        for h in held:
            if h.liveness is not None:
                h.liveness = float(row[0])  # the setting as it is now
        for lease_id in row[1] or ():
            message = f"Lease {lease_id} was lost: the database no longer has it, so its slots may be held by others now."
            self.held.lose(lease_id, LeaseLostError(message))
        for lease_id in row[2] or ():  # e.g. a release lost in a failover: given back now, not at its expiry
            logger.info("pgslots: releasing lease %s, which this process no longer holds.", lease_id)
            self._release_later(lease_id)

    def check_silence(self) -> None:
        """Cut off from the database: before it may take a lease back (liveness_seconds after it last
        heard from this process, or after the grant), give the lease up as lost."""
        now = time.monotonic()
        sent = self._sent_ok or 0.0
        late = [
            (h.lease_id, now - max(sent, h.held_at), h.liveness)
            for h in self.held.snapshot()
            if h.liveness is not None and now - max(sent, h.held_at) >= h.liveness - min(SILENCE_MARGIN_SECONDS, h.liveness / 3)
        ]
        for lease_id, silent, liveness in late:
            error = LeaseRenewalFailedError(
                f"The database has not heard from this process for {silent:.1f} s: after {liveness:g} s (liveness_seconds) "
                "it may give its slots to others, so the lease is treated as lost."
            )
            self.held.lose(lease_id, error)
