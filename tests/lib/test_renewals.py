"""The renewal schedule of a process's held leases (no database: the schedule alone)."""

from __future__ import annotations

import time
import uuid

from pgslots._renewals import HeldLeases
from pgslots.types import Lease


def _lease(seconds: float = 300.0) -> Lease:
    return Lease(uuid.uuid4(), 1, None, ("a",), 1, seconds)


def test_dropped_leases_leave_the_schedule_long_before_they_would_be_due() -> None:
    # A lease of 300 s is due for renewal 225 s after its grant. A process holding 10,000 short
    # bodies one after another must not keep 10,000 dropped entries until then.
    held = HeldLeases()
    kept = _lease()
    held.hold(kept, lambda _: None)
    for _ in range(10_000):
        lease = _lease()
        held.hold(lease, lambda _: None)
        assert lease.lease_id is not None
        held.drop(lease.lease_id)
    assert len(held._due) <= 2 * len(held.by_lease) + 65
    assert list(held.by_lease) == [kept.lease_id]
    # What is left is the lease still held, and it is still renewed when due.
    assert held.next_due() is not None
    assert [h.lease_id for h in held.snapshot()] == [kept.lease_id]


def test_leases_due_together_are_renewed_in_one_batch_and_rescheduled() -> None:
    held = HeldLeases()
    short = [_lease(0.04) for _ in range(3)]
    for lease in short:
        held.hold(lease, lambda _: None)
    dropped = short[1].lease_id
    assert dropped is not None
    held.drop(dropped)
    time.sleep(0.05)
    batch = held.take_due()
    assert sorted(str(h.lease_id) for h in batch) == sorted(str(lease.lease_id) for lease in short if lease.lease_id != dropped)
    held.renewed(batch, set(), None)
    due = held.next_due()
    assert due is not None and due > time.monotonic()
