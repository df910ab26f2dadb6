"""Renewals: the leases a process holds, each renewed at 0.75 x its term, all that are due in one
call (``pgslots.renew_leases``), as the keep-alive names them all in one call too."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from . import _queries as q
from ._flow import BACKGROUND_WAIT_SECONDS
from ._translate import translate
from .errors import LeaseLostError
from .types import Lease

RENEW_TRIES = 3
RENEW_BACKOFF = (0.25, 1.0)  # between the tries of one renewal call
RENEW_AHEAD_SECONDS = 1.0  # leases due this soon are renewed with those due now: one call for all
RETRY_SECONDS = 1.0  # the database is away but a lease is still good: try again this soon


@dataclass
class Held:
    """One held lease and its renewal schedule (monotonic times)."""

    due: float
    lease_id: uuid.UUID
    lease_seconds: float
    on_lost: Callable[[BaseException], None]
    valid_until: float = 0.0
    cancelled: bool = False
    liveness: float | None = None  # see Lease.liveness_seconds
    held_at: float = 0.0  # just after the grant


class HeldLeases:
    """The leases of one process, kept alive until dropped; shared by renewals and liveness."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # A heap of (due, sequence, lease), soonest first: tuples compare faster than dataclasses,
        # and the sequence number keeps two leases due at once from being compared.
        self._due: list[tuple[float, int, Held]] = []
        self.by_lease: dict[uuid.UUID, Held] = {}
        self._seq = itertools.count()

    def _push(self, held: Held) -> None:
        heapq.heappush(self._due, (held.due, next(self._seq), held))

    def hold(self, lease: Lease, on_lost: Callable[[BaseException], None]) -> None:
        """A lease handed over by a release first runs for less than lease_seconds (its first_term);
        renewals then extend it to lease_seconds."""
        assert lease.lease_id is not None
        now = time.monotonic()
        term = lease.lease_seconds if lease.first_term is None else min(lease.first_term, lease.lease_seconds)
        held = Held(
            now + 0.75 * term,
            lease.lease_id,
            lease.lease_seconds,
            on_lost,
            now + term,
            liveness=lease.liveness_seconds,
            held_at=now,
        )
        with self._lock:
            self._push(held)
            self.by_lease[lease.lease_id] = held

    def drop(self, lease_id: uuid.UUID) -> None:
        with self._lock:
            held = self.by_lease.pop(lease_id, None)
            if held is not None:
                held.cancelled = True
            # A dropped lease stays in the heap until it is due (0.75 x its term, minutes away):
            # once most entries are dropped ones, the heap is rebuilt without them, so a process
            # that holds thousands of short bodies a second keeps neither their memory nor a
            # deeper heap to push into.
            if len(self._due) > 2 * len(self.by_lease) + 64:
                self._due = [entry for entry in self._due if not entry[2].cancelled]
                heapq.heapify(self._due)

    def lose(self, lease_id: uuid.UUID, error: BaseException) -> None:
        """The lease is gone: stop renewing it and tell its holder."""
        with self._lock:
            held = self.by_lease.pop(lease_id, None)
            if held is None or held.cancelled:
                return
            held.cancelled = True
        held.on_lost(error)

    def snapshot(self) -> list[Held]:
        with self._lock:
            return list(self.by_lease.values())

    def next_due(self) -> float | None:
        with self._lock:
            return self._due[0][0] if self._due else None

    def take_due(self) -> list[Held]:
        """Every lease due now, and those due within RENEW_AHEAD_SECONDS: renewed in one call."""
        horizon = time.monotonic() + RENEW_AHEAD_SECONDS
        batch: list[Held] = []
        with self._lock:
            if not self._due or self._due[0][0] > time.monotonic():
                return batch
            while self._due and self._due[0][0] <= horizon:
                held = heapq.heappop(self._due)[2]
                if not held.cancelled:
                    batch.append(held)
        return batch

    def renewed(self, batch: list[Held], lost: set[uuid.UUID], failure: BaseException | None) -> None:
        """After a renewal call: the renewed are due again at 0.75 x their term; the lost, and those
        the database stayed away too long for, are given up."""
        now = time.monotonic()
        gone: list[tuple[Held, BaseException]] = []
        with self._lock:
            for held in batch:
                if held.cancelled:
                    continue
                if failure is None and held.lease_id not in lost:
                    held.valid_until = now + held.lease_seconds
                    held.due = now + 0.75 * held.lease_seconds
                elif failure is not None and not isinstance(failure, LeaseLostError) and now + RETRY_SECONDS < held.valid_until:
                    held.due = now + RETRY_SECONDS  # the database is away, but the lease is still good for a while
                else:
                    self.by_lease.pop(held.lease_id, None)
                    gone.append((held, failure or _lost(held.lease_id)))
                    continue
                self._push(held)
        for held, error in gone:
            held.on_lost(error)


def _lost(lease_id: uuid.UUID) -> LeaseLostError:
    return LeaseLostError(f"Lease {lease_id} was lost: it expired or was released, so its slots may be held by others now.")


def renew(connect: Callable[[], psycopg.Connection[Any]], batch: list[Held]) -> tuple[set[uuid.UUID], BaseException | None]:
    """Renews a batch in one call, up to RENEW_TRIES times: (the leases the database no longer
    has, None), or (nothing, the last error). ``connect`` gives the worker's connection, reconnecting
    if it was lost."""
    error: BaseException | None = None
    params = {
        "lease_ids": [held.lease_id for held in batch],
        "lease_seconds": [held.lease_seconds for held in batch],
        "wait_seconds": BACKGROUND_WAIT_SECONDS,
    }
    for attempt in range(RENEW_TRIES):
        if attempt:
            time.sleep(RENEW_BACKOFF[min(attempt - 1, len(RENEW_BACKOFF) - 1)])
        try:
            row = connect().execute(q.RENEW_LEASES, params).fetchone()
            return set(row[0] or ()) if row else set(), None
        except psycopg.Error as exc:
            error = translate(exc) or exc
            if not isinstance(exc, psycopg.OperationalError):
                return set(), error  # the database refused the call: retrying cannot change that
    return set(), error
