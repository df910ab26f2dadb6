-- 0001_initial: the tables of the slot core.
--
-- Why they are shaped this way:
--  * A limit counts two kinds of occupied slots: `leased_slots`, the exact sum of its lease rows,
--    and `unleased_slots`, slots taken by rate limits (or set by an operator) that decay
--    continuously at `slot_decay_per_second` from `decayed_at`. Decay is computed exactly, never
--    floored, and `decayed_at` moves only when `unleased_slots` is rewritten, so refusals and edits
--    never slow decay down.
--  * A lease is one row per limit it occupies, so a limit's leases are found by index and an
--    expired one is reclaimed under that limit's row lock alone.
--  * Tables never depend on pgslots' functions (no defaults or checks that call them), so the
--    functions can be replaced as a whole (sql/functions/) without touching the data.

CREATE TABLE pgslots.settings (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    min_lease_seconds float8 NOT NULL DEFAULT 60,
    max_lease_seconds float8 NOT NULL DEFAULT 86400,
    waiter_ttl_seconds float8 NOT NULL DEFAULT 3,
    clock_offset interval NOT NULL DEFAULT '0',
    CONSTRAINT settings_lease_bounds CHECK (
        min_lease_seconds > 0 AND max_lease_seconds >= min_lease_seconds
        AND max_lease_seconds < 'Infinity'::float8),
    CONSTRAINT settings_waiter_ttl CHECK (waiter_ttl_seconds > 0 AND waiter_ttl_seconds < 3600)
);
INSERT INTO pgslots.settings DEFAULT VALUES;
COMMENT ON TABLE pgslots.settings IS
    'One row. Lease bounds honoured by acquire and renew; waiter_ttl_seconds: how long a queued '
    'waiter keeps its place without a heartbeat; clock_offset: moves the pgslots clock (tests only).';

CREATE TABLE pgslots.limits (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL UNIQUE,
    "limit" integer NOT NULL,
    active boolean NOT NULL DEFAULT true,
    slot_decay_per_second float8 NOT NULL DEFAULT 0,
    leased_slots integer NOT NULL DEFAULT 0,
    unleased_slots float8 NOT NULL DEFAULT 0,
    decayed_at timestamptz NOT NULL,
    denied_slots bigint NOT NULL DEFAULT 0,
    avg_slot_occupancy_seconds float8 NOT NULL DEFAULT 2,
    created timestamptz NOT NULL,
    updated timestamptz NOT NULL,
    CONSTRAINT limits_name_rule CHECK (
        name <> '' AND name !~ '[/%&><]' AND char_length(name) <= 255),
    CONSTRAINT limits_limit_rule CHECK ("limit" >= 0),
    CONSTRAINT limits_decay_rule CHECK (
        slot_decay_per_second >= 0 AND slot_decay_per_second < 'Infinity'::float8),
    CONSTRAINT limits_counts_rule CHECK (
        leased_slots >= 0 AND unleased_slots >= 0 AND unleased_slots < 'Infinity'::float8)
);

-- One row per (lease, limit it occupies). All rows of a lease share id, expiry and `parts`.
CREATE TABLE pgslots.leases (
    id uuid NOT NULL,
    limit_id uuid NOT NULL,
    slots integer NOT NULL CHECK (slots > 0),
    parts smallint NOT NULL,
    fencing_token bigint NOT NULL,
    acquired_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    host text,
    pid integer,
    application_name text,
    holder jsonb,
    PRIMARY KEY (id, limit_id)
);
CREATE INDEX leases_limit_expiry ON pgslots.leases (limit_id, expires_at);

-- Queued waiters, one row per (waiter, limit). Served in id order per limit.
CREATE TABLE pgslots.waiters (
    id bigint NOT NULL,
    limit_id uuid NOT NULL,
    slots integer NOT NULL CHECK (slots > 0),
    client_id uuid NOT NULL,
    enqueued_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (limit_id, id)
);
CREATE INDEX waiters_client ON pgslots.waiters (client_id);
CREATE INDEX waiters_ticket ON pgslots.waiters (id);

CREATE SEQUENCE pgslots.fencing_tokens AS bigint;
CREATE SEQUENCE pgslots.waiter_tickets AS bigint;
