-- 0014_margins: grants a strict downstream accepts.
--
-- Why: a window or decay limit is exact on the database's clock, but a downstream service that
-- enforces the same rate counts requests as they reach it, a little after each grant (the commit,
-- the network, the caller's own work). Requests granted in order can reach it closer together than
-- they were granted, and a strict downstream then refuses traffic pgslots admitted.
--
-- margin_seconds is the largest delay between a grant and the request's arrival that the limit
-- absorbs. A window limit counts each grant for window_seconds + margin_seconds. A decay limit
-- decides as if each grant started to decay margin_seconds later (its bucket, decayed to now, plus
-- rate x margin; a bucket that has been empty for at least that long decides exactly): the same
-- rate, a burst smaller by rate x margin. 0 keeps the exact behaviour. Existing limits get the
-- default too: a limit that must stay exact is set to 0 with update_limit.

ALTER TABLE pgslots.limits
    ADD COLUMN margin_seconds double precision NOT NULL DEFAULT 0.05,
    ADD CONSTRAINT limits_margin CHECK (margin_seconds >= 0 AND margin_seconds <= 60);
