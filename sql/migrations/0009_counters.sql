-- 0009_counters: monotonic counters per limit, for monitoring (Prometheus, the web page).
--
-- Why they live where they do:
--  * grants_total, wait_seconds_total and expired_leases_total are columns of the limit's row: the
--    statements that grant, hand off and reclaim update that row already, under its lock, so
--    counting adds no statement and no lock.
--  * refusals_total is beside denied_slots in pgslots.refusals: a refusal takes no lock on the
--    limit's row (see acquire), and counting it must not either.
--  * When an idle key of a template is removed, its counters are added to its template's row, so
--    a template's totals (its own row plus its keys) never go down.

ALTER TABLE pgslots.limits
    ADD COLUMN grants_total bigint NOT NULL DEFAULT 0,
    ADD COLUMN wait_seconds_total float8 NOT NULL DEFAULT 0,
    ADD COLUMN expired_leases_total bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN pgslots.limits.grants_total IS 'Requests granted (acquires, rate limits, reservations, hand-offs).';
COMMENT ON COLUMN pgslots.limits.wait_seconds_total IS 'Seconds that queued waiters waited before their grant, summed.';
COMMENT ON COLUMN pgslots.limits.expired_leases_total IS 'Leases taken back because they expired or their session died.';

ALTER TABLE pgslots.refusals ADD COLUMN refusals_total bigint NOT NULL DEFAULT 0;
UPDATE pgslots.refusals SET refusals_total = 0;
COMMENT ON COLUMN pgslots.refusals.refusals_total IS 'Requests refused (each refused call once, whatever its slots).';

-- The counters of a template's keys removed as idle: the template's totals include them.
CREATE TABLE pgslots.retired_counters (
    template_id uuid PRIMARY KEY REFERENCES pgslots.limits (id) ON DELETE CASCADE,
    grants_total bigint NOT NULL DEFAULT 0,
    refusals_total bigint NOT NULL DEFAULT 0,
    wait_seconds_total float8 NOT NULL DEFAULT 0,
    expired_leases_total bigint NOT NULL DEFAULT 0,
    shadow_refusals bigint NOT NULL DEFAULT 0
);
COMMENT ON TABLE pgslots.retired_counters IS
    'Counters of keys removed as idle, per template, so that a template''s totals never go down.';
