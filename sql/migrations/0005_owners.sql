-- 0005_owners: a queue place belongs to the role that took it, and no two single-limit leases
-- share an id.
--
-- Why: a waiter's ticket is a number from a sequence, so a caller who queues once can tell the
-- tickets of its neighbours. Tickets passed back to acquire, heartbeat and leave_queue are now
-- honoured only for the client and the login role they were issued to (`owner`); any other ticket is
-- treated as a new arrival at the back of the queue. Waiters queued before this migration have no
-- owner (they leave the queue within seconds unless their client heartbeats): their client id, a
-- random UUID known to that client alone, is their proof until then.
-- A caller may name its lease (acquire's new_lease_id). Two single-limit leases with one id would
-- make a release of one count for the other; the unique index makes that impossible, whatever the
-- callers pass and however their calls interleave.

ALTER TABLE pgslots.waiters ADD COLUMN owner name;
COMMENT ON COLUMN pgslots.waiters.owner IS
    'The login role (session_user) that queued the waiter: only it can pass the ticket back.';

CREATE UNIQUE INDEX leases_single_limit_id ON pgslots.leases (id) WHERE parts = 1;
