-- 0020_acquired: one declared type for what acquire answers.
--
-- Why: PostgreSQL describes the row of a function with OUT parameters from the function's own
-- catalog row, at every call and every statement that calls it (it unpacks and decompresses the
-- argument arrays of that row each time); a declared composite type's description comes from a
-- cache. acquire answers the same nine columns with RETURNS pgslots.acquired, so callers see no
-- difference (SELECT * FROM pgslots.acquire(...) names the same columns, of the same types), and an
-- uncontended acquire + release cycle costs the server about 3% fewer instructions (measured in
-- the server alone on PostgreSQL 15).
--  * granted, lease_id, fencing_token, expires_at, retry_after, missing, blocked_by, waiter: as in
--    pgslots.decision
--  * liveness_seconds: the liveness bound of a lease bound to a session (NULL without one)

CREATE TYPE pgslots.acquired AS (
    granted boolean,
    lease_id uuid,
    fencing_token bigint,
    expires_at timestamptz,
    retry_after float8,
    missing text[],
    blocked_by text[],
    waiter bigint,
    liveness_seconds float8
);
