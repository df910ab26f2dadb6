-- 0004_code: functions become code, replaced as a whole whenever they change.
--
-- Why: until now each migration restated the functions it changed, so a function had several
-- bodies in the history and privileges had to be restated with them. From here on the migrator
-- keeps the functions, views and privileges of sql/functions/ and sql/privileges.sql current by
-- checksum (recorded below), in the same transaction as any migration. Refusal pressure, counted in
-- two places so far, is kept in pgslots.refusals alone.

CREATE TABLE pgslots.code (
    file text PRIMARY KEY,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgslots.code IS
    'The checksum of every file of functions and privileges applied: the migrator re-applies them when these differ.';

INSERT INTO pgslots.refusals AS r (limit_id, denied_slots)
SELECT l.id, l.denied_slots FROM pgslots.limits l WHERE l.denied_slots > 0
ON CONFLICT (limit_id) DO UPDATE SET denied_slots = r.denied_slots + excluded.denied_slots;
ALTER TABLE pgslots.limits DROP COLUMN denied_slots;
