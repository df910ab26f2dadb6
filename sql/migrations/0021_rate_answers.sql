-- 0021_rate_answers: declared types for what rate_limit and reserve answer.
--
-- Why: as for acquire (migration 0020), PostgreSQL describes the row of a function with OUT
-- parameters from its catalog row at every call; a declared type's description comes from a cache.
-- rate_limit answers pgslots.rated and reserve pgslots.reserved, the same columns of the same types
-- as before, so callers see no difference. _rate, the decision both share, answers
-- pgslots.reserved too, so rate_limit takes it in an assignment instead of a statement.
--  * granted, retry_after, missing, blocked_by, waiter: as in pgslots.decision
--  * reservation_id: the reservation to settle (reserve only; NULL when nothing was reserved)

CREATE TYPE pgslots.rated AS (
    granted boolean,
    retry_after float8,
    missing text[],
    blocked_by text[],
    waiter bigint
);

CREATE TYPE pgslots.reserved AS (
    granted boolean,
    retry_after float8,
    missing text[],
    blocked_by text[],
    waiter bigint,
    reservation_id uuid
);
