-- 0013_pause: a limit (or one key of a template) can be closed until a time.
--
-- Why: when the upstream answers 429 with Retry-After, every process sharing the limit should stop
-- until then, not find out by failing one by one. paused_until closes the limit: nothing is
-- granted on it before then, refused callers are told the time left, queued waiters keep their
-- places. pause_reason says why (shown to operators). Any pgslots_user may pause, for at most
-- max_pause_seconds at a time.

ALTER TABLE pgslots.limits
    ADD COLUMN paused_until timestamptz,
    ADD COLUMN pause_reason text;

ALTER TABLE pgslots.settings
    ADD COLUMN max_pause_seconds double precision NOT NULL DEFAULT 300,
    ADD CONSTRAINT settings_max_pause CHECK (max_pause_seconds > 0 AND max_pause_seconds < 'Infinity');
