-- 0003_handoff: what a release needs to hand the slots it frees straight to the head of the queue.
--
-- Why: before, a release only notified the waiters the freed slots could serve, and each of them
-- then called acquire to take them: a second pass through the limit's row lock per hand-off, and a
-- gap in which the slot stood idle. A waiter that names its lease up front now leaves in its queue
-- row what that lease needs (its id, length and holder), so a release can write it. Refusals that
-- queue are counted in their own table, so counting them needs no lock on the limit's row.

ALTER TABLE pgslots.waiters
    ADD COLUMN parts smallint NOT NULL DEFAULT 1,
    ADD COLUMN lease_id uuid,
    ADD COLUMN lease_seconds float8,
    ADD COLUMN host text,
    ADD COLUMN pid integer,
    ADD COLUMN application_name text,
    ADD COLUMN holder jsonb;
CREATE INDEX waiters_lease ON pgslots.waiters (lease_id) WHERE lease_id IS NOT NULL;
COMMENT ON COLUMN pgslots.waiters.lease_id IS
    'The lease the waiter named (acquire''s new_lease_id): release may grant it directly.';

CREATE TABLE pgslots.refusals (
    limit_id uuid PRIMARY KEY,
    denied_slots bigint NOT NULL
);
