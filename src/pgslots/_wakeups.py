"""Wake-ups: the notifications a process's waiters get, and the heartbeat that stands in for lost ones.

Each process listens on its own channel, ``pgslots:<session>``. A notification's payload is one
JSON object (see sql/functions/40_queue.sql, where the database sends them):

* ``{"wake": [12, 13]}``: tickets 12 and 13 should ask again, the freed slots may fit them now;
* ``{"grant": {"ticket": 13, "lease_id": "<uuid>", "fencing_token": 77, "expires_epoch":
  1700000000.5, "term_seconds": 6.0}}``: a release granted ticket 13 the lease it named.

Anyone may notify any channel, so a grant counts only for the waiter that named that lease id
(see ``Attempts.handed``); anything unreadable is ignored, and the heartbeat (once a second for all
of a process's waiters) tells the waiters whose tickets left the queue to ask again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ._flow import Grant

logger = logging.getLogger("pgslots")

HEARTBEAT_SECONDS = 1.0  # well inside the queue's waiter_ttl_seconds (3 s by default)
RECENT_SECONDS = 5.0  # a ticket notified before its waiter registered is remembered this long

Waker = Callable[[Grant | None], None]


def parse_notification(payload: str) -> list[tuple[int, Grant | None]]:
    """The tickets a payload wakes, each with the Grant it was handed, if any."""
    try:
        note = json.loads(payload)
    except ValueError:
        note = None
    if not isinstance(note, dict):
        logger.debug("pgslots: ignoring a notification it cannot read: %.200r", payload)
        return []
    woken: list[tuple[int, Grant | None]] = []
    for ticket in note.get("wake") or ():
        if isinstance(ticket, int) and not isinstance(ticket, bool):
            woken.append((ticket, None))
    grant = note.get("grant")
    if isinstance(grant, dict):
        try:
            expires = datetime.fromtimestamp(float(grant["expires_epoch"]), UTC)
            handed = Grant(uuid.UUID(str(grant["lease_id"])), int(grant["fencing_token"]), expires, float(grant["term_seconds"]))
            woken.append((int(grant["ticket"]), handed))
        except (KeyError, TypeError, ValueError, OverflowError):
            logger.debug("pgslots: ignoring a grant it cannot read: %.200r", grant)
    return woken


class WakeUps:
    """The waiters of one process, by ticket: who to wake when a notification names them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wakers: dict[int, Waker] = {}
        # Tickets notified before their waiter registered: when, and the lease if one was handed over.
        self._recent: dict[int, tuple[float, Grant | None]] = {}
        self._next_heartbeat = 0.0

    def register(self, ticket: int, wake: Waker) -> None:
        """Calls wake (from the worker) when the ticket is notified, with the lease if it was handed one."""
        with self._lock:
            self._wakers[ticket] = wake
            notified = self._recent.pop(ticket, None)
        if notified is not None:
            wake(notified[1])

    def unregister(self, ticket: int) -> None:
        with self._lock:
            self._wakers.pop(ticket, None)

    def waiting(self) -> bool:
        """Whether any waiter of this process is registered."""
        return bool(self._wakers)

    def deliver(self, woken: list[tuple[int, Grant | None]]) -> None:
        now = time.monotonic()
        with self._lock:
            calls = []
            for ticket, grant in woken:
                wake = self._wakers.get(ticket)
                if wake is None:
                    self._recent[ticket] = (now, grant)
                else:
                    calls.append((wake, grant))
            if len(self._recent) > 1000:
                self._recent = {t: seen for t, seen in self._recent.items() if now - seen[0] < RECENT_SECONDS}
        for wake, grant in calls:
            wake(grant)

    def wake_all(self) -> None:
        """Every waiter asks again (notifications may have been lost while the listener was away)."""
        with self._lock:
            wakers = list(self._wakers.values())
        for wake in wakers:
            wake(None)

    def heartbeat_due(self, jitter: float) -> list[int]:
        """The tickets to heartbeat now (none when it is not time yet, or nobody waits)."""
        now = time.monotonic()
        if now < self._next_heartbeat:
            return []
        with self._lock:
            # Taken before the call: each of these tickets was queued (committed) before it registered.
            tickets = list(self._wakers)
        if tickets:
            self._next_heartbeat = now + HEARTBEAT_SECONDS * jitter
        return tickets

    def heard(self, again: Any) -> None:
        """The heartbeat's answer: tickets that left the queue (handed a lease, or expired) ask again."""
        self.deliver([(ticket, None) for ticket in again or ()])
