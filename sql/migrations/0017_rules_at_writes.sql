-- 0017_rules_at_writes: the rules of a limit's row are checked when its settings are written, not
-- on every statement that counts slots; a lease's rows have one unique index, not two.
--
-- Why: PostgreSQL rebuilds the expression of every CHECK constraint of a table for each statement
-- that writes it, whichever columns the statement changes. The limits table had nine, and an
-- acquire and a release each write a limit's counters: measured on PostgreSQL 15, the constraints
-- of limits and leases cost about 45 microseconds of each acquire and of each release, more than
-- the decision itself. A limit's rules (its name, size, decay, window, margin, key cap, template
-- link and counters) are now checked by the trigger limits_rules (sql/functions/17_rules.sql),
-- which fires when a row is inserted or one of its settings is updated: never on the counters'
-- UPDATEs of acquire, release and renew. The counters are written only by the decision
-- statements, which keep them in range (a release subtracts with greatest(0, ...), a grant adds
-- slots >= 1). The rows of leases, waiters, window_grants and reservations are each written in one
-- place, whose arguments are checked before it (slots >= 1, a finite actual).

ALTER TABLE pgslots.limits
    DROP CONSTRAINT limits_name_rule,
    DROP CONSTRAINT limits_limit_rule,
    DROP CONSTRAINT limits_decay_rule,
    DROP CONSTRAINT limits_counts_rule,
    DROP CONSTRAINT limits_template_rule,
    DROP CONSTRAINT limits_window_rule,
    DROP CONSTRAINT limits_one_kind_rule,
    DROP CONSTRAINT limits_max_keys_check,
    DROP CONSTRAINT limits_margin;
ALTER TABLE pgslots.leases DROP CONSTRAINT leases_slots_check;
ALTER TABLE pgslots.waiters DROP CONSTRAINT waiters_slots_check;
ALTER TABLE pgslots.window_grants DROP CONSTRAINT window_grants_slots_check;
ALTER TABLE pgslots.reservations DROP CONSTRAINT reservations_slots_check;

-- One unique index on a lease's rows instead of two. A lease has one row per limit it counts on;
-- `part` numbers them from 1. The primary key (id, part) makes a lease id name one lease whatever
-- the callers pass (every lease has a part 1), which took two indexes before: (id, limit_id), and
-- (id) for single-limit leases. Each grant wrote both; lookups by id use the key's first column.
ALTER TABLE pgslots.leases ADD COLUMN part smallint;
UPDATE pgslots.leases x SET part = n.part
FROM (SELECT l.ctid AS row_id, row_number() OVER (PARTITION BY l.id ORDER BY l.limit_id) AS part
      FROM pgslots.leases l) n
WHERE x.ctid = n.row_id;
ALTER TABLE pgslots.leases ALTER COLUMN part SET NOT NULL,
    DROP CONSTRAINT leases_pkey,
    ADD PRIMARY KEY (id, part);
DROP INDEX pgslots.leases_single_limit_id;
COMMENT ON COLUMN pgslots.leases.part IS
    'This row''s number among the rows of its lease, 1 to parts: (id, part) is the primary key.';
