-- 0011_decision: one type for what every admission stage answers.
--
-- Why: acquire is a pipeline of stages (the fast grant, the queued refusal, the full decision in
-- _admit), and the first stage that decides answers. Each returns a pgslots.decision, so the stages
-- and the lease writer share one shape instead of nine OUT parameters restated in each.
--  * granted: true (a lease or rate slots), false (refused), NULL (this stage did not decide)
--  * lease_id, fencing_token, expires_at: the lease of a granted acquire
--  * retry_after, blocked_by, waiter: a refusal's hint, the limits that refused, the queue ticket
--  * missing: names with no limit (not strict)
--  * lease_limits: the limits a grant counts on (a lease row for each; the limits a reservation
--    charges)

CREATE TYPE pgslots.decision AS (
    granted boolean,
    lease_id uuid,
    fencing_token bigint,
    expires_at timestamptz,
    retry_after float8,
    missing text[],
    blocked_by text[],
    waiter bigint,
    lease_limits uuid[]
);
