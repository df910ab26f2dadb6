-- 0010_bounds: what one hostile plain role can do is bounded.
--
-- Why:
--  * A refund gives back only slots that have not decayed yet: each reservation remembers, per
--    limit it counted on, the slots it still holds in that limit's bucket (held, at held_at). They
--    decay at the limit's rate like the bucket itself, so a refund settled late gives back little
--    or nothing, never slots that already left the bucket.
--  * Reservations, sessions and template keys are capped per role or per template, and reaped by
--    the calls that need the room. Reservations are counted per role in role_reservations, spread
--    over 16 rows per role (by the reserving backend) so that a role's reserves do not queue on
--    one counter row.
--  * max_priority caps the priority a caller may use (default 10), and waiters age one level every
--    2 s (was 60 s): a priority-0 waiter is overtaken only by higher-priority waiters that arrive
--    within max_priority x priority_aging_seconds (20 s) after it.
--  * A session's liveness is its connection holding an advisory lock (see keep_alive), not its
--    backend PID, which another connection may get after the holder died.

ALTER TABLE pgslots.settings
    ADD COLUMN max_priority integer NOT NULL DEFAULT 10,
    ADD COLUMN max_sessions_per_role integer NOT NULL DEFAULT 1000,
    ADD COLUMN max_reservations_per_role integer NOT NULL DEFAULT 100000,
    ADD COLUMN max_keys_per_template integer NOT NULL DEFAULT 10000,
    ADD CONSTRAINT settings_max_priority CHECK (max_priority >= 0 AND max_priority <= 100),
    ADD CONSTRAINT settings_max_sessions CHECK (max_sessions_per_role >= 1),
    ADD CONSTRAINT settings_max_reservations CHECK (max_reservations_per_role >= 1),
    ADD CONSTRAINT settings_max_keys CHECK (max_keys_per_template >= 1),
    ALTER COLUMN priority_aging_seconds SET DEFAULT 2;
-- Databases still on the old default move to the new one; a value an operator chose stays.
UPDATE pgslots.settings SET priority_aging_seconds = 2 WHERE priority_aging_seconds = 60;
COMMENT ON COLUMN pgslots.settings.max_priority IS
    'The highest priority a caller may ask for (priorities are -100..max_priority).';
COMMENT ON COLUMN pgslots.settings.max_sessions_per_role IS
    'Sessions (keep_alive) one login role may have at once; sessions gone quiet are reaped to make room.';
COMMENT ON COLUMN pgslots.settings.max_reservations_per_role IS
    'Reservations one login role may have open; a new one beyond it makes the role''s oldest unsettleable.';
COMMENT ON COLUMN pgslots.settings.max_keys_per_template IS
    'Live keys a template may have (a template''s own max_keys, when set, wins).';

ALTER TABLE pgslots.limits ADD COLUMN max_keys integer CHECK (max_keys >= 1);
COMMENT ON COLUMN pgslots.limits.max_keys IS
    'For a template: how many live keys it may have (NULL: settings.max_keys_per_template).';
-- Idle keys are picked from a random point of this order (see _drop_idle): never a scan of them all.
CREATE INDEX limits_instances_by_id ON pgslots.limits (template_id, id) WHERE template_id IS NOT NULL;

ALTER TABLE pgslots.reservations
    ADD COLUMN held float8[],
    ADD COLUMN held_at timestamptz,
    ADD COLUMN shard smallint NOT NULL DEFAULT 0;
COMMENT ON COLUMN pgslots.reservations.held IS
    'Per limit of limit_ids (decay limits): the slots of this reservation still in its bucket at held_at.';
-- Open reservations keep what they reserved, as if reserved when they were.
UPDATE pgslots.reservations SET held = array_fill(slots, ARRAY[cardinality(limit_ids)]), held_at = reserved_at;

CREATE TABLE pgslots.role_reservations (
    owner name NOT NULL,
    shard smallint NOT NULL,
    open bigint NOT NULL,
    PRIMARY KEY (owner, shard)
);
COMMENT ON TABLE pgslots.role_reservations IS
    'Open reservations per login role, in 16 shards (by the backend that reserved: one transaction '
    'only ever counts in one shard, so two never wait for each other''s counter rows).';
INSERT INTO pgslots.role_reservations (owner, shard, open)
SELECT r.owner, 0, count(*) FROM pgslots.reservations r GROUP BY 1;
CREATE INDEX reservations_owner ON pgslots.reservations (owner, shard, reserved_at);

CREATE INDEX sessions_owner ON pgslots.sessions (owner, seen_at);
