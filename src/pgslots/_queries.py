"""Every statement pgslots sends, each a one-line call of a ``pgslots.*`` function.

Keeping them together lets a reader see all of the library's database traffic in one file.
"""

from __future__ import annotations

from typing import LiteralString

# wait_seconds: how long each call may wait for a lock another session holds (None: no bound).
# holder: JSON text (the flows write it once per request).
ACQUIRE: LiteralString = (
    "SELECT * FROM pgslots.acquire(%(names)s, %(slots)s, %(lease_seconds)s, %(holder)s::jsonb, %(strict)s, %(ticket)s,"
    " %(queue_client)s, %(new_lease_id)s, %(wait_seconds)s, %(session)s, %(priority)s, %(fairness_key)s)"
)
# The async face's batches: many acquires (a JSON array of acquire's arguments by name), or releases, in one call.
ACQUIRE_EACH: LiteralString = "SELECT * FROM pgslots.acquire_each(%(requests)s::jsonb, %(wait_seconds)s)"
RELEASE_EACH: LiteralString = "SELECT * FROM pgslots.release_each(%(lease_ids)s, %(wait_seconds)s)"
RATE_LIMIT: LiteralString = (
    "SELECT * FROM pgslots.rate_limit(%(names)s, %(slots)s, %(strict)s, %(ticket)s, %(queue_client)s, %(wait_seconds)s,"
    " %(priority)s, %(fairness_key)s)"
)
RESERVE: LiteralString = (
    "SELECT * FROM pgslots.reserve(%(names)s, %(slots)s, %(strict)s, %(ticket)s, %(queue_client)s, %(wait_seconds)s,"
    " %(priority)s, %(fairness_key)s)"
)
SETTLE: LiteralString = "SELECT pgslots.settle(%(reservation_id)s, %(actual)s, %(wait_seconds)s) AS changed"
RELEASE: LiteralString = "SELECT pgslots.release(%(lease_id)s, true, %(wait_seconds)s)"
# A release in its own transaction need not wait for the WAL flush: see pgslots.release.
RELEASE_FAST: LiteralString = "SELECT pgslots.release(%(lease_id)s, false, %(wait_seconds)s)"
# The engine: every lease due for renewal in one call; returns those lost.
RENEW_LEASES: LiteralString = "SELECT pgslots.renew_leases(%(lease_ids)s, %(lease_seconds)s, %(wait_seconds)s)"
# The engine, about twice a second while it holds leases: keeps its session alive, names lost leases.
KEEP_ALIVE: LiteralString = "SELECT * FROM pgslots.keep_alive(%(session)s, %(leases)s, %(bind)s)"
HEARTBEAT: LiteralString = "SELECT pgslots.heartbeat(%(queue_client)s, %(tickets)s)"
LEAVE_QUEUE: LiteralString = "SELECT pgslots.leave_queue(%(ticket)s, %(queue_client)s, %(wait_seconds)s)"
SWEEP: LiteralString = "SELECT pgslots.sweep()"
CREATE_LIMIT: LiteralString = (
    "SELECT pgslots.create_limit(%(name)s, %(limit)s, %(slot_decay_per_second)s, %(active)s, %(active_slots)s,"
    " %(window_seconds)s, %(shadow)s, %(max_keys)s, %(margin_seconds)s)"
)
UPDATE_LIMIT: LiteralString = (
    "SELECT pgslots.update_limit(%(name)s, %(limit)s, %(slot_decay_per_second)s, %(active)s, %(active_slots)s, %(new_name)s,"
    " %(window_seconds)s, %(shadow)s, %(max_keys)s, %(margin_seconds)s)"
)
DELETE_LIMIT: LiteralString = "SELECT pgslots.delete_limit(%(name)s)"
PAUSE: LiteralString = "SELECT pgslots.pause(%(name)s, %(seconds)s, %(reason)s) AS until"
RESUME: LiteralString = "SELECT pgslots.resume(%(name)s) AS resumed"
CLEAR_DEBT: LiteralString = "SELECT pgslots.clear_debt(%(name)s) AS cleared"
GET_LIMITS: LiteralString = "SELECT * FROM pgslots.get_limits(%(names)s, %(with_instances)s)"
GET_INSTANCES: LiteralString = "SELECT * FROM pgslots.get_instances(%(template)s, %(busiest)s)"
# apply: serializes appliers for the rest of the transaction.
LOCK_FOR_APPLY: LiteralString = "SELECT pgslots.lock_for_apply()"
LIST_LEASES: LiteralString = "SELECT * FROM pgslots.list_leases(%(name)s)"
GET_OVERVIEW: LiteralString = "SELECT * FROM pgslots.get_overview(%(names)s, %(busiest)s)"
LIST_HOLDERS: LiteralString = "SELECT * FROM pgslots.list_holders(%(names)s, %(per_limit)s)"
SCHEMA_VERSION: LiteralString = "SELECT pgslots.schema_version()"
# The first call of a client: the schema's version, and the port the server itself listens on (a
# different port from the one connected to means a pooler such as PgBouncer sits in between).
PROBE: LiteralString = "SELECT pgslots.schema_version(), current_setting('port')::integer"
# Each client listens on its own channel, named after its queue_client id (see migration 0003).
LISTEN: LiteralString = "LISTEN {}"
UNLISTEN: LiteralString = "UNLISTEN *"
# Only for acquires inside the caller's transaction: undo a refused attempt, keep a granted one.
SAVEPOINT: LiteralString = "SAVEPOINT pgslots_acquire"
ROLLBACK_TO_SAVEPOINT: LiteralString = "ROLLBACK TO SAVEPOINT pgslots_acquire"
RELEASE_SAVEPOINT: LiteralString = "RELEASE SAVEPOINT pgslots_acquire"
